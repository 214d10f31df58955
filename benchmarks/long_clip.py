"""Peak memory of tokenizing one long clip against a short one: it must not grow with duration.

    python benchmarks/long_clip.py --tokenizers runs/demo/tokenize/tokenizers [--minutes 1,10]

For each duration it writes one 224×224, 25 fps H.264 clip with 48 kHz stereo AAC sound
(moving shapes and a tone), then runs ``vqmae tokenize DIR --out STORE --tokenizers DIR --face none --workers 1`` in a
fresh process and samples, every 0.2 s, the resident memory of that process and of its decoding
worker (from /proc). It prints per duration the wall time, the peak of each process and the peak of
their sum. Face detection is left out (`--face none`): it costs time, not memory.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZE, FPS, RATE = 224, 25, 48000  # audio: 48 kHz stereo AAC, as cameras record


def write_clip(path: Path, minutes: float) -> Path:
    """Frames made one at a time (a square crossing a gradient), written straight to the file."""
    import av

    n = int(minutes * 60 * FPS)
    base = np.linspace(0, 255, SIZE, dtype=np.float32)[None, :, None].repeat(SIZE, 0).repeat(3, 2)
    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=FPS, options={"preset": "ultrafast", "threads": "1"})
        v.width = v.height = SIZE
        v.pix_fmt = "yuv420p"
        a = out.add_stream("aac", rate=RATE, layout="stereo")
        for k in range(n):
            img = base.copy()
            x = (7 * k) % (SIZE - 40)
            img[60:100, x:x + 40] = 255 - (3 * k) % 255
            for p in v.encode(av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")):
                out.mux(p)
        for p in v.encode():
            out.mux(p)
        step = RATE * 10
        for lo in range(0, int(minutes * 60 * RATE), step):
            t = (lo + np.arange(step)) / RATE
            x = (0.3 * np.sin(2 * np.pi * (180 + 40 * np.sin(t)) * t)).astype(np.float32)
            frame = av.AudioFrame.from_ndarray(np.stack([x, 0.5 * x]), format="fltp", layout="stereo")
            frame.sample_rate, frame.pts = RATE, lo
            for p in a.encode(frame):
                out.mux(p)
        for p in a.encode(None):
            out.mux(p)
    return path


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def measure(cmd: list[str]) -> dict[str, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_main = peak_worker = peak_sum = 0.0
    while proc.poll() is None:
        main = _rss_mb(proc.pid)
        kids = [_rss_mb(c) for c in _children(proc.pid)]
        peak_main, peak_worker = max(peak_main, main), max([peak_worker, *kids])
        peak_sum = max(peak_sum, main + sum(kids))
        time.sleep(0.2)
    err = proc.stderr.read()
    if proc.returncode != 0:  # the clip is well formed: anything but success is a failed measurement
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return {"seconds": time.perf_counter() - t0, "main_mb": peak_main, "worker_mb": peak_worker,
            "sum_mb": peak_sum}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizers", type=Path, required=True, help="a tokenize run's tokenizers/ folder")
    ap.add_argument("--minutes", default="1,10")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for minutes in [float(m) for m in args.minutes.split(",")]:
            corpus = Path(tmp) / f"m{minutes:g}" / "spk"
            corpus.mkdir(parents=True)
            t = time.perf_counter()
            write_clip(corpus / "long.mp4", minutes)
            made = time.perf_counter() - t
            cmd = [sys.executable, "-m", "vqmae_cli.main", "tokenize", str(corpus.parent), "--kind", "folder",
                   "--out", str(Path(tmp) / f"m{minutes:g}.zarr"), "--tokenizers", str(args.tokenizers),
                   "--face", "none", "--workers", "1", "--preset", "tiny", "--device", "cpu",
                   "--run-dir", str(Path(tmp) / f"run{minutes:g}")]
            rows.append((minutes, made, measure(cmd)))
    print(f"load average before: {load:.2f}; 224x224 25 fps H.264 + 48 kHz stereo AAC, --face none, 1 worker")
    print("| clip | written in | tokenize wall | peak RSS, main process | peak RSS, worker | peak RSS, both |")
    print("|---|---|---|---|---|---|")
    for minutes, made, m in rows:
        print(f"| {minutes:g} min | {made:.0f} s | {m['seconds']:.0f} s | {m['main_mb']:.0f} MB | "
              f"{m['worker_mb']:.0f} MB | {m['sum_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
