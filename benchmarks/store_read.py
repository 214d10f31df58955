"""Windows per second of `TokenStore.read_windows` on a synthetic audio token store.

Three ways to gather a batch of B windows of L audio frames (64 tokens each):
  ram      codes loaded once, one vectorised fancy-index per batch (what stage 2 should use)
  batched  codes left in Zarr, ONE `oindex` read of the distinct rows per batch
  naive    one Zarr slice per window (the baseline docs/design.md §3 rules out)

    .venv/bin/python benchmarks/store_read.py --clips 1000 --frames 500
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from vqmae.config import StoreConfig
from vqmae.store import ModalitySpec, StoreWriter, TokenStore, merge


def build_store(path: Path, n_clips: int, mean_frames: int, seed: int, chunk_rows: int) -> float:
    """Write and merge `n_clips` audio-only clips of about `mean_frames` frames; returns seconds."""
    rng = np.random.default_rng(seed)
    specs = {"audio": ModalitySpec("audio", 256, (64,), 50.0, "0" * 64)}
    t0 = time.perf_counter()
    with StoreWriter(path, specs, cfg=StoreConfig(audio_chunk_rows=chunk_rows)) as w:
        for i in range(n_clips):
            n = int(rng.integers(mean_frames // 2, 3 * mean_frames // 2 + 1))
            w.add({"clip_id": f"clip{i:06d}", "index": i, "speaker": f"s{i % 50}"},
                  {"audio": rng.integers(0, 256, (n, 64), dtype=np.uint16)})
    merge(path)
    return time.perf_counter() - t0


def sample_windows(store: TokenStore, rng: np.random.Generator, batch: int,
                   length: int) -> tuple[np.ndarray, np.ndarray]:
    """Clip rows weighted by length and uniform starts: [B] rows, [B] starts."""
    lengths = store.clips["audio_length"].astype(np.float64)
    rows = rng.choice(store.n_clips, size=batch, p=lengths / lengths.sum())
    starts = rng.integers(0, np.maximum(store.clips["audio_length"][rows] - length, 0) + 1)
    return rows, starts


def naive_read(store: TokenStore, rows: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    arr = store._array("audio")
    out = np.zeros((len(rows), length, 64), np.uint16)  # [B, L, 64]
    for b, (r, s) in enumerate(zip(rows, starts)):
        a = int(store.clips["audio_start"][r]) + int(s)
        n = min(length, int(store.clips["audio_length"][r]) - int(s))
        out[b, :n] = arr[a:a + n]
    return out


def measure(fn, store: TokenStore, batch: int, length: int, seconds: float, seed: int) -> float:
    """Windows per second over at least `seconds` (and at least 2 batches)."""
    rng = np.random.default_rng(seed)
    fn(*sample_windows(store, rng, batch, length))  # warm-up
    n, t0 = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - t0 < seconds:
        fn(*sample_windows(store, rng, batch, length))
        n += 1
    return n * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--clips", type=int, default=1000)
    ap.add_argument("--frames", type=int, default=500, help="mean audio frames per clip")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--length", type=int, default=100, help="window length in audio frames")
    ap.add_argument("--seconds", type=float, default=3.0, help="time per method")
    ap.add_argument("--chunk-rows", type=int, default=StoreConfig().audio_chunk_rows,
                    help="zarr row chunk of the synthetic store (paper default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--path", type=Path, help="keep the synthetic store here (default: a temp dir)")
    args = ap.parse_args()

    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.path or Path(tmp) / "bench.zarr"
        if not (path / "zarr.json").exists():
            built = build_store(path, args.clips, args.frames, args.seed, args.chunk_rows)
            console.print(f"built {path} in {built:.1f} s")
        disk = TokenStore.open(path)
        t0 = time.perf_counter()
        ram = TokenStore.open(path, load=True)
        load_s = time.perf_counter() - t0
        rows = disk.n_frames("audio")
        console.print(f"{disk.n_clips} clips, {rows} audio frames ({disk.hours('audio'):.2f} h, "
                      f"{rows * 128 / 2**20:.0f} MiB), chunk {disk.chunk_rows('audio')} rows; "
                      f"open+load into RAM {load_s:.2f} s")
        b, n = args.batch, args.length
        methods = {
            "ram (loaded, one gather)": lambda r, s: ram.read_windows("audio", r, s, n),
            "batched zarr (one oindex)": lambda r, s: disk.read_windows("audio", r, s, n),
            "naive zarr (slice per window)": lambda r, s: naive_read(disk, r, s, n),
        }
        table = Table(title=f"read_windows: batch {b} × {n} audio frames × 64 tokens")
        for col in ("method", "windows/s", "ms/batch", "vs naive"):
            table.add_column(col, justify="left" if col == "method" else "right")
        rates = {k: measure(fn, disk, b, n, args.seconds, args.seed) for k, fn in methods.items()}
        naive = rates["naive zarr (slice per window)"]
        for k, rate in rates.items():
            table.add_row(k, f"{rate:,.0f}", f"{1000 * b / rate:.2f}", f"{rate / naive:.1f}×")
        console.print(table)


if __name__ == "__main__":
    main()
