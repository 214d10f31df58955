"""Stage-2 throughput: can the data path feed the masked-token transformer, and how close does the
training step come to the machine's matmul peak?

One run builds one synthetic paper-shaped av token store (audio codebook 256, grid (64,), 50 fps;
visual codebook 512, grid (24, 24), 25 fps; clips of 4–10 s with uniform random codes) and reports:

  (a) loader     windows/s of `WindowData.train_batches` (in RAM), of `StreamingWindows` in the main
                 process (ram_limit_gb=0) and through DataLoader(num_workers=2), each batch moved to
                 the device as the training loop does (`batch_dict`)
  (b) train      windows/s of forward + backward + clip + AdamW step of the configured model (plus
                 every `--variant`), bf16 autocast on CUDA, warm-up steps excluded, synchronised on
                 GPU; batches staged on the device first, so the loader is not in this number;
                 peak RSS and peak GPU memory
  (c) FLOPs      `flops_per_window` × windows/s, as a fraction of a large matmul measured in the
                 same run (fp32 on CPU, bf16 on CUDA)
  (d) ratio      loader windows/s ÷ training windows/s (the CPU demo target is ≥ 5×)

Every loader method and training variant runs in a fresh subprocess, so its peak RSS is its own.

    .venv/bin/python benchmarks/pretrain.py                               # CPU, ~2 min on 2 cores
    .venv/bin/python benchmarks/pretrain.py --set mae.head_dim=16
    .venv/bin/python benchmarks/pretrain.py --variant "mae.head_dim=16" --variant "mae.width=256"
    .venv/bin/python benchmarks/pretrain.py --device cuda                 # batch 256, 2000 clips
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich import box
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from vqmae.config import Config, StoreConfig, load_config, mae_modalities
from vqmae.models.layout import MAEDims, flops_per_window, patch_layout
from vqmae.models.mae import MAEModel
from vqmae.models.masking import sample_masking
from vqmae.stages.pretrain import GlobalMasking, batch_dict, mask_generator, param_groups
from vqmae.store import ModalitySpec, StoreWriter, TokenStore, merge
from vqmae.training import adamw, autocast_context
from vqmae.windows import WindowData

LOADERS = ("ram", "stream-w0", "stream-w2")
STREAM_WORKERS = {"stream-w0": 0, "stream-w2": 2}
# Defaults per device: a paper-sized step is seconds on 2 CPU cores, milliseconds on a GPU.
DEFAULTS = {"cpu": {"batch": 16, "steps": 4, "warmup": 1, "clips": 200, "loader_seconds": 2.0},
            "cuda": {"batch": 256, "steps": 50, "warmup": 10, "clips": 2000,
                     "loader_seconds": 5.0}}
# Distinct batches staged on the device for the training step (cycled).
STAGED_BATCHES = 4
TARGET_RATIO = 5.0
CLIP_SECONDS = (4.0, 10.0)


# ----------------------------------------------------------------------------------------------
# set-up


def machine(device: str) -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "gpu": gpu,
            "device": device, "load_avg_1min": os.getloadavg()[0]}


def build_store(path: Path, n_clips: int, seed: int) -> float:
    """Paper-shaped av store of ``n_clips`` clips of 4–10 s with random codes → seconds taken."""
    rng = np.random.default_rng(seed)
    specs = {"audio": ModalitySpec("audio", 256, (64,), 50.0, "0" * 64),
             "visual": ModalitySpec("visual", 512, (24, 24), 25.0, "1" * 64)}
    lo, hi = (int(s * 25) for s in CLIP_SECONDS)
    t0 = time.perf_counter()
    with StoreWriter(path, specs, cfg=StoreConfig(segment_clips=64)) as w:
        for i in range(n_clips):
            n_v = int(rng.integers(lo, hi + 1))  # visual frames; audio has 2 per video frame
            w.add({"clip_id": f"clip{i:06d}", "index": i, "speaker": f"s{i % 50}"},
                  {"audio": rng.integers(0, 256, (2 * n_v, 64), dtype=np.uint16),
                   "visual": rng.integers(0, 512, (n_v, 576), dtype=np.uint16)})
    merge(path)
    return time.perf_counter() - t0


def job_config(job: dict[str, Any]) -> Config:
    """The preset + overrides of a job, with the benchmark's batch size and loader path."""
    cfg = load_config(job["preset"], job["overrides"])
    stream = job.get("method", "ram") != "ram"
    return dataclasses.replace(cfg, pretrain=dataclasses.replace(
        cfg.pretrain, batch_size=job["batch"], ram_limit_gb=0.0 if stream else 1e6,
        workers=STREAM_WORKERS.get(job.get("method"), 0)))


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_rss_gb(pid: int | str = "self") -> float | None:
    """Peak resident memory (VmHWM) of one process, GiB; None where /proc cannot tell.

    Not ``getrusage``: Linux carries ``ru_maxrss`` across fork and exec, so a measurement child
    would report at least its parent's footprint.
    """
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2 ** 20  # kB → GiB
    except OSError:
        pass
    return None


def workers_rss_gb() -> float | None:
    """Summed peak RSS of this process's live children (DataLoader workers), GiB; None if none.

    Pages shared with the parent by fork count in each, so this overstates what they add.
    """
    pids = []
    for task in Path("/proc/self/task").iterdir():
        try:
            pids += (task / "children").read_text().split()
        except OSError:
            continue
    peaks = [x for x in map(peak_rss_gb, pids) if x is not None]
    return sum(peaks) if peaks else None


# ----------------------------------------------------------------------------------------------
# the measurements (each in its own process)


def loader_batches(data: WindowData, method: str, device: str):
    if method == "ram":
        return data.train_batches()
    ds = data.streaming()
    if method == "stream-w0":
        return iter(ds)
    return iter(DataLoader(ds, batch_size=None, num_workers=STREAM_WORKERS[method],
                           pin_memory=device.startswith("cuda")))


def measure_loader(job: dict[str, Any]) -> dict[str, Any]:
    """Windows/s of one loader path, device transfer included; start-up (load / fork) apart."""
    cfg, device, method = job_config(job), job["device"], job["method"]
    t0 = time.perf_counter()
    data = WindowData(TokenStore.open(job["path"]), cfg)
    it = loader_batches(data, method, device)
    first = batch_dict(next(it), device)
    synchronize(device)
    startup = time.perf_counter() - t0
    for m, spec in data.specs.items():  # a reused --path store must give whole windows
        want = (job["batch"], data.geom.frames[m], *spec.grid)
        if tuple(first[m].shape) != want:
            raise ValueError(f"{job['path']}: {m} batch {tuple(first[m].shape)}, expected {want}")
    n, batches, t0 = 0, 0, time.perf_counter()
    while batches < 3 or time.perf_counter() - t0 < job["seconds"]:
        n += len(batch_dict(next(it), device)["audio"])
        batches += 1
    synchronize(device)
    rate = n / (time.perf_counter() - t0)
    return {"method": method, "windows_per_s": rate, "startup_s": startup,
            "peak_rss_gb": peak_rss_gb(), "workers_rss_gb": workers_rss_gb(),
            "in_ram": data.in_ram}


def nominal_mask_ratio(cfg: Config, dims: MAEDims) -> float:
    """Expected masked fraction of all patches, the single ratio `flops_per_window` takes."""
    mae = cfg.mae
    mode = mae_modalities(mae.modalities, [m for m in ("audio", "visual") if dims.get(m) is not None])
    names = ("audio", "visual") if mode == "av" else (mode,)
    n = {m: patch_layout(m, dims.get(m), mae).n_patches for m in names}
    if mae.masking in ("coupled", "coupled_batch"):  # E[r_v] = E[1 - r_v] = 0.5 in every modality
        return 0.5
    if mae.masking in ("audio2visual", "visual2audio"):
        hidden = "visual" if mae.masking == "audio2visual" else "audio"
        return n.get(hidden, 0) / sum(n.values())
    ratio = {"audio": mae.mask_ratio_audio, "visual": mae.mask_ratio_visual}
    return sum(ratio[m] * n[m] for m in names) / sum(n.values())


def measure_train(job: dict[str, Any]) -> dict[str, Any]:
    """Windows/s of the training step (as `vqmae.stages.pretrain.pretrain` runs it) on staged batches."""
    cfg, device = job_config(job), job["device"]
    pcfg = cfg.pretrain
    store = TokenStore.open(job["path"])
    data = WindowData(store, cfg)
    dims = MAEDims.from_specs(store.specs, cfg.mae)
    torch.manual_seed(cfg.seed)
    model = MAEModel(cfg.mae, dims).to(device)
    if pcfg.compile:
        model.compile_blocks()
    opt = adamw(param_groups(model, pcfg.weight_decay), lr=pcfg.base_lr * pcfg.batch_size / 256,
                betas=tuple(pcfg.betas))
    masker = GlobalMasking(model, data, device)
    it = data.train_batches()
    staged = [(batch_dict(b, device), b.rows.to(device), b.starts.to(device))
              for b in (next(it) for _ in range(STAGED_BATCHES))]
    ctx = autocast_context(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    def step(i: int) -> torch.Tensor:
        inputs, rows, starts = staged[i % len(staged)]
        # one process: the global batch is this batch, masks drawn as the loop draws them
        masks = masker.draw(rows, starts, mask_generator(cfg.seed, i, device), 0, len(rows))
        with ctx:
            out = model(inputs, None, mask=masks.mask, ce_denominator=masks.count, bounds=masks.bounds)
        loss = out.loss.float()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), pcfg.grad_clip)
        opt.step()
        return loss.detach()

    for i in range(job["warmup"]):
        step(i)
    synchronize(device)
    t0 = time.perf_counter()
    losses = [step(i) for i in range(job["warmup"], job["warmup"] + job["steps"])]
    synchronize(device)
    took = time.perf_counter() - t0
    if not all(torch.isfinite(x) for x in losses):
        raise FloatingPointError(f"non-finite loss in the timed steps: "
                                 f"{[float(x) for x in losses]}")
    gpu_gb = torch.cuda.max_memory_allocated() / 2 ** 30 if device.startswith("cuda") else None
    ratio = nominal_mask_ratio(cfg, dims)
    return {"overrides": job["overrides"], "windows_per_s": job["steps"] * pcfg.batch_size / took,
            "ms_per_step": 1e3 * took / job["steps"], "params": model.num_params(),
            "flops_per_window": flops_per_window(cfg.mae, dims, ratio), "mask_ratio": ratio,
            "peak_rss_gb": peak_rss_gb(), "peak_gpu_gb": gpu_gb,
            "final_loss": float(losses[-1])}


PAPER_SPECS = {"audio": {"codebook_size": 256, "grid": [64], "frame_rate": 50.0},
               "visual": {"codebook_size": 512, "grid": [24, 24], "frame_rate": 25.0}}


def reference_module():
    """benchmarks/reference_mae.py, loaded by path (whatever the importer's sys.path)."""
    spec = importlib.util.spec_from_file_location("reference_mae", Path(__file__).with_name("reference_mae.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def reference_pair(job: dict[str, Any]):
    """vqmae's paper-preset model (with the job's overrides) and the reference, each with its own
    optimiser and step functions, plus staged random paper-shaped batches."""
    ref_mod = reference_module()
    cfg = load_config("paper", job["overrides"])
    device, b = job["device"], job["batch"]
    dims = MAEDims.from_specs(PAPER_SPECS, cfg.mae)
    torch.manual_seed(cfg.seed)
    ours = MAEModel(cfg.mae, dims).to(device)
    ref = ref_mod.ReferenceMAE().to(device)
    lr = cfg.pretrain.base_lr * b / 256
    opt_ours = adamw(param_groups(ours, cfg.pretrain.weight_decay), lr=lr, betas=tuple(cfg.pretrain.betas))
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    g = torch.Generator().manual_seed(job.get("seed", 0))
    batches = [{"visual": torch.randint(0, 512, (b, 50, 24, 24), generator=g).to(device),
                "audio": torch.randint(0, 256, (b, 100, 64), generator=g).to(device)}
               for _ in range(STAGED_BATCHES)]
    gen = torch.Generator(device).manual_seed(0)
    rng = np.random.default_rng(0)
    ctx = autocast_context(device)
    # Both models mask step i with the same visual ratio (audio: 1 − it), so the per-batch draws
    # do not decide the comparison; vqmae draws its masks in the step with its own masking code.
    ratios = np.random.default_rng(job.get("seed", 0) + 1).uniform(size=10_000)
    no_padding = {m: torch.zeros(b, lay.n_patches, dtype=torch.bool, device=device)
                  for m, lay in ours.layouts.items()}

    def ours_masks(i: int) -> dict[str, Any]:
        """The step's masks and their host-known bounds, as `vqmae pretrain` passes them."""
        r = {"visual": float(ratios[i]), "audio": 1.0 - float(ratios[i])}
        masking = sample_masking("fixed", no_padding, ours.layouts, r, gen)
        return {"mask": masking.mask, "bounds": masking.bounds}

    def train_ours(i: int) -> None:
        ours.train()
        with ctx:
            loss = ours(batches[i % STAGED_BATCHES], None, **ours_masks(i)).loss
        opt_ours.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), cfg.pretrain.grad_clip)
        opt_ours.step()

    def train_ref(i: int) -> None:
        batch = batches[i % STAGED_BATCHES]
        with ctx:
            loss = ref(batch["visual"], batch["audio"], rng, ratios[i])
        opt_ref.zero_grad(set_to_none=True)
        loss.backward()
        opt_ref.step()

    @torch.no_grad()
    def eval_ours(i: int) -> None:
        ours.eval()
        with ctx:
            ours(batches[i % STAGED_BATCHES], None, **ours_masks(i))

    @torch.no_grad()
    def eval_ref(i: int) -> None:
        batch = batches[i % STAGED_BATCHES]
        with ctx:
            ref(batch["visual"], batch["audio"], rng, ratios[i])

    flops = {"vqmae": flops_per_window(cfg.mae, dims, 0.5),
             "reference": ref_mod.reference_flops_per_window(0.5)}
    params = {"vqmae": ours.num_params(), "reference": ref_mod.parameter_count(ref)}
    return {"vqmae": (train_ours, eval_ours), "reference": (train_ref, eval_ref)}, flops, params


def measure_versus_reference(job: dict[str, Any]) -> dict[str, Any]:
    """Both models timed in one process, interleaved step by step (reference, vqmae, reference, ...)
    so that a change in the machine's load hits both alike: training steps, then eval forwards."""
    fns, flops, params = reference_pair(job)
    device = job["device"]
    out: dict[str, Any] = {"flops_per_window": flops, "params": params}
    for phase, k in (("train", 0), ("eval", 1)):
        took = {name: 0.0 for name in fns}
        for i in range(job["warmup"] + job["steps"]):
            for name, pair in fns.items():
                synchronize(device)
                t0 = time.perf_counter()
                pair[k](i)
                synchronize(device)
                if i >= job["warmup"]:
                    took[name] += time.perf_counter() - t0
        out[phase] = {name: job["steps"] * job["batch"] / t for name, t in took.items()}
    return out


def measure_reference_rss(job: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS of one of the two models' training steps, alone in this process."""
    fns, _, _ = reference_pair(job)
    train = fns[job["model"]][0]
    for i in range(job["warmup"] + 2):
        train(i)
    return {"model": job["model"], "peak_rss_gb": peak_rss_gb()}


def matmul_tflops(device: str, seconds: float = 2.0) -> dict[str, Any]:
    """Peak square-matmul throughput: fp32 n=2048 on CPU, bf16 n=8192 on CUDA.

    The best of many short bursts: on a CPU shared with other jobs the mean would measure them.
    """
    cuda = device.startswith("cuda")
    n, dtype = (8192, torch.bfloat16) if cuda else (2048, torch.float32)
    per_burst = 10 if cuda else 1  # enough GPU work queued per reading of the clock
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3 if cuda else 1):
        a @ b
    synchronize(device)
    best, bursts, start = 0.0, 0, time.perf_counter()
    while bursts < 3 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        for _ in range(per_burst):
            a @ b
        synchronize(device)
        best = max(best, 2 * n ** 3 * per_burst / (time.perf_counter() - t0) / 1e12)
        bursts += 1
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "tflops": best}


# ----------------------------------------------------------------------------------------------
# driver


def run_job(job: dict[str, Any], console: Console) -> dict[str, Any] | None:
    """Run one measurement in a fresh interpreter; None (and the error shown) when it fails."""
    out = subprocess.run([sys.executable, __file__, "--job", json.dumps(job)],
                         capture_output=True, text=True)
    if out.returncode:
        console.print(f"[red]{job['kind']} {job.get('method', job['overrides'])} failed "
                      f"(exit {out.returncode}):[/red]\n{out.stderr[-2000:]}")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override applied to everything (repeatable)")
    ap.add_argument("--variant", action="append", default=[], metavar="'KEY=VALUE ...'",
                    help="an extra training row: space-separated overrides on top of --set")
    ap.add_argument("--steps", type=int, help="timed training steps (cpu 4, cuda 50)")
    ap.add_argument("--warmup", type=int, help="untimed training steps first (cpu 1, cuda 10)")
    ap.add_argument("--batch", type=int, help="windows per batch (cpu 4, cuda 256)")
    ap.add_argument("--clips", type=int, help="clips in the synthetic store (cpu 200, cuda 2000)")
    ap.add_argument("--loader-seconds", type=float, help="time per loader method (cpu 2, cuda 5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--path", type=Path, help="keep the synthetic store here; an existing store "
                    "there (e.g. the demo corpus's tokens.zarr) is used as it is")
    ap.add_argument("--markdown", action="store_true", help="print tables as markdown (README)")
    ap.add_argument("--json", type=Path, help="also write every number to this file")
    ap.add_argument("--no-reference", dest="reference", action="store_false",
                    help="skip (e): vqmae's model against benchmarks/reference_mae.py (paper preset)")
    ap.add_argument("--job", help=argparse.SUPPRESS)  # internal: one measurement, JSON out
    args = ap.parse_args()
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.clips < 2:
        ap.error("need --steps >= 1, --warmup >= 0, --batch >= 1, --clips >= 2")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device on this machine")
    return args


def fmt(x: float | None, spec: str = ",.1f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_report(console: Console, style: box.Box, res: dict[str, Any], base: Config) -> None:
    peak = res["matmul"]["tflops"]
    train = [t for t in res["train"] if t is not None]
    base_rate = train[0]["windows_per_s"] if train else math.nan
    # the path `WindowData.train_loader` would take for this store (workers: 2 measured)
    in_ram = base.pretrain.ram_limit_gb * 2 ** 30 > res["store"]["code_bytes"]
    used = "ram" if in_ram else "stream-w2"
    feed = next((r["windows_per_s"] for r in res["loader"] if r and r["method"] == used), math.nan)

    loader = Table("loader path", "windows/s", "start-up s", "peak RSS GiB", "+ workers GiB",
                   "÷ train windows/s", f"≥ {TARGET_RATIO:g}×", box=style,
                   title=f"(a, d) loader, batch {res['batch']}, to {res['machine']['device']}")
    for r in filter(None, res["loader"]):
        ratio = r["windows_per_s"] / base_rate
        loader.add_row(r["method"] + (" (pretrain uses)" if r["method"] == used else ""),
                       fmt(r["windows_per_s"]), fmt(r["startup_s"], ".2f"),
                       fmt(r["peak_rss_gb"], ".2f"), fmt(r["workers_rss_gb"], ".2f"),
                       fmt(ratio, ",.0f") + "×", "yes" if ratio >= TARGET_RATIO else "NO")
    console.print(loader)

    trainer = Table("model", "params M", "windows/s", "ms/step", "GFLOP/window",
                    "achieved TFLOP/s", "of matmul peak", "peak RSS GiB", "peak GPU GiB",
                    f"{used} ÷ train", box=style,
                    title=f"(b, c, d) training step, batch {res['batch']}, {res['steps']} steps "
                          f"timed after {res['warmup']} warm-up")
    for r in train:
        achieved = r["flops_per_window"] * r["windows_per_s"] / 1e12
        ratio = feed / r["windows_per_s"]
        trainer.add_row(r["label"], fmt(r["params"] / 1e6, ".2f"),
                        fmt(r["windows_per_s"], ",.2f"), fmt(r["ms_per_step"], ",.0f"),
                        fmt(r["flops_per_window"] / 1e9, ".1f"), fmt(achieved, ".4f"),
                        fmt(100 * achieved / peak, ".1f") + " %", fmt(r["peak_rss_gb"], ".2f"),
                        fmt(r["peak_gpu_gb"], ".2f"),
                        fmt(ratio, ",.0f") + "× " + ("ok" if ratio >= TARGET_RATIO else "TOO LOW"))
    console.print(trainer)
    mm = res["matmul"]
    console.print(f"(c) matmul peak: {mm['dtype']} {mm['n']}×{mm['n']} → {peak:.4f} TFLOP/s; "
                  f"GFLOP/window = vqmae.models.layout.flops_per_window (fwd + bwd) at mask ratio "
                  f"{train[0]['mask_ratio'] if train else math.nan:g}")
    if train:
        ratio = feed / max(r["windows_per_s"] for r in train)  # the hungriest model binds
        console.print(f"(d) {used} loader ÷ fastest training step = {ratio:,.0f}× → the "
                      f"≥ {TARGET_RATIO:g}× requirement "
                      f"{'holds' if ratio >= TARGET_RATIO else 'does NOT hold'} on this machine")


def print_reference(console: Console, style: box.Box, res: dict[str, Any]) -> None:
    ref, peak = res.get("reference"), res["matmul"]["tflops"]
    if not ref:
        return
    table = Table("model", "params M", "GFLOP/window", "train windows/s", "eval windows/s",
                  "train achieved GFLOP/s", "of matmul peak", "peak RSS GiB", box=style,
                  title=f"(e) against the reference implementation, interleaved step by step, batch "
                        f"{res['batch']}, {res['steps']} steps after {res['warmup']} warm-up")
    for name in ("reference", "vqmae"):
        achieved = ref["flops_per_window"][name] * ref["train"][name] / 1e9
        table.add_row(name, fmt(ref["params"][name] / 1e6, ".2f"), fmt(ref["flops_per_window"][name] / 1e9, ".1f"),
                      fmt(ref["train"][name], ",.2f"), fmt(ref["eval"][name], ",.2f"), fmt(achieved, ",.1f"),
                      fmt(100 * achieved / (peak * 1e3), ".1f") + " %", fmt(ref["peak_rss_gb"].get(name), ".2f"))
    console.print(table)
    console.print(f"(e) vqmae ÷ reference: training {ref['train']['vqmae'] / ref['train']['reference']:.2f}×, "
                  f"eval {ref['eval']['vqmae'] / ref['eval']['reference']:.2f}× (same machine, same run)")


def main() -> None:
    args = parse_args()
    if args.job:
        job = json.loads(args.job)
        fn = {"loader": measure_loader, "train": measure_train, "reference": measure_versus_reference,
              "reference_rss": measure_reference_rss}[job["kind"]]
        print(json.dumps(fn(job)))
        return
    # markdown rows must not wrap (they go into README.md)
    console = Console(width=250 if args.markdown else max(Console().width, 130))
    style = box.MARKDOWN if args.markdown else box.HEAVY_HEAD
    base = load_config(args.preset, args.overrides)  # fail here on a bad --set, not per job
    variants = [args.overrides] + [args.overrides + v.split() for v in args.variant]
    labels = [" ".join([args.preset, *args.overrides])] + [f"+ {v}" for v in args.variant]
    for v in variants[1:]:
        load_config(args.preset, v)
    info = machine(args.device)
    console.print(f"machine: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), "
                  f"torch {info['torch']} with {info['torch_threads']} threads; "
                  f"GPU: {info['gpu']}; device {args.device}; load average "
                  f"{info['load_avg_1min']:.1f} (other jobs slow every number)")
    with tempfile.TemporaryDirectory() as tmp:
        path = args.path or Path(tmp) / "tokens.zarr"
        if not (path / "zarr.json").exists():
            took = build_store(path, args.clips, args.seed)
            console.print(f"built {path} ({args.clips} clips) in {took:.1f} s")
        store = TokenStore.open(path)
        code_bytes = sum(store.n_frames(m) * s.n_tokens * 2 for m, s in store.specs.items())
        console.print(f"store: {store.n_clips} clips, {store.hours('visual'):.2f} h, "
                      f"{code_bytes / 2 ** 20:.0f} MiB of codes")
        res: dict[str, Any] = {"machine": info, "preset": args.preset, "batch": args.batch,
                               "steps": args.steps, "warmup": args.warmup,
                               "store": {"clips": store.n_clips, "code_bytes": code_bytes,
                                         "hours": store.hours("visual")},
                               "matmul": matmul_tflops(args.device)}
        common = {"path": str(path), "preset": args.preset, "batch": args.batch,
                  "device": args.device}
        res["loader"] = [run_job({**common, "kind": "loader", "method": m, "overrides":
                                  args.overrides, "seconds": args.loader_seconds}, console)
                         for m in LOADERS]
        res["train"] = [run_job({**common, "kind": "train", "overrides": v, "steps": args.steps,
                                 "warmup": args.warmup}, console) for v in variants]
        for r, label in zip(res["train"], labels):
            if r is not None:
                r["label"] = label
        if args.reference and args.preset == "paper":
            ref_job = {**common, "overrides": args.overrides, "steps": args.steps, "warmup": args.warmup,
                       "seed": args.seed}
            res["reference"] = run_job({**ref_job, "kind": "reference"}, console)
            if res["reference"] is not None:
                res["reference"]["peak_rss_gb"] = {
                    m: (run_job({**ref_job, "kind": "reference_rss", "model": m}, console) or {}).get("peak_rss_gb")
                    for m in ("reference", "vqmae")}
        # measured again after the jobs, the best kept: another job on a shared CPU lowers it
        res["matmul"] = max(res["matmul"], matmul_tflops(args.device), key=lambda r: r["tflops"])
    print_report(console, style, res, base)
    print_reference(console, style, res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
