"""Checkpoint format `vqmae-ckpt/1` (DESIGN.md §3).

A checkpoint is one plain dict saved with `torch.save`, readable with `torch.load(weights_only=True)`
(no pickled classes: only tensors, str, numbers, None and dict / list / tuple of them):

    format          "vqmae-ckpt/1"
    kind            "audio_vqvae" | "visual_vqvae" | "mae" | "classifier"
    vqmae_version   package version that wrote it
    config          the full resolved `Config.to_dict()`; models are rebuilt from this
    state_dict      weights on the CPU, without `module.` / `_orig_mod.` wrapper prefixes
    parents         {name: sha256} of the checkpoints it was built on
    step, metrics   training progress
    optimizer, scheduler   their state dicts or None (for resume)
    rng             {"torch", "cuda", "numpy", "python"} generator states (for resume)
    extra           anything else plain the caller wants to keep

Files are written to a temporary sibling and renamed into place, so a crash mid-write leaves the old
checkpoint (or none), never a truncated one.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from vqmae import __version__
from vqmae.config import Config, ConfigError
from vqmae.utils import atomic_write, sha256_file

log = logging.getLogger(__name__)

FORMAT = "vqmae-ckpt/1"
KINDS = ("audio_vqvae", "visual_vqvae", "mae", "classifier")
TOKENIZER_KINDS = ("audio_vqvae", "visual_vqvae")
_REQUIRED = ("format", "kind", "config", "state_dict")
_PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.dtype, torch.device, torch.Size)


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or used; the message names the file and the reason."""


# ---------------------------------------------------------------------------------------- writing

def clean_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copy of `state` without DDP (`module.`) or `torch.compile` (`_orig_mod.`) wrappers.

    Leading `module.` components are DDP's; `_orig_mod` components can sit at any depth (a compiled
    submodule). Two keys collapsing onto one name is an error rather than a silent overwrite.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = [p for p in key.split(".") if p != "_orig_mod"]
        while len(parts) > 1 and parts[0] == "module":
            parts = parts[1:]
        name = ".".join(parts)
        if name in out:
            raise CheckpointError(f"state dict keys collide after removing wrapper prefixes: {name!r}")
        out[name] = value.detach().cpu() if isinstance(value, torch.Tensor) else value
    return out


def rng_state() -> dict[str, Any]:
    """Every global generator's state as tensors and lists (weights_only-loadable)."""
    np_state = np.random.get_state(legacy=False)
    version, mt, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": [version, list(mt), gauss],
    }


def restore_rng(ckpt: Mapping[str, Any]) -> None:
    """Put the global torch / CUDA / numpy / python generators back to the checkpoint's states."""
    state = ckpt.get("rng")
    if not state:
        raise CheckpointError("checkpoint has no RNG state to restore")
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            log.warning("checkpoint holds %d CUDA RNG states but %d devices are visible; "
                        "CUDA RNG not restored", len(state["cuda"]), torch.cuda.device_count())
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))


def _check_plain(obj: Any, where: str) -> None:
    """Refuse anything `torch.load(weights_only=True)` could not read back, naming where it is."""
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise CheckpointError(f"{where}: key {k!r} is a {type(k).__name__}, not str or int")
            _check_plain(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN):
        raise CheckpointError(f"{where} is a {type(obj).__name__}; a checkpoint holds only tensors, "
                              "str, numbers, None and dict / list / tuple of them")


def _plain_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Scalar tensors become floats so metrics read the same everywhere."""
    return {k: float(v) if isinstance(v, torch.Tensor) and v.numel() == 1 else v
            for k, v in metrics.items()}


def _unwrap(model: nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    return model.state_dict() if isinstance(model, nn.Module) else model


def save_checkpoint(path: str | os.PathLike, *, kind: str,
                    model: nn.Module | Mapping[str, torch.Tensor],
                    config: Mapping[str, Any] | Config, parents: Mapping[str, str] | None = None,
                    step: int = 0, metrics: Mapping[str, Any] | None = None,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    extra: Mapping[str, Any] | None = None) -> Path:
    """Write a `vqmae-ckpt/1` checkpoint atomically and return its path.

    `model` is a module (possibly DDP- or compile-wrapped) or a state dict; `config` the full
    resolved config (a `Config` or its dict). Raises CheckpointError for an unknown kind or a value
    `weights_only` loading could not read back.
    """
    path = Path(path)
    if kind not in KINDS:
        raise CheckpointError(f"{path}: unknown checkpoint kind {kind!r}; "
                              f"expected one of {list(KINDS)}")
    ckpt = {
        "format": FORMAT,
        "kind": kind,
        "vqmae_version": __version__,
        "config": config.to_dict() if isinstance(config, Config) else dict(config),
        "state_dict": clean_state_dict(_unwrap(model)),
        "parents": dict(parents or {}),
        "step": int(step),
        "metrics": _plain_metrics(metrics or {}),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_state(),
        "extra": dict(extra or {}),
    }
    for name, sha in ckpt["parents"].items():
        if not isinstance(sha, str):
            raise CheckpointError(f"{path}: parent {name!r} must be a sha256 string, got {sha!r}")
    try:
        _check_plain(ckpt, "checkpoint")
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    _atomic_torch_save(ckpt, path)
    log.debug("saved %s checkpoint (step %d) to %s", kind, step, path)  # every epoch / ckpt_every: not news
    return path


def _atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save into a temporary sibling, fsync, then rename over `path` (same filesystem)."""
    atomic_write(path, lambda f: torch.save(obj, f))


# ---------------------------------------------------------------------------------------- reading

def load_checkpoint(path: str | os.PathLike, kind: str | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and validate a checkpoint; `kind` (if given) must match the stored kind.

    Raises CheckpointError naming the file for a missing, truncated, corrupt or non-plain file, an
    unknown format (both values named) or the wrong kind (both values named).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError / ... by cause
        raise CheckpointError(f"{path}: cannot read checkpoint (truncated, corrupt or not a "
                              f"plain-data torch file): {_load_failure(e)}") from e
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if fmt != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {fmt!r}; "
                              f"this vqmae reads {FORMAT!r}")
    missing = [k for k in _REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks required fields {missing}")
    if kind is not None and ckpt["kind"] != kind:
        raise CheckpointError(f"{path}: checkpoint kind is {ckpt['kind']!r}, expected {kind!r}")
    return ckpt


def _load_failure(e: Exception) -> str:
    """The informative line of a torch.load error (its weights_only message runs to a page)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    unsupported = [line for line in lines if "Unsupported global" in line]
    if unsupported:
        return "it holds pickled Python objects; " + unsupported[0].split(" was not an allowed")[0]
    return lines[0] if lines else type(e).__name__


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of the checkpoint file: the identity artifacts record as `parents`."""
    return sha256_file(path)


def load_tokenizer(path: str | os.PathLike, device: str | torch.device = "cpu",
                   kind: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a tokenizer from the config stored in `path`, load its weights, put it in eval mode.

    Returns `(model, ckpt)`. The model's size comes from the checkpoint, never from the current
    command line, so a store is always re-encoded with the tokenizer that made it.
    """
    from vqmae.tokenizers import build_tokenizer  # deferred: checkpoints of any kind load without it

    ckpt = load_checkpoint(path, kind=kind)
    if ckpt["kind"] not in TOKENIZER_KINDS:
        raise CheckpointError(f"{path}: checkpoint kind is {ckpt['kind']!r}, expected a tokenizer "
                              f"({' or '.join(TOKENIZER_KINDS)})")
    try:
        cfg = Config.from_dict(ckpt["config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: stored config does not match this vqmae version: {e}") from e
    model = build_tokenizer(ckpt["kind"], cfg)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the model built from its stored config: "
                              f"{e}") from e
    return model.to(device).eval(), ckpt
