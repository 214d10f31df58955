"""Stage 1: train the audio and visual VQ-VAE tokenizers and encode every clip into a token store.

    train_tokenizers(clips, cfg, run_dir)  → run_dir/tokenizers/{audio,visual}_vqvae.pt
    encode_corpus(clips, cfg, store, tokenizers) → store (resumable, shardable, merged at the end)

Training draws every batch uniformly from a `FramePool` filled by crash-isolated decoding workers, so
a batch mixes frames of many clips. Checkpoints are written every `ckpt_every` steps and a rerun
resumes from them. Encoding runs batched on the device, writes through `StoreWriter` segments and
skips clips already committed, so an interrupted run resumes without losing or duplicating a clip.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from vqmae.checkpoint import (TOKENIZER_FILES, TOKENIZER_KIND, check_resume, load_checkpoint, load_tokenizer,
                              load_tokenizers, restore_rng, save_checkpoint)
from vqmae.config import AudioConfig, Config, view_differences
from vqmae.datasets import ClipInfo, scan
from vqmae.encoding import TokenizeError, encode_corpus, store_failures
from vqmae.framepool import FramePool
from vqmae.ingest import ClipData, Failure, clip_progress, ingest
from vqmae.models.prosody_ids import pitch_and_energy
from vqmae.models.tokenizers import build_tokenizer, decode_codes, encode_frames, faces_to_tensor
from vqmae.expression import expression_agreement
from vqmae.prosody import contour_agreement, prosody_agreement
from vqmae.training import Fit, MetricsLog, Reporter, StepOut, base_lrs
from vqmae.utils import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)


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
    for i, (clip, data, failure) in enumerate(ordered(ingest(clips, cfg, modalities, workers=workers,
                                                             on_progress=clip_progress(reporter, name)),
                                                      clips)):
        if failure is not None:
            pools.failures.append(failure)
        else:
            pools.add(data, i)
        reporter.advance(name)
    reporter.finish(name)
    return pools


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
    kind = TOKENIZER_KIND[modality]
    tcfg = cfg.audio_vq if modality == "audio" else cfg.visual_vq
    path = out_dir / TOKENIZER_FILES[modality]
    torch.manual_seed(cfg.seed)
    model = build_tokenizer(kind, cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=tcfg.lr)
    fit = Fit(f"train {modality}", model, opt, total_steps=tcfg.steps, warmup_steps=tcfg.warmup_steps,
              grad_clip=1.0, bases=base_lrs(opt), device=device, reporter=reporter)
    gen = torch.Generator().manual_seed(cfg.seed + (0 if modality == "audio" else 1))
    step = 0
    if path.exists():
        ckpt = load_checkpoint(path, kind=kind)
        check_resume(path, ckpt["config"], cfg, "tokenize", TokenizeError)
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
    log_file = MetricsLog(metrics_file)
    last: dict[str, float] = {}

    def step_fn(step: int) -> StepOut:
        out = model(_batch(modality, pool, tcfg.batch_frames, gen, device))
        return StepOut(out.loss, out.metrics, tcfg.batch_frames)

    def on_log(step: int, row: dict[str, float]) -> None:
        nonlocal last
        last = {"step": step, "model": kind, **row}
        log_file.write(last)

    def save(step: int) -> None:
        save_checkpoint(path, kind=kind, model=model, config=cfg.to_dict(), step=step,
                        optimizer=opt, extra={"generator": gen.get_state()},
                        metrics={k: v for k, v in last.items() if k != "model"})

    stop = min(tcfg.steps, max_steps if max_steps is not None else tcfg.steps)
    fit.run(step_fn, start=step, stop=stop, log_every=log_every, on_log=on_log,
            hooks=[(ckpt_every, save)],
            progress=lambda row: {"loss": row["loss/total"], "perplexity": row.get("vq/perplexity", 0.0)})
    return path


# -- evaluation -------------------------------------------------------------------------------

def _is_div(x: np.ndarray, y: np.ndarray) -> float:
    """Mean Itakura-Saito divergence between power spectra (same floor as the training loss)."""
    r = (x.astype(np.float64) + 1e-8) / (y.astype(np.float64) + 1e-8)
    return float(np.mean(r - np.log(r) - 1))


def evaluate_tokenizer(model, modality: str, frames: np.ndarray, train_mean: np.ndarray,
                       device: str, audio_cfg: AudioConfig | None = None) -> dict[str, float]:
    """Held-out codebook usage and reconstruction error vs predicting the training-set mean frame.

    Audio error is the Itakura-Saito divergence (the training loss); visual error is pixel MSE in
    [-0.5, 0.5] units. `ratio` = model error / mean-frame error (lower is better, < 0.5 required).
    Given the features' `audio_cfg`, audio also reports how well the decoded frames keep pitch and
    energy (`vqmae.prosody.prosody_agreement`: f0_corr, f0_within_5pct, energy_corr), and with
    prosody ids the same for the pitch and energy the ids carry (ids_f0_corr, …); visual, how
    much of the mouth's and eyes' expression detail and of the face colour the decoded crops keep
    (`vqmae.expression.expression_agreement`: mouth_kept, eyes_kept, colour_corr).
    """
    codes = encode_frames(model, modality, frames, device)
    recon = decode_codes(model, modality, codes, device)
    # usage of the learned codebook (not of computed ids such as the audio's prosody ids)
    counts = np.bincount(codes[:, :model.n_learned].reshape(-1), minlength=model.quantizer.codebook_size)
    extra: dict[str, float] = {}
    if modality == "audio":
        err = _is_div(frames, recon)
        base = _is_div(frames, np.broadcast_to(train_mean, frames.shape))
        if audio_cfg is not None:
            extra = prosody_agreement(frames, recon, audio_cfg)
            if codes.shape[1] > model.n_learned:  # what the prosody ids carry: their bins' pitch and energy
                ids = codes[:, model.n_learned:].astype(np.int64) - model.quantizer.codebook_size
                agree = contour_agreement(frames, *pitch_and_energy(ids), audio_cfg)
                extra |= {f"ids_{k}": agree[k] for k in ("f0_corr", "f0_within_5pct", "energy_corr")}
    else:
        f = frames.astype(np.float32) / 255
        err = float(np.mean((f - recon.astype(np.float32) / 255) ** 2))
        base = float(np.mean((f - train_mean.astype(np.float32) / 255) ** 2))
        extra = expression_agreement(np.asarray(frames, np.uint8), np.clip(recon, 0, 255).astype(np.uint8))
    p = counts / max(1, counts.sum())
    perplexity = float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum()))
    return {"frames": int(len(frames)), "usage": float((counts > 0).mean()), "perplexity": perplexity,
            "recon_error": err, "mean_frame_error": base, "ratio": err / base if base > 0 else math.inf,
            **extra, "_counts": counts}


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
        evaluation[m], figs = _evaluate_and_plot(model, m, pool, held_pools, out, device, cfg)
        plots += figs
    report = {m: {k: v for k, v in e.items() if not k.startswith("_")} for m, e in evaluation.items()}
    atomic_write_json(out / "eval.json", report)
    return TrainResult(ckpts, report, pools.failures + (held_pools.failures if held_pools else []), plots)


def _finished(out: Path, modalities: Sequence[str], cfg: Config) -> TrainResult | None:
    """The earlier result when every tokenizer finished its steps with this config's tokenize view
    and was evaluated."""
    report = out / "eval.json"
    if not report.exists():
        return None
    ckpts = {}
    for m in modalities:
        path = out / TOKENIZER_FILES[m]
        steps = (cfg.audio_vq if m == "audio" else cfg.visual_vq).steps
        if not path.exists():
            return None
        ckpt = load_checkpoint(path, kind=TOKENIZER_KIND[m])
        if ckpt["step"] < steps or view_differences(Config.from_dict(ckpt["config"]), cfg, "tokenize"):
            return None
        ckpts[m] = path
    evaluation = json.loads(report.read_text())
    if set(evaluation) != set(modalities):
        return None
    return TrainResult(ckpts, evaluation, [], sorted(out.glob("*.png")))


def _evaluate_and_plot(model, m: str, pool: FramePool, held_pools: Pools | None, out: Path,
                       device: str, cfg: Config) -> tuple[dict, list[Path]]:
    from vqmae import plots

    held = getattr(held_pools, m) if held_pools is not None else None
    frames = held.frames[:held.filled] if held is not None and held.filled else pool.frames[:pool.filled]
    train_mean = pool.frames[:pool.filled].mean(axis=0)
    ev = evaluate_tokenizer(model, m, frames, train_mean, device, cfg.audio)
    ev["heldout"] = held is not None and held.filled > 0
    figs = [plots.codebook_usage(ev["_counts"], out / f"{m}_codebook.png", f"{m} tokenizer")]
    sample = frames[:200] if m == "audio" else frames[np.linspace(0, len(frames) - 1, 8).astype(int)]
    recon = decode_codes(model, m, encode_frames(model, m, sample, device), device)
    if m == "audio":
        figs.append(plots.spectrogram_pair(sample, recon, out / "audio_recon.png", "audio tokenizer"))
    else:
        figs.append(plots.face_grid(sample, recon, out / "visual_recon.png", "visual tokenizer"))
    return ev, figs


# -- the stage ----------------------------------------------------------------------------------

@dataclass
class TokenizeResult:
    """What `tokenize` did: the store (merged unless sharded), the clip counts, every failed clip
    (also in the run's failures CSV) and the tokenizers' held-out evaluation when they were trained."""

    store: Path
    run: Path
    tokenizers: Path
    encoded: int
    skipped_done: int
    merged: bool
    failures: list[Failure]
    evaluation: dict[str, dict[str, float]] | None
    failures_csv: Path
    seconds: float
    # inputs the scan could not use (duplicates, unreadable entries, link loops...): (path, reason),
    # listed in the failures CSV with stage "scan"
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def tokenize(data: str | Path, out: str | Path, cfg: Config, run_dir: str | Path, *,
             tokenizers: str | Path | None = None, kind: str = "auto",
             modalities: Sequence[str] | None = None, shard: tuple[int, int] = (0, 1),
             workers: int = 2, device: str = "cpu", train_only: bool = False,
             heldout_fraction: float = 0.1, reporter: Reporter = Reporter()) -> TokenizeResult:
    """Stage 1 from a corpus: scan it, train both tokenizers (or load `tokenizers`, a directory
    with audio_vqvae.pt / visual_vqvae.pt), encode this shard's clips into `out` and list every
    failure in `run_dir/failures.csv` (one file per shard). Resumable at every point.

    `modalities` None: audio and visual when any clip has video, else audio alone."""
    t0 = time.perf_counter()
    run, out = Path(run_dir), Path(out)
    scanned = scan(data, kind)  # before the run directory is made: a bad corpus leaves none
    clips, skipped = scanned.clips, list(scanned.skipped)
    if modalities is None:
        modalities = ("audio", "visual") if any(c.has_video for c in clips) else ("audio",)
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run / "config.json", cfg.to_dict())
    failures: list[Failure] = []
    evaluation = None
    if tokenizers is None:
        if shard != (0, 1):
            raise TokenizeError("--shard needs --tokenizers: train once (e.g. with --train-only), "
                                "then give every shard the same tokenizers")
        trained = train_tokenizers(clips, cfg, run, modalities=modalities, device=device, workers=workers,
                                   heldout_fraction=heldout_fraction, reporter=reporter)
        failures += trained.failures
        evaluation = trained.evaluation
        tokenizers = run / "tokenizers"
    # concurrent shards share the run directory: one failures file each
    csv_path = run / ("failures.csv" if shard == (0, 1) else f"failures-shard{shard[0]}of{shard[1]}.csv")
    if train_only:
        write_failures(csv_path, failures, skipped)
        return TokenizeResult(out, run, Path(tokenizers), 0, 0, False, failures, evaluation, csv_path,
                              time.perf_counter() - t0, skipped)
    loaded = load_tokenizers(tokenizers, modalities, device)
    result = encode_corpus(clips, cfg, out, loaded, shard=shard, device=device, workers=workers,
                           reporter=reporter, skipped=skipped)
    # the store's scan rows are this scan's `skipped` (or an earlier scan's): listed once, below
    failed = [f for f in store_failures(out) if f.stage != "scan"] if result.merged else list(result.failed)
    known = {f.path for f in failed}
    failed += [f for f in failures if f.path not in known]  # failed while decoding training clips
    failed += [f for f in result.failed if f.stage == "decode" and f.path not in known]
    write_failures(csv_path, failed, skipped)
    return TokenizeResult(out, run, Path(tokenizers), result.encoded, result.skipped_done, result.merged,
                          failed, evaluation, csv_path, time.perf_counter() - t0, skipped)


def write_failures(path: Path, failures: Sequence[Failure],
                   skipped: Sequence[tuple[str, str]] = ()) -> None:
    """path,stage,reason per failed input, then per input skipped at scan (stage "scan"); atomic."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "stage", "reason"])
    w.writerows([[f.path, f.stage, f.reason] for f in failures])
    w.writerows([[p, "scan", reason] for p, reason in skipped])
    atomic_write_bytes(path, buf.getvalue().encode())
