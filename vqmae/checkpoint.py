"""Checkpoint format `vqmae-ckpt/1` (docs/design.md §3).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from vqmae import __version__
from vqmae.config import Config, ConfigError, MAEConfig, section_from_dict, view_differences
from vqmae.models.classifier import EmotionModel
from vqmae.models.layout import MAEDims
from vqmae.models.mae import MAEModel
from vqmae.models.tokenizers import build_tokenizer
from vqmae.store import TokenStore
from vqmae.tasks import Task, task_from_dict
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
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":  # torch.save writes a zip archive; anything else is another file
        raise CheckpointError(f"{path}: not a checkpoint (a torch checkpoint is a zip archive; this "
                              f"file is {'empty' if not magic else 'something else'})")
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


# ------------------------------------------------------------------ artifacts of the pipeline

TOKENIZER_KIND = {"audio": "audio_vqvae", "visual": "visual_vqvae"}  # modality → checkpoint kind
TOKENIZER_FILES = {m: f"{k}.pt" for m, k in TOKENIZER_KIND.items()}  # in a tokenize run
TOKENIZER_HINT = "pass the directory holding the tokenizers that made the store with --tokenizers DIR"


class ParentMismatchError(CheckpointError):
    """An artifact built on other parents than the ones at hand (another tokenizer or MAE)."""


@dataclass
class LoadedTokenizer:
    model: nn.Module
    ckpt: dict[str, Any]
    sha256: str
    path: Path


def load_tokenizers(directory: str | os.PathLike, modalities: Sequence[str],
                    device: str = "cpu") -> dict[str, LoadedTokenizer]:
    """{modality: LoadedTokenizer} from `directory/{audio,visual}_vqvae.pt` (a tokenize run's
    `tokenizers/` folder), with no parent to check against."""
    return resolve_tokenizers(str(directory), {m: None for m in modalities}, directory=directory,
                              device=device)


def resolve_tokenizers(owner: str | os.PathLike, expected: Mapping[str, str | None], *,
                       recorded: Mapping[str, Mapping[str, str]] | None = None,
                       directory: str | os.PathLike | None = None, device: str = "cpu",
                       required: bool = True, hint: str = TOKENIZER_HINT) -> dict[str, LoadedTokenizer]:
    """The tokenizers an artifact (`owner`: a store, a classifier) was made with: the one rule every
    stage loads them by.

    For each modality in `expected` ({modality: sha256, or None when nothing is recorded}) the file
    is `directory/<modality>_vqvae.pt` when a directory is given, else the path `recorded` for it
    ({modality: {"path", "sha256"}}, as `vqmae tokenize` writes into a store). A missing record or
    file, or a file whose sha256 is not the expected one, raises `CheckpointError` naming the owner,
    the file and both values; with `required=False` it is logged and the modality left out.
    """
    recorded = recorded or {}
    found = {}
    for m, want in expected.items():
        want = want or (recorded.get(m) or {}).get("sha256")
        try:
            found[m] = _resolve_one(owner, m, want, recorded.get(m) or {}, directory, device, hint)
        except CheckpointError as e:
            if required:
                raise
            log.warning("%s; no %s tokenizer", e, m)
    return found


def _resolve_one(owner: str | os.PathLike, m: str, want: str | None, record: Mapping[str, str],
                 directory: str | os.PathLike | None, device: str, hint: str) -> LoadedTokenizer:
    if directory is not None:
        path = Path(directory) / TOKENIZER_FILES[m]
        if not path.is_file():
            raise CheckpointError(f"{directory}: no {TOKENIZER_FILES[m]} (the {m} tokenizer of {owner})")
    elif record.get("path"):
        path = Path(record["path"])
        if not path.is_file():
            raise CheckpointError(f"{owner}: its {m} tokenizer {path} (sha256 {want}) does not exist; "
                                  f"{hint}")
    else:
        raise CheckpointError(f"{owner}: records no {m} tokenizer path (made by an older vqmae?); {hint}")
    got = checkpoint_sha256(path)
    if want and got != want:
        raise ParentMismatchError(f"{path}: {m} tokenizer sha256 {got} is not the one {owner} was made "
                                  f"with ({want}); {hint}")
    model, ckpt = load_tokenizer(path, device)
    return LoadedTokenizer(model, ckpt, got, path.resolve())


def store_tokenizers(store: TokenStore, *, directory: str | os.PathLike | None = None,
                     device: str = "cpu", required: bool = True) -> dict[str, LoadedTokenizer]:
    """The tokenizers that encoded `store` (see `resolve_tokenizers`): the paths it recorded, or
    `directory`, each checked against the sha256 in the store's specs."""
    recorded = (store.attrs.get("config") or {}).get("tokenizers") or {}
    expected = {m: spec.tokenizer_sha256 for m, spec in store.specs.items()}
    return resolve_tokenizers(store.path, expected, recorded=recorded, directory=directory,
                              device=device, required=required)


def load_mae(path: str | os.PathLike, device: str = "cpu") -> tuple[MAEModel, dict[str, Any], Config]:
    """(model in eval mode, checkpoint, config) rebuilt from a `mae` checkpoint's stored config and
    dims."""
    ckpt = load_checkpoint(path, kind="mae")
    cfg = Config.from_dict(ckpt["config"])
    model = MAEModel(cfg.mae, MAEDims.from_dict(ckpt["extra"]["dims"]))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the model built from its stored config: "
                              f"{e}") from e
    return model.to(device).eval(), ckpt, cfg


def check_resume(path: str | os.PathLike, stored: Mapping[str, Any] | Config, cfg: Config, stage: str,
                 error: type[Exception] = CheckpointError) -> None:
    """Refuse to resume the artifact at `path`, made under config `stored`, with `cfg` when they
    differ in what `stage` depends on (`vqmae.config.VIEWS`); the message lists the differences."""
    try:
        stored = stored if isinstance(stored, Config) else Config.from_dict(dict(stored))
    except (ConfigError, TypeError) as e:
        raise error(f"{path}: stored config does not match this vqmae version: {e}") from None
    diff = view_differences(stored, cfg, stage)
    if diff:
        raise error(f"{path}: was trained with another config ({'; '.join(diff[:5])}"
                    f"{'; …' if len(diff) > 5 else ''}); resume with the same --preset/--set, or use "
                    f"a new run directory")


def store_parents(store: TokenStore) -> dict[str, str]:
    """The tokenizer hashes a model trained on `store` depends on: {"audio_tokenizer": sha, ...}."""
    return {f"{m}_tokenizer": spec.tokenizer_sha256 for m, spec in sorted(store.specs.items())}


def check_parents(where: str | os.PathLike, expected: Mapping[str, str], store: TokenStore) -> None:
    """Refuse a store whose tokenizers differ from the ones a checkpoint was trained on."""
    have = store_parents(store)
    for key, sha in expected.items():
        if key in have and have[key] != sha:
            raise ParentMismatchError(f"{where}: {key} mismatch: checkpoint was trained on {sha[:12]}…, "
                                      f"store {store.path} has {have[key][:12]}…")
        if key not in have:
            raise ParentMismatchError(f"{where}: checkpoint needs {key}, store {store.path} has only "
                                      f"{sorted(have)}")


@dataclass
class LoadedClassifier:
    """A fine-tuned classifier rebuilt from its checkpoint, with the tokenizers of its training store."""

    model: EmotionModel  # in eval mode
    task: Task
    cfg: Config  # the fine-tuning run's config (face detection and audio settings to decode with)
    mae_cfg: MAEConfig  # what the encoder was built with (window length, modalities)
    dims: MAEDims
    tokenizers: dict[str, LoadedTokenizer]
    ckpt: dict[str, Any]


def load_classifier(path: str | os.PathLike, *, device: str = "cpu",
                    tokenizers: str | os.PathLike | None = None, hint: str = TOKENIZER_HINT,
                    with_tokenizers: bool = True) -> LoadedClassifier:
    """Rebuild a `classifier` checkpoint from what it recorded (never from today's flags) and its
    tokenizers (`resolve_tokenizers`: the recorded paths, or the directory `tokenizers`), checking
    that their codebooks, grids and frame rates fit the model. `with_tokenizers=False` skips them
    (scoring a token store needs none: check the store with `check_parents`). Raises
    CheckpointError."""
    path = Path(path)
    ckpt = load_checkpoint(path, kind="classifier")
    model, task, cfg, mae_cfg, dims = build_classifier(ckpt, ckpt["state_dict"], path)
    parents = ckpt.get("parents") or {}
    if not with_tokenizers:
        return LoadedClassifier(model.to(device).eval(), task, cfg, mae_cfg, dims, {}, ckpt)
    try:
        toks = resolve_tokenizers(path, {m: parents.get(f"{m}_tokenizer") for m in model.names},
                                  recorded=ckpt["extra"].get("tokenizers") or {}, directory=tokenizers,
                                  device=device, hint=hint)
    except RuntimeError as e:
        raise CheckpointError(str(e)) from None
    check_tokenizers_fit(path, dims, mae_cfg, toks)
    return LoadedClassifier(model.to(device).eval(), task, cfg, mae_cfg, dims, toks, ckpt)


def build_classifier(ckpt: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], where: Path
                     ) -> tuple[EmotionModel, Any, Config, MAEConfig, MAEDims]:
    """The classifier a checkpoint's config and extra describe, with `state_dict` loaded (a
    `.pt` checkpoint's own, or a Hub folder's safetensors). Raises CheckpointError naming `where`."""
    try:
        extra = ckpt["extra"]
        cfg = Config.from_dict(ckpt["config"])
        mae_cfg = section_from_dict(MAEConfig, dict(extra["mae_config"]), "mae_config.")
        dims = MAEDims.from_dict(extra["dims"])
        task = task_from_dict(extra["task"])
    except (KeyError, TypeError, ValueError, ConfigError) as e:
        raise CheckpointError(f"{where}: not a complete classifier checkpoint (field {e} missing or "
                              f"unreadable); was it written by `vqmae finetune`?") from None
    if "clip_pooling" not in dict(ckpt["config"].get("finetune") or {}):
        raise CheckpointError(f"{where}: a classifier from before clip-level scoring (it averaged "
                              f"per-window outputs); fine-tune it again with this version")
    model = EmotionModel(mae_cfg, dims, len(task.names), cfg.finetune.pooling, cfg.finetune.dropout,
                         speaker_norm="center" in state_dict, clip_pooling=cfg.finetune.clip_pooling,
                         head_norm=cfg.finetune.head_norm)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise CheckpointError(f"{where}: weights do not fit the model built from its stored config: "
                              f"{e}") from None
    return model, task, cfg, mae_cfg, dims


def check_tokenizers_fit(where: Path, dims: MAEDims, mae_cfg: MAEConfig,
                         toks: Mapping[str, LoadedTokenizer]) -> None:
    """The model's codebook sizes, grids and window frames are its tokenizers'; CheckpointError if not."""
    for m, t in toks.items():
        d = dims.get(m)
        frames = mae_cfg.window_seconds * float(t.model.frame_rate)
        if d is None or d.codebook_size != t.model.codebook_size or tuple(d.grid) != tuple(t.model.grid) \
                or abs(d.frames - frames) > 1e-6:
            raise CheckpointError(f"{where}: its {m} input {d} does not match the tokenizer {t.path} "
                                  f"(codebook {t.model.codebook_size}, grid {tuple(t.model.grid)}, "
                                  f"{frames:g} frames per {mae_cfg.window_seconds:g} s window)")
