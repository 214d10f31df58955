"""Noise-robustness evaluation data: a token store re-encoded with noise added to every waveform.

Stage 3 evaluates models "with additive noise at chosen SNRs (noise added to the waveform, then
tokenized with the same tokenizers)". `noisy_store` builds that data: a copy of a labelled store with
the same clips, clip ids and tokenizers, whose audio codes come from the waveform plus noise (added
after audio/video alignment, before peak normalisation and the STFT) and whose visual codes are
re-encoded from the unchanged video.

    add_noise(wave, NoiseSpec(snr_db=0), key)   → wave + noise at exactly 0 dB SNR
    noisy_store(store, out, NoiseSpec(snr_db=5), cfg=cfg) → out (resumable, cached by spec + source)

The noise of a clip is a pure function of (spec, clip id): the same clip gets the same noise in
every process, run and machine, so a noisy store can be rebuilt, sharded or resumed exactly.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import zarr

from vqmae.audio import NoiseSpec
from vqmae.checkpoint import CheckpointError, LoadedTokenizer, store_tokenizers
from vqmae.config import Config
from vqmae.datasets import ClipInfo
from vqmae.store import TokenStore, check_specs, list_segments, parts_dir
from vqmae.encoding import TokenizeError, encode_corpus, feature_config, store_specs
from vqmae.training import Reporter
from vqmae.utils import atomic_write_json

log = logging.getLogger(__name__)


class NoiseError(TokenizeError):
    """A noisy store that cannot be built: tokenizers that moved or changed since the source store
    was made, or an output path holding another store. The message names the path and both sides."""


# -- one waveform --------------------------------------------------------------------------------


# -- a whole store -------------------------------------------------------------------------------

def clips_from_store(store: TokenStore) -> list[ClipInfo]:
    """The `ClipInfo` of every row with status "ok", in table order: same clip_id, path, dataset,
    speaker, labels, dimensions and split; `has_video` = the clip has visual codes.

    The table keeps one media path per clip. Corpora whose audio lives in a separate tree (CREMA-D,
    VoxCeleb2 `aac/`) lose their `audio_path` here: rescan the corpus and pass those clips to
    `noisy_store(clips=...)` instead. `ClipInfo.meta` is not stored either.
    """
    t = store.clips
    has_visual = "visual" in store.specs
    out = []
    for i in np.flatnonzero(t["status"] == "ok"):
        out.append(ClipInfo(
            clip_id=str(t["clip_id"][i]), path=str(t["path"][i]), dataset=str(t["dataset"][i]),
            speaker=str(t["speaker"][i]), label=str(t["label"][i]) or None,
            labels=tuple(x for x in str(t["labels"][i]).split(";") if x),
            valence=_number(t["valence"][i]), arousal=_number(t["arousal"][i]),
            dominance=_number(t["dominance"][i]), split=str(t["split"][i]) or None,
            has_video=has_visual and int(t["visual_length"][i]) > 0))
    return out


def _number(x: Any) -> float | None:
    return None if math.isnan(float(x)) else float(x)


def noisy_store(store_path: str | os.PathLike, out_path: str | os.PathLike, spec: NoiseSpec, *,
                cfg: Config | None = None, clips: Sequence[ClipInfo] | None = None,
                device: str = "cpu", workers: int = 1, reporter: Reporter = Reporter()) -> Path:
    """Re-encode the clips of the store at `store_path` into `out_path` with `spec`'s noise added to
    every waveform; returns `out_path`.

    The store's own tokenizers (found through their recorded paths, sha256-checked) encode it, so
    `out_path` has the source's specs and a model trained on the source accepts it. `clips` default
    to `clips_from_store` (see there for corpora with separate audio files); `cfg` defaults to the
    config the source store was encoded with (face detection settings decide the visual codes).
    Encoding goes through `encode_corpus`: resumable after an interruption and atomic per segment.
    The result carries `attrs["noise"]` = {snr_db, kind, seed, source}; a later call for the same
    spec and source finds it complete and returns at once.
    """
    store_path, out_path = Path(store_path), Path(out_path)
    source = TokenStore.open(store_path)
    if out_path.resolve() == store_path.resolve():
        raise NoiseError(f"{out_path}: the noisy store must not overwrite its source")
    record = spec.record(store_path)
    clips = list(clips) if clips is not None else clips_from_store(source)
    if _is_cached(out_path, record, source, clips):
        log.info("%s: already holds %s; nothing to do", out_path, record)
        _marker(out_path).unlink(missing_ok=True)
        return out_path
    _check_out_path(out_path, record)
    try:
        tokenizers = store_tokenizers(source, device=device)
    except CheckpointError as e:
        raise NoiseError(str(e)) from None
    check_specs(store_path, source.specs, store_specs(tokenizers), have_name="store",
                want_name="its tokenizers")
    cfg = _encoding_config(source, cfg, tokenizers)
    atomic_write_json(_marker(out_path), record)
    result = encode_corpus(clips, cfg, out_path, tokenizers, device=device, workers=workers,
                           reporter=reporter, noise=spec)
    for f in result.failed:
        log.warning("%s: clip %s failed (%s: %s)", out_path, f.clip_id, f.stage, f.reason)
    _write_noise_attrs(out_path, record)
    _marker(out_path).unlink(missing_ok=True)
    log.info("%s: %d clips encoded, %d already done, %d failed, noise %s", out_path, result.encoded,
             result.skipped_done, len(result.failed), record)
    return out_path


def _marker(out_path: Path) -> Path:
    """Written before encoding starts, removed once `attrs["noise"]` is set: says whose unfinished
    writes lie at `out_path` (the merge rewrites the root attributes, so they cannot say it)."""
    return Path(str(out_path) + ".noise.json")


def _is_cached(out_path: Path, record: dict[str, Any], source: TokenStore,
               clips: Sequence[ClipInfo]) -> bool:
    if not (out_path / "zarr.json").exists():
        return False
    out = TokenStore.open(out_path)
    if out.attrs.get("noise") != record:
        return False
    # same spec and source, but the source was re-tokenized since: stale, and it is not ours to delete
    check_specs(out_path, out.specs, source.specs, have_name="noisy store", want_name="source store")
    have = set(out.clips["clip_id"].tolist())
    return not list_segments(out_path) and all(c.clip_id in have for c in clips)


def _check_out_path(out_path: Path, record: dict[str, Any]) -> None:
    """Refuse an `out_path` holding another store or another noise spec's unfinished writes."""
    marker = _marker(out_path)
    claimed = json.loads(marker.read_text()) if marker.exists() else None
    if claimed is not None and claimed != record:
        raise NoiseError(f"{out_path}: an unfinished noisy store for {claimed} is there ({marker}); "
                         f"this call wants {record}: choose another path or delete both")
    if (out_path / "zarr.json").exists():
        noise = TokenStore.open(out_path).attrs.get("noise")
        if noise is not None and noise != record:
            raise NoiseError(f"{out_path}: holds a noisy store for {noise}; this call wants {record}")
        if noise is None and claimed is None:
            raise NoiseError(f"{out_path}: holds a token store that is not a noisy store (no "
                             f"'noise' attribute); choose another path")
    elif parts_dir(out_path).exists() and claimed is None:
        raise NoiseError(f"{out_path}: {parts_dir(out_path)} holds unfinished writes of another "
                         f"store; choose another path")


def _encoding_config(source: TokenStore, cfg: Config | None, tokenizers: dict[str, LoadedTokenizer]
                     ) -> Config:
    stored = (source.attrs.get("config") or {}).get("config")
    if cfg is None:
        if not stored:
            raise NoiseError(f"{source.path}: records no encoding config; pass cfg=")
        return Config.from_dict(stored)
    if stored:
        want, had = feature_config(cfg, tokenizers), Config.from_dict(stored)
        for part in ("audio", "video", "face"):
            if getattr(want, part) != getattr(had, part):
                log.warning("%s was encoded with %s %s, the noisy copy uses %s: its codes may differ "
                            "for reasons other than the noise", source.path, part,
                            getattr(had, part), getattr(want, part))
    return cfg


def _write_noise_attrs(out_path: Path, record: dict[str, Any]) -> None:
    # zarr 3's local store replaces zarr.json atomically (temp file + rename)
    zarr.open_group(str(out_path), mode="r+").attrs.update({"noise": record})
