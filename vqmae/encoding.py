"""Encoding clips into a token store with trained tokenizers: the write path shared by `vqmae tokenize`
(the clean store) and `vqmae.noise` (noisy twins of a store).

    encode_corpus(clips, cfg, store, tokenizers) → store (resumable, shardable, merged at the end)

Encoding runs batched on the device, writes through `StoreWriter` segments and skips clips already
committed, so an interrupted run resumes without losing or duplicating a clip. Features are decoded
with the tokenizers' own settings (`feature_config`), never with today's flags.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from vqmae.audio import NoiseSpec
from vqmae.checkpoint import LoadedTokenizer
from vqmae.config import Config
from vqmae.datasets import ClipInfo
from vqmae.ingest import ClipData, Failure, clip_progress, ingest
from vqmae.models.tokenizers import encode_frames
from vqmae.store import ModalitySpec, StoreWriter, TokenStore, merge
from vqmae.training import Reporter

log = logging.getLogger(__name__)


class TokenizeError(RuntimeError):
    """Stage-1 problem that stops the run (mismatched tokenizers, nothing to train on, ...)."""


def clip_record(clip: ClipInfo, index: int, data: ClipData | None = None) -> dict[str, Any]:
    """The store's table row for a clip (everything but codes, starts and lengths)."""
    return {
        "clip_id": clip.clip_id, "index": index, "path": clip.path, "dataset": clip.dataset,
        "speaker": clip.speaker, "label": clip.label, "labels": clip.labels, "split": clip.split,
        "valence": clip.valence, "arousal": clip.arousal, "dominance": clip.dominance,
        "face_rate": None if data is None else data.face_rate,
    }


def feature_config(cfg: Config, tokenizers: dict[str, LoadedTokenizer]) -> Config:
    """The config to decode with: the tokenizers' own feature settings (audio STFT, frame rate,
    face size) override today's, since codes are only meaningful for the features they were
    trained on. Differences are logged; face detection settings stay the user's."""
    for m, tok in tokenizers.items():
        stored = Config.from_dict(tok.ckpt["config"])
        if m == "audio" and stored.audio != cfg.audio:
            log.warning("using the audio tokenizer's audio features %s (command line had %s)",
                        stored.audio, cfg.audio)
            cfg = replace(cfg, audio=stored.audio)
        if m == "visual":
            if stored.face.size != cfg.face.size or stored.video.fps != cfg.video.fps:
                log.warning("using the visual tokenizer's face size %d and fps %g",
                            stored.face.size, stored.video.fps)
            cfg = replace(cfg, face=replace(cfg.face, size=stored.face.size),
                          video=replace(cfg.video, fps=stored.video.fps))
    return cfg


def store_specs(tokenizers: dict[str, LoadedTokenizer]) -> dict[str, ModalitySpec]:
    return {m: ModalitySpec(name=m, codebook_size=t.model.codebook_size, grid=tuple(t.model.grid),
                            frame_rate=float(t.model.frame_rate), tokenizer_sha256=t.sha256)
            for m, t in tokenizers.items()}


@dataclass
class EncodeResult:
    encoded: int
    failed: list[Failure]
    skipped_done: int
    merged: bool


def encode_corpus(clips: Sequence[ClipInfo], cfg: Config, store: Path,
                  tokenizers: dict[str, LoadedTokenizer], *,
                  shard: tuple[int, int] = (0, 1), device: str = "cpu", workers: int = 1,
                  reporter: Reporter = Reporter(), on_clip: Callable[[], None] | None = None,
                  noise: NoiseSpec | None = None,
                  skipped: Sequence[tuple[str, str]] = ()) -> EncodeResult:
    """Encode this shard's clips (index % n == i) into `store`; merge when running unsharded.

    `clips` is the full scan (positions are the store's canonical `index`). Clips already committed
    are skipped, so a rerun after an interruption resumes. `noise` adds seeded noise to every
    clip's waveform before the STFT (see `vqmae.noise`). `skipped`: (path, reason) of the inputs
    the scan could not use; shard 0 records each in the store's table as a failed row (stage
    "scan", clip id ``skipped:<path>``, ordered after the scanned clips), so the store accounts for
    every input.
    """
    modalities = tuple(tokenizers)
    cfg = feature_config(cfg, tokenizers)
    # the store's config records where its tokenizers live (for reconstructions in later stages)
    config = {"config": cfg.to_dict(),
              "tokenizers": {m: {"path": str(t.path), "sha256": t.sha256} for m, t in tokenizers.items()}}
    writer = StoreWriter(store, store_specs(tokenizers), shard=shard, cfg=cfg.store, config=config)
    index = {c.clip_id: i for i, c in enumerate(clips)}
    mine = [c for i, c in enumerate(clips) if i % shard[1] == shard[0]]
    todo = [c for c in mine if c.clip_id not in writer.done]
    failures: list[Failure] = []
    reporter.start("encode", len(mine))
    reporter.advance("encode", len(mine) - len(todo))
    encoded = 0
    with writer:
        if shard[0] == 0:
            for j, (path, reason) in enumerate(skipped):
                if f"skipped:{path}" not in writer.done:
                    writer.add_failure({"clip_id": f"skipped:{path}", "index": len(clips) + j, "path": path},
                                       "scan", reason)
        # completion order: `merge` sorts by index, and holding early finishers back for a slow
        # clip would keep their arrays in memory
        for clip, data, failure in ingest(todo, cfg, modalities, workers=workers, noise=noise,
                                          on_progress=clip_progress(reporter, "encode")):
            if failure is not None:
                failures.append(failure)
                if failure.stage != "decode":  # a crash or timeout may be transient: retry on rerun
                    writer.add_failure(clip_record(clip, index[clip.clip_id]), failure.stage,
                                       failure.reason)
            else:
                if data.n_audio_frames >= 3000:  # a minute or more: say where the time goes now
                    reporter.advance("encode", 0, clip=f"{os.path.basename(clip.path)} decoded, encoding")
                codes = {}
                if data.spec is not None:
                    codes["audio"] = encode_frames(tokenizers["audio"].model, "audio", data.spec, device)
                if data.faces is not None and "visual" in tokenizers:
                    codes["visual"] = encode_frames(tokenizers["visual"].model, "visual", data.faces, device)
                writer.add(clip_record(clip, index[clip.clip_id], data), codes)
                encoded += 1
            reporter.advance("encode")
            if on_clip is not None:
                on_clip()
    reporter.finish("encode")
    merged = shard[1] == 1
    if merged:
        merge(store)
    return EncodeResult(encoded, failures, len(mine) - len(todo), merged)


def store_failures(store: Path) -> list[Failure]:
    """Every failed clip recorded in a merged store (this run's and earlier runs')."""
    out = []
    for clip_id, path, error in TokenStore.open(store).failures():
        stage, _, reason = error.partition(": ")
        out.append(Failure(path, stage, reason, clip_id))
    return out
