"""ONNX files beside the TorchScript ones (`vqmae export`, format ``onnx``).

    classifier.onnx      inputs audio, audio_valid, visual, visual_valid (those of the model's
                         modalities) → outputs [1, C]
    audio_encoder.onnx   power [N, n_bins] float32 → codes [N, n_tokens] int64
    visual_encoder.onnx  faces [N, S, S, 3] uint8 → codes [N, S/4, S/4] int64

The same modules as the TorchScript export (`vqmae.stages.export`) go through PyTorch's
TorchScript-based ONNX exporter (opset `OPSET`, the batch dimension dynamic). The newer exporter
(`dynamo=True`) goes through `torch.export`, which cannot take the model yet (the data-dependent
checks named in `vqmae.stages.export`). Two model operations have ONNX-specific forms, chosen while
exporting only: the stable sort of patch keys (`vqmae.models.masking.order_by_key`) and the clip
pooling's segment sums (`vqmae.models.classifier.segment_pool`: a membership-matrix product, since an
ONNX scatter overwrites instead of adding).

Each file is loaded back into an `onnxruntime.InferenceSession` and run on the same check inputs as
the TorchScript files; its largest difference from the eager model goes into `export.json`. Needs the
``onnx`` extra (`pip install 'vqmae[onnx]'`: the onnx and onnxruntime packages).
"""

from __future__ import annotations

import io
import warnings
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

OPSET = 17
EXTRA = "pip install 'vqmae[onnx]'"


def available() -> str | None:
    """None when ONNX export can run here, else the reason (a missing package and how to add it)."""
    for module in ("onnx", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            return f"the {module} package is not installed ({EXTRA})"
    return None


def onnx_bytes(module: nn.Module, example: tuple[torch.Tensor, ...], input_names: Sequence[str],
               output_name: str, batch_output: bool) -> bytes:
    """Export `module` on `example` to ONNX bytes; dimension 0 of every input (and of the output
    when `batch_output`) is dynamic. Raises whatever the exporter raises (the caller names the file)."""
    dynamic = {name: {0: "batch"} for name in input_names}
    if batch_output:
        dynamic[output_name] = {0: "batch"}
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # the legacy exporter says it is deprecated, and traces like torch.jit.trace (its shape
        # checks warn): both expected, see the module docstring
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), example, buf, input_names=list(input_names),
                          output_names=[output_name], dynamic_axes=dynamic, opset_version=OPSET,
                          dynamo=False)
    return buf.getvalue()


def session(data: bytes) -> Any:
    """An onnxruntime CPU session on ONNX bytes."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: no per-node warnings on a user's terminal
    return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])


def run(sess: Any, inputs: dict[str, torch.Tensor], device: str) -> torch.Tensor:
    """Run a session on named tensors → its first output as a tensor on `device`. Inputs the graph
    does not read (the exporter drops them) are left out."""
    feed = {i.name: inputs[i.name].detach().cpu().numpy() for i in sess.get_inputs()}
    return torch.from_numpy(np.asarray(sess.run(None, feed)[0])).to(device)
