"""Fingerprint of the demo pipeline: a refactor that must not change behaviour keeps it identical.

    python benchmarks/fingerprint.py --work DIR [--out fingerprint.json]

Runs the CLI as a user would (tiny preset): `synth` → `tokenize` → `pretrain` for 50 steps logged
every step, then writes one JSON with the SHA-256 of every array in the store (its decoded values,
not its chunk files; all but the absolute media paths) and the 50 pretraining losses. Two runs on one machine compare with
`diff`. (Float kernels differ between CPUs: compare fingerprints made on the same machine.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path


def vqmae(*args: str) -> None:
    cmd = [sys.executable, "-c", "from vqmae_cli.main import app; app()", *args]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def code_hashes(store: Path) -> dict[str, str]:
    import numpy as np
    import zarr

    root = zarr.open_group(str(store), mode="r")
    out = {}
    for name, arr in sorted(root.arrays()) if hasattr(root, "arrays") else []:
        out[name] = hashlib.sha256(np.ascontiguousarray(arr[...]).tobytes()).hexdigest()
    for name, group in sorted(root.groups()):
        for aname, arr in sorted(group.arrays()):
            if f"{name}/{aname}" == "clips/path":  # absolute paths: they name the --work folder
                continue
            data = np.ascontiguousarray(arr[...])
            out[f"{name}/{aname}"] = hashlib.sha256(data.tobytes()).hexdigest()
    return out


def summary(w: Path, seconds: float) -> dict:
    rows = [json.loads(line) for line in open(w / "pretrain" / "metrics.jsonl")]
    losses = [r["loss/total"] for r in rows if "loss/total" in r]
    return {"codes": code_hashes(w / "tokens.zarr"), "losses": losses, "seconds": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="scratch directory (corpus, store, runs)")
    ap.add_argument("--out", type=Path, default=None, help="JSON to write (default: print)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--hash-only", action="store_true", help="summarise an earlier run in --work")
    args = ap.parse_args()
    w = args.work
    t0 = time.perf_counter()
    if args.hash_only:
        print(json.dumps(summary(w, 0.0), indent=1))
        return
    if not (w / "corpus" / "manifest.csv").exists():
        vqmae("synth", str(w / "corpus"), "--preset", "tiny", "--force")
    vqmae("tokenize", str(w / "corpus"), "--out", str(w / "tokens.zarr"), "--face", "haar",
          "--preset", "tiny", "--workers", "2", "--device", "cpu", "--run-dir", str(w / "tokenize"))
    vqmae("pretrain", str(w / "tokens.zarr"), "--preset", "tiny", "--device", "cpu",
          "--run-dir", str(w / "pretrain"), "--set", f"pretrain.steps={args.steps}",
          "--set", "pretrain.log_every=1", "--set", f"pretrain.val_every={args.steps}",
          "--set", f"pretrain.ckpt_every={args.steps}", "--set", f"pretrain.recon_every={args.steps}")
    text = json.dumps(summary(w, time.perf_counter() - t0), indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
