"""Stage 1: train the audio and visual VQ-VAE tokenizers and encode every clip into a token store.

    train_tokenizers(clips, cfg, run_dir)  → run_dir/tokenizers/{audio,visual}_vqvae.pt
    encode_corpus(clips, cfg, store, tokenizers) → store (resumable, shardable, merged at the end)

Training draws every batch uniformly from a `FramePool` filled by crash-isolated decoding workers, so
a batch mixes frames of many clips. Checkpoints are written every `ckpt_every` steps and a rerun
resumes from them. Encoding runs batched on the device, writes through `StoreWriter` segments and
skips clips already committed, so an interrupted run resumes without losing or duplicating a clip.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch

from vqmae.checkpoint import checkpoint_sha256, load_checkpoint, load_tokenizer, restore_rng, save_checkpoint
from vqmae.config import Config
from vqmae.datasets import ClipInfo
from vqmae.framepool import FramePool
from vqmae.ingest import ClipData, Failure, ingest
from vqmae.store import ModalitySpec, StoreWriter, TokenStore, merge
from vqmae.tokenizers import build_tokenizer
from vqmae.training import Reporter, autocast_context, lr_at
from vqmae.utils import atomic_write_json

if TYPE_CHECKING:
    from vqmae.noise import NoiseSpec

log = logging.getLogger(__name__)

KINDS = {"audio": "audio_vqvae", "visual": "visual_vqvae"}
CKPT_NAMES = {m: f"{k}.pt" for m, k in KINDS.items()}


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


def ordered(outcomes: Iterator[tuple[ClipInfo, ClipData | None, Failure | None]],
            order: Sequence[ClipInfo]) -> Iterator[tuple[ClipInfo, ClipData | None, Failure | None]]:
    """Re-emit `ingest` results in input order (workers finish out of order), so that what is
    built from them does not depend on timing."""
    position = {c.clip_id: i for i, c in enumerate(order)}
    pending: dict[int, tuple] = {}
    nxt = 0
    for item in outcomes:
        pending[position[item[0].clip_id]] = item
        while nxt in pending:
            yield pending.pop(nxt)
            nxt += 1


def split_heldout(clips: Sequence[ClipInfo], fraction: float, seed: int) -> tuple[list, list]:
    """Seeded split of clips into (train, held-out); held-out gets max(1, fraction × n) clips."""
    if len(clips) < 2 or fraction <= 0:
        return list(clips), []
    rng = random.Random(seed)
    idx = list(range(len(clips)))
    rng.shuffle(idx)
    n_held = max(1, int(round(fraction * len(clips))))
    held = set(idx[:n_held])
    return ([c for i, c in enumerate(clips) if i not in held],
            [c for i, c in enumerate(clips) if i in held])


# -- pools ------------------------------------------------------------------------------------

@dataclass
class Pools:
    audio: FramePool | None = None
    visual: FramePool | None = None
    failures: list[Failure] = field(default_factory=list)
    n_clips: int = 0

    def add(self, data: ClipData, clip_index: int) -> None:
        if self.audio is not None and data.spec is not None:
            self.audio.add(data.spec, clip_index)
        if self.visual is not None and data.faces is not None:
            self.visual.add(data.faces, clip_index)
        self.n_clips += 1


def fill_pools(clips: Sequence[ClipInfo], cfg: Config, modalities: Sequence[str], *,
               workers: int, capacity: dict[str, int], seed: int, reporter: Reporter = Reporter(),
               name: str = "decode") -> Pools:
    """Decode `clips` once and keep a uniform sample of their frames (at most `capacity[m]`)."""
    pools = Pools(
        audio=FramePool(capacity["audio"], (cfg.audio.n_bins,), np.float32, seed)
        if "audio" in modalities else None,
        visual=FramePool(capacity["visual"], (cfg.face.size, cfg.face.size, 3), np.uint8, seed + 1)
        if "visual" in modalities else None,
    )
    reporter.start(name, len(clips))
    for i, (clip, data, failure) in enumerate(ordered(ingest(clips, cfg, modalities, workers=workers),
                                                      clips)):
        if failure is not None:
            pools.failures.append(failure)
        else:
            pools.add(data, i)
        reporter.advance(name)
    reporter.finish(name)
    return pools


def faces_to_tensor(faces: np.ndarray, device: str | torch.device) -> torch.Tensor:
    """uint8 [N, S, S, 3] → float [N, 3, S, S] in [-0.5, 0.5] (DESIGN.md §2 pixel range)."""
    x = torch.from_numpy(np.ascontiguousarray(faces)).to(device, non_blocking=True)
    return x.permute(0, 3, 1, 2).float().div_(255.0).sub_(0.5)


def tensor_to_faces(x: torch.Tensor) -> np.ndarray:
    """float [N, 3, S, S] in [-0.5, 0.5] → uint8 [N, S, S, 3]."""
    return ((x.float() + 0.5).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def _batch(modality: str, pool: FramePool, n: int, gen: torch.Generator, device) -> torch.Tensor:
    frames = pool.sample(n, gen)
    if modality == "audio":
        return torch.from_numpy(frames).to(device, non_blocking=True)  # [n, F] power
    return faces_to_tensor(frames, device)  # [n, 3, S, S]


# -- training ---------------------------------------------------------------------------------

def train_one(modality: str, pool: FramePool, cfg: Config, out_dir: Path, *, device: str,
              reporter: Reporter = Reporter(), log_every: int = 10, ckpt_every: int = 500,
              metrics_file: Path | None = None, max_steps: int | None = None) -> Path:
    """Train (or resume) one tokenizer on its pool; returns the checkpoint path.

    `max_steps` stops early (checkpointing there; the schedule still spans the configured steps)."""
    kind = KINDS[modality]
    tcfg = cfg.audio_vq if modality == "audio" else cfg.visual_vq
    path = out_dir / CKPT_NAMES[modality]
    torch.manual_seed(cfg.seed)
    model = build_tokenizer(kind, cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=tcfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed + (0 if modality == "audio" else 1))
    step = 0
    if path.exists():
        ckpt = load_checkpoint(path, kind=kind)
        stored = Config.from_dict(ckpt["config"])
        if stored != cfg:
            raise TokenizeError(f"{path}: checkpoint was trained with another config; "
                                f"use a new run directory or the same --preset/--set")
        model.load_state_dict(ckpt["state_dict"])
        if ckpt.get("optimizer"):
            opt.load_state_dict(ckpt["optimizer"])
        restore_rng(ckpt)
        if "generator" in ckpt.get("extra", {}):
            gen.set_state(ckpt["extra"]["generator"])
        step = int(ckpt["step"])
        log.info("%s: resuming %s at step %d of %d", path, kind, step, tcfg.steps)
    if step >= tcfg.steps:
        return path
    if step == 0 and hasattr(model, "set_input_stats"):
        stats_frames = pool.frames[:pool.filled][:: max(1, pool.filled // 20000)]
        model.set_input_stats(torch.from_numpy(stats_frames).to(device))
    model.train()
    ctx = autocast_context(device)
    reporter.start(f"train {modality}", tcfg.steps)
    reporter.advance(f"train {modality}", step)
    window: list[dict[str, float]] = []
    last: dict[str, float] = {}
    stop = min(tcfg.steps, max_steps if max_steps is not None else tcfg.steps)
    while step < stop:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tcfg.lr, tcfg.warmup_steps, tcfg.steps)
        x = _batch(modality, pool, tcfg.batch_frames, gen, device)
        with ctx:
            out = model(x)
        loss = out.loss.float()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{kind}: non-finite loss {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        window.append({k: float(v) for k, v in out.metrics.items()} | {"loss/total": loss.item()})
        if step % log_every == 0 or step == stop:
            row = {"step": step, "model": kind, "lr": opt.param_groups[0]["lr"],
                   **{k: float(np.mean([w[k] for w in window])) for k in window[0]}}
            window, last = [], row
            if metrics_file is not None:
                with open(metrics_file, "a") as f:
                    f.write(json.dumps(row) + "\n")
            reporter.advance(f"train {modality}", log_every if step % log_every == 0 else step % log_every,
                             loss=row["loss/total"], perplexity=row.get("vq/perplexity", 0.0))
        if step % ckpt_every == 0 or step == stop:
            save_checkpoint(path, kind=kind, model=model, config=cfg.to_dict(), step=step,
                            optimizer=opt, extra={"generator": gen.get_state()},
                            metrics={k: v for k, v in last.items() if k != "model"})
    reporter.finish(f"train {modality}")
    return path


# -- evaluation -------------------------------------------------------------------------------

@torch.no_grad()
def encode_frames(model, modality: str, frames: np.ndarray, device: str,
                  batch: int = 1024) -> np.ndarray:
    """Codes for every frame, batched on `device`: audio [T, 513] → [T, 64], faces [T, S, S, 3] →
    [T, H*W]; uint16."""
    model.eval()
    out = []
    ctx = autocast_context(device)
    for lo in range(0, len(frames), batch):
        chunk = frames[lo:lo + batch]
        x = torch.from_numpy(chunk).to(device) if modality == "audio" else faces_to_tensor(chunk, device)
        with ctx:
            codes = model.encode(x)
        out.append(codes.reshape(len(chunk), -1).to(torch.int32).cpu().numpy().astype(np.uint16))
    n_tokens = int(np.prod(model.grid))
    return np.concatenate(out) if out else np.zeros((0, n_tokens), np.uint16)


@torch.no_grad()
def decode_codes(model, modality: str, codes: np.ndarray, device: str, batch: int = 1024) -> np.ndarray:
    """Inverse of `encode_frames`: audio → power [T, 513] float32, visual → uint8 faces."""
    model.eval()
    out = []
    for lo in range(0, len(codes), batch):
        c = torch.from_numpy(codes[lo:lo + batch].astype(np.int64)).to(device)
        c = c.reshape(len(c), *model.grid)
        x = model.decode(c)
        out.append(x.float().cpu().numpy() if modality == "audio" else tensor_to_faces(x))
    return np.concatenate(out)


def _is_div(x: np.ndarray, y: np.ndarray) -> float:
    """Mean Itakura-Saito divergence between power spectra (same floor as the training loss)."""
    r = (x.astype(np.float64) + 1e-8) / (y.astype(np.float64) + 1e-8)
    return float(np.mean(r - np.log(r) - 1))


def evaluate_tokenizer(model, modality: str, frames: np.ndarray, train_mean: np.ndarray,
                       device: str) -> dict[str, float]:
    """Held-out codebook usage and reconstruction error vs predicting the training-set mean frame.

    Audio error is the Itakura-Saito divergence (the training loss); visual error is pixel MSE in
    [-0.5, 0.5] units. `ratio` = model error / mean-frame error (lower is better, < 0.5 required).
    """
    codes = encode_frames(model, modality, frames, device)
    recon = decode_codes(model, modality, codes, device)
    counts = np.bincount(codes.reshape(-1), minlength=model.codebook_size)
    if modality == "audio":
        err = _is_div(frames, recon)
        base = _is_div(frames, np.broadcast_to(train_mean, frames.shape))
    else:
        f = frames.astype(np.float32) / 255
        err = float(np.mean((f - recon.astype(np.float32) / 255) ** 2))
        base = float(np.mean((f - train_mean.astype(np.float32) / 255) ** 2))
    p = counts / max(1, counts.sum())
    perplexity = float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum()))
    return {"frames": int(len(frames)), "usage": float((counts > 0).mean()), "perplexity": perplexity,
            "recon_error": err, "mean_frame_error": base, "ratio": err / base if base > 0 else math.inf,
            "_counts": counts}


# -- the stage --------------------------------------------------------------------------------

@dataclass
class TrainResult:
    checkpoints: dict[str, Path]
    evaluation: dict[str, dict[str, float]]
    failures: list[Failure]
    plots: list[Path]


def train_tokenizers(clips: Sequence[ClipInfo], cfg: Config, run_dir: Path, *,
                     modalities: Sequence[str] = ("audio", "visual"), device: str = "cpu",
                     workers: int = 1, heldout_fraction: float = 0.1,
                     reporter: Reporter = Reporter()) -> TrainResult:
    """Train the tokenizers of `modalities` on `clips` (resuming from `run_dir` if present), evaluate
    them on held-out clips, and write checkpoints, `metrics.jsonl`, `eval.json` and PNGs."""
    out = run_dir / "tokenizers"
    out.mkdir(parents=True, exist_ok=True)
    done = _finished(out, modalities, cfg)
    if done is not None:  # a rerun after training finished (e.g. resuming the encoding): no decoding
        log.info("%s: tokenizers already trained; reusing them", out)
        return done
    train, held = split_heldout(clips, heldout_fraction, cfg.seed)
    limit = {m: (cfg.audio_vq if m == "audio" else cfg.visual_vq).max_train_clips for m in modalities}
    n_train = max(limit.values()) if all(limit.values()) else len(train)
    if n_train < len(train):
        train = random.Random(cfg.seed).sample(train, n_train)
        train.sort(key=lambda c: c.clip_id)
    pools = fill_pools(train, cfg, modalities, workers=workers, seed=cfg.seed,
                       capacity={"audio": cfg.audio_vq.pool_frames, "visual": cfg.visual_vq.pool_frames},
                       reporter=reporter, name="decode train clips")
    ckpts, evaluation, plots = {}, {}, []
    held_pools = fill_pools(held, cfg, modalities, workers=workers, seed=cfg.seed + 7,
                            capacity={"audio": 20000, "visual": 4000}, reporter=reporter,
                            name="decode held-out clips") if held else None
    for m in modalities:
        if getattr(pools, m).filled == 0:
            first = pools.failures[0] if pools.failures else None
            raise TokenizeError(
                f"no {m} frames to train on: all {len(train)} training clips failed or have no {m} "
                f"stream (first failure: {f'{first.path}: {first.stage}: {first.reason}' if first else 'none'})"
                + ("; use --modalities audio for an audio-only corpus" if m == "visual" else ""))
    for m in modalities:
        pool = getattr(pools, m)
        log.info("%s pool: %d frames from %d clips (%d offered)", m, pool.filled, pool.n_clips, pool.seen)
        ckpts[m] = train_one(m, pool, cfg, out, device=device, reporter=reporter,
                             metrics_file=run_dir / "metrics.jsonl")
        model, _ = load_tokenizer(ckpts[m], device)
        evaluation[m], figs = _evaluate_and_plot(model, m, pool, held_pools, out, device)
        plots += figs
    report = {m: {k: v for k, v in e.items() if not k.startswith("_")} for m, e in evaluation.items()}
    atomic_write_json(out / "eval.json", report)
    return TrainResult(ckpts, report, pools.failures + (held_pools.failures if held_pools else []), plots)


def _finished(out: Path, modalities: Sequence[str], cfg: Config) -> TrainResult | None:
    """The earlier result when every tokenizer finished its steps with this config and was evaluated."""
    report = out / "eval.json"
    if not report.exists():
        return None
    ckpts = {}
    for m in modalities:
        path = out / CKPT_NAMES[m]
        steps = (cfg.audio_vq if m == "audio" else cfg.visual_vq).steps
        if not path.exists():
            return None
        ckpt = load_checkpoint(path, kind=KINDS[m])
        if ckpt["step"] < steps or Config.from_dict(ckpt["config"]) != cfg:
            return None
        ckpts[m] = path
    evaluation = json.loads(report.read_text())
    if set(evaluation) != set(modalities):
        return None
    return TrainResult(ckpts, evaluation, [], sorted(out.glob("*.png")))


def _evaluate_and_plot(model, m: str, pool: FramePool, held_pools: Pools | None, out: Path,
                       device: str) -> tuple[dict, list[Path]]:
    from vqmae import plots

    held = getattr(held_pools, m) if held_pools is not None else None
    frames = held.frames[:held.filled] if held is not None and held.filled else pool.frames[:pool.filled]
    train_mean = pool.frames[:pool.filled].mean(axis=0)
    ev = evaluate_tokenizer(model, m, frames, train_mean, device)
    ev["heldout"] = held is not None and held.filled > 0
    figs = [plots.codebook_usage(ev["_counts"], out / f"{m}_codebook.png", f"{m} tokenizer")]
    sample = frames[:200] if m == "audio" else frames[np.linspace(0, len(frames) - 1, 8).astype(int)]
    recon = decode_codes(model, m, encode_frames(model, m, sample, device), device)
    if m == "audio":
        figs.append(plots.spectrogram_pair(sample, recon, out / "audio_recon.png", "audio tokenizer"))
    else:
        figs.append(plots.face_grid(sample, recon, out / "visual_recon.png", "visual tokenizer"))
    return ev, figs


@dataclass
class LoadedTokenizer:
    model: torch.nn.Module
    ckpt: dict[str, Any]
    sha256: str
    path: Path


def load_tokenizers(directory: Path, modalities: Sequence[str], device: str) -> dict[str, LoadedTokenizer]:
    """{modality: LoadedTokenizer} from `directory/{audio,visual}_vqvae.pt`."""
    found = {}
    for m in modalities:
        path = Path(directory) / CKPT_NAMES[m]
        if not path.exists():
            raise TokenizeError(f"{directory}: no {CKPT_NAMES[m]} (needed for modality {m!r})")
        model, ckpt = load_tokenizer(path, device)
        model.eval()
        found[m] = LoadedTokenizer(model, ckpt, checkpoint_sha256(path), path.resolve())
    return found


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
                  noise: NoiseSpec | None = None) -> EncodeResult:
    """Encode this shard's clips (index % n == i) into `store`; merge when running unsharded.

    `clips` is the full scan (positions are the store's canonical `index`). Clips already committed
    are skipped, so a rerun after an interruption resumes. `noise` adds seeded noise to every
    clip's waveform before the STFT (see `vqmae.noise`).
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
        # completion order: `merge` sorts by index, and holding early finishers back for a slow
        # clip would keep their arrays in memory
        for clip, data, failure in ingest(todo, cfg, modalities, workers=workers, noise=noise):
            if failure is not None:
                failures.append(failure)
                if failure.stage != "decode":  # a crash or timeout may be transient: retry on rerun
                    writer.add_failure(clip_record(clip, index[clip.clip_id]), failure.stage,
                                       failure.reason)
            else:
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
