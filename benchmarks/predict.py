"""Single-clip and batch prediction speed: `vqmae predict` on one 3-s clip with start-up included,
where the time of one clip goes, and clips per second over a folder.

    python benchmarks/predict.py --model runs/demo/finetune/units/pretrained/frac1/fold0/classifier.pt \
        --corpus runs/demo/data/corpus [--repeats 3] [--device cpu]

1. **Cold command**: ``vqmae predict CLIP --model M`` in a fresh process, wall time from the shell
   (interpreter start, imports, model and tokenizer load, decode, faces, tokenize, model, output);
   median of `repeats`; again with ``--workers 0`` (no decoding worker process to start). Also
   ``vqmae --help`` (the start-up floor).
2. **One clip, in process**, after `Predictor.load`: the time of each step of that clip, measured
   separately: load (`Predictor.load`), decode (video frames and audio, no face detection), faces
   (decode + crop minus decode), tokenize (both encoders), model (the classifier on the codes).
3. **Batch**: `Predictor.predict_many` over every video of the corpus (one process), clips / s.

The 3-s clip is made from the corpus: two of its clips' frames and sound, concatenated and written
as a real mp4 (H.264 + AAC) with `vqmae.media.mp4_bytes`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_clip(corpus: Path, out: Path, seconds: float = 3.0) -> Path:
    """A `seconds`-long talking-face mp4 from the corpus's first video clips of one speaker."""
    import decord

    from vqmae.media import mp4_bytes

    videos = sorted((corpus / "video").rglob("*.mp4"))
    frames, sound, rate, fps = [], [], 16000, 25
    for v in videos:
        reader = decord.AVReader(str(v), sample_rate=rate, mono=True)
        audio, video = reader[:]
        frames += [f for f in video.asnumpy()]
        sound += [np.concatenate([a.asnumpy().reshape(-1) for a in audio])]
        if len(frames) >= seconds * fps:
            break
    n = int(seconds * fps)
    wave = np.concatenate(sound)[: int(seconds * rate)]
    size = frames[0].shape[0]
    out.write_bytes(mp4_bytes(frames[:n], wave, rate, size, size, fps))
    return out


def cold_command(args: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "vqmae_cli.main", *args], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def one_clip(model: Path, clip: Path, device: str, repeats: int) -> dict[str, float]:
    from dataclasses import replace

    from vqmae.ingest import load_clip
    from vqmae.models.tokenizers import encode_frames
    from vqmae.stages.predict import Predictor
    from vqmae.stages.predict.results import _clip_info

    t0 = time.perf_counter()
    pred = Predictor.load(model, device=device)
    out = {"load": time.perf_counter() - t0}
    info = _clip_info(clip, 0)
    no_faces = replace(pred.cfg, face=replace(pred.cfg.face, mode="none"))
    steps: dict[str, list[float]] = {"decode": [], "decode+faces": [], "tokenize": [], "model": [], "total": []}
    for _ in range(repeats):
        t = time.perf_counter()
        load_clip(info, no_faces, pred.modalities)
        steps["decode"].append(time.perf_counter() - t)
        t = time.perf_counter()
        data = load_clip(info, pred.cfg, pred.modalities)
        steps["decode+faces"].append(time.perf_counter() - t)
        t = time.perf_counter()
        codes = {"audio": encode_frames(pred.tokenizers["audio"].model, "audio", data.spec, device)}
        if "visual" in pred.modalities:
            codes["visual"] = encode_frames(pred.tokenizers["visual"].model, "visual", data.faces, device)
        steps["tokenize"].append(time.perf_counter() - t)
        t = time.perf_counter()
        pred.predict(codes)
        steps["model"].append(time.perf_counter() - t)
        t = time.perf_counter()
        pred.predict(clip)
        steps["total"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in steps.items()}
    out.update(decode=med["decode"], faces=med["decode+faces"] - med["decode"], tokenize=med["tokenize"],
               model=med["model"], predict_call=med["total"])
    return out


def batch(model: Path, corpus: Path, device: str) -> tuple[int, float]:
    from vqmae.stages.predict import Predictor

    pred = Predictor.load(model, device=device)
    videos = sorted((corpus / "video").rglob("*.mp4"))
    t0 = time.perf_counter()
    result = pred.predict_many(videos)
    return len(result.predictions), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--corpus", type=Path, default=Path("runs/demo/data/corpus"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        clip = make_clip(args.corpus, Path(tmp) / "clip3s.mp4")
        help_s = cold_command(["--help"], args.repeats)
        cold = cold_command(["predict", str(clip), "--model", str(args.model), "--device", args.device],
                            args.repeats)
        cold0 = cold_command(["predict", str(clip), "--model", str(args.model), "--device", args.device,
                              "--workers", "0"], args.repeats)
        steps = one_clip(args.model, clip, args.device, args.repeats)
    n, seconds = batch(args.model, args.corpus, args.device)
    print(f"load average before: {load:.2f}; torch threads: default; device {args.device}")
    print("| measurement | seconds |")
    print("|---|---|")
    print(f"| `vqmae --help`, fresh process | {help_s:.2f} |")
    print(f"| `vqmae predict` one 3-s clip, fresh process (everything; decoding in a worker process) | {cold:.2f} |")
    print(f"| the same with `--workers 0` (decoding in the command's own process, no crash isolation) | {cold0:.2f} |")
    for k in ("load", "decode", "faces", "tokenize", "model", "predict_call"):
        label = {"load": "in process: Predictor.load (classifier + tokenizers)",
                 "decode": "in process: decode video frames and audio",
                 "faces": "in process: face detection and crops",
                 "tokenize": "in process: both tokenizer encoders",
                 "model": "in process: the classifier on the codes",
                 "predict_call": "in process: Predictor.predict(clip), all of the above but load"}[k]
        print(f"| {label} | {steps[k]:.3f} |")
    print(f"\nbatch: {n} clips in {seconds:.1f} s = {n / seconds:.1f} clips/s (Predictor.predict_many, one process)")


if __name__ == "__main__":
    main()
