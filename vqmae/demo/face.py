"""Face of the demo corpus: `skimage.data.astronaut()` re-coloured, reshaped and animated per clip.

Per speaker the photo is re-coloured (skin, hair, backdrop) and reshaped (chin, eye distance, size,
aspect, mirroring); per emotion local warps move mouth corners, brows and lids; per frame a slow
head sway and a jaw warp whose opening follows the audio energy. Every frame is one backward map
from output pixels to astronaut coordinates, sampled with OpenCV.
"""

from __future__ import annotations

import functools

import numpy as np

from vqmae.config import SynthConfig
from vqmae.demo.profiles import _EYE, EMOTIONS, FPS, Emotion, Speaker, _pair, make_speaker

# More landmarks of skimage.data.astronaut() (512 × 512), read off the image; those the expression
# handles use are in `profiles`.
_CHIN = (224.0, 175.0)
_FACE_CENTRE = (224.0, 120.0)
_HALF_VIEW = 100.0  # half the astronaut-pixel side shown in a frame at speaker scale 1
# Lip gap between the upper teeth and the lower lip: y = _GAP_Y - _GAP_CURVE * (dx / 20)² (smile).
_GAP_X, _GAP_Y, _GAP_CURVE, _GAP_HALF_W = 224.0, 149.0, 8.0, 21.0
_GAP_BAND = 2.0  # astronaut px of dark mouth interior painted along the gap; the jaw warp stretches it
_JAW_DROP = 9.0  # astronaut px the lower lip drops at full opening
_JAW_HALF_W = 25.0


@functools.lru_cache(maxsize=1)
def _astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut().astype(np.float32)  # [512, 512, 3]


def _ellipse(xx: np.ndarray, yy: np.ndarray, c: tuple[float, float], ax: tuple[float, float],
             feather: float) -> np.ndarray:
    """Soft inside-ellipse mask: 1 inside, 0 outside, a ramp about `feather` px wide."""
    r = np.sqrt(((xx - c[0]) / ax[0]) ** 2 + ((yy - c[1]) / ax[1]) ** 2)
    return np.clip((1 - r) * min(ax) / feather + 0.5, 0.0, 1.0)


@functools.lru_cache(maxsize=8)
def speaker_image(spk: Speaker) -> np.ndarray:
    """astronaut() re-coloured for one speaker, mouth interior painted along the lip gap.  # [512, 512, 3] uint8"""
    import cv2

    img = _astronaut().copy()
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]].astype(np.float32)
    face = _ellipse(xx, yy, (224.0, 128.0), (44.0, 58.0), 6.0)
    suit = _ellipse(xx, yy, (212.0, 300.0), (118.0, 150.0), 8.0)
    hair = np.clip(_ellipse(xx, yy, (227.5, 93.0), (75.0, 80.0), 6.0) - face, 0, 1)
    bg = _backdrop_mask(img) * (1 - np.maximum(face, suit))  # the photo's pale grey studio backdrop
    hair = (hair * (1 - bg))[..., None]
    img = img * (1 - hair) + img * hair * np.array(spk.hair, np.float32)
    img *= np.array(spk.skin, np.float32) ** (1 - bg[..., None])
    top, bottom = (np.array(c, np.float32) for c in spk.background)
    t = (yy / img.shape[0])[..., None]
    backdrop = (top * (1 - t) + bottom * t) * (0.8 + 0.2 * img.mean(axis=2, keepdims=True) / 200)
    bg = cv2.GaussianBlur(bg, (0, 0), 1.5)[..., None]
    img = img * (1 - bg) + backdrop * bg
    _paint_mouth(img, xx, yy)
    return np.clip(img, 0, 255).astype(np.uint8)


def _backdrop_mask(img: np.ndarray) -> np.ndarray:
    """Soft mask of bright, unsaturated pixels (the backdrop; face and suit are masked out after)."""
    hi, lo = img.max(axis=2), img.min(axis=2)
    sat = (hi - lo) / np.maximum(hi, 1.0)
    return np.clip((0.2 - sat) / 0.08, 0, 1) * np.clip((hi - 120) / 40, 0, 1)


def _paint_mouth(img: np.ndarray, xx: np.ndarray, yy: np.ndarray) -> None:
    """Dark band just below the teeth: the jaw warp stretches it into the open mouth."""
    x0, x1, y0, y1 = 195, 254, 135, 156
    dx = xx[y0:y1, x0:x1] - _GAP_X
    d = yy[y0:y1, x0:x1] - (_GAP_Y - _GAP_CURVE * (dx / 20) ** 2)
    across = np.clip(1 - np.abs(dx) / _GAP_HALF_W, 0, 1) ** 0.5
    inside = np.clip(np.minimum(d + 0.5, _GAP_BAND + 0.5 - d), 0, 1)
    alpha = (across * inside)[..., None]
    img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - alpha) + np.array([45, 12, 16], np.float32) * alpha


def _apply_handles(ax: np.ndarray, ay: np.ndarray, handles) -> tuple[np.ndarray, np.ndarray]:
    """Backward map for local moves: sample from p - d·G(p) so content near each handle moves by d."""
    ox, oy = ax.copy(), ay.copy()
    for x, y, dx, dy, s in handles:
        g = np.exp(-((ax - x) ** 2 + (ay - y) ** 2) / (2 * s * s))
        ox -= dx * g
        oy -= dy * g
    return ox, oy


def static_map(spk: Speaker, emo: Emotion, size: int, margin: int) -> np.ndarray:
    """Astronaut coordinates for every canonical pixel of a clip (placement, speaker shape,
    expression), on a grid `margin` px wider than the frame on each side.  # [S+2m, S+2m, 2] float32"""
    n = size + 2 * margin
    v, u = np.mgrid[:n, :n].astype(np.float32) - margin
    k = 2 * _HALF_VIEW / (size * spk.scale)
    cx, cy = size / 2 + spk.offset[0] * size, size / 2 + spk.offset[1] * size
    ax = _FACE_CENTRE[0] + (-1 if spk.mirror else 1) * (u - cx) * k / spk.aspect
    ay = _FACE_CENTRE[1] + (v - cy) * k
    shape = ((*_CHIN, 0.0, spk.chin, 16.0),) + _pair(_EYE, (-spk.eye_spread, 0.0), 9.0)
    ax, ay = _apply_handles(ax, ay, shape + emo.face)
    return np.stack([ax, ay], axis=-1)


def head_motion(n_frames: int, size: int, margin: int, gain: float, rng: np.random.Generator) -> np.ndarray:
    """Per-frame affine from output pixels to canonical-grid pixels: a slow sway and nod of a
    degree or two about the neck.  # [T, 2, 3]"""
    t = np.arange(n_frames)[:, None] / FPS
    freq = rng.uniform(0.15, 0.7, size=(1, 8))
    phase = rng.uniform(0, 2 * np.pi, size=(1, 8))
    waves = np.sin(2 * np.pi * freq * t + phase)  # [T, 8]
    theta = np.deg2rad(1.5 * gain) * waves[:, :2].mean(axis=1)
    shift = 0.012 * size * gain * waves[:, 2:6].reshape(-1, 2, 2).mean(axis=2)  # [T, 2]
    zoom = 1 + 0.012 * gain * waves[:, 6]
    cos, sin = np.cos(theta) / zoom, np.sin(theta) / zoom
    pivot = np.array([size / 2, 0.85 * size])
    out = np.empty((n_frames, 2, 3))
    out[:, 0, :2] = np.stack([cos, -sin], axis=1)
    out[:, 1, :2] = np.stack([sin, cos], axis=1)
    rot_pivot = np.einsum("tij,j->ti", out[:, :, :2], pivot)
    out[:, :, 2] = pivot - rot_pivot + shift + margin
    return out


def jaw_warp(amap: np.ndarray, opening: float) -> np.ndarray:
    """Drop the lower lip and jaw by `opening` (in astronaut coordinates, in place).  # [H, W, 2]"""
    ax, ay = amap[..., 0], amap[..., 1]
    dx = ax - _GAP_X
    across = np.clip(1 - (dx / _JAW_HALF_W) ** 2, 0, 1) ** 2
    drop = opening * _JAW_DROP * across
    d = ay - (_GAP_Y - _GAP_CURVE * (np.minimum(np.abs(dx), _GAP_HALF_W) / 20) ** 2)
    ramp = np.clip(d / (_GAP_BAND + drop + 1e-6), 0, 1)
    chin = d - (_CHIN[1] - _GAP_Y) - drop
    release = 1 - np.clip(chin / 28.0, 0, 1)
    amap[..., 1] = ay - drop * ramp * release ** 2 * (3 - 2 * release)
    return amap


class FaceRenderer:
    """Frames of one clip: static map → head motion → jaw warp → sample the speaker's image."""

    def __init__(self, spk: Speaker, emo: Emotion, size: int):
        self.size = size
        self.margin = max(4, size // 10)
        self.image = speaker_image(spk)
        self.map = static_map(spk, emo, size, self.margin)
        self.window = self._jaw_window()

    def _jaw_window(self) -> tuple[slice, slice]:
        """Output rows/cols that can show the jaw, whatever the head motion (pads the bounding box)."""
        inner = self.map[self.margin:-self.margin, self.margin:-self.margin]
        near = ((np.abs(inner[..., 0] - _GAP_X) < _JAW_HALF_W + 2)
                & (inner[..., 1] > _GAP_Y - 12) & (inner[..., 1] < _CHIN[1] + 40))
        rows, cols = np.nonzero(near)
        pad = self.margin
        if rows.size == 0:
            return slice(0, 0), slice(0, 0)
        return (slice(max(0, rows.min() - pad), rows.max() + pad + 1),
                slice(max(0, cols.min() - pad), cols.max() + pad + 1))

    def render(self, affine: np.ndarray, opening: float) -> np.ndarray:
        """One RGB frame.  # [S, S, 3] uint8"""
        import cv2

        amap = cv2.warpAffine(self.map, affine, (self.size, self.size),
                              flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)
        rows, cols = self.window
        amap[rows, cols] = jaw_warp(amap[rows, cols], opening)
        return cv2.remap(self.image, amap[..., 0], amap[..., 1], cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REFLECT)


def mouth_box(cfg: SynthConfig, speaker: int) -> tuple[int, int, int, int]:
    """Output-pixel box (y0, y1, x0, x1) around the lips of `speaker`, head at rest: where the jaw
    opening shows."""
    spk = make_speaker(cfg, speaker)
    m = static_map(spk, EMOTIONS["neutral"], cfg.frame_size, 0)
    near = ((np.abs(m[..., 0] - _GAP_X) < _GAP_HALF_W - 4) & (m[..., 1] > _GAP_Y - 6)
            & (m[..., 1] < _GAP_Y + 16))
    rows, cols = np.nonzero(near)
    return int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
