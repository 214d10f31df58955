"""What the pretrained encoder keeps of the emotion its tokens carry: linear probes, speaker-independent.

For one modality of a token store, each clip is turned into a feature vector several ways, each
speaker's mean is subtracted (as fine-tuning does), and a logistic regression is scored over
speaker folds (UAR, mean ± std over folds; the penalty, from the baselines' grid, is chosen on the
training speakers of each fold by an inner speaker split, never on the test speakers):

- ``prosody-id functionals``: with prosody ids in the audio grid, 23 clip statistics of them (pitch
  level, spread, percentiles, slope and jumps over voiced frames; voiced fraction; energy level,
  spread and percentiles; harmonicity and tilt; voiced segments per second and their length) — what
  the tokens hold of the eGeMAPS kind of information;
- ``prosody-id histogram`` and ``code histogram``: the clip's id frequencies (the prosody ids alone;
  every code per grid position, as the bag-of-tokens baseline);
- with ``--mae``: the frozen encoder's features after each layer (layer 0: the patch embeddings),
  mean-pooled over time at each spatial patch position (the fine-tuning default), and the last
  layer's features at the prosody ids' patch row alone.

    python benchmarks/encoder_probe.py runs/speech/data/speech.zarr --mae runs/speech/pretrain/mae.pt

A probe of the encoder far below the probe of the ids it reads means the pretraining did not carry
the information into the features (docs/model-quality.md, "What the encoder keeps of its tokens").
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace

import numpy as np
import torch

from vqmae.config import load_config
from vqmae.models import mae as mae_module
from vqmae.models.classifier import EmotionModel, load_encoder
from vqmae.models.prosody_ids import N_IDS, SIZES, VOCAB
from vqmae.metrics import classification_metrics
from vqmae.stages.finetune.baseline import PENALTIES, fit_logistic, histogram_features, speaker_centered
from vqmae.stages.finetune.data import ClipWindows, load_backbone, pooled_clips
from vqmae.store import TokenStore

def probe(x: np.ndarray, y: np.ndarray, speakers: np.ndarray, folds: list[np.ndarray]) -> tuple[float, float]:
    """Speaker-centred features → UAR mean and std over the speaker folds; the penalty of each fold
    chosen by a leave-one-group-out over its training speakers (in two groups)."""
    x = speaker_centered(x.astype(np.float32), speakers)
    k = int(y.max()) + 1

    def uar(rows: np.ndarray, model) -> float:
        return classification_metrics(y[rows], model(x[rows]), k)["uar"]

    scores = []
    for test in folds:
        te = np.isin(speakers, test)
        train_spk = np.unique(speakers[~te])
        inner = np.array_split(train_spk, 2)
        best, best_p = -1.0, PENALTIES[0]
        for p in PENALTIES:
            s = 0.0
            for val in inner:
                va = np.isin(speakers, val) & ~te
                tr = ~te & ~va
                s += uar(va, fit_logistic(x[tr], y[tr], k, p))
            if s > best:
                best, best_p = s, p
        model = fit_logistic(x[~te], y[~te], k, best_p)
        scores.append(uar(te, model))
    return float(np.mean(scores)), float(np.std(scores, ddof=1))


def prosody_base(store: TokenStore) -> int | None:
    """The id where the prosody ids start in the audio vocabulary, None when the grid has none."""
    spec = store.specs.get("audio")
    if spec is None or spec.codebook_size <= VOCAB or spec.grid[-1] <= N_IDS:
        return None
    base = spec.codebook_size - VOCAB
    codes = store.codes("audio").reshape(store.n_frames("audio"), -1)
    return base if codes[:, -N_IDS:].min() >= base and codes[:, :-N_IDS].max() < base else None


def functionals(ids: np.ndarray, frame_rate: float) -> list[float]:
    """A clip's prosody ids `[T, 4]` (offsets removed) → 23 clip statistics."""
    f0, energy, harm, tilt = (ids[:, j].astype(np.float64) for j in range(N_IDS))
    voiced = f0 > 0
    semis = f0[voiced] if voiced.any() else np.zeros(1)
    steps = np.abs(np.diff(semis)) if len(semis) > 1 else np.zeros(1)
    slope = np.polyfit(np.flatnonzero(voiced), semis, 1)[0] if voiced.sum() > 2 else 0.0
    edges = np.diff(np.r_[0, voiced.astype(int), 0])
    seg = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)
    seconds = len(f0) / frame_rate
    q = np.percentile
    return [semis.mean(), semis.std(), q(semis, 10), q(semis, 50), q(semis, 90), q(semis, 90) - q(semis, 10),
            slope, steps.mean(), voiced.mean(), energy.mean(), energy.std(), q(energy, 10), q(energy, 50),
            q(energy, 90), energy[voiced].mean() if voiced.any() else 0.0, harm.mean(),
            harm[voiced].mean() if voiced.any() else 0.0, tilt.mean(), tilt[voiced].mean() if voiced.any() else 0.0,
            len(seg) / seconds, seg.mean() if len(seg) else 0.0, (~voiced).sum() / max(1, len(seg)), seconds]


def encoder_features(store: TokenStore, mae: str, rows: np.ndarray, modality: str
                     ) -> tuple[dict[int, np.ndarray], int]:
    """({layer: position-pooled clip features [len(rows), positions × width]}, width) of the
    frozen encoder."""
    cfg = load_config("tiny")
    bb = load_backbone(store, cfg, mae)
    data = ClipWindows(store, bb.names, bb.mae_cfg.window_seconds)
    model = EmotionModel(bb.mae_cfg, bb.dims, 2, "position", 0.0, speaker_norm=True, clip_pooling="mean",
                         head_norm="none")
    load_encoder(model, bb.state)
    model.eval()
    depth = len(model.backbone.encoder)
    layer = [depth]
    plain = mae_module.MAEModel._run_encoder

    def first_layers(self, packed):  # the encoder stopped after `layer[0]` blocks, then its norm
        h, valid, _ = packed
        for block in self.encoder[:layer[0]]:
            h = block(h, valid)
        return self.encoder_norm(h)

    out = {}
    # the modality's own features: an audiovisual model zero-pads each modality's to the widest
    n_features = math.prod(model.backbone.layouts[modality].n_spatial) * bb.mae_cfg.width
    mae_module.MAEModel._run_encoder = first_layers
    try:
        for n in range(depth + 1):
            layer[0] = n
            x, *_ = pooled_clips(model, data, rows, modality, "cpu", 64)
            out[n] = x[:, list(bb.names).index(modality), :n_features].numpy()
    finally:
        mae_module.MAEModel._run_encoder = plain
    return out, bb.mae_cfg.width


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--mae", help="a pretrained MAE of this store (mae.pt)")
    ap.add_argument("--modality", default="audio", choices=("audio", "visual"))
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0, help="draws the speaker folds")
    args = ap.parse_args()
    torch.manual_seed(0)
    store = TokenStore.open(args.store, load=True)
    m = args.modality
    ok = (np.asarray(store.clips["status"]) == "ok") & (np.asarray(store.clips[f"{m}_length"]) > 0)
    rows = np.flatnonzero(ok)
    speakers = np.array(store.clips["speaker"].tolist(), object)[rows]
    labels = np.array(store.clips["label"].tolist(), object)[rows]
    classes = np.unique(labels)
    y = np.searchsorted(classes, labels).astype(np.int64)
    order = np.random.default_rng(args.seed).permutation(np.unique(speakers))
    folds = np.array_split(order, args.folds)
    feats: dict[str, np.ndarray] = {}
    base = prosody_base(store) if m == "audio" else None
    if base is not None:
        offsets = np.cumsum((0,) + SIZES[:-1])
        rate = store.specs["audio"].frame_rate
        ids = [np.asarray(store.clip_codes("audio", int(r)), np.int64)[:, -N_IDS:] - base - offsets for r in rows]
        feats["prosody-id functionals"] = np.array([functionals(i, rate) for i in ids])
        feats["prosody-id histogram"] = np.array([np.bincount((i + offsets).ravel(), minlength=VOCAB) / len(i)
                                                 for i in ids])
    feats["code histogram (bag of tokens)"] = histogram_features(store, rows, m, 4)
    if args.mae:
        enc, width = encoder_features(store, args.mae, rows, m)
        for n, x in enc.items():
            feats[f"encoder, layer {n}" + (" (patch embeddings)" if n == 0 else "")] = x
        if base is not None:
            feats[f"encoder, layer {max(enc)}, prosody-id patch row only"] = enc[max(enc)][:, -width:]
    print(f"{m}: {len(rows)} clips, {len(np.unique(speakers))} speakers, {args.folds} speaker folds, "
          f"{len(classes)} classes (chance {1 / len(classes):.3f})")
    print("| features | dims | UAR |")
    print("|---|---|---|")
    for name, x in feats.items():
        mean, std = probe(x, y, speakers, folds)
        print(f"| {name} | {x.shape[1]} | {mean:.3f} ± {std:.3f} |")


if __name__ == "__main__":
    main()
