"""What decoded face crops keep of the expression and the colour: the visual tokenizer's counterpart
of `vqmae.prosody`.

Face crops are cut around the detected face, so the mouth and the eyes with the brows sit in
roughly fixed parts of every crop. For each region the *expression detail* of a frame is its
deviation from the average region over the frames measured (mouth corners, lip opening, brow
raise and eye opening all move these pixels away from the average face); a tokenizer keeps it when
the decoded crop's deviation matches the original's:

    kept = 1 − ‖dev(decoded) − dev(original)‖² / ‖dev(original)‖²

(1: every deviation kept; 0: as good as decoding the average region; below 0: worse). Colour is
the mean R, G, B of the face's centre per frame, correlated between original and decoded crops
across frames (and so across speakers' skin tones), averaged over the three channels.
"""

from __future__ import annotations

import numpy as np

# (top, bottom, left, right) as fractions of the crop
REGIONS = {"mouth": (0.62, 0.92, 0.25, 0.75), "eyes": (0.22, 0.48, 0.12, 0.88)}
CENTRE = (0.25, 0.85, 0.25, 0.75)


def _cut(frames: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    h, w = frames.shape[1:3]
    t, b, left, r = box
    return frames[:, int(t * h):max(int(t * h) + 1, int(b * h)), int(left * w):max(int(left * w) + 1, int(r * w))]


def expression_agreement(original: np.ndarray, decoded: np.ndarray) -> dict[str, float]:
    """Original and decoded face crops uint8 [N, S, S, 3] → {"mouth_kept", "eyes_kept",
    "colour_corr"} (NaN when fewer than 2 frames or no variation to measure)."""
    if original.shape != decoded.shape or original.ndim != 4 or original.shape[-1] != 3:
        raise ValueError(f"crops must both be [N, S, S, 3], got {original.shape} and {decoded.shape}")
    out: dict[str, float] = {}
    o, d = original.astype(np.float64), decoded.astype(np.float64)
    for name, box in REGIONS.items():
        ro, rd = _cut(o, box).mean(-1), _cut(d, box).mean(-1)  # grey [N, h, w]
        mean = ro.mean(0, keepdims=True)
        dev = ((ro - mean) ** 2).sum()
        out[f"{name}_kept"] = float(1 - (((rd - mean) - (ro - mean)) ** 2).sum() / dev) \
            if len(o) > 1 and dev > 0 else float("nan")
    co, cd = _cut(o, CENTRE).mean((1, 2)), _cut(d, CENTRE).mean((1, 2))  # [N, 3]
    corrs = [np.corrcoef(co[:, c], cd[:, c])[0, 1] for c in range(3)
             if len(o) > 1 and co[:, c].std() > 1e-9 and cd[:, c].std() > 1e-9]
    out["colour_corr"] = float(np.mean(corrs)) if corrs else float("nan")
    return out
