"""Emotion scores for new media from one stage-3 classifier checkpoint (docs/design.md §4, `vqmae predict`).

    Predictor.load(classifier.pt) → predictor.predict(media | arrays | codes) → Prediction
                                  → predictor.predict_many([files, folders]) → PredictResult

Everything is rebuilt from what the checkpoint recorded, never from today's flags: the model from
its stored MAE config, dims and fine-tuning settings; the tokenizers from the paths stage 1 wrote
into the store (or a directory given with ``tokenizers=``), each checked against the sha256 the
classifier names as its parent; the audio / video features from the tokenizers' own configs
(`vqmae.encoding.feature_config`), so new media are encoded exactly as the training store was.

Scoring is the test-time rule of `vqmae.stages.finetune.predict_clips`: a clip is cut into non-overlapping
windows of the model's length from frame 0 (the last one padded, its padding invalid), each window
is encoded, the window vectors are pooled into one clip vector by the model's learned clip pooling,
and the head's outputs (logits, or values for regression) are turned into scores (softmax for
classify, a sigmoid per label for multilabel, the values for regress). The per-window timeline is
the head applied to each window alone.

Modalities (``modality=``): ``auto`` scores whatever the input has among the model's modalities;
``av`` demands both; ``audio`` / ``visual`` score that one alone (the other is never decoded and is
absent for the model, as `drop_modality` makes it). In ``auto`` mode a video where no face is found
falls back to audio alone with a warning kept in the `Prediction`; every other problem with one
input is a `Failure` naming the file, and `predict_many` goes on with the others.

Speaker normalisation: a classifier fine-tuned with ``finetune.speaker_norm`` subtracts a speaker's
mean pooled features before its head. ``predict_many(..., same_speaker=True)`` treats the files as
one speaker's clips and takes that mean over them (what `vqmae finetune` does with a test speaker's
clips); otherwise each clip uses the mean of the training speakers stored with the model, which is
less accurate for a voice or face unlike the training speakers'.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from vqmae.checkpoint import CheckpointError, LoadedTokenizer, load_classifier
from vqmae.config import Config, ConfigError, set_key
from vqmae.datasets import ClipInfo
from vqmae.encoding import feature_config
from vqmae.ingest import ClipData, Failure, ingest, spec_from_wave
from vqmae.models.classifier import EmotionModel, clip_and_window_outputs, drop_modality
from vqmae.models.tokenizers import encode_frames
from vqmae.store import ModalitySpec
from vqmae.tasks import Task
from vqmae.training import Reporter
from vqmae.utils import autocast_context
from vqmae.stages.predict.results import (ARRAYS, InputError, Prediction, PredictError, PredictResult, _clip_info,
                                          _failure, expand_paths, failure_status, to_csv, to_json)
from vqmae.windows import batch_dict, gather, make_batch, tile_windows, window_geometry

__all__ = ["MODES", "InputError", "Prediction", "PredictError", "PredictResult", "Predictor", "failure_status",
           "to_csv", "to_json"]

log = logging.getLogger(__name__)

MODES = ("auto", "av", "audio", "visual")
TOKENIZERS_HINT = "pass the directory holding the tokenizers that made the training store with --tokenizers DIR"
# A face found in fewer frames than this (tracked boxes fill the rest) is worth a warning.
LOW_FACE_RATE = 0.5
# Audio and video lengths differing by more than this (s) are worth a warning (AAC padding is ~0.1 s).
AV_OFFSET_WARN = 0.2


# ----------------------------------------------------------------------------------------------
# results


@dataclass
class _Clip:
    """One input, encoded: codes[m] uint16 [T_m, K_m] for the modalities scored, mode and notes."""

    path: str
    codes: dict[str, np.ndarray]
    mode: str
    warnings: list[str]


# ----------------------------------------------------------------------------------------------
# the predictor


class Predictor:
    """A classifier rebuilt from its checkpoint, with the tokenizers that made its training store."""

    def __init__(self, model: EmotionModel, task: Task, tokenizers: dict[str, LoadedTokenizer],
                 cfg: Config, window_seconds: float, device: str, path: Path, batch_windows: int = 64):
        self.model = model.to(device).eval()
        self.task = task
        self.tokenizers = tokenizers
        self.cfg = cfg  # decoding settings: the tokenizers' features, the classifier run's face settings
        self.device = device
        self.path = path
        self.batch_windows = batch_windows
        self.modalities: tuple[str, ...] = tuple(model.names)
        self.specs = {m: ModalitySpec(m, t.model.codebook_size, tuple(t.model.grid),
                                      float(t.model.frame_rate), t.sha256)
                      for m, t in tokenizers.items()}
        mode = "av" if len(self.modalities) == 2 else self.modalities[0]
        self.geom = window_geometry(self.specs, mode, window_seconds)

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str = "cpu",
             tokenizers: str | os.PathLike | None = None, face_mode: str | None = None,
             batch_windows: int = 64) -> "Predictor":
        """Rebuild the classifier at `path` and its tokenizers (`vqmae.checkpoint.load_classifier`):
        from the recorded paths, or from the directory `tokenizers` holding audio_vqvae.pt /
        visual_vqvae.pt, each sha256-checked against the classifier's parents. `face_mode` (auto,
        fan, haar, none) overrides the face detector the classifier's run used. Raises
        PredictError naming the file and the reason. A directory is read as a Hub folder
        (`from_pretrained`)."""
        if Path(path).is_dir():
            return cls.from_pretrained(path, device=device, face_mode=face_mode, batch_windows=batch_windows)
        try:
            loaded = load_classifier(path, device=device, tokenizers=tokenizers, hint=TOKENIZERS_HINT)
            cfg = feature_config(loaded.cfg, loaded.tokenizers)
            if face_mode is not None:
                cfg = set_key(cfg, "face.mode", face_mode)
        except (CheckpointError, ConfigError) as e:
            raise PredictError(str(e)) from None
        task, model = loaded.task, loaded.model
        log.info("%s: %s over %s, %s", path, task.kind, list(task.names), list(model.names))
        return cls(model, task, loaded.tokenizers, cfg, loaded.mae_cfg.window_seconds, device, Path(path),
                   batch_windows)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, device: str = "cpu",
                        revision: str | None = None, face_mode: str | None = None,
                        batch_windows: int = 64) -> "Predictor":
        """A classifier and its tokenizers from a Hub folder (`vqmae export --hub-dir`) or a Hugging
        Face Hub repo id holding one (`vqmae.stages.hub`). Raises PredictError."""
        from vqmae.stages.predict.hub import load_hub_folder

        h = load_hub_folder(name_or_path, device=device, revision=revision, face_mode=face_mode)
        return cls(h.model, h.task, h.tokenizers, h.cfg, h.window_seconds, device, h.folder, batch_windows)

    @property
    def task_kind(self) -> str:
        return self.task.kind

    @property
    def names(self) -> tuple[str, ...]:
        """Output names: classes, labels or regression targets."""
        return self.task.names

    # -- one input ---------------------------------------------------------------------------

    def predict(self, source: str | os.PathLike | Mapping[str, np.ndarray], *,
                modality: str = "auto") -> Prediction:
        """Scores for one media file, or arrays: ``{"audio": float [n] waveform at the tokenizer's
        sample rate, "faces": uint8 [T, S, S, 3] face crops}`` (either or both), or precomputed codes
        ``{"audio": int [Ta, K] or [Ta, *grid], "visual": int [Tv, K] or [Tv, *grid]}``.
        Raises InputError (or `vqmae.ingest.ClipError`) naming the file and the reason."""
        self._check_mode(modality)
        if isinstance(source, Mapping):
            clip = self._from_arrays(source, modality)
        else:
            clip = self._from_file(Path(source), modality)
        return self._score([clip])[0]

    def _from_file(self, path: Path, modality: str) -> _Clip:
        info = _clip_info(path, 0)
        want = self._decode_modalities(modality)
        outcome = next(ingest([info], self.cfg, want, workers=0))
        return self._encoded(info, outcome[1], outcome[2], modality, workers=0)

    # -- many files --------------------------------------------------------------------------

    @property
    def speaker_norm(self) -> bool:
        """Whether the classifier subtracts a speaker's mean features (see the module doc)."""
        return self.model.speaker_norm

    def predict_many(self, paths: Iterable[str | os.PathLike], *, modality: str = "auto",
                     workers: int = 0, batch_windows: int | None = None, same_speaker: bool = False,
                     reporter: Reporter = Reporter()) -> PredictResult:
        """Score every media file of `paths` (a folder stands for its media files, recursively, in
        sorted order). Decoding runs in `workers` crash-isolated processes (0: in this process);
        windows of several files share a model batch of `batch_windows`. A file that cannot be
        scored becomes a `Failure` (path, stage, reason) and the others go on. `same_speaker`: the
        files are one speaker's, and a speaker-normalised classifier takes that speaker's mean
        features over all of them (every file is decoded before any is scored)."""
        self._check_mode(modality)
        files, failures = expand_paths(paths)
        infos = [_clip_info(p, i) for i, p in enumerate(files)]
        batch = batch_windows or self.batch_windows
        done: dict[int, Prediction] = {}
        failed: dict[int, Failure] = {}
        pending: list[tuple[int, _Clip]] = []
        reporter.start("predict", len(infos))
        for info, data, failure in ingest(infos, self.cfg, self._decode_modalities(modality),
                                          workers=workers):
            index = int(info.clip_id)
            try:
                pending.append((index, self._encoded(info, data, failure, modality, workers)))
            except Exception as e:  # noqa: BLE001 - one file's problem must not stop the others
                log.debug("%s failed", info.path, exc_info=True)
                failed[index] = _failure(info.path, e)
            if not same_speaker and sum(self._n_windows(c) for _, c in pending) >= batch:
                done.update(self._flush(pending, failed))
                pending = []
            reporter.advance("predict")
        done.update(self._flush(pending, failed, same_speaker and self.speaker_norm))
        reporter.finish("predict")
        return PredictResult([done[i] for i in sorted(done)],
                             failures + [failed[i] for i in sorted(failed)])

    def _flush(self, pending: list[tuple[int, _Clip]], failed: dict[int, Failure],
               same_speaker: bool = False) -> dict[int, Prediction]:
        if not pending:
            return {}
        try:
            return dict(zip([i for i, _ in pending], self._score([c for _, c in pending], same_speaker)))
        except InputError:  # one bad clip in a batch: score one by one to find it
            out = {}
            for i, c in pending:
                try:
                    out[i] = self._score([c])[0]
                except InputError as e:
                    failed[i] = _failure(c.path, e)
            return out

    # -- decoding and encoding ---------------------------------------------------------------

    def _check_mode(self, modality: str) -> None:
        if modality not in MODES:
            raise ValueError(f"modality {modality!r}: expected one of {list(MODES)}")
        if modality == "av" and len(self.modalities) < 2:
            raise ValueError(f"modality 'av': the classifier {self.path} is {self.modalities[0]}-only")
        if modality in ("audio", "visual") and modality not in self.modalities:
            raise ValueError(f"modality {modality!r}: the classifier {self.path} takes "
                             f"{list(self.modalities)}")

    def _decode_modalities(self, modality: str) -> tuple[str, ...]:
        return self.modalities if modality in ("auto", "av") else (modality,)

    def _encoded(self, info: ClipInfo, data: ClipData | None, failure: Failure | None, modality: str,
                 workers: int) -> _Clip:
        """Codes of a decoded file; in auto mode a video without a face is decoded again for its
        audio alone, with a warning."""
        warnings: list[str] = []
        if failure is not None and failure.stage == "faces" and modality == "auto" \
                and "audio" in self.modalities:
            warnings.append(f"no face found ({failure.reason}); scored on audio alone")
            log.warning("%s: %s", info.path, warnings[-1])
            _, data, failure = next(ingest([info], self.cfg, ("audio",), workers=workers))
        if failure is not None:
            raise InputError(failure.path, failure.reason, failure.stage)
        codes = {}
        if data.spec is not None:
            codes["audio"] = encode_frames(self.tokenizers["audio"].model, "audio", data.spec, self.device)
        if data.faces is not None:
            codes["visual"] = encode_frames(self.tokenizers["visual"].model, "visual", data.faces,
                                            self.device)
            if data.face_rate < LOW_FACE_RATE:
                warnings.append(f"face detected in only {data.face_rate:.0%} of the frames")
        if data.faces is not None and data.spec is not None and abs(data.av_offset) > AV_OFFSET_WARN:
            warnings.append(f"audio and video lengths differ by {data.av_offset:+.2f} s; audio "
                            f"{'trimmed' if data.av_offset > 0 else 'zero-padded'} to the video")
        return self._clip(info.path, codes, modality, warnings)

    def _clip(self, path: str, codes: dict[str, np.ndarray], modality: str, warnings: list[str]) -> _Clip:
        """Choose the scored modalities and keep only their codes."""
        have = [m for m in self.modalities if m in codes and len(codes[m])]
        if modality == "auto":
            if not have:
                raise InputError(path, f"has none of the classifier's modalities {list(self.modalities)}")
            mode = "av" if len(have) == 2 else have[0]
        else:
            need = self.modalities if modality == "av" else (modality,)
            missing = [m for m in need if m not in have]
            if missing:
                what = "no video track" if "visual" in missing and "audio" in have else f"no {missing} frames"
                raise InputError(path, f"{what} for modality {modality!r}"
                                 + (" (--modality auto falls back to audio)" if modality == "av" else ""))
            mode = modality
        keep = self.modalities if mode == "av" else (mode,)
        return _Clip(path, {m: codes[m] for m in keep}, mode, warnings)

    def _from_arrays(self, source: Mapping[str, np.ndarray], modality: str) -> _Clip:
        """Codes from waveform / face arrays, or checked precomputed codes."""
        keys = set(source)
        unknown = keys - {"audio", "faces", "visual"}
        if unknown or not keys:
            raise InputError(ARRAYS, f"keys {sorted(keys)}: expected audio and/or faces (media), or "
                                     f"audio and/or visual (codes)")
        audio = source.get("audio")
        is_codes = "visual" in keys or (audio is not None and np.ndim(audio) >= 2)
        if is_codes and "faces" in keys:
            raise InputError(ARRAYS, "give either media arrays (audio waveform, faces) or codes "
                                     "(audio, visual), not a mix")
        codes = self._check_codes(source) if is_codes else self._encode_arrays(source, modality)
        return self._clip(ARRAYS, codes, modality, [])

    def _check_codes(self, source: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for m, x in source.items():
            if m not in self.specs:
                raise InputError(ARRAYS, f"{m} codes given but the classifier takes {list(self.modalities)}")
            spec = self.specs[m]
            x = np.asarray(x)
            if x.ndim < 2 or math.prod(x.shape[1:]) != spec.n_tokens or not np.issubdtype(x.dtype, np.integer):
                raise InputError(ARRAYS, f"{m} codes: expected integers [T, {spec.n_tokens}] or "
                                         f"[T, {', '.join(map(str, spec.grid))}], got {x.dtype} {list(x.shape)}")
            if x.size and (x.min() < 0 or x.max() >= spec.codebook_size):
                raise InputError(ARRAYS, f"{m} codes outside [0, {spec.codebook_size}): "
                                         f"min {x.min()}, max {x.max()}")
            out[m] = x.reshape(len(x), spec.n_tokens).astype(np.uint16)
        return out

    def _encode_arrays(self, source: Mapping[str, np.ndarray], modality: str) -> dict[str, np.ndarray]:
        use_faces = modality != "audio" and "visual" in self.modalities and source.get("faces") is not None
        use_audio = modality != "visual" and "audio" in self.modalities and source.get("audio") is not None
        codes = {}
        n_video = None
        if use_faces:
            faces = _check_faces(source["faces"], self.cfg.face.size)
            codes["visual"] = encode_frames(self.tokenizers["visual"].model, "visual", faces, self.device)
            n_video = len(faces)
        if use_audio:
            spec = spectrogram_frames(np.asarray(source["audio"]), self.cfg, n_video)
            codes["audio"] = encode_frames(self.tokenizers["audio"].model, "audio", spec, self.device)
        return codes

    # -- scoring -----------------------------------------------------------------------------

    def _n_windows(self, clip: _Clip) -> int:
        return max(1, -(-self._steps(clip) // self.geom.window_steps))

    def _steps(self, clip: _Clip) -> int:
        """The clip's duration in window-grid steps (as `ClipWindows.steps`)."""
        return max(-(-len(c) // self.geom.ratio[m]) for m, c in clip.codes.items())

    @torch.no_grad()
    def _score(self, clips: Sequence[_Clip], same_speaker: bool = False) -> list[Prediction]:
        """Every window of every clip through the encoder, pooled per clip, then the head (exactly
        `vqmae.stages.finetune.predict_clips`), then turned into scores. `same_speaker`: the clips are
        one speaker's, whose mean features a speaker-normalised model subtracts."""
        geom = self.geom
        steps = np.array([self._steps(c) for c in clips], np.int64)
        win_clip, win_starts = tile_windows(np.arange(len(clips)), steps, geom.window_steps)
        src, first, avail = {}, {}, {}
        for m in self.modalities:  # clips' codes concatenated, as rows of a store
            parts = [c.codes.get(m, np.zeros((0, self.specs[m].n_tokens), np.uint16)) for c in clips]
            length = np.array([len(p) for p in parts], np.int64)
            offset = np.cumsum(length) - length
            src[m] = np.concatenate(parts)
            frames = win_starts * geom.ratio[m]
            first[m], avail[m] = offset[win_clip] + frames, length[win_clip] - frames
        # which windows lose which modality: the clip's mode keeps only its own
        drop = {m: torch.from_numpy(np.array([c.mode not in ("av", m) for c in clips])[win_clip])
                for m in self.modalities}
        xs, ps = [], []
        with autocast_context(self.device):
            for a in range(0, len(win_clip), self.batch_windows):
                sl = slice(a, a + self.batch_windows)
                parts = {m: gather(src[m], first[m][sl], avail[m][sl], geom.frames[m]) for m in self.modalities}
                batch = batch_dict(make_batch(win_clip[sl], win_starts[sl], parts, self.specs), self.device)
                for m in self.modalities:
                    if drop[m][sl].any():
                        batch = drop_modality(batch, m, drop[m][sl].to(self.device))
                x, p = self.model.pooled(batch)
                xs.append(x.float())
                ps.append(p)
            x = torch.cat(xs)
            group = torch.zeros(len(clips), dtype=torch.long, device=x.device) if same_speaker else None
            out, win = clip_and_window_outputs(self.model, x, torch.cat(ps), torch.from_numpy(win_clip).to(x.device),
                                               len(clips), group, self.batch_windows)
            out, win = out.numpy(), win.numpy()  # [n_clips, C], [n_windows, C]: timelines
        if not np.isfinite(out).all():
            bad = sorted({clips[i].path for i in np.flatnonzero(~np.isfinite(out).all(1))})
            raise InputError(bad[0], "the model produced non-finite outputs")
        mean = out.astype(np.float32)
        return [self._prediction(c, mean[i], win_starts[win_clip == i], win[win_clip == i], steps[i])
                for i, c in enumerate(clips)]

    def _prediction(self, clip: _Clip, logits: np.ndarray, starts: np.ndarray, win: np.ndarray,
                    steps: int) -> Prediction:
        scores = self.task.activate(logits)
        return Prediction(clip.path, self.task.kind, self.task.names, scores, self.task.top(scores), clip.mode,
                          steps / self.geom.step_rate, starts / self.geom.step_rate,
                          self.task.activate(win), list(clip.warnings))


# ----------------------------------------------------------------------------------------------
# helpers


def spectrogram_frames(wave: np.ndarray, cfg: Config, n_video: int | None = None) -> np.ndarray:
    """A waveform float [n] at ``cfg.audio.sample_rate`` → power frames float32 [Ta, F], as
    `vqmae.ingest.load_clip` makes them: fitted to ``n_video`` frames (Ta = 2 × n_video) when given,
    peak-normalised, STFT."""
    wave = np.asarray(wave, np.float32)
    if wave.ndim != 1:
        raise InputError(ARRAYS, f"audio waveform: expected mono float [n], got shape {list(wave.shape)}")
    try:
        return spec_from_wave(wave, cfg, n_video)[0]
    except ValueError as e:
        raise InputError(ARRAYS, str(e)) from None


def _check_faces(faces: np.ndarray, size: int) -> np.ndarray:
    faces = np.asarray(faces)
    if faces.dtype != np.uint8 or faces.ndim != 4 or faces.shape[1:] != (size, size, 3) or not len(faces):
        raise InputError(ARRAYS, f"faces: expected uint8 [T, {size}, {size}, 3] RGB crops, got "
                                 f"{faces.dtype} {list(faces.shape)}")
    return faces
