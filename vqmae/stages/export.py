"""TorchScript and ONNX export of a stage-3 classifier and the tokenizer encoders it needs
(`vqmae export`).

    export_model(classifier.pt, out_dir) → out_dir/classifier.ts        codes → outputs
                                           out_dir/audio_encoder.ts     power frames → audio codes
                                           out_dir/visual_encoder.ts    face crops → visual codes
                                           out_dir/*.onnx               the same three, for ONNX
                                                                        runtimes (`export_onnx`)
                                           out_dir/export.json          inputs, shapes, settings, sha256s

The model and tokenizers are rebuilt exactly as `vqmae predict` rebuilds them (`Predictor.load`: the
stored config, sha-checked tokenizers), traced with `torch.jit.trace` and saved. Loading a file needs
only ``torch.jit.load`` (or libtorch's ``torch::jit::load``): no vqmae import, no pickled classes.

Every export is checked before `export.json` is written: each file is loaded back from its bytes and
run beside the eager module on inputs it was not traced with (another batch size, partly padded
windows, a modality absent); the largest difference is recorded in `export.json` and a difference
above `TOLERANCE` (or any differing code id) is an `ExportError`.

Why tracing, and what it fixes in the graph:

* `torch.jit.script` cannot compile the MAE (dataclasses, dicts of modules, Python-side checks);
  `torch.export` stops on its data-dependent code-range check and visible-patch count.
* A traced graph keeps the window length, grid and codebook of the checkpoint; only the batch
  dimension (the number of windows, or of frames for the encoders) is free.
* The encoder packs visible patches to the batch's largest visible count, a Python int the trace
  freezes. Tracing with every patch valid freezes it at its maximum (all patches), which is correct
  for any later validity: the extra positions are padding keys that attention never reads.
* Devices are frozen too (factory calls in the graph carry the trace device): export on the device
  the files will run on (``device="cuda"`` for GPU use). A ``cpu`` classifier.ts loaded onto a GPU
  fails at its first call (seen on an H100); ``cuda`` files matched the eager model there exactly.
* The exported graphs run in fp32; `vqmae predict` on CUDA runs under bf16 autocast, so its scores
  agree with the exported model's only to bf16 precision there (exactly on the CPU).
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from vqmae import __version__
from vqmae.checkpoint import checkpoint_sha256
from vqmae.models.classifier import EmotionModel
from vqmae.stages.predict import PredictError, Predictor
from vqmae.models.tokenizers import faces_to_tensor
from vqmae.stages import export_onnx
from vqmae.utils import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

FORMAT = "vqmae-export/1"
MANIFEST = "export.json"
CLASSIFIER_FILE = "classifier.ts"
ENCODER_FILES = {"audio": "audio_encoder.ts", "visual": "visual_encoder.ts"}
FORMATS = ("torchscript", "onnx")
SUFFIX = {"torchscript": ".ts", "onnx": ".onnx"}
# Largest |exported − eager| accepted on the classifier's outputs (the acceptance bound).
TOLERANCE = 1e-4
# Windows (and frames) per traced example; checks use other sizes so a frozen batch size shows.
TRACE_BATCH = 2
CHECK_BATCH = 5
# torch 2.14 marks torch.jit.save / load deprecated in favour of torch.export, which cannot take
# this model yet (module docstring); the choice is deliberate, so the warning is not repeated here.
JIT_DEPRECATION = r".*torch\.jit\..* is deprecated"


class ExportError(RuntimeError):
    """A classifier that cannot be exported, or an export that does not match the eager model; the
    message names the file and the reason."""


@dataclass
class ExportResult:
    """What `export_model` wrote: ``files`` maps each written file's name to its path (the
    TorchScript files, then `export.json`); ``max_abs_diff`` the check's largest difference per
    TorchScript file; ``manifest`` the content of `export.json`."""

    out_dir: Path
    files: dict[str, Path]
    manifest: dict[str, Any]
    max_abs_diff: dict[str, float]


# ----------------------------------------------------------------------------------------------
# the exported modules


class ClassifierModule(nn.Module):
    """`EmotionModel` on the B windows of ONE clip, as positional tensors, two per modality in
    ``model.names`` order:

    codes int64 ``[B, T_m, *grid_m]`` (or flat ``[B, T_m, K_m]``), valid bool ``[B, T_m]``
    (False on padded frames; all False = the modality is absent) → the clip's outputs float32
    ``[1, C]`` (logits for classify / multilabel, values for regress; the windows pooled by the
    model's clip pooling). One window alone gives that window's outputs. For an audiovisual model:
    ``(audio [B, Ta, 64], audio_valid [B, Ta], visual [B, Tv, 24, 24], visual_valid [B, Tv])``.
    """

    def __init__(self, model: EmotionModel):
        super().__init__()
        self.model = copy.deepcopy(model).eval()
        self.names = tuple(model.names)
        self.grids = {m: tuple(self.model.backbone.dims.get(m).grid) for m in self.names}

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        batch = {}
        for i, m in enumerate(self.names):
            codes = inputs[2 * i]
            # one reshape accepts grid or flat frames: the trace records it with a free batch size
            batch[m] = codes.reshape(codes.shape[0], codes.shape[1], *self.grids[m])
            batch[f"{m}_valid"] = inputs[2 * i + 1]
        return self.model(batch, clip=one_clip(inputs[0]), n_clips=1)  # [1, C]


def one_clip(codes: torch.Tensor) -> torch.Tensor:
    """Clip ids `[B]` (all 0) for the B windows of one clip."""
    return torch.zeros(codes.shape[0], dtype=torch.long, device=codes.device)


def _encoder_only(tokenizer: nn.Module) -> nn.Module:
    """A copy of a tokenizer without its decoder, which encoding never runs (the file would carry
    its weights otherwise)."""
    tok = copy.deepcopy(tokenizer).eval()
    del tok.decoder
    return tok


class AudioEncoderModule(nn.Module):
    """Power-spectrogram frames float32 ``[N, n_bins]`` → audio codes int64 ``[N, n_tokens]``."""

    def __init__(self, tokenizer: nn.Module):
        super().__init__()
        self.tokenizer = _encoder_only(tokenizer)

    def forward(self, power: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.encode(power)


class VisualEncoderModule(nn.Module):
    """RGB face crops uint8 ``[N, S, S, 3]`` → visual codes int64 ``[N, S/4, S/4]``; the scaling to
    [-0.5, 0.5] channels-first that `vqmae.models.tokenizers.faces_to_tensor` does is part of the graph."""

    def __init__(self, tokenizer: nn.Module):
        super().__init__()
        self.tokenizer = _encoder_only(tokenizer)

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        x = faces.permute(0, 3, 1, 2).float() / 255.0 - 0.5  # [N, 3, S, S]
        return self.tokenizer.encode(x)


# ----------------------------------------------------------------------------------------------
# example inputs


def classifier_inputs(model: EmotionModel, batch: int, gen: torch.Generator, device: str,
                      lengths: Mapping[str, Sequence[int]] | None = None) -> tuple[torch.Tensor, ...]:
    """Random codes and validity for `ClassifierModule`: per modality (``model.names`` order)
    codes int64 ``[B, T, *grid]`` and valid bool ``[B, T]`` whose first ``lengths[m][b]`` frames
    are valid (default: every frame; 0 = the modality absent for that window)."""
    out: list[torch.Tensor] = []
    for m in model.names:
        d = model.backbone.dims.get(m)
        codes = torch.randint(0, d.codebook_size, (batch, d.frames, *d.grid), generator=gen)
        n = torch.tensor(list(lengths[m]) if lengths else [d.frames] * batch)
        valid = torch.arange(d.frames)[None, :] < n[:, None]  # [B, T], a prefix as windows have
        out += [codes.to(device), valid.to(device)]
    return tuple(out)


def check_lengths(model: EmotionModel, batch: int = CHECK_BATCH) -> dict[str, list[int]]:
    """Valid frames per check window, cycling over `batch` windows: all valid, partly padded, then
    (two modalities) each modality absent in turn, or (one) a short window."""
    names = model.names
    out = {}
    for m in names:
        t = model.backbone.dims.get(m).frames
        tail = [0 if other == m else t for other in names] if len(names) == 2 else [max(1, t // 3)]
        cycle = [t, t // 2 + 1, *tail]
        out[m] = [cycle[i % len(cycle)] for i in range(batch)]
    return out


def encoder_input(modality: str, tokenizer: nn.Module, n: int, gen: torch.Generator,
                  device: str) -> torch.Tensor:
    """Random frames for an encoder: audio power float32 ``[n, n_bins]`` (log-normal, the spread of
    speech spectra), visual faces uint8 ``[n, S, S, 3]``."""
    if modality == "audio":
        x = torch.exp(3.0 * torch.randn(n, tokenizer.n_bins, generator=gen) - 6.0)
    else:
        x = torch.randint(0, 256, (n, tokenizer.size, tokenizer.size, 3), generator=gen, dtype=torch.uint8)
    return x.to(device)


# ----------------------------------------------------------------------------------------------
# export


@dataclass
class _Target:
    """One file to export: the module traced, its example inputs, check inputs drawn from a
    generator, the eager vqmae computation it must reproduce, and whether equality is exact."""

    module: nn.Module
    example: tuple[torch.Tensor, ...]
    checks: Callable[[torch.Generator], list[tuple[torch.Tensor, ...]]]
    reference: Callable[..., torch.Tensor]
    exact: bool
    input_names: tuple[str, ...] = ()  # the ONNX graph's input names, in order
    output_name: str = "outputs"
    batch_output: bool = False  # the output's first dimension follows the inputs' (the encoders)


def onnx_name(name: str) -> str:
    """The ONNX file beside a TorchScript one: classifier.ts → classifier.onnx."""
    return name.removesuffix(SUFFIX["torchscript"]) + SUFFIX["onnx"]


def resolve_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    """``all`` (TorchScript, plus ONNX where its packages are installed), or a comma-separated
    subset of `FORMATS`. Raises ExportError for an unknown name, or ONNX asked for without its
    packages."""
    names = [f.strip() for f in (formats.split(",") if isinstance(formats, str) else formats) if f.strip()]
    if names == ["all"]:
        return FORMATS if export_onnx.available() is None else ("torchscript",)
    unknown = sorted(set(names) - set(FORMATS))
    if unknown or not names:
        raise ExportError(f"unknown export format {unknown or names}; expected all or a comma-separated "
                          f"subset of {', '.join(FORMATS)}")
    if "onnx" in names and (why := export_onnx.available()):
        raise ExportError(f"cannot export ONNX: {why}")
    return tuple(f for f in FORMATS if f in names)


def export_model(classifier_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                 tokenizers: str | os.PathLike | None = None, device: str = "cpu",
                 formats: str | Sequence[str] = "all") -> ExportResult:
    """Export the classifier at `classifier_path` and its tokenizers' encoders into `out_dir`.

    `tokenizers`: a directory holding audio_vqvae.pt / visual_vqvae.pt when the paths recorded at
    training moved (each is sha-checked against the classifier, as `vqmae predict` does). `device`:
    where the traced files will run (see the module docstring); ONNX files are checked on the CPU
    (onnxruntime). `formats`: see `resolve_formats`. Writes `classifier.ts`, one
    `<modality>_encoder.ts` per modality the model takes, the same as `.onnx`, then `export.json`,
    each atomically. Raises ExportError naming the file and the reason.
    """
    formats = resolve_formats(formats)
    path = Path(classifier_path)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory")
    try:
        pred = Predictor.load(path, device=device, tokenizers=tokenizers)
    except PredictError as e:
        raise ExportError(str(e)) from None
    gen = torch.Generator().manual_seed(0)
    blobs, diffs = {}, {}
    for name, target in _targets(pred).items():
        if "torchscript" in formats:
            blobs[name] = _trace(target.module, target.example, name)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", JIT_DEPRECATION, FutureWarning)
                loaded = torch.jit.load(io.BytesIO(blobs[name]), map_location=device)
            diffs[name] = max(_difference(name, target, loaded, x)
                              for x in (target.example, *target.checks(gen)))
        if "onnx" in formats:
            name = onnx_name(name)
            blobs[name], sess = _onnx(target, name)
            run = lambda *x, sess=sess, t=target: export_onnx.run(  # noqa: E731
                sess, dict(zip(t.input_names, x)), device)
            diffs[name] = max(_difference(name, target, run, x)
                              for x in (target.example, *target.checks(gen)))
        log.info("%s: %d bytes, max |exported - eager| = %.3g", name, len(blobs[name]), diffs[name])
    try:
        files = _write_files(out, blobs)
        manifest = build_manifest(pred, path, blobs, diffs, device)
        atomic_write_json(out / MANIFEST, manifest)  # last: it names the files it describes
    except OSError as e:
        raise ExportError(f"{out}: cannot write the export there ({e.strerror or e})") from None
    return ExportResult(out, {**files, MANIFEST: out / MANIFEST}, manifest, diffs)


def _targets(pred: Predictor) -> dict[str, _Target]:
    model, device = pred.model, pred.device
    gen = torch.Generator().manual_seed(1)
    out = {CLASSIFIER_FILE: _Target(
        ClassifierModule(model).to(device),
        classifier_inputs(model, TRACE_BATCH, gen, device),
        lambda g: [classifier_inputs(model, CHECK_BATCH, g, device, check_lengths(model)),
                   classifier_inputs(model, 1, g, device, check_lengths(model, 1))],
        lambda *x: model(_batch_dict(model.names, x), clip=one_clip(x[0]), n_clips=1),
        exact=False, input_names=tuple(io["name"] for io in _classifier_io(model)),
        output_name="outputs", batch_output=False)}
    for m in pred.modalities:
        tok = pred.tokenizers[m].model
        if m == "audio":
            module, reference = AudioEncoderModule(tok), tok.encode
        else:  # the eager reference is vqmae's own pixel path, `faces_to_tensor`
            module = VisualEncoderModule(tok)
            reference = lambda f, tok=tok: tok.encode(faces_to_tensor(f.cpu().numpy(), device))  # noqa: E731
        out[ENCODER_FILES[m]] = _Target(
            module.to(device), (encoder_input(m, tok, TRACE_BATCH, gen, device),),
            lambda g, m=m, tok=tok: [(encoder_input(m, tok, n, g, device),) for n in (CHECK_BATCH, 1)],
            reference, exact=True, input_names=(_encoder_input(m, tok)["name"],),
            output_name="codes", batch_output=True)
    return out


def _batch_dict(names: Sequence[str], x: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Positional (codes, valid) pairs in `names` order → the model's batch dict."""
    out = {}
    for i, m in enumerate(names):
        out[m], out[f"{m}_valid"] = x[2 * i], x[2 * i + 1]
    return out


def _trace(module: nn.Module, example: tuple[torch.Tensor, ...], name: str) -> bytes:
    """`torch.jit.trace` + save to bytes. The tracer's warnings about Python values taken from
    tensors are expected (shape checks, the frozen visible count: see the module docstring)."""
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", JIT_DEPRECATION, FutureWarning)
        try:
            traced = torch.jit.trace(module.eval(), example, check_trace=False)
        except Exception as e:  # noqa: BLE001 - any tracing failure is this file's export failing
            raise ExportError(f"{name}: tracing failed: {type(e).__name__}: {e}") from e
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
    n_tracer = sum(issubclass(w.category, torch.jit.TracerWarning) for w in caught)
    log.debug("%s: traced with %d tracer warnings (expected: shape checks)", name, n_tracer)
    return buf.getvalue()


def _onnx(target: _Target, name: str) -> tuple[bytes, object]:
    """ONNX bytes of a target and an onnxruntime session on them; ExportError on failure."""
    try:
        data = export_onnx.onnx_bytes(target.module, target.example, target.input_names,
                                      target.output_name, target.batch_output)
        return data, export_onnx.session(data)
    except Exception as e:  # noqa: BLE001 - any exporter or runtime failure is this file failing
        raise ExportError(f"{name}: ONNX export failed: {type(e).__name__}: {e}") from e


@torch.no_grad()
def _difference(name: str, target: _Target, exported: Callable[..., torch.Tensor],
                x: tuple[torch.Tensor, ...]) -> float:
    """max |exported(x) − eager(x)|; raises ExportError past the target's limit."""
    want = target.reference(*x)
    got = exported(*x)
    n = x[0].shape[0]
    if got.shape != want.shape or got.dtype != want.dtype:
        raise ExportError(f"{name}: exported output {got.dtype} {list(got.shape)} for a batch of {n}, "
                          f"eager {want.dtype} {list(want.shape)}")
    diff = float((got.double() - want.double()).abs().max()) if got.numel() else 0.0
    limit = 0.0 if target.exact else TOLERANCE
    if not diff <= limit:
        raise ExportError(f"{name}: exported output differs from the eager model by {diff:.3g} "
                          f"(limit {limit:g}) on a batch of {n}")
    return diff


def _write_files(out: Path, blobs: Mapping[str, bytes]) -> dict[str, Path]:
    """Write each file atomically; an encoder file left by an earlier export of another model (a
    modality this one does not take) is removed so the folder holds one consistent export."""
    out.mkdir(parents=True, exist_ok=True)
    # The manifest goes first and comes back last: a re-export interrupted half-way leaves files
    # without a manifest, never a manifest describing another model's files.
    (out / MANIFEST).unlink(missing_ok=True)
    for ts in (CLASSIFIER_FILE, *ENCODER_FILES.values()):
        for name in (ts, onnx_name(ts)):  # another model's modality, or a format not asked now
            if name not in blobs and (out / name).exists():
                log.info("%s: removing %s left by an earlier export", out, name)
                (out / name).unlink()
    for name, data in blobs.items():
        atomic_write_bytes(out / name, data)
    return {name: out / name for name in blobs}


# ----------------------------------------------------------------------------------------------
# export.json


def build_manifest(pred: Predictor, source: Path, blobs: Mapping[str, bytes],
                   diffs: Mapping[str, float], device: str) -> dict[str, Any]:
    """The content of `export.json`: what each file takes and returns, how to make its inputs,
    and where everything came from."""
    model = pred.model
    base = {CLASSIFIER_FILE: {"role": "classifier", "inputs": _classifier_io(model),
                               "outputs": [_io("outputs", "float32", [1, len(pred.names)],
                                               f"the clip's outputs ({pred.task.activation} "
                                               f"of these gives the scores)")]}}
    for m in pred.modalities:
        tok = pred.tokenizers[m].model
        base[ENCODER_FILES[m]] = {"role": f"{m}_encoder", "inputs": [_encoder_input(m, tok)],
                                   "outputs": [_io("codes", "int64", ["N", *tok.grid],
                                                   f"ids in [0, {tok.codebook_size})")]}
    files = {}
    for name, data in blobs.items():
        fmt = "onnx" if name.endswith(SUFFIX["onnx"]) else "torchscript"
        src = name if fmt == "torchscript" else name.removesuffix(SUFFIX["onnx"]) + SUFFIX["torchscript"]
        entry = base[src] if name != onnx_name(CLASSIFIER_FILE) else \
            {**base[src], "inputs": _classifier_io(model, flat=False)}
        files[name] = {**entry, "format": fmt, "sha256": hashlib.sha256(data).hexdigest(),
                       "bytes": len(data)}
    return {
        "format": FORMAT, "vqmae_version": __version__, "torch_version": torch.__version__,
        "device": device,
        "source": {"path": str(source.resolve()), "sha256": checkpoint_sha256(source)},
        "tokenizers": {m: {"path": str(t.path), "sha256": t.sha256,
                           "codebook_size": t.model.codebook_size, "grid": list(t.model.grid)}
                       for m, t in pred.tokenizers.items()},
        "task": {"kind": pred.task_kind, "names": list(pred.names),
                 "activation": pred.task.activation},
        "modalities": list(model.names),
        # a speaker-normalised classifier.ts subtracts the stored mean of the training speakers
        # (vqmae predict without --same-speaker); a speaker's own mean needs the eager model
        "speaker_norm": "training-speaker mean" if model.speaker_norm else None,
        "window": _window(pred),
        "features": _features(pred),
        "files": files,
        "run": {"torchscript": "torch.jit.load(path, map_location=device)(*inputs), inputs in the "
                               "listed order",
                "onnx": "onnxruntime.InferenceSession(path).run(None, {name: array}) with the listed "
                        "input names; returns [outputs] (opset %d)" % export_onnx.OPSET},
        "check": {"tolerance": TOLERANCE, "codes": "equal", "trace_batch": TRACE_BATCH,
                  "check_batches": [CHECK_BATCH, 1], "max_abs_diff": dict(diffs)},
    }


def _io(name: str, dtype: str, shape: Sequence[int | str], doc: str) -> dict[str, Any]:
    return {"name": name, "dtype": dtype, "shape": list(shape), "doc": doc}


def _classifier_io(model: EmotionModel, flat: bool = True) -> list[dict[str, Any]]:
    """Positional inputs of classifier.ts, in order (`flat`: it also takes flat frames; the ONNX
    graph does not)."""
    out = []
    for m in model.names:
        d = model.backbone.dims.get(m)
        out += [_io(m, "int64", ["B", d.frames, *d.grid],
                    f"{m} codes of the B windows of one clip, ids in [0, {d.codebook_size})"
                    + (f"; flat [B, {d.frames}, {math.prod(d.grid)}] rows also accepted" if flat else "")),
                _io(f"{m}_valid", "bool", ["B", d.frames],
                    "True on real frames, False on padding after a clip's end; all False = the "
                    f"{m} modality is absent for that window")]
    return out


def _encoder_input(m: str, tok: nn.Module) -> dict[str, Any]:
    if m == "audio":
        return _io("power", "float32", ["N", tok.n_bins],
                   "power spectrogram frames |STFT|^2 (see features.audio), time-major")
    return _io("faces", "uint8", ["N", tok.size, tok.size, 3], "RGB face crops (see features.visual)")


def _window(pred: Predictor) -> dict[str, Any]:
    g = pred.geom
    return {"seconds": g.window_steps / g.step_rate,
            "frames": {m: g.frames[m] for m in pred.modalities},
            "frames_per_step": {m: g.ratio[m] for m in pred.modalities},
            "step_rate": g.step_rate,
            "scoring": "cut a clip into non-overlapping windows from frame 0, the last one padded "
                       "(valid False on padding); pass all its windows as one batch (the model "
                       "pools them into one clip vector), then apply the task's activation to "
                       "the outputs"}


def _features(pred: Predictor) -> dict[str, Any]:
    """How encoder inputs are made from media, with the tokenizers' own settings."""
    a, cfg = pred.cfg.audio, pred.cfg
    out: dict[str, Any] = {}
    if "audio" in pred.modalities:
        out["audio"] = {"sample_rate": a.sample_rate, "n_fft": a.n_fft, "win_length": a.win_length,
                        "hop_length": a.hop_length, "n_bins": a.n_bins, "frame_rate": a.frame_rate,
                        "window": "hann", "center": True, "pad_mode": "reflect",
                        "peak_normalize": a.peak_normalize,
                        "recipe": "mono float wave at sample_rate; for a video, first zero-padded or "
                                  "trimmed to exactly n_video * sample_rate / fps samples (its "
                                  "audio then spans its frames); divided by its absolute peak when "
                                  "peak_normalize; s = torch.stft(wave, n_fft, hop_length, "
                                  "win_length, hann_window(win_length), center=True, pad_mode="
                                  "'reflect', return_complex=True); power = (s.real**2 + "
                                  "s.imag**2).T, first len(wave) // hop_length frames"}
    if "visual" in pred.modalities:
        out["visual"] = {"face_size": cfg.face.size, "fps": cfg.video.fps, "channels": "RGB",
                         "recipe": "square RGB face crops resized to face_size x face_size, one per "
                                   "video frame at fps"}
    return out
