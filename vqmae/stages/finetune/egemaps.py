"""The eGeMAPS baseline: the acoustic features speech-emotion papers report against.

Each clip's audio is decoded from the media path the store recorded and passed, as a 16 kHz mono
waveform, to openSMILE's eGeMAPSv02 functionals. That gives 88 statistics of pitch, loudness,
spectral balance, formants, voice quality and rhythm over the whole utterance. Features are then
z-scored per speaker, over all of that speaker's clips: their labels are never used, and it is the
usual way to take out the speaker's voice. `baseline.run_baseline` fits the linear model on the same
folds and label subsets as the transformer:

- logistic regression for classes;
- ridge regression for `--task regress`.

Features are computed once per run and cached as `egemaps.npz` in the run directory, keyed by clip
id. A clip whose audio cannot be decoded, or that has no audio, gets an all-zero row; the baseline
then leaves that clip out, and the log says how many were left out.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np

from vqmae.isolate import isolated_map
from vqmae.media import MediaError, read_audio
from vqmae.stages.finetune.baseline import per_speaker
from vqmae.store import TokenStore
from vqmae.training import Reporter
from vqmae.utils import atomic_write_bytes

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
N_FEATURES = 88  # eGeMAPSv02 functionals
CACHE = "egemaps.npz"


class EgemapsError(RuntimeError):
    """openSMILE is missing or failed as a whole (not one clip)."""


_SMILE = None  # one extractor per process


def _smile():
    global _SMILE
    if _SMILE is None:
        try:
            import opensmile
        except ImportError as e:
            raise EgemapsError("the eGeMAPS baseline needs the 'opensmile' package (pip install "
                               f"opensmile): {e}") from None
        _SMILE = opensmile.Smile(feature_set=opensmile.FeatureSet.eGeMAPSv02,
                                 feature_level=opensmile.FeatureLevel.Functionals)
    return _SMILE


def clip_features(path: str) -> np.ndarray:
    """eGeMAPSv02 functionals of one media file's audio → float32 [88]."""
    wave = read_audio(path, SAMPLE_RATE)
    if len(wave) < SAMPLE_RATE // 10:
        raise MediaError(Path(path), f"audio too short for eGeMAPS ({len(wave)} samples)")
    out = _smile().process_signal(wave, SAMPLE_RATE).to_numpy(np.float32).reshape(-1)
    if out.shape != (N_FEATURES,) or not np.isfinite(out).all():
        raise MediaError(Path(path), "openSMILE returned no finite eGeMAPS vector")
    return out


def _one(path: str) -> np.ndarray:
    try:
        return clip_features(path)
    except MediaError as e:
        log.debug("%s", e)
        return np.zeros(N_FEATURES, np.float32)


def store_features(store: TokenStore, cache_dir: Path | None = None, workers: int = 1,
                   reporter: Reporter = Reporter()) -> np.ndarray:
    """Raw eGeMAPS features of every clip of the store, float32 [n_clips, 88], one row per table
    row. Clips that are not ok, or have no audio codes, get a zero row. The result is cached in
    `cache_dir`, keyed by clip id."""
    _smile()  # fail early and clearly when openSMILE is missing
    ids = [str(x) for x in store.clips["clip_id"].tolist()]
    cached = _read_cache(cache_dir, ids)
    if cached is not None:
        return cached
    want = np.flatnonzero((store.clips["status"] == "ok") & (np.asarray(store.clips["audio_length"]) > 0)) \
        if "audio_length" in store.clips else np.zeros(0, np.int64)
    feats = np.zeros((len(ids), N_FEATURES), np.float32)
    paths = [str(store.clips["path"][r]) for r in want]
    reporter.start("egemaps", len(paths))
    for outcome in isolated_map(_one, paths, workers=workers):  # completion order
        if outcome.ok:
            feats[want[outcome.index]] = outcome.value
        reporter.advance("egemaps")
    reporter.finish("egemaps")
    missing = len(want) - int(feats[want].any(1).sum())
    if missing:
        log.warning("eGeMAPS: %d of %d clips gave no features (undecodable or too short audio)",
                    missing, len(want))
    if cache_dir is not None:
        _write_cache(cache_dir, ids, feats)
    return feats


def speaker_normalized(feats: np.ndarray, speakers: np.ndarray) -> np.ndarray:
    """Each speaker's rows z-scored with that speaker's mean and std (rows with features only; a
    speaker with one clip is centred only). Zero rows stay zero (no features)."""
    return per_speaker(feats, speakers, scale=True)


def _read_cache(cache_dir: Path | None, ids: list[str]) -> np.ndarray | None:
    path = None if cache_dir is None else Path(cache_dir) / CACHE
    if path is None or not path.exists():
        return None
    with np.load(path, allow_pickle=False) as z:
        if z["clip_id"].tolist() != ids or z["features"].shape != (len(ids), N_FEATURES):
            log.info("%s: made for other clips; recomputing", path)
            return None
        return z["features"].astype(np.float32)


def _write_cache(cache_dir: Path, ids: list[str], feats: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, clip_id=np.array(ids), features=feats)
    atomic_write_bytes(Path(cache_dir) / CACHE, buf.getvalue())
