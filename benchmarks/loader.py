"""Windows per second of the stage-2 data path (`vqmae.windows`) on a synthetic av token store.

Methods, each run in a fresh subprocess so its peak RSS is its own:
  ram        codes loaded once, one fancy-index gather per batch (WindowData.train_batches)
  stream-w0  StreamingWindows iterated in the main process (ram_limit_gb=0 forces it)
  stream-w2  the same through DataLoader(num_workers=2)
  naive      one TokenStore.read_windows call per window and modality (the baseline docs/design.md
             §3 rules out), gathered into the same batches

    .venv/bin/python benchmarks/loader.py --clips 2000 --seconds-per-clip 8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from vqmae.config import StoreConfig, load_config
from vqmae.store import ModalitySpec, StoreWriter, TokenStore, merge
from vqmae.windows import WindowData, make_batch

METHODS = ("ram", "stream-w0", "stream-w2", "naive")


def build_store(path: Path, n_clips: int, seconds: float, seed: int) -> float:
    """Paper-shaped av store (64 audio tokens at 50 fps, 24 × 24 visual at 25 fps) → seconds."""
    rng = np.random.default_rng(seed)
    specs = {"audio": ModalitySpec("audio", 256, (64,), 50.0, "0" * 64),
             "visual": ModalitySpec("visual", 512, (24, 24), 25.0, "1" * 64)}
    t0 = time.perf_counter()
    with StoreWriter(path, specs, cfg=StoreConfig(segment_clips=64)) as w:
        for i in range(n_clips):
            n_v = int(rng.integers(int(12.5 * seconds), int(37.5 * seconds) + 1))  # mean `seconds`
            w.add({"clip_id": f"clip{i:06d}", "index": i, "speaker": f"s{i % 50}"},
                  {"audio": rng.integers(0, 256, (2 * n_v, 64), dtype=np.uint16),
                   "visual": rng.integers(0, 512, (n_v, 576), dtype=np.uint16)})
    merge(path)
    return time.perf_counter() - t0


def make_data(path: Path, method: str, batch: int) -> WindowData:
    cfg = load_config("paper")
    ram = 64.0 if method == "ram" else 0.0
    cfg = dataclasses.replace(cfg, pretrain=dataclasses.replace(
        cfg.pretrain, batch_size=batch, ram_limit_gb=ram, workers=2, val_fraction=0.05))
    return WindowData(TokenStore.open(path), cfg)


def naive_batches(data: WindowData):
    """Same plan as `ram`, but one zarr read per window and modality."""
    step = 0
    while True:
        rows, starts = data.plan.batch(step, data.batch_size)
        parts = {}
        for m in data.specs:
            outs = [data.store.read_windows(m, rows[b:b + 1], starts[b:b + 1] * data.geom.ratio[m],
                                            data.geom.frames[m]) for b in range(len(rows))]
            parts[m] = (np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs]))
        yield make_batch(rows, starts, parts, data.specs)
        step += 1


def batches(data: WindowData, method: str):
    if method == "ram":
        return data.train_batches()
    if method == "naive":
        return naive_batches(data)
    ds = data.streaming()
    if method == "stream-w0":
        return iter(ds)
    return iter(DataLoader(ds, batch_size=None, num_workers=2))


def run_one(path: Path, method: str, batch: int, seconds: float) -> dict:
    t0 = time.perf_counter()
    data = make_data(path, method, batch)
    it = batches(data, method)
    first = next(it)  # loading (ram) or worker start-up (stream) counted apart
    startup = time.perf_counter() - t0
    assert first.visual.shape == (batch, 50, 24, 24) and first.audio.shape == (batch, 100, 64)
    n, t0 = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - t0 < seconds:
        n += len(next(it))
    rate = n / (time.perf_counter() - t0)
    rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
              resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 2 ** 20  # KiB → GiB
    return {"method": method, "windows_per_s": rate, "startup_s": startup, "peak_rss_gb": rss,
            "in_ram": data.in_ram}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--clips", type=int, default=2000)
    ap.add_argument("--seconds-per-clip", type=float, default=8.0)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=5.0, help="time per method")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--path", type=Path, help="keep (or reuse) the synthetic store here")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one method, print JSON
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.one:
        print(json.dumps(run_one(args.path, args.one, args.batch, args.seconds)))
        return
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.path or Path(tmp) / "tokens.zarr"
        if not (path / "zarr.json").exists():
            took = build_store(path, args.clips, args.seconds_per_clip, args.seed)
            console.print(f"built {path} ({args.clips} clips) in {took:.1f} s")
        store = TokenStore.open(path)
        gb = sum(store.n_frames(m) * s.n_tokens * 2 for m, s in store.specs.items()) / 2 ** 30
        console.print(f"{store.n_clips} clips, {store.hours('visual'):.2f} h, "
                      f"{gb:.2f} GiB of codes")
        table = Table("method", "windows/s", "start-up s", "peak RSS GiB")
        for method in args.methods.split(","):
            out = subprocess.run([sys.executable, __file__, "--one", method, "--path", str(path),
                                  "--batch", str(args.batch), "--seconds", str(args.seconds)],
                                 capture_output=True, text=True)
            if out.returncode:
                console.print(f"[red]{method} failed:[/red]\n{out.stderr[-2000:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            table.add_row(method, f"{r['windows_per_s']:,.0f}", f"{r['startup_s']:.2f}",
                          f"{r['peak_rss_gb']:.2f}")
        console.print(table)


if __name__ == "__main__":
    main()
