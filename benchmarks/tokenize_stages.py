"""Stage-1 throughput: VQ-VAE encoding alone vs the whole tokenize path, in one run.

    python benchmarks/tokenize_stages.py --data runs/demo/data/corpus [--clips 32] [--device cpu|cuda]
                                  [--preset paper] [--face haar]

Rows (video frames/s; audio frames are 2 per video frame):
  decode          decord video (25 fps) + audio            the baseline: nothing is faster than reading
  + faces         ... + face detection, tracking, crops
  + features      ... + power STFT frames (= `load_clip`)
  + encode        ... + audio and visual VQ-VAE encoding   the whole tokenize path for one process
  encode alone    both encoders on frames already in memory
Model weights are randomly initialised (encoding cost does not depend on them). Single process, so
multiply by decoding workers for a machine estimate until the encoder is the bottleneck.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time

import numpy as np
import torch


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="runs/demo/data/corpus")
    ap.add_argument("--clips", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--face", default="haar")
    args = ap.parse_args()

    from vqmae.config import load_config
    from vqmae.datasets import scan
    from vqmae.ingest import get_cropper, load_clip
    from vqmae.media import iter_video, read_audio
    from vqmae.stages.tokenize import encode_frames
    from vqmae.models.tokenizers import build_tokenizer

    cfg = load_config(args.preset, [f"face.mode={args.face}"])
    clips = [c for c in scan(args.data).clips if c.has_video][: args.clips]
    dev = args.device
    torch.manual_seed(0)
    models = {m: build_tokenizer(k, cfg).to(dev).eval()
              for m, k in (("audio", "audio_vqvae"), ("visual", "visual_vqvae"))}
    get_cropper(cfg)
    rows = []

    def timed(name, fn):
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        frames = fn()
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        rows.append((name, frames, dt, peak_rss_mb()))
        return frames

    def decode_only():
        n = 0
        for c in clips:
            n += sum(len(x) for x in iter_video(c.path, cfg.video.fps, cfg.video.chunk_frames, cfg.video.max_side))
            read_audio(c.audio_path or c.path, cfg.audio.sample_rate)
        return n

    def with_faces():
        n = 0
        for c in clips:
            n += load_clip(c, cfg, ("visual",)).n_video_frames
            read_audio(c.audio_path or c.path, cfg.audio.sample_rate)
        return n

    loaded = []

    def with_features():
        loaded.clear()
        for c in clips:
            loaded.append(load_clip(c, cfg))
        return sum(d.n_video_frames for d in loaded)

    def with_encode():
        n = 0
        for c in clips:
            d = load_clip(c, cfg)
            encode_frames(models["audio"], "audio", d.spec, dev)
            encode_frames(models["visual"], "visual", d.faces, dev)
            n += d.n_video_frames
        return n

    timed("decode", decode_only)
    timed("+ faces", with_faces)
    timed("+ features", with_features)
    timed("+ encode", with_encode)
    spec = np.concatenate([d.spec for d in loaded])
    faces = np.concatenate([d.faces for d in loaded])
    encode_frames(models["audio"], "audio", spec[:256], dev)  # warm-up
    encode_frames(models["visual"], "visual", faces[:64], dev)
    t_audio = time.perf_counter()
    encode_frames(models["audio"], "audio", spec, dev, batch=4096)
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    t_audio = time.perf_counter() - t_audio
    t_vis = time.perf_counter()
    encode_frames(models["visual"], "visual", faces, dev, batch=512)
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    t_vis = time.perf_counter() - t_vis

    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name() if dev.startswith("cuda") else "-"
    print(f"machine: {cpu}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, device {dev} ({gpu})")
    print(f"preset {args.preset}, face {args.face}, {len(clips)} clips, {len(faces)} video frames")
    print(f"{'stage':14} {'video frames/s':>15} {'seconds':>8} {'peak RSS MB':>12}")
    for name, n, dt, rss in rows:
        print(f"{name:14} {n / dt:>15.1f} {dt:>8.2f} {rss:>12.0f}")
    print(f"{'encode alone':14} audio {len(spec) / t_audio:,.0f} frames/s, visual {len(faces) / t_vis:,.0f} frames/s")
    if dev.startswith("cuda"):
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MB")


if __name__ == "__main__":
    main()
