"""Face crops on real face pixels (skimage's astronaut): moved over frames, blanked where detection
must fail."""

import logging

import cv2
import numpy as np
import pytest
from skimage.data import astronaut

from vqmae.config import FaceConfig
from vqmae.faces import (
    FAN_WEIGHTS_FILE,
    FaceCropper,
    FaceTrack,
    NoFaceError,
    align_matrix,
    box_matrix,
    fill_boxes,
    five_points,
    smooth_boxes,
    similarity_transform,
    template_points,
    warp_crop,
)

IMG = astronaut()  # [512, 512, 3]; the face is about x 177..272, y 66..161
FACE_FULL = np.array([177.0, 66.0, 272.0, 161.0])
STEP, WIN, SIDE = 3, 240, 160  # window moves STEP px per frame; WIN px windows resized to SIDE


def sequence(n: int, blank=()) -> np.ndarray:
    """uint8 [n, 160, 160, 3]: the astronaut's head panning left by 2 px per frame; `blank` frames grey."""
    frames = []
    for t in range(n):
        x = 100 + STEP * t
        frame = cv2.resize(IMG[20:20 + WIN, x:x + WIN], (SIDE, SIDE), interpolation=cv2.INTER_AREA)
        frames.append(np.full_like(frame, 128) if t in blank else frame)
    return np.stack(frames)


def true_face(t: int) -> np.ndarray:
    """The face box of `sequence` frame t, in frame pixels. # [4]"""
    k = SIDE / WIN
    return (FACE_FULL - np.array([100 + STEP * t, 20, 100 + STEP * t, 20])) * k


def centre_size(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64)
    return np.stack([(b[..., 0] + b[..., 2]) / 2, (b[..., 1] + b[..., 3]) / 2,
                     b[..., 2] - b[..., 0]], -1)


def haar(**kw) -> FaceCropper:
    return FaceCropper(FaceConfig(mode="haar", **kw))


# ------------------------------------------------------------------------------------ haar


def test_haar_finds_the_face_and_the_crop_covers_it():
    frames = sequence(8)
    track = haar().crop(frames)
    assert isinstance(track, FaceTrack) and track.rate == 1.0 and track.n_fallback == 0
    assert track.crops.shape == (8, 96, 96, 3) and track.crops.dtype == np.uint8
    assert track.boxes.shape == (8, 4) and track.boxes.dtype == np.float32
    truth = np.stack([true_face(t) for t in range(8)])
    err = centre_size(track.boxes) - centre_size(truth)
    assert np.abs(err[:, :2]).max() < 4 and np.abs(err[:, 2] / 63.3).max() < 0.15
    for t in range(8):  # the true face box lies inside the crop, with margin
        m = box_matrix(track.boxes[t], 1.4, 96)
        corners = np.array([truth[t, :2], truth[t, 2:]]) @ m[:, :2].T + m[:, 2]
        assert corners.min() > 3 and corners.max() < 93
    # The crop follows the face: crops of first and last frame nearly agree although the face
    # moved 14 px in the frame, and both resemble the face cut straight from the photo.
    reference = warp_crop(IMG, box_matrix(FACE_FULL, 1.4, 96), 96).astype(float)
    assert np.abs(track.crops[0].astype(float) - track.crops[-1]).mean() < 4
    assert np.abs(track.crops[0] - reference).mean() < 15
    assert np.abs(frames[0, 32:128, 32:128].astype(float) - frames[-1, 32:128, 32:128]).mean() > 20


def test_missing_frames_are_filled_by_interpolation():
    blank = {0, 4, 5}
    cropper = haar(smooth_frames=0)
    raw = cropper.detect(sequence(10, blank))
    assert raw.dtype == np.float32 and raw.shape == (10, 4)
    np.testing.assert_array_equal(np.isnan(raw).all(1), [t in blank for t in range(10)])
    boxes, detected = cropper.track(raw)
    np.testing.assert_array_equal(detected, [t not in blank for t in range(10)])
    assert FaceTrack(np.zeros((10, 96, 96, 3), np.uint8), boxes, detected).rate == pytest.approx(0.7)
    np.testing.assert_allclose(boxes[0], raw[1])  # nearest at the start
    for t, w in ((4, 1 / 3), (5, 2 / 3)):  # linear between frames 3 and 6
        np.testing.assert_allclose(boxes[t], raw[3] + w * (raw[6] - raw[3]), atol=1e-4)
    keep = [t for t in range(10) if t not in blank]
    np.testing.assert_array_equal(boxes[keep], raw[keep])


def test_fill_boxes_exact_values():
    nan = [np.nan] * 4
    boxes = np.array([nan, [10, 10, 30, 30], nan, nan, [16, 22, 56, 62], nan], dtype=np.float32)
    # centre (20, 20) size 20 at t=1 → centre (36, 42) size 40 at t=4: thirds of the way in between
    def box(cx, cy, side):
        return [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]

    expected = [box(20, 20, 20), box(20, 20, 20), box(20 + 16 / 3, 20 + 22 / 3, 20 + 20 / 3),
                box(20 + 32 / 3, 20 + 44 / 3, 20 + 40 / 3), box(36, 42, 40), box(36, 42, 40)]
    np.testing.assert_allclose(fill_boxes(boxes), expected, atol=1e-9)


def test_smoothing_reduces_jitter_and_keeps_linear_motion():
    t = np.arange(200, dtype=np.float64)
    line = np.stack([10 + 1.5 * t, 20 - 0.5 * t, 70 + 1.5 * t, 80 - 0.5 * t], 1)  # constant velocity
    np.testing.assert_allclose(smooth_boxes(line, 2), line, atol=1e-9)  # no lag, no end bias
    noisy = line + np.random.default_rng(0).normal(0, 2.0, line.shape)

    def rms(boxes):
        return np.sqrt(((centre_size(boxes) - centre_size(line)) ** 2).mean())

    assert rms(smooth_boxes(noisy, 2)) < rms(noisy) / 2
    still = np.tile([10.0, 10, 50, 50], (9, 1))
    jumpy = still.copy()
    jumpy[4] += 40  # a one-frame false detection
    np.testing.assert_allclose(smooth_boxes(jumpy, 2), still)
    cropper = haar(smooth_frames=2)  # track() applies it
    np.testing.assert_allclose(cropper.track(jumpy)[0], still)


def test_detect_every_detects_keyframes_and_interpolates():
    frames = sequence(9, blank={3, 4})
    cropper = haar(detect_every=3, smooth_frames=0)
    raw = cropper.detect(frames)
    np.testing.assert_array_equal(np.isfinite(raw).all(1), [t in (0, 6) for t in range(9)])
    boxes, detected = cropper.track(raw)
    # skipped frames carry their keyframe's flag: keyframe 3 was blank
    np.testing.assert_array_equal(detected, [True] * 3 + [False] * 3 + [True] * 3)
    assert np.isfinite(boxes).all()
    np.testing.assert_allclose(boxes[3], raw[0] + (raw[6] - raw[0]) / 2, atol=1e-4)
    every = haar(smooth_frames=0).detect(frames)
    np.testing.assert_array_equal(raw[[0, 6]], every[[0, 6]])


def test_chunked_calls_equal_one_call():
    frames = sequence(10)
    whole = haar(detect_every=2)
    raw = whole.detect(frames)
    boxes, detected = whole.track(raw)
    crops = whole.extract(frames, boxes)
    chunked = haar(detect_every=2)
    raw_c = np.concatenate([chunked.detect(frames[i:i + 3]) for i in range(0, 10, 3)])
    np.testing.assert_array_equal(raw_c, raw)
    boxes_c, _ = chunked.track(raw_c)
    crops_c = np.concatenate([chunked.extract(frames[i:i + 4], boxes_c[i:i + 4]) for i in range(0, 10, 4)])
    np.testing.assert_array_equal(crops_c, crops)
    # track() ended the pass: the same cropper starts the next clip at frame 0 again
    np.testing.assert_array_equal(chunked.detect(frames), raw)


def test_noise_only_frames_raise_no_face_error():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (6, 160, 160, 3), dtype=np.uint8)
    cropper = haar()
    with pytest.raises(NoFaceError, match=r"^no face detected in any of 6 frames$"):
        cropper.crop(noise)
    assert issubclass(NoFaceError, ValueError)
    assert cropper.crop(sequence(3)).rate == 1.0  # the cropper is usable for the next clip


def test_pick_prefers_the_tracked_face_and_drops_weak_detections():
    cropper = haar()
    small, large = np.array([10.0, 10, 50, 50]), np.array([100.0, 100, 180, 180])
    boxes = np.stack([small, large])
    np.testing.assert_array_equal(cropper._pick(boxes, np.array([40.0, 40])), large)  # largest
    np.testing.assert_array_equal(cropper._pick(boxes, np.array([40.0, 6])), small)  # weak FP dropped
    cropper._prev = small + 3
    np.testing.assert_array_equal(cropper._pick(boxes, np.array([40.0, 40])), small)  # nearest track
    assert cropper._pick(np.zeros((0, 4)), np.zeros(0)) is None


# ------------------------------------------------------------------------------------ crops


def test_none_mode_centre_crop():
    frame = np.zeros((120, 160, 3), np.uint8)
    frame[:, :20] = frame[:, 140:] = (255, 0, 0)  # red bands outside the centre square
    yy, xx = np.mgrid[0:120, 0:120]
    frame[:, 20:140, 1] = (xx * 2).astype(np.uint8)
    frame[:, 20:140, 2] = (yy * 2).astype(np.uint8)
    frames = np.stack([frame, frame])
    track = FaceCropper(FaceConfig(mode="none")).crop(frames)
    assert track.crops.shape == (2, 96, 96, 3) and track.crops.dtype == np.uint8 and track.rate == 1.0
    np.testing.assert_array_equal(track.boxes, [[20, 0, 140, 120]] * 2)
    assert track.crops[..., 0].max() == 0  # nothing of the side bands
    expected = cv2.resize(frame[:, 20:140], (96, 96), interpolation=cv2.INTER_LINEAR)
    assert np.abs(track.crops[0].astype(int) - expected).max() <= 1
    portrait = np.ascontiguousarray(np.stack([frame.transpose(1, 0, 2)]))  # [1, 160, 120, 3]
    track = FaceCropper(FaceConfig(mode="none", size=64)).crop(portrait)
    assert track.crops.shape == (1, 64, 64, 3) and track.crops[..., 0].max() == 0
    np.testing.assert_array_equal(track.boxes, [[0, 20, 120, 140]])


def test_crops_at_the_border_are_padded_not_shifted():
    frame = np.random.default_rng(1).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    box = np.array([[-20.0, -20, 20, 20]])  # centred on the top-left corner
    cropper = FaceCropper(FaceConfig(mode="haar", size=40, box_scale=1.0))
    crop = cropper.extract(frame[None], box)[0]
    np.testing.assert_array_equal(crop[20:, 20:], frame[:20, :20])  # exact, one frame px per crop px
    np.testing.assert_array_equal(crop[:20, 20:], np.broadcast_to(frame[0, :20], (20, 20, 3)))
    np.testing.assert_array_equal(crop[20:, :20], np.broadcast_to(frame[:20, :1], (20, 20, 3)))
    np.testing.assert_array_equal(crop[:20, :20], np.broadcast_to(frame[0, 0], (20, 20, 3)))


def test_strong_downscale_is_antialiased():
    stripes = np.zeros((384, 384, 3), np.uint8)
    stripes[:, ::3] = 255  # finer than the 96-px crop can show: the right answer is flat 85
    m = box_matrix(np.array([0.0, 0, 384, 384]), 1.0, 96)
    crop = warp_crop(stripes, m, 96)
    assert abs(crop.mean() - 85) < 2 and crop.std() < 8
    assert cv2.warpAffine(stripes, m, (96, 96)).std() > 40  # what plain bilinear sampling gives
    photo = warp_crop(IMG, box_matrix(np.array([0.0, 0, 512, 512]), 1.0, 128), 128)
    area = cv2.resize(IMG, (128, 128), interpolation=cv2.INTER_AREA)
    assert np.abs(photo.astype(float) - area).mean() < 2


# ------------------------------------------------------------------------------------ alignment


def known_transform(scale=1.7, degrees=12.0, shift=(150.0, 90.0)) -> tuple[np.ndarray, np.ndarray]:
    """(crop → frame similarity [3, 3], its inverse frame → crop [2, 3])."""
    a = np.radians(degrees)
    fwd = np.array([[scale * np.cos(a), -scale * np.sin(a), shift[0]],
                    [scale * np.sin(a), scale * np.cos(a), shift[1]], [0, 0, 1]])
    return fwd, np.linalg.inv(fwd)[:2]


def landmarks_from(points5: np.ndarray) -> np.ndarray:
    """68 landmarks [68, 2] whose eye contours average to the eye centres given in points5 [5, 2]."""
    lm = np.random.default_rng(2).uniform(0, 300, (68, 2))
    ring = np.stack([np.cos(np.arange(6) * np.pi / 3), np.sin(np.arange(6) * np.pi / 3)], 1) * 5
    lm[36:42], lm[42:48] = points5[0] + ring, points5[1] + ring
    lm[30], lm[48], lm[54] = points5[2], points5[3], points5[4]
    return lm


def test_similarity_transform_recovers_a_known_transform():
    fwd, _ = known_transform()
    src = np.random.default_rng(3).uniform(0, 100, (7, 2))
    dst = src @ fwd[:2, :2].T + fwd[:2, 2]
    np.testing.assert_allclose(similarity_transform(src, dst), fwd[:2], atol=1e-9)
    mirrored = similarity_transform(src, dst * [-1, 1])  # best fit, but never a reflection
    assert np.linalg.det(mirrored[:, :2]) > 0
    with pytest.raises(ValueError, match="degenerate"):
        similarity_transform(np.ones((5, 2)), dst[:5])


def test_alignment_from_exact_landmarks():
    fwd, inv = known_transform()
    points = template_points(96) @ fwd[:2, :2].T + fwd[:2, 2]  # template seen in the frame
    lm = landmarks_from(points)
    np.testing.assert_allclose(five_points(lm), points, atol=1e-9)
    m, residual = align_matrix(lm, 96)
    np.testing.assert_allclose(m, inv, atol=1e-9)
    assert residual < 1e-9
    expected = cv2.warpAffine(IMG, inv, (96, 96), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    np.testing.assert_array_equal(warp_crop(IMG, m, 96), expected)


class FakeFAN:
    """Stands in for face_alignment.FaceAlignment: returns fixed landmarks and records the boxes."""

    def __init__(self, landmarks):
        self.landmarks, self.boxes = landmarks, []

    def get_landmarks_from_image(self, image, detected_faces=None):
        self.boxes.append(detected_faces[0])
        return [self.landmarks]


def test_fan_extract_aligns_plausible_landmarks_and_falls_back_otherwise():
    fwd, inv = known_transform()
    points = template_points(96) @ fwd[:2, :2].T + fwd[:2, 2]
    centre = fwd[:2] @ np.array([47.5, 47.5, 1.0])
    half = 96 * 1.7 / 1.4 / 2  # the box whose 1.4× crop frames the same face
    box = np.array([[*(centre - half), *(centre + half)]], dtype=np.float32)
    cropper = haar()
    cropper.mode, cropper._fa = "fan", FakeFAN(landmarks_from(points))
    crop = cropper.extract(IMG[None], box)
    assert cropper.n_fallback == 0
    np.testing.assert_array_equal(crop[0], warp_crop(IMG, inv, 96))
    np.testing.assert_allclose(cropper._fa.boxes[0], box[0])
    turned = (points - centre) @ np.array([[0, -1], [1, 0]]) + centre  # a 90° roll is implausible
    cropper._fa = FakeFAN(landmarks_from(turned))
    crop = cropper.extract(IMG[None], box)
    assert cropper.n_fallback == 1
    np.testing.assert_array_equal(crop[0], warp_crop(IMG, box_matrix(box[0], 1.4, 96), 96))


# ------------------------------------------------------------------------------------ fan / auto


@pytest.fixture(scope="module")
def fan_home(tmp_path_factory):
    """A TORCH_HOME whose hub cache holds a randomly initialised FAN(4) under its real file name."""
    import torch
    from face_alignment.models import FAN

    home = tmp_path_factory.mktemp("torch_home")
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(FAN(4).state_dict(), home / "hub" / "checkpoints" / FAN_WEIGHTS_FILE)
    return home


def test_auto_mode_picks_fan_only_when_weights_are_cached(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    caplog.set_level(logging.INFO, logger="vqmae.faces")
    assert FaceCropper(FaceConfig(mode="auto")).mode == "haar"
    assert f"auto → haar ({FAN_WEIGHTS_FILE} not in {tmp_path / 'hub' / 'checkpoints'})" in caplog.text
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / FAN_WEIGHTS_FILE).touch()
    from vqmae.faces import resolve_mode

    assert resolve_mode(FaceConfig(mode="auto")) == "fan"
    assert resolve_mode(FaceConfig(mode="auto", fan_detector="sfd")) == "haar"  # s3fd not cached
    assert resolve_mode(FaceConfig(mode="none")) == "none"


def test_fan_mode_end_to_end_with_random_weights(fan_home, monkeypatch):
    import face_alignment.utils as fa_utils

    monkeypatch.setenv("TORCH_HOME", str(fan_home))
    # face-alignment's heatmap decoding is numba-jitted: compiling costs 10-20 s on two busy cores,
    # its plain-Python original gives the same result for one frame in milliseconds.
    for name in ("_get_preds_fromhm", "transform_np"):
        monkeypatch.setattr(fa_utils, name, getattr(fa_utils, name).py_func)
    frames = sequence(1)  # one FAN forward: 0.4 s on an idle CPU core, several s on a busy one
    cropper = FaceCropper(FaceConfig(mode="auto", fan_device="cpu"))
    assert cropper.mode == "fan"
    track = cropper.crop(frames)
    assert track.crops.shape == (1, 96, 96, 3) and track.crops.dtype == np.uint8 and track.rate == 1.0
    assert track.n_fallback == 1  # random landmarks never pass the plausibility checks
    np.testing.assert_array_equal(track.crops, haar().crop(frames).crops)  # the box crop


def test_fan_with_the_sfd_detector_offline(fan_home, monkeypatch):
    """The sfd wiring (weights file name, output parsing); random weights give arbitrary boxes."""
    import torch
    from face_alignment.detection.sfd.net_s3fd import s3fd

    monkeypatch.setenv("TORCH_HOME", str(fan_home))
    cfg = FaceConfig(mode="auto", fan_detector="sfd", fan_device="cpu")
    assert FaceCropper(cfg).mode == "haar"  # FAN alone is not enough for sfd
    torch.manual_seed(0)
    torch.save(s3fd().state_dict(), fan_home / "hub" / "checkpoints" / "s3fd-619a316812.pth")
    cropper = FaceCropper(cfg)
    assert cropper.mode == "fan" and type(cropper._torch_detector).__name__ == "SFDDetector"
    raw = cropper.detect(sequence(1))
    assert raw.shape == (1, 4) and raw.dtype == np.float32


# ------------------------------------------------------------------------------------ bad input


def test_bad_input_is_rejected_with_the_reason():
    cropper = haar()
    with pytest.raises(ValueError, match=r"uint8 RGB \[T, H, W, 3\], got float32 \(2, 8, 8, 3\)"):
        cropper.detect(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"got uint8 \(8, 8, 3\)"):
        cropper.detect(np.zeros((8, 8, 3), np.uint8))
    frames = sequence(2)
    with pytest.raises(ValueError, match=r"NaN rows: pass them through track\(\) first"):
        cropper.extract(frames, np.full((2, 4), np.nan))
    with pytest.raises(ValueError, match=r"boxes must be \[2, 4\] to match the frames, got \(3, 4\)"):
        cropper.extract(frames, np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"boxes must be \[T, 4\], got shape \(5,\)"):
        cropper.track(np.zeros(5))
    with pytest.raises(ValueError, match="detect_every"):
        FaceCropper(FaceConfig(mode="haar", detect_every=0))
