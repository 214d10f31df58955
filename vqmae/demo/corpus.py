"""The demo corpus on disk: clip planning, per-clip parameters, media encoding and the parallel writer.

`synthesize(out_dir, cfg)` plans every clip, synthesises each one (voice, then face frames) in its
own worker, writes it as an mp4 or wav, then writes the manifest and the `synth.json` summary.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from vqmae import __version__
from vqmae.audio import wav_bytes
from vqmae.config import SynthConfig
from vqmae.demo.face import FaceRenderer, head_motion
from vqmae.demo.profiles import EMOTIONS, FPS, Emotion, Handle, _rng, make_speaker, speaker_name
from vqmae.demo.voice import frame_energy, mouth_opening, synth_voice
from vqmae.media import mp4_bytes as media_mp4_bytes
from vqmae.utils import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

FORMAT = "vqmae-synth/1"
MANIFEST_COLUMNS = ("path", "speaker", "label", "valence", "arousal", "dominance", "split")
AAC_RATES = frozenset({8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000})
ProgressFn = Callable[[int, int], None]


class SynthError(ValueError):
    """A configuration the generator cannot honour, or an output directory it must not touch."""


# --------------------------------------------------------------------------------------------------
# Plan: clips
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipSpec:
    speaker: int
    clip: int
    kind: str  # "video" or "audio"
    label: str

    @property
    def path(self) -> str:
        name = speaker_name(self.speaker)
        ext = "mp4" if self.kind == "video" else "wav"
        return f"{self.kind}/{name}/{name}_{self.clip:03d}.{ext}"


@dataclass(frozen=True)
class ClipRecord:
    path: str
    speaker: str
    label: str
    valence: float
    arousal: float
    dominance: float
    seconds: float
    kind: str


def validate(cfg: SynthConfig) -> None:
    """Raise `SynthError` naming the first setting the generator cannot honour."""
    unknown = [e for e in cfg.emotions if e not in EMOTIONS]
    checks = [
        (cfg.n_speakers >= 1, f"synth.n_speakers={cfg.n_speakers}: need at least one speaker"),
        (cfg.clips_per_speaker >= 0 and cfg.audio_only_per_speaker >= 0,
         "synth.clips_per_speaker and synth.audio_only_per_speaker must be >= 0"),
        (cfg.clips_per_speaker + cfg.audio_only_per_speaker >= 1, "no clips requested"),
        (len(cfg.emotions) >= 1, "synth.emotions is empty"),
        (not unknown, f"synth.emotions: unknown {unknown}; known: {sorted(EMOTIONS)}"),
        (len(set(cfg.emotions)) == len(cfg.emotions), f"synth.emotions repeats a class: {cfg.emotions}"),
        (0 < cfg.min_seconds <= cfg.max_seconds,
         f"need 0 < synth.min_seconds ({cfg.min_seconds}) <= synth.max_seconds ({cfg.max_seconds})"),
        (cfg.frame_size >= 64 and cfg.frame_size % 2 == 0,
         f"synth.frame_size={cfg.frame_size}: need an even size >= 64 (yuv420p halves it)"),
        (cfg.audio_rate in AAC_RATES, f"synth.audio_rate={cfg.audio_rate}: AAC needs one of {sorted(AAC_RATES)}"),
        (cfg.seed >= 0, f"synth.seed={cfg.seed}: must be >= 0"),
        (cfg.variability >= 0, f"synth.variability={cfg.variability}: must be >= 0"),
        (0 <= cfg.expressiveness <= 4, f"synth.expressiveness={cfg.expressiveness}: must be in [0, 4]"),
        (0 <= cfg.speaker_spread <= 1, f"synth.speaker_spread={cfg.speaker_spread}: must be in [0, 1]"),
    ]
    for ok, message in checks:
        if not ok:
            raise SynthError(message)


def clip_rng(cfg: SynthConfig, spec: ClipSpec) -> np.random.Generator:
    """The clip's own stream: its parameters, then its voice, are drawn from it in that order."""
    return _rng(cfg, 1, spec.speaker, spec.clip)


def plan(cfg: SynthConfig) -> list[ClipSpec]:
    """Every clip of the corpus (video first, then audio-only); labels cycle through the classes
    continuing from one speaker to the next, so counts stay balanced overall and per speaker."""
    n = len(cfg.emotions)
    specs = []
    for spk in range(cfg.n_speakers):
        for c in range(cfg.clips_per_speaker):
            specs.append(ClipSpec(spk, c, "video", cfg.emotions[(spk * cfg.clips_per_speaker + c) % n]))
        for j in range(cfg.audio_only_per_speaker):
            label = cfg.emotions[(spk * cfg.audio_only_per_speaker + j) % n]
            specs.append(ClipSpec(spk, cfg.clips_per_speaker + j, "audio", label))
    return specs


# --------------------------------------------------------------------------------------------------
# Per-clip parameters
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipParams:
    n_frames: int
    intensity: float
    emo: Emotion  # the class profile moved toward neutral by `intensity`, plus per-clip jitter
    vad: tuple[float, float, float]


def clip_params(cfg: SynthConfig, spec: ClipSpec, rng: np.random.Generator) -> ClipParams:
    """Length, intensity, jittered profile and dimensional labels of one clip.

    intensity ~ U(0.55, 1.15) at variability 1 moves every cue (and valence / arousal / dominance)
    that far from neutral, so a weak angry clip sits near a strong neutral one."""
    seconds = rng.uniform(cfg.min_seconds, cfg.max_seconds)
    n_frames = max(1, int(round(seconds * FPS)))
    j = cfg.variability
    intensity = float(np.clip(1.0 + j * rng.uniform(-0.45, 0.15), 0.1, 1.5))
    gain = intensity * cfg.expressiveness  # how far the signal moves; the labels use `intensity`
    base, target = EMOTIONS["neutral"], EMOTIONS[spec.label]
    mix = {f.name: getattr(base, f.name) + gain * (getattr(target, f.name) - getattr(base, f.name))
           for f in dataclasses.fields(Emotion) if f.name not in ("vad", "face")}
    noise = rng.standard_normal(6) * j
    mix["pitch_st"] += 1.0 * noise[0]
    mix["range_st"] *= float(np.exp(0.2 * noise[1]))
    mix["rate"] *= float(np.exp(0.1 * noise[2]))
    mix["loud_db"] += 1.5 * noise[3]
    mix["open_quotient"] = float(np.clip(mix["open_quotient"] + 0.03 * noise[4], 0.3, 0.85))
    mix["pause"] *= float(np.exp(0.15 * noise[5]))
    if cfg.expressiveness > 1:  # extrapolating past the written profiles: keep them physical
        for name, (lo, hi) in _EXTRAPOLATION_LIMITS.items():
            mix[name] = float(np.clip(mix[name], lo, hi))
    face = tuple(_scaled_handle(h, gain) for h in target.face)
    emo = Emotion(**mix, vad=target.vad, face=face)
    vad = np.clip(intensity * np.array(target.vad) + 0.08 * j * rng.standard_normal(3), -1, 1)
    return ClipParams(n_frames, intensity, emo, tuple(float(round(v, 3)) for v in vad))


# Physically sensible ranges for the profile fields, so an expressiveness above 1 cannot produce
# a negative rate, a closed glottis or a folded face warp.
_EXTRAPOLATION_LIMITS = {
    "rate": (2.0, 8.0), "open_quotient": (0.3, 0.85), "breath": (0.0, 0.5), "jitter": (0.0, 0.04),
    "shimmer": (0.0, 0.25), "formant": (0.85, 1.2), "pause": (0.3, 3.0), "tremor": (0.0, 1.5),
    "mouth": (0.3, 1.8), "head": (0.2, 2.0), "jaw": (0.0, 0.6), "loud_db": (-20.0, 15.0),
    "pitch_st": (-8.0, 10.0), "range_st": (0.5, 12.0),  # accents stay upward, pitch within ~1.5 octaves
}


def _scaled_handle(h: Handle, gain: float) -> Handle:
    """A face handle's displacement times `gain`, capped at 1.5 σ: the backward map p - d·G(p)
    folds (content crosses over itself) once |d| exceeds about 1.65 σ."""
    x, y, dx, dy, s = h
    k = min(gain, 1.5 * s / max(float(np.hypot(dx, dy)), 1e-9))
    return (x, y, dx * k, dy * k, s)


# --------------------------------------------------------------------------------------------------
# One clip
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clip:
    audio: np.ndarray  # [n_frames * hop] float32
    opening: np.ndarray  # [n_frames]
    params: ClipParams


def make_clip(cfg: SynthConfig, spec: ClipSpec) -> Clip:
    """Audio and per-frame mouth opening of one clip (frames are rendered while encoding)."""
    rng = clip_rng(cfg, spec)
    params = clip_params(cfg, spec, rng)
    hop = cfg.audio_rate // FPS
    spk = make_speaker(cfg, spec.speaker)
    audio = synth_voice(params.n_frames * hop, cfg.audio_rate, params.emo, spk, rng)
    return Clip(audio, mouth_opening(frame_energy(audio, hop), params.emo), params)


def render_frames(cfg: SynthConfig, spec: ClipSpec, clip: Clip):
    """Yield the clip's RGB frames.  # each [S, S, 3] uint8"""
    spk = make_speaker(cfg, spec.speaker)
    renderer = FaceRenderer(spk, clip.params.emo, cfg.frame_size)
    rng = _rng(cfg, 2, spec.speaker, spec.clip)
    motion = head_motion(len(clip.opening), cfg.frame_size, renderer.margin, clip.params.emo.head, rng)
    for affine, opening in zip(motion, clip.opening):
        yield renderer.render(affine, float(opening))


def mp4_bytes(frames, audio: np.ndarray, rate: int, size: int) -> bytes:
    """H.264 yuv420p at 25 fps plus AAC mono.  frames: iterable of [S, S, 3] uint8; audio: [n]"""
    return media_mp4_bytes(frames, audio, rate, size, size, FPS)


def _write_atomic(path: Path, data: bytes) -> None:
    """Temp name then rename: an interrupted run never leaves a half file under the final name.
    No fsync: a crash at worst loses whole clips, which a rerun with --force rewrites."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_clip(cfg: SynthConfig, spec: ClipSpec, out_dir: str | os.PathLike) -> ClipRecord:
    """Synthesise one clip and write its media file under `out_dir`."""
    clip = make_clip(cfg, spec)
    if spec.kind == "video":
        data = mp4_bytes(render_frames(cfg, spec, clip), clip.audio, cfg.audio_rate, cfg.frame_size)
    else:
        data = wav_bytes(clip.audio, cfg.audio_rate)
    _write_atomic(Path(out_dir) / spec.path, data)
    v, a, d = clip.params.vad
    return ClipRecord(spec.path, speaker_name(spec.speaker), spec.label, v, a, d,
                      clip.params.n_frames / FPS, spec.kind)


def _worker_init() -> None:
    import cv2

    cv2.setNumThreads(1)  # one clip per process already fills the cores


def _job(args: tuple[SynthConfig, ClipSpec, str]) -> ClipRecord:
    cfg, spec, out_dir = args
    try:
        return write_clip(cfg, spec, out_dir)
    except Exception as e:
        raise SynthError(f"{Path(out_dir) / spec.path}: {type(e).__name__}: {e}") from e


# --------------------------------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------------------------------


def synthesize(out_dir: str | os.PathLike, cfg: SynthConfig, workers: int | None = None,
               progress: ProgressFn | None = None, overwrite: bool = False) -> Path:
    """Write the corpus under `out_dir` and return the manifest path.

    `workers`: processes (default: CPU count; <= 1 runs in this process). `progress(done, total)` is
    called after each clip. A non-empty `out_dir` is refused unless `overwrite`; then clips of an
    earlier corpus that this one does not contain are removed (only .mp4/.wav under video/, audio/).
    """
    validate(cfg)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SynthError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SynthError(f"{out}: directory is not empty (pass --force / overwrite=True to write into it)")
    specs = plan(cfg)
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale(out, {s.path for s in specs})
    t0 = time.perf_counter()
    records = _run_jobs(cfg, specs, out, workers, progress)
    records.sort(key=lambda r: r.path)
    manifest = out / "manifest.csv"
    atomic_write_bytes(manifest, manifest_bytes(records))
    atomic_write_json(out / "synth.json", _summary(cfg, records))
    log.info("synth: %d clips (%.1f s of media) in %s, %.1f s", len(records),
             sum(r.seconds for r in records), out, time.perf_counter() - t0)
    return manifest


def _remove_stale(out: Path, keep: set[str]) -> None:
    for sub in ("video", "audio"):
        for f in sorted((out / sub).rglob("*")) if (out / sub).is_dir() else []:
            rel = f.relative_to(out).as_posix()
            stale = f.suffix in (".mp4", ".wav") and rel not in keep
            if f.is_file() and (stale or f.name.endswith(".tmp")):
                f.unlink()
    for name in ("manifest.csv", "synth.json"):
        (out / name).unlink(missing_ok=True)  # a corpus without a manifest is visibly incomplete


def _run_jobs(cfg: SynthConfig, specs: list[ClipSpec], out: Path, workers: int | None,
              progress: ProgressFn | None) -> list[ClipRecord]:
    workers = min((os.cpu_count() or 1) if workers is None else workers, len(specs))
    jobs = [(cfg, s, str(out)) for s in specs]
    records: list[ClipRecord] = []

    def done(record: ClipRecord) -> None:
        records.append(record)
        if progress:
            progress(len(records), len(specs))

    if workers <= 1:
        for job in jobs:
            done(_job(job))
        return records
    # An executor, unlike Pool, fails instead of respawning workers that die while starting up.
    try:
        with ProcessPoolExecutor(workers, mp_context=_mp_context(), initializer=_worker_init) as pool:
            futures = [pool.submit(_job, job) for job in jobs]
            try:
                for future in as_completed(futures):
                    done(future.result())
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    except BrokenProcessPool as e:
        raise SynthError(f"{out}: a worker process died ({e}); a script that calls synthesize() must "
                         "do so under `if __name__ == '__main__':` (spawned workers import it), "
                         "or pass workers=1") from None
    return records


def _mp_context() -> multiprocessing.context.BaseContext:
    """spawn everywhere. fork was faster to start but deadlocked when the parent had already run
    threaded code (torch's OpenMP pool, OpenCV's parallel_for, zarr's event loop): a child inherits
    their locks held and hangs in cv2/numpy calls (seen in the test suite). Spawned workers re-import
    the caller's __main__ (a couple of seconds via the CLI), hence the `__main__` guard."""
    return multiprocessing.get_context("spawn")


def manifest_bytes(records: list[ClipRecord]) -> bytes:
    """The CSV-manifest format (docs/design.md §5): path relative to the corpus root, split left empty."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for r in records:
        writer.writerow([r.path, r.speaker, r.label, f"{r.valence:.3f}", f"{r.arousal:.3f}",
                         f"{r.dominance:.3f}", ""])
    return buf.getvalue().encode()


def _summary(cfg: SynthConfig, records: list[ClipRecord]) -> dict:
    def count(key: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in records:
            out[getattr(r, key)] = out.get(getattr(r, key), 0) + 1
        return dict(sorted(out.items()))

    return {
        "format": FORMAT,
        "version": __version__,
        "seed": cfg.seed,
        "config": dataclasses.asdict(cfg),
        "n_clips": len(records),
        "n_video": sum(r.kind == "video" for r in records),
        "n_audio": sum(r.kind == "audio" for r in records),
        "total_seconds": round(sum(r.seconds for r in records), 2),
        "per_label": count("label"),
        "per_speaker": count("speaker"),
        "speakers": [dataclasses.asdict(make_speaker(cfg, i)) for i in range(cfg.n_speakers)],
    }


def manifest_counts(manifest: str | os.PathLike) -> dict[tuple[str, str], int]:
    """{(speaker, label): clips} of a corpus manifest."""
    counts: dict[tuple[str, str], int] = {}
    with open(manifest, newline="") as f:
        for row in csv.DictReader(f):
            key = (row["speaker"], row["label"])
            counts[key] = counts.get(key, 0) + 1
    return counts


def read_summary(out_dir: str | os.PathLike) -> dict:
    """The `synth.json` of a corpus written by `synthesize`."""
    import json

    path = Path(out_dir) / "synth.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SynthError(f"{path}: cannot read ({e})") from None
    if data.get("format") != FORMAT:
        raise SynthError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}")
    return data
