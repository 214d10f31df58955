"""Stage 2's shapes: what a window of codes looks like and how it is cut into patches.

`ModalityDims` / `MAEDims` hold everything `MAEModel`'s shapes depend on besides `MAEConfig`
(stored in checkpoints); `PatchLayout` (built by `patch_layout`, which checks the configured patch
divides the window) cuts a modality's window `[B, T, *grid]` into time-major patches
`[B, n_patches, patch_ids]` and back; `sincos_positions` gives each patch's position code;
`flops_per_window` is the training cost these shapes imply (benchmarks/pretrain.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from vqmae.config import MAEConfig, mae_modalities

MODALITIES = ("audio", "visual")


# ----------------------------------------------------------------------------------------------
# dimensions


@dataclass(frozen=True)
class ModalityDims:
    """What the codes of one modality look like inside a window."""

    codebook_size: int
    grid: tuple[int, ...]  # ids per frame: audio (64,), visual (24, 24)
    frames: int  # frames per window: audio 100, visual 50

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        if self.codebook_size < 1 or not self.grid or min(self.grid) < 1 or self.frames < 1:
            raise ValueError(f"bad modality dims {self}: sizes must be positive")


@dataclass(frozen=True)
class MAEDims:
    """Everything the model's shapes depend on besides `MAEConfig` (like whisper's ModelDimensions).

    Stored in checkpoints (`to_dict`) so the model is rebuilt exactly (`from_dict`).
    """

    audio: ModalityDims | None = None
    visual: ModalityDims | None = None

    def get(self, name: str) -> ModalityDims | None:
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        return {m: None if d is None else {"codebook_size": d.codebook_size, "grid": list(d.grid),
                                           "frames": d.frames}
                for m in MODALITIES for d in [self.get(m)]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MAEDims":
        unknown = sorted(set(data) - set(MODALITIES))
        if unknown:
            raise ValueError(f"MAE dims: unknown modalities {unknown}; expected {list(MODALITIES)}")
        return cls(**{m: None if data.get(m) is None else ModalityDims(
            int(data[m]["codebook_size"]), tuple(data[m]["grid"]), int(data[m]["frames"]))
            for m in MODALITIES})

    @classmethod
    def from_specs(cls, specs: Mapping[str, Any], cfg: MAEConfig) -> "MAEDims":
        """From a token store's specs (`ModalitySpec` or its dict: codebook_size, grid, frame_rate)."""
        dims = {}
        for name in MODALITIES:
            if name not in specs:
                continue
            spec = specs[name]
            get = spec.get if isinstance(spec, Mapping) else lambda k, s=spec: getattr(s, k)
            rate = float(get("frame_rate"))
            frames = cfg.window_seconds * rate
            if abs(frames - round(frames)) > 1e-6:
                raise ValueError(f"{name}: window of {cfg.window_seconds} s at {rate} frames/s is "
                                 f"{frames:g} frames, not a whole number")
            dims[name] = ModalityDims(int(get("codebook_size")), tuple(get("grid")), round(frames))
        return cls(**dims)


@dataclass(frozen=True)
class PatchLayout:
    """How one modality's window `[B, T, *grid]` is cut into `n_patches` patches of `patch_ids` ids.

    Patches are ordered time-major (time, then grid rows...); the ids inside a patch are ordered
    (frame, then grid rows...).
    """

    name: str
    grid: tuple[int, ...]
    frames: int
    spatial: tuple[int, ...]  # patch size along each grid axis
    time: int  # frames per patch

    @property
    def n_spatial(self) -> tuple[int, ...]:
        return tuple(g // s for g, s in zip(self.grid, self.spatial))

    @property
    def n_time(self) -> int:
        return self.frames // self.time

    @property
    def n_patches(self) -> int:
        return self.n_time * math.prod(self.n_spatial)

    @property
    def patch_ids(self) -> int:
        return self.time * math.prod(self.spatial)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, T, *grid]` → `[B, n_patches, patch_ids]`."""
        k = len(self.grid)
        split = [x.shape[0], self.n_time, self.time]
        for n, s in zip(self.n_spatial, self.spatial):
            split += [n, s]
        x = x.reshape(split)  # [B, nT, pt, n1, s1, ..., nk, sk]
        order = [0, 1, *range(3, 3 + 2 * k, 2), 2, *range(4, 4 + 2 * k, 2)]
        return x.permute(order).reshape(x.shape[0], self.n_patches, self.patch_ids)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, n_patches, patch_ids, *rest]` → `[B, T, *grid, *rest]` (inverse of `patchify`)."""
        k = len(self.grid)
        rest = tuple(x.shape[3:])
        x = x.reshape(x.shape[0], self.n_time, *self.n_spatial, self.time, *self.spatial, *rest)
        # [B, nT, n1..nk, pt, s1..sk, *rest] → [B, nT, pt, n1, s1, ..., nk, sk, *rest]
        order = [0, 1, 2 + k] + [i for j in range(k) for i in (2 + j, 3 + k + j)]
        order += list(range(3 + 2 * k, x.dim()))
        return x.permute(order).reshape(x.shape[0], self.frames, *self.grid, *rest)

    def time_index(self, device: torch.device | str | None = None) -> torch.Tensor:
        """`[n_patches]` the patch's time step in `[0, n_time)`."""
        per_step = math.prod(self.n_spatial)
        return torch.arange(self.n_patches, device=device) // per_step


def _sincos(n: int, dim: int) -> torch.Tensor:
    """`[n, dim]` sin / cos of positions 0..n-1 at `dim // 2` geometric frequencies (1 to 1/100)."""
    freq = torch.exp(-math.log(100.0) * torch.arange(dim // 2, dtype=torch.float64) / max(dim // 2, 1))
    angle = torch.arange(n, dtype=torch.float64)[:, None] * freq
    out = torch.cat([angle.sin(), angle.cos()], 1)
    return torch.cat([out, out.new_zeros(n, dim - out.shape[1])], 1).float()


def sincos_positions(lay: PatchLayout, width: int) -> torch.Tensor:
    """`[1, n_patches, width]` sin-cos codes of each patch's time step and grid position, in
    `patchify` order. The first third of the channels code time, with the same frequencies in
    every modality, so equal time steps get equal time codes; the rest are split between the grid
    axes."""
    k = len(lay.n_spatial)
    d_time = width // 3 // 2 * 2
    rest = width - d_time
    dims = [rest // k // 2 * 2] * (k - 1)
    dims.append(rest - sum(dims))
    axes = [_sincos(lay.n_time, d_time)] + [_sincos(n, d) for n, d in zip(lay.n_spatial, dims)]
    sizes = (lay.n_time, *lay.n_spatial)
    parts = []
    for i, table in enumerate(axes):  # broadcast axis i's code over the others
        shape = [1] * len(sizes) + [table.shape[1]]
        shape[i] = sizes[i]
        parts.append(table.view(shape).expand(*sizes, table.shape[1]))
    return torch.cat(parts, -1).reshape(1, lay.n_patches, width)


def patch_layout(name: str, dims: ModalityDims, cfg: MAEConfig) -> PatchLayout:
    """Check that the configured patch divides the modality's grid and window, with a clear error."""
    patch = tuple(cfg.visual_tube if name == "visual" else cfg.audio_patch)
    key = "mae.visual_tube" if name == "visual" else "mae.audio_patch"
    if len(patch) != len(dims.grid) + 1 or min(patch) < 1:
        raise ValueError(f"{key}={patch}: expected {len(dims.grid) + 1} positive sizes "
                         f"(one per grid axis of {dims.grid}, then frames)")
    spatial, time = patch[:-1], patch[-1]
    for axis, (g, s) in enumerate(zip(dims.grid, spatial)):
        if g % s:
            raise ValueError(f"{key}={patch}: {name} grid axis {axis} has {g} tokens, "
                             f"not divisible by patch size {s}")
    if dims.frames % time:
        raise ValueError(f"{key}={patch}: {name} window of {dims.frames} frames is not divisible "
                         f"by {time} frames per patch")
    return PatchLayout(name, dims.grid, dims.frames, spatial, time)


# ----------------------------------------------------------------------------------------------
# cost


def flops_per_window(cfg: MAEConfig, dims: MAEDims, mask_ratio: float = 0.5) -> float:
    """Forward + backward FLOPs for one training window (≈ 3 × forward, 2 FLOPs per MAC).

    Counts the patch projection (every patch), the encoder on `(1 − mask_ratio)` of the patches,
    the decoder on every patch, attention scores and mixing (4 · L² · width per layer), and the
    heads on masked patches only. `mask_ratio` 0.5 is the mean under "coupled" masking.
    """
    mode = mae_modalities(cfg.modalities, [m for m in MODALITIES if dims.get(m) is not None])
    names = ("audio", "visual") if mode == "av" else (mode,)
    layouts = {m: patch_layout(m, dims.get(m), cfg) for m in names}
    w = cfg.width
    hidden = int(round(w * cfg.mlp_ratio))
    block_macs = 4 * w * w + 2 * w * hidden  # q, kv, out; MLP
    n_total = sum(lay.n_patches for lay in layouts.values())
    n_enc = (1.0 - mask_ratio) * n_total
    fwd = 0.0
    for m, lay in layouts.items():
        e = cfg.visual_embed_dim if m == "visual" else cfg.audio_embed_dim
        flat = lay.patch_ids * e
        if flat != w:
            fwd += 2 * lay.n_patches * flat * w
        d, k = cfg.head_dim, dims.get(m).codebook_size
        head_macs = lay.patch_ids * ((w // lay.patch_ids) * k if d < 0 else d * (w + k) if d else w * k)
        fwd += 2 * mask_ratio * lay.n_patches * head_macs
    for depth, length in ((cfg.encoder_depth, n_enc), (cfg.decoder_depth, n_total)):
        fwd += depth * (2 * length * block_macs + 4 * length * length * w)
    if cfg.fusion == "cross" and len(names) == 2:
        per = {m: (1.0 - mask_ratio) * lay.n_patches for m, lay in layouts.items()}
        a, v = per["audio"], per["visual"]
        # the per-modality self-attention sees shorter sequences than the joint one...
        fwd -= cfg.encoder_depth * 4 * w * (n_enc * n_enc - a * a - v * v)
        # ...and each layer adds two cross-attentions
        fwd += cfg.encoder_depth * (2 * (a + v) * 4 * w * w + 2 * 4 * a * v * w)
    return 3.0 * fwd
