"""Face crops: decoded RGB frames → square RGB face crops for the visual tokenizer (docs/design.md §2).

Modes (`FaceConfig.mode`):

- `haar`: OpenCV's frontal-face Haar cascade (ships inside the opencv-python 4.x wheel, works offline).
  Detection runs on a grayscale copy downscaled just enough that the smallest face we accept
  (`min_face_frac` of the shorter side) still spans `DET_MIN_PX` pixels; boxes are scaled back.
- `fan`: face-alignment's 2D FAN predicts 68 landmarks inside our own detection box; a similarity
  transform (Umeyama least squares) maps eye centres, nose tip and mouth corners onto a canonical
  template, and the crop is that warp. Frames whose landmarks are implausible fall back to the box crop.
- `none`: the video is already face-centred (VoxCeleb2): the centre square, resized.
- `auto`: `fan` when its weights are already in the torch hub cache, else `haar`.

How face-alignment 1.5.0 finds its weights (read from its source): `FaceAlignment.__init__` calls
`face_alignment.utils.load_file_from_url(url)`, which looks for the URL's base name in
`torch.hub.get_dir()/checkpoints/` (that is `$TORCH_HOME/hub/checkpoints/`, default
`~/.cache/torch/hub/checkpoints/`) and downloads it when absent. The 2D landmark network is
`2DFAN4-11f355bf06.pth.tar` (a plain `FAN(4)` state dict loaded with `weights_only=True`); the
detectors we may use fetch `s3fd-619a316812.pth` (`sfd`) or `blazeface.pth` + `anchors.npy`
(`blazeface`) the same way via `torch.hub.load_state_dict_from_url`. `face_detector="folder"` loads
nothing, so with `detected_faces=[box]` only the FAN file is needed. `compile=True` (the 1.5 default)
wraps the network in `torch.compile`, warms it up and caches artifacts under
`~/.cache/face_alignment/compile/`; we pass `compile=False` (minutes on a CPU, files outside the run).

Streaming: per clip, `detect` each chunk of consecutive frames (the frame counter and the previous
face carry over between calls), `track` the whole clip's boxes (small), then `extract` each chunk.
`track` ends the detection pass, so one cropper serves clip after clip; call `reset()` before a clip
whose previous pass was abandoned half-way (an exception between `detect` and `track`).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .config import FaceConfig
from .utils import resolve_device

log = logging.getLogger(__name__)

HAAR_FILE = "haarcascade_frontalface_default.xml"
# Smallest face side (pixels) the detector sees after downscaling; the cascade's window is 24 px and
# the astronaut test face is still found at 30 px but lost at 19 px.
DET_MIN_PX = 32
# Detections weaker than this fraction of the frame's strongest are dropped before picking one.
MIN_REL_SCORE = 0.34
FAN_WEIGHTS_FILE = "2DFAN4-11f355bf06.pth.tar"
DETECTOR_WEIGHT_FILES = {"haar": (), "sfd": ("s3fd-619a316812.pth",),
                         "blazeface": ("blazeface.pth", "anchors.npy")}

# Canonical positions in the unit crop square: eye centres (image left, image right), nose tip, mouth
# corners (image left, image right). Chosen where a haar box × 1.4 crop puts a frontal face's features
# (checked on skimage's astronaut), with ArcFace-like eye/mouth proportions, so fan and haar crops
# frame the face alike and the chin stays inside.
TEMPLATE_UNIT = np.array([[0.34, 0.38], [0.66, 0.38], [0.50, 0.55], [0.37, 0.72], [0.63, 0.72]],
                         dtype=np.float64)
# 68-point (iBUG 300-W) indices: eye contours are averaged, the rest are single points.
_LEFT_EYE, _RIGHT_EYE, _NOSE_TIP, _MOUTH_LEFT, _MOUTH_RIGHT = range(36, 42), range(42, 48), 30, 48, 54

# Plausibility of a landmark alignment against the detection box (else: box crop for that frame).
MAX_ALIGN_SCALE_RATIO = 1.6   # aligned crop side vs box crop side, either way
MAX_ALIGN_SHIFT = 0.25        # aligned crop centre vs box centre, in box-crop sides
MAX_ALIGN_ROTATION = 45.0     # degrees
MAX_ALIGN_RESIDUAL = 0.08     # RMS landmark error after the fit, in crop sides


class NoFaceError(ValueError):
    """No frame of a clip had a detectable face (the caller adds the file name)."""


@dataclass
class FaceTrack:
    """One clip's face crops and the box track they were cut from."""

    crops: np.ndarray     # uint8 [T, S, S, 3] RGB
    boxes: np.ndarray     # float32 [T, 4] x0, y0, x1, y1 in frame pixels (smoothed and filled)
    detected: np.ndarray  # bool [T]: a face was detected in this frame (before filling)
    n_fallback: int = 0   # fan mode: frames cropped from the box because landmarks were implausible

    @property
    def rate(self) -> float:
        return float(self.detected.mean()) if len(self.detected) else 0.0


# --------------------------------------------------------------------------- weights and mode


def hub_checkpoint_dir() -> Path:
    """Where torch hub (and face-alignment) caches weights: `$TORCH_HOME/hub/checkpoints`."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def missing_fan_weights(detector: str = "haar") -> list[str]:
    """File names FAN (and `detector`, if it needs weights) would still have to download."""
    names = (FAN_WEIGHTS_FILE, *DETECTOR_WEIGHT_FILES[detector])
    return [name for name in names if not (hub_checkpoint_dir() / name).is_file()]


def resolve_mode(cfg: FaceConfig) -> str:
    """`auto` → `fan` when its weights are cached (never downloads), else `haar`; others unchanged."""
    if cfg.mode != "auto":
        return cfg.mode
    where = hub_checkpoint_dir()
    missing = missing_fan_weights(cfg.fan_detector)
    if not missing:
        log.info("face mode auto → fan (weights found in %s)", where)
        return "fan"
    log.info("face mode auto → haar (%s not in %s)", ", ".join(missing), where)
    return "haar"


# --------------------------------------------------------------------------- geometry


def template_points(size: int) -> np.ndarray:
    """Canonical landmark positions in a `size`-pixel crop, pixel-centre convention. # [5, 2]"""
    return TEMPLATE_UNIT * size - 0.5


def five_points(landmarks: np.ndarray) -> np.ndarray:
    """68 landmarks [68, 2] → eye centres, nose tip, mouth corners [5, 2]."""
    lm = np.asarray(landmarks, dtype=np.float64)[:, :2]
    if lm.shape != (68, 2):
        raise ValueError(f"expected 68 landmarks [68, 2], got shape {lm.shape}")
    return np.stack([lm[list(_LEFT_EYE)].mean(0), lm[list(_RIGHT_EYE)].mean(0), lm[_NOSE_TIP],
                     lm[_MOUTH_LEFT], lm[_MOUTH_RIGHT]])


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (scale, rotation, translation; no reflection) mapping src → dst.

    Umeyama (1991). src, dst: [N, 2] corresponding points. Returns the affine matrix [2, 3].
    Raises ValueError when src is degenerate (all points together).
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    var_s = (xs ** 2).sum() / len(src)
    if not np.isfinite(var_s) or var_s < 1e-9:
        raise ValueError("degenerate landmarks: all points coincide")
    cov = xd.T @ xs / len(src)  # [2, 2]
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # forbid a reflection
        d[-1] = -1.0
    rot = u @ np.diag(d) @ vt
    scale = (sig * d).sum() / var_s
    return np.hstack([scale * rot, (mu_d - scale * rot @ mu_s)[:, None]])


def box_matrix(box: np.ndarray, box_scale: float, size: int) -> np.ndarray:
    """Affine [2, 3] mapping frame pixels to a `size` crop: a square of side max(w, h) × box_scale
    centred on `box` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(x1 - x0, y1 - y0) * box_scale
    k = size / side
    # Pixel centres: crop pixel j covers frame [left + j/k, left + (j+1)/k).
    left, top = (x0 + x1) / 2 - side / 2, (y0 + y1) / 2 - side / 2
    return np.array([[k, 0.0, k * (0.5 - left) - 0.5], [0.0, k, k * (0.5 - top) - 0.5]])


def warp_crop(frame: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """Cut a `size` × `size` crop out of `frame` [H, W, 3] through `matrix` [2, 3] (frame → crop).

    The border is replicated, so a face at the image edge is padded, never shifted. When the warp
    shrinks by more than 2× the region is first halved with Gaussian pyramids: plain bilinear
    sampling would alias and make textures shimmer from frame to frame.
    """
    m = np.asarray(matrix, dtype=np.float64)
    scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))
    if scale < 0.5:
        frame, m = _prefilter(frame, m, size, scale)
    return cv2.warpAffine(frame, m, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


def _prefilter(frame: np.ndarray, m: np.ndarray, size: int, scale: float):
    """Cut the crop's footprint (plus a margin) and pyrDown it until the warp shrinks ≤ 2×."""
    inv = cv2.invertAffineTransform(m)
    corners = np.array([[-0.5, -0.5, 1], [size, -0.5, 1], [-0.5, size, 1], [size, size, 1]]) @ inv.T
    margin = 4.0 / scale
    x0, y0 = np.floor(corners.min(0) - margin).astype(int)
    x1, y1 = np.ceil(corners.max(0) + margin).astype(int)
    roi = _padded_region(frame, x0, y0, x1, y1)
    m = m @ np.array([[1.0, 0, x0], [0, 1.0, y0], [0, 0, 1.0]])
    while scale < 0.5:
        roi = cv2.pyrDown(roi)  # output pixel i sits on input pixel 2i
        m = m @ np.diag([2.0, 2.0, 1.0])
        scale *= 2.0
    return roi, m[:2]


def _padded_region(frame: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """frame[y0:y1, x0:x1] with replicated borders where the region leaves the image."""
    h, w = frame.shape[:2]
    # Keep at least one real pixel in range so replication has something to copy.
    cx0, cy0 = min(max(x0, 0), w - 1), min(max(y0, 0), h - 1)
    cx1, cy1 = max(min(x1, w), cx0 + 1), max(min(y1, h), cy0 + 1)
    inner = frame[cy0:cy1, cx0:cx1]
    return cv2.copyMakeBorder(inner, cy0 - y0, y1 - cy1, cx0 - x0, x1 - cx1, cv2.BORDER_REPLICATE)


def align_matrix(landmarks: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """68 landmarks [68, 2] → (frame → crop similarity [2, 3], RMS residual in crop sides)."""
    src, dst = five_points(landmarks), template_points(size)
    m = similarity_transform(src, dst)
    fitted = src @ m[:, :2].T + m[:, 2]
    residual = float(np.sqrt(((fitted - dst) ** 2).sum(1).mean())) / size
    return m, residual


def alignment_plausible(m: np.ndarray, residual: float, box: np.ndarray, box_scale: float,
                        size: int) -> bool:
    """Does the landmark warp `m` [2, 3] frame the same face as the box crop would?"""
    scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))
    if not np.isfinite(scale) or scale <= 0 or not np.isfinite(residual):
        return False
    x0, y0, x1, y1 = (float(v) for v in box)
    box_side = max(x1 - x0, y1 - y0) * box_scale
    centre = cv2.invertAffineTransform(m) @ np.array([(size - 1) / 2, (size - 1) / 2, 1.0])
    shift = np.hypot(centre[0] - (x0 + x1) / 2, centre[1] - (y0 + y1) / 2) / box_side
    angle = np.degrees(np.arctan2(m[1, 0], m[0, 0]))
    return bool(abs(np.log(size / scale / box_side)) <= np.log(MAX_ALIGN_SCALE_RATIO)
                and shift <= MAX_ALIGN_SHIFT and abs(angle) <= MAX_ALIGN_ROTATION
                and residual <= MAX_ALIGN_RESIDUAL)


# --------------------------------------------------------------------------- tracks


def _to_cxcywh(boxes: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = boxes.T
    return np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], 1)


def _to_xyxy(p: np.ndarray) -> np.ndarray:
    cx, cy, w, h = p.T
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)


def fill_boxes(boxes: np.ndarray) -> np.ndarray:
    """Fill NaN rows [T, 4] by linear interpolation of box centre and size between the nearest
    detected frames; rows before the first / after the last detection copy it. Needs ≥ 1 valid row."""
    p = _to_cxcywh(np.asarray(boxes, dtype=np.float64))
    valid = np.flatnonzero(np.isfinite(p).all(1))
    t = np.arange(len(p))
    filled = np.stack([np.interp(t, valid, p[valid, j]) for j in range(4)], 1)
    return _to_xyxy(filled)


def smooth_boxes(boxes: np.ndarray, half_width: int) -> np.ndarray:
    """Moving median then moving mean of box centre and size over 2·half_width + 1 frames. [T, 4]

    Windows shrink symmetrically at the clip ends, so a face moving at constant speed keeps its exact
    track (no lag, no end bias) while detector jitter and one-frame outliers are averaged away.
    """
    p = _to_cxcywh(np.asarray(boxes, dtype=np.float64))
    if half_width > 0 and len(p) > 2:
        p = _window_filter(_window_filter(p, half_width, np.median), half_width, np.mean)
    return _to_xyxy(p)


def _window_filter(x: np.ndarray, r: int, reduce) -> np.ndarray:
    """Apply `reduce` over centred windows of x [T, D]; half-width min(r, t, T-1-t)."""
    n = len(x)
    out = x.copy()
    r = min(r, (n - 1) // 2)
    if r > 0:
        win = np.lib.stride_tricks.sliding_window_view(x, 2 * r + 1, axis=0)  # [T-2r, D, 2r+1]
        out[r:n - r] = reduce(win, axis=-1)
    for t in [*range(min(r, n)), *range(max(n - r, r), n)]:
        h = min(t, n - 1 - t)
        out[t] = reduce(x[t - h:t + h + 1], axis=0)
    return out


# --------------------------------------------------------------------------- cropper


class FaceCropper:
    """Frames → face boxes → box track → crops, for one clip at a time (`reset()` between clips)."""

    def __init__(self, cfg: FaceConfig):
        if cfg.size <= 0 or cfg.box_scale <= 0 or cfg.detect_every < 1 or cfg.smooth_frames < 0:
            raise ValueError(f"bad face config {cfg}: size, box_scale must be > 0, detect_every ≥ 1, "
                             "smooth_frames ≥ 0")
        self.cfg = cfg
        self.mode = resolve_mode(cfg)
        self._haar: cv2.CascadeClassifier | None = None
        self._torch_detector = None
        self._fa = None
        if self.mode == "fan":
            self._fa = _load_fan(resolve_device(cfg.fan_device))
        if self.mode == "haar" or (self.mode == "fan" and cfg.fan_detector == "haar"):
            self._haar = _load_haar()
        elif self.mode == "fan":
            self._torch_detector = _load_fa_detector(cfg.fan_detector, resolve_device(cfg.fan_device))
        self.reset()

    def reset(self) -> None:
        """Forget the previous clip: frame counter, last box, fallback count."""
        self._n_seen = 0
        self._prev: np.ndarray | None = None
        self.n_fallback = 0

    # ---------------------------------------------------------------- detect

    def detect(self, frames: np.ndarray) -> np.ndarray:
        """Face box per frame, NaN rows where none was found or detection was skipped.

        frames: uint8 [T, H, W, 3] RGB, consecutive with the previous call's. Returns float32 [T, 4].
        """
        frames = _check_frames(frames)
        out = np.full((len(frames), 4), np.nan, dtype=np.float32)
        for j, frame in enumerate(frames):
            index = self._n_seen + j
            if self.mode == "none":
                out[j] = _centre_square(frame.shape)
            elif index % self.cfg.detect_every == 0:
                box = self._pick(*self._detect_one(frame))
                if box is not None:
                    out[j] = self._prev = box
        self._n_seen += len(frames)
        return out

    def _detect_one(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All faces in one frame [H, W, 3] → (boxes [N, 4] in frame pixels, confidences [N])."""
        h, w = frame.shape[:2]
        min_face = self.cfg.min_face_frac * min(h, w)
        f = min(1.0, DET_MIN_PX / max(min_face, 1.0))
        size = (max(1, round(w * f)), max(1, round(h * f)))
        small = cv2.resize(frame, size, interpolation=cv2.INTER_AREA) if f < 1 else frame
        fx, fy = w / size[0], h / size[1]
        if self._haar is not None:
            # No histogram equalisation: on the astronaut frames it added false positives.
            gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
            min_px = max(24, int(min_face / max(fx, fy)))
            found, neighbours = self._haar.detectMultiScale2(gray, scaleFactor=1.1, minNeighbors=5,
                                                             minSize=(min_px, min_px))
            boxes = np.array([[x, y, x + bw, y + bh] for x, y, bw, bh in found], dtype=np.float64)
            scores = np.asarray(neighbours, dtype=np.float64).reshape(-1)
        else:
            found = self._torch_detector.detect_from_image(np.ascontiguousarray(small))
            boxes = np.array([b[:4] for b in found], dtype=np.float64)
            scores = np.array([b[4] if len(b) > 4 else 1.0 for b in found], dtype=np.float64)
        boxes = boxes.reshape(-1, 4) * np.array([fx, fy, fx, fy])
        # 0.9: haar's minSize was rounded down in the small image
        keep = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) >= 0.9 * min_face
        return boxes[keep], scores[keep]

    def _pick(self, boxes: np.ndarray, scores: np.ndarray) -> np.ndarray | None:
        """Among confident faces: the one nearest the previous pick (within half its size), else
        the largest. Returns a box [4] or None."""
        if len(boxes) == 0:
            return None
        # A real face collects 30-50 haar neighbours, a false positive on clothing or background 5-10.
        boxes = boxes[scores >= scores.max() * MIN_REL_SCORE]
        if self._prev is not None:
            p = _to_cxcywh(self._prev[None].astype(np.float64))[0]
            q = _to_cxcywh(boxes)
            dist = np.hypot(q[:, 0] - p[0], q[:, 1] - p[1]) / max(p[2], p[3], 1.0)
            if dist.min() < 0.5:
                return boxes[dist.argmin()]
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        return boxes[area.argmax()]

    # ---------------------------------------------------------------- track

    def track(self, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Whole clip's `detect` output [T, 4] → (filled, smoothed boxes float32 [T, 4], detected [T]).

        Frames skipped by `detect_every` carry the detected flag of the keyframe before them, so
        `detected.mean()` estimates the detection rate of the frames actually tried.
        Ends the clip's detection pass (resets the frame counter, previous face and fallback
        count), so one cropper serves clip after clip as detect* → track → extract*.
        Raises NoFaceError when no frame has a box.
        """
        boxes = np.asarray(boxes, dtype=np.float64)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"boxes must be [T, 4], got shape {boxes.shape}")
        found = np.isfinite(boxes).all(1)
        if not found.any():
            self.reset()
            raise NoFaceError(f"no face detected in any of {len(boxes)} frames")
        keyframe = np.arange(len(boxes)) // self.cfg.detect_every * self.cfg.detect_every
        detected = found[keyframe]
        smoothed = smooth_boxes(fill_boxes(boxes), self.cfg.smooth_frames)
        # The detection pass is over: the next detect() call starts a new clip.
        self.reset()
        return smoothed.astype(np.float32), detected

    # ---------------------------------------------------------------- extract

    def extract(self, frames: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Crops for frames uint8 [T, H, W, 3] and their tracked boxes [T, 4] → uint8 [T, S, S, 3].

        In `fan` mode each frame is aligned to the landmark template; implausible landmarks fall
        back to the box crop and add to `n_fallback`.
        """
        frames = _check_frames(frames)
        boxes = np.asarray(boxes, dtype=np.float64)
        if boxes.shape != (len(frames), 4):
            raise ValueError(f"boxes must be [{len(frames)}, 4] to match the frames, got {boxes.shape}")
        if not np.isfinite(boxes).all():
            raise ValueError("boxes contain NaN rows: pass them through track() first")
        size = self.cfg.size
        out = np.empty((len(frames), size, size, 3), dtype=np.uint8)
        for j, (frame, box) in enumerate(zip(frames, boxes)):
            out[j] = warp_crop(frame, self._matrix(frame, box), size)
        return out

    def _matrix(self, frame: np.ndarray, box: np.ndarray) -> np.ndarray:
        """frame → crop affine [2, 3] for one frame."""
        scale = 1.0 if self.mode == "none" else self.cfg.box_scale
        fallback = box_matrix(box, scale, self.cfg.size)
        if self.mode != "fan":
            return fallback
        # float64: face-alignment's crop maths fails on numpy float32 scalars
        found = self._fa.get_landmarks_from_image(frame, detected_faces=[box.astype(np.float64)])
        try:
            m, residual = align_matrix(found[0], self.cfg.size)
        except (ValueError, TypeError, IndexError, np.linalg.LinAlgError):
            m, residual = fallback, np.inf
        if alignment_plausible(m, residual, box, scale, self.cfg.size):
            return m
        self.n_fallback += 1
        return fallback

    # ---------------------------------------------------------------- all at once

    def crop(self, frames: np.ndarray) -> FaceTrack:
        """detect → track → extract for one whole clip uint8 [T, H, W, 3]."""
        self.reset()
        boxes, detected = self.track(self.detect(frames))
        crops = self.extract(frames, boxes)
        if self.n_fallback:
            log.info("face alignment fell back to the box crop in %d of %d frames",
                     self.n_fallback, len(frames))
        return FaceTrack(crops=crops, boxes=boxes, detected=detected, n_fallback=self.n_fallback)


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 RGB [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if frames.shape[1] < 2 or frames.shape[2] < 2:
        raise ValueError(f"frames are too small to crop: {frames.shape[1]}×{frames.shape[2]} pixels")
    return frames


def _centre_square(shape: tuple[int, ...]) -> np.ndarray:
    """Box x0, y0, x1, y1 of the largest centred square in an [H, W, ...] frame."""
    h, w = shape[:2]
    side = min(h, w)
    x0, y0 = (w - side) / 2, (h - side) / 2
    return np.array([x0, y0, x0 + side, y0 + side], dtype=np.float32)


def _load_haar() -> cv2.CascadeClassifier:
    path = Path(cv2.data.haarcascades) / HAAR_FILE
    cascade = cv2.CascadeClassifier(str(path))
    if cascade.empty():
        raise RuntimeError(f"could not load the Haar cascade {path} (opencv-python 4.x ships it)")
    return cascade


def _load_fan(device: str):
    """face-alignment's 2D FAN on `device`, without its own detector (we pass the boxes)."""
    import face_alignment

    path = hub_checkpoint_dir() / FAN_WEIGHTS_FILE
    if not path.is_file():
        log.warning("FAN weights not cached at %s: face-alignment will try to download them", path)
    kwargs = dict(face_detector="folder", device=device, flip_input=False)
    if "compile" in inspect.signature(face_alignment.FaceAlignment).parameters:
        kwargs["compile"] = False
    try:
        return face_alignment.FaceAlignment(face_alignment.LandmarksType.TWO_D, **kwargs)
    except Exception as e:
        raise RuntimeError(f"could not load the FAN landmark weights {path}: {e}") from e


def _load_fa_detector(name: str, device: str):
    """face-alignment's `sfd` or `blazeface` detector (weights from the torch hub cache)."""
    import importlib

    files = [str(hub_checkpoint_dir() / f) for f in DETECTOR_WEIGHT_FILES[name]]
    try:
        module = importlib.import_module(f"face_alignment.detection.{name}")
        return module.FaceDetector(device=device)
    except Exception as e:
        raise RuntimeError(f"could not load the {name} face detector ({', '.join(files)}): {e}") from e
