"""Ingest throughput: decode only (the baseline) vs decode + each face mode, in one run.

    python benchmarks/ingest.py --data runs/demo/data/corpus [--clips 64] [--modes decode,none,haar,fan]

Each mode runs in its own subprocess (one decoding process, so numbers are per core) and reports
video frames/s and that process's peak RSS. `fan` needs face-alignment's landmark weights; offline
(as on CI machines) the script times the same network with randomly initialised weights in a
temporary TORCH_HOME, which costs the same compute: say so when quoting it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("decode", "none", "haar", "fan")


def run_mode(mode: str, data: str, n_clips: int) -> dict:
    """Time one mode in this process: frames/s over the first `n_clips` video clips."""
    from vqmae.config import load_config
    from vqmae.datasets import scan
    from vqmae.ingest import get_cropper, load_clip
    from vqmae.media import iter_video

    clips = [c for c in scan(data).clips if c.has_video][:n_clips]
    cfg = load_config("paper", [f"face.mode={'none' if mode == 'decode' else mode}"])
    if mode != "decode":
        get_cropper(cfg)  # model loading is start-up, not throughput
    frames, failed = 0, 0
    t0 = time.perf_counter()
    for clip in clips:
        if mode == "decode":
            frames += sum(len(c) for c in iter_video(clip.path, cfg.video.fps, cfg.video.chunk_frames,
                                                     cfg.video.max_side))
            continue
        try:
            frames += load_clip(clip, cfg, ("visual",)).n_video_frames
        except Exception:  # noqa: BLE001 - a benchmark counts failures, it does not stop
            failed += 1
    dt = time.perf_counter() - t0
    return {"mode": mode, "clips": len(clips), "failed": failed, "frames": frames,
            "seconds": round(dt, 2), "frames_per_s": round(frames / dt, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def fake_fan_home() -> str:
    """A TORCH_HOME holding randomly initialised FAN weights (timing only, never for results)."""
    import torch
    from face_alignment.models import FAN

    from vqmae.faces import FAN_WEIGHTS_FILE

    home = tempfile.mkdtemp(prefix="vqmae-bench-fan-")
    ckpt = Path(home) / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.save(FAN(4).state_dict(), ckpt / FAN_WEIGHTS_FILE)
    return home


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="runs/demo/data/corpus")
    ap.add_argument("--clips", type=int, default=48)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--fan-clips", type=int, default=3, help="clips for the fan mode (≈0.4 s/frame on CPU)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run a single mode, print JSON
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_mode(args.one, args.data, args.clips)))
        return

    from vqmae.faces import missing_fan_weights

    rows = []
    for mode in args.modes.split(","):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        note = ""
        if mode == "fan" and missing_fan_weights():
            env["TORCH_HOME"] = fake_fan_home()
            note = "random FAN weights (offline)"
        n_clips = min(args.clips, args.fan_clips) if mode == "fan" else args.clips
        out = subprocess.run([sys.executable, __file__, "--data", args.data, "--clips", str(n_clips),
                              "--one", mode], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"mode {mode} failed")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["note"] = note
        rows.append(row)

    base = rows[0]["frames_per_s"] if rows and rows[0]["mode"] == "decode" else None
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.platform()}")
    print(f"{'mode':8} {'clips':>5} {'frames':>7} {'frames/s':>9} {'vs decode':>9} {'peak RSS MB':>11}  note")
    for r in rows:
        rel = f"{r['frames_per_s'] / base:.2f}x" if base else "-"
        print(f"{r['mode']:8} {r['clips']:>5} {r['frames']:>7} {r['frames_per_s']:>9} {rel:>9} "
              f"{r['peak_rss_mb']:>11}  {r['note']}{' failed=' + str(r['failed']) if r['failed'] else ''}")


if __name__ == "__main__":
    main()
