"""Stage 2: masked-token transformer over audio and visual codes (VQ-MAE-AV, DESIGN.md §2).

A batch is a dict of windows of discrete codes read from the token store:

- ``batch["visual"]``: int ``[B, Tv, 24, 24]`` (or flat ``[B, Tv, 576]`` as stored), ids < 512
- ``batch["visual_valid"]``: bool ``[B, Tv]``, False on frames padded after a short clip's end
- ``batch["audio"]``: int ``[B, Ta, 64]``, ids < 256; ``batch["audio_valid"]``: bool ``[B, Ta]``

(``*_valid`` may be left out: every frame valid.) Codes are cut into patches — visual tubes of
4×4 tokens × 5 frames, audio patches of 4 frequency tokens × 10 frames, both time-major; each id
is embedded, the patch flattened and projected to ``width``. Patch time index ``t`` covers the same
0.2 s in both modalities (5 video frames = 10 audio frames).

Masking follows facebookresearch/mae's ``random_masking``: noise is sorted into ``ids_shuffle``
(visible patches first, then masked, then padding) and ``ids_restore = argsort(ids_shuffle)``; the
encoder runs on the visible patches only, padded per batch to the largest visible count with a
key-padding mask. The decoder sees every non-padding patch (encoded visible ones, a learned mask
token elsewhere) and predicts logits over the codebook for every id of a patch; the loss is
cross-entropy over the valid ids of masked patches only.

A patch is *padding* when all its frames are padding: it is never visible, never masked, never a
key in attention. The padded ids of a partly padded patch embed to zero and never count in the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from vqmae.config import MAEConfig

MODALITIES = ("audio", "visual")
# InfoNCE temperature of the optional contrastive term (CLIP's initial value is 0.07; pooled
# summaries of a small model saturate less with a softer 0.1).
CONTRASTIVE_TEMPERATURE = 0.1
# Masking groups: the sort key is group + noise (noise in [0, 1)), so one argsort orders patches
# visible → masked → padding and, within a group, by noise.
_VISIBLE, _MASKED, _PADDING = 0.0, 1.0, 2.0
IGNORE = -100  # target of a padded id in a partly padded masked patch


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
# masking


@dataclass
class Masking:
    """Per-modality masking of one batch (all tensors on the model's device)."""

    mask: dict[str, torch.Tensor]  # [B, N] bool, True = masked (a valid patch the decoder predicts)
    padding: dict[str, torch.Tensor]  # [B, N] bool, True = padding patch (all frames padded)
    ids_shuffle: dict[str, torch.Tensor]  # [B, N] visible first, then masked, then padding
    ids_restore: dict[str, torch.Tensor]  # [B, N] argsort(ids_shuffle)
    n_visible: dict[str, torch.Tensor]  # [B] int64
    key: dict[str, torch.Tensor] = field(repr=False)  # [B, N] sort key: group + noise

    def visible(self, name: str) -> torch.Tensor:
        return ~(self.mask[name] | self.padding[name])  # [B, N]


def _build_masking(mask: dict[str, torch.Tensor], padding: dict[str, torch.Tensor],
                   noise: dict[str, torch.Tensor]) -> Masking:
    key, shuffle, restore, n_vis = {}, {}, {}, {}
    for m in mask:
        group = torch.where(padding[m], _PADDING, torch.where(mask[m], _MASKED, _VISIBLE))
        key[m] = group + noise[m]
        shuffle[m] = torch.argsort(key[m], dim=1, stable=True)
        restore[m] = torch.argsort(shuffle[m], dim=1)
        n_vis[m] = (~(mask[m] | padding[m])).sum(1)
    return Masking(mask, padding, shuffle, restore, n_vis, key)


def masking_from(mask: Mapping[str, torch.Tensor], padding: Mapping[str, torch.Tensor]) -> Masking:
    """A `Masking` from given masks (`[B, N]` bool per modality); padding patches are never masked."""
    masks = {m: (mask[m].bool() if m in mask else torch.zeros_like(p)) & ~p
             for m, p in padding.items()}
    noise = {m: torch.zeros(p.shape, device=p.device) for m, p in padding.items()}
    return _build_masking(masks, padding, noise)


def _mask_counts(strategy: str, n_valid: dict[str, torch.Tensor], ratios: Mapping[str, float],
                 generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """Patches to mask per sample `[B]` for the count-based strategies."""
    names = list(n_valid)
    first = n_valid[names[0]]
    if strategy == "coupled":
        # Dirichlet(1, 1) = (u, 1 − u) with u ~ U(0, 1); a lone modality keeps that marginal.
        r_v = torch.rand(first.shape, generator=generator, device=first.device)
        r = {"visual": r_v, "audio": 1.0 - r_v} if len(names) == 2 else {names[0]: r_v}
    elif strategy == "fixed":
        r = {m: torch.full(first.shape, float(ratios[m]), device=first.device) for m in names}
    elif strategy in ("audio2visual", "visual2audio"):
        hidden = "visual" if strategy == "audio2visual" else "audio"
        r = {m: torch.full(first.shape, float(m == hidden), device=first.device) for m in names}
    else:
        raise ValueError(f"unknown masking strategy {strategy!r}")
    return {m: torch.round(r[m] * n_valid[m]).long() for m in names}


def _keep_one_visible(n_mask: dict[str, torch.Tensor], n_valid: dict[str, torch.Tensor]) -> None:
    """Where a sample would have no visible patch at all, unmask one of its largest modality's."""
    names = list(n_mask)
    visible = sum(n_valid[m] - n_mask[m] for m in names)
    largest = torch.stack([n_valid[m] for m in names]).argmax(0)  # [B]
    for i, m in enumerate(names):
        fix = (visible == 0) & (largest == i) & (n_valid[m] > 0)
        n_mask[m] = n_mask[m] - fix.long()


def sample_masking(strategy: str, padding: Mapping[str, torch.Tensor],
                   layouts: Mapping[str, PatchLayout], ratios: Mapping[str, float],
                   generator: torch.Generator | None) -> Masking:
    """Draw per-clip masks for every modality at once, on `padding`'s device.

    padding: `[B, N]` bool per modality. ratios: fixed mask ratio per modality ("fixed", "time").
    Every sample keeps at least one visible patch overall; masked counts are exact:
    `round(r × n_valid_patches)` per modality (coupled, fixed); "time" masks
    `round(r × n_valid_steps)` whole time steps per modality, drawn from one permutation of time
    steps shared by both modalities, so the modality with the smaller ratio masks a subset of the
    other's steps (identical steps when the ratios are equal).
    """
    names = list(padding)
    valid = {m: ~padding[m] for m in names}
    n_valid = {m: valid[m].sum(1) for m in names}
    device = padding[names[0]].device
    if strategy == "time":
        n_time = {layouts[m].n_time for m in names}
        if len(n_time) != 1:
            raise ValueError(f"time masking needs equal time steps per modality, got "
                             f"{ {m: layouts[m].n_time for m in names} }")
        b = padding[names[0]].shape[0]
        step_noise = torch.rand(b, n_time.pop(), generator=generator, device=device)
        noise = {m: step_noise[:, layouts[m].time_index(device)] for m in names}
        n_mask = {}
        for m in names:
            per_step = layouts[m].n_patches // layouts[m].n_time
            steps = torch.round(ratios[m] * n_valid[m].div(per_step, rounding_mode="floor"))
            n_mask[m] = steps.long() * per_step
    else:
        noise = {m: torch.rand(padding[m].shape, generator=generator, device=device) for m in names}
        n_mask = _mask_counts(strategy, n_valid, ratios, generator)
    _keep_one_visible(n_mask, n_valid)
    mask = {}
    for m in names:
        # Lowest-noise valid patches are masked; padding sorts last and is never masked.
        order = torch.argsort(torch.where(valid[m], noise[m], _PADDING), dim=1, stable=True)
        rank = torch.argsort(order, dim=1)
        mask[m] = valid[m] & (rank < n_mask[m][:, None])
    return _build_masking(mask, dict(padding), noise)


# ----------------------------------------------------------------------------------------------
# transformer parts


class Attention(nn.Module):
    """Multi-head attention through `scaled_dot_product_attention`; self- or cross-attention."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"mae.width={width} is not divisible by mae.heads={heads}")
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                key_valid: torch.Tensor | None = None) -> torch.Tensor:
        """x `[B, L, D]`, context `[B, S, D]` (default x), key_valid `[B, S]` bool → `[B, L, D]`."""
        context = x if context is None else context
        b, n, d = x.shape
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)  # [B, H, L, D/H]
        k, v = self.kv(context).view(b, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        mask = None if key_valid is None else key_valid[:, None, None, :]  # [B, 1, 1, S]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN x), then x + MLP(LN x)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        hidden = int(round(width * mlp_ratio))
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, width), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        """x `[B, L, D]`, key_valid `[B, L]` bool (False = never attended to)."""
        if x.shape[1] == 0:  # a modality with no visible patch in the whole batch (cross fusion)
            return x
        x = x + self.attn(self.norm1(x), key_valid=key_valid)
        return x + self.mlp(self.norm2(x))


class CrossBlock(nn.Module):
    """Pre-LN cross-attention: x + attn(LN x, LN context); samples with no context keys pass."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        self.attn = Attention(width, heads, dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        """x `[B, L, D]`, context `[B, S, D]`, key_valid `[B, S]` → `[B, L, D]`."""
        if x.shape[1] == 0 or context.shape[1] == 0:
            return x
        has_keys = key_valid.any(1)  # [B]
        # A sample without context keys (its other modality fully masked) attends to a dummy key
        # (no NaN from an empty softmax) and its update is then dropped.
        safe = key_valid.clone()
        safe[:, 0] |= ~has_keys
        update = self.attn(self.norm_q(x), self.norm_kv(context), safe)
        return x + update * has_keys[:, None, None].to(update.dtype)


class CrossEncoder(nn.Module):
    """`fusion="cross"`: per layer, each modality runs its own self-attention `Block`, then both
    exchange information through a `CrossBlock` (audio queries attend to visible visual patches
    and visual queries to visible audio patches, both from the self-attention outputs, updated
    simultaneously). Each modality keeps its own sequence of visible patches; with one modality
    the cross blocks are skipped. The decoder is the same joint one for both fusions.
    """

    def __init__(self, names: tuple[str, ...], cfg: MAEConfig):
        super().__init__()
        w = cfg.width
        self.self_blocks = nn.ModuleDict({m: nn.ModuleList(
            [Block(w, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.encoder_depth)])
            for m in names})
        self.cross_blocks = nn.ModuleDict({m: nn.ModuleList(
            [CrossBlock(w, cfg.heads, cfg.dropout) for _ in range(cfg.encoder_depth)])
            for m in names}) if len(names) == 2 else nn.ModuleDict()

    def forward(self, seq: dict[str, torch.Tensor],
                valid: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """seq `[B, K_m, D]` and key validity `[B, K_m]` per modality → `[B, K_m, D]`."""
        names = list(seq)
        for layer in range(len(self.self_blocks[names[0]])):
            seq = {m: self.self_blocks[m][layer](seq[m], valid[m]) for m in names}
            if len(names) == 2:
                a, b = names
                seq = {a: self.cross_blocks[a][layer](seq[a], seq[b], valid[b]),
                       b: self.cross_blocks[b][layer](seq[b], seq[a], valid[a])}
        return seq


# ----------------------------------------------------------------------------------------------
# model


@dataclass
class MAEOutput:
    loss: torch.Tensor  # [] CE summed over modalities + contrastive_weight × InfoNCE
    # full logits per modality, only when asked for (`return_logits=True`):
    # visual [B, 360, 80, 512], audio [B, 160, 40, 256]
    logits: dict[str, torch.Tensor]
    mask: dict[str, torch.Tensor]  # [B, N] bool, True = masked
    # detached scalars: loss/<m>_ce, acc/<m> (masked-token accuracy), mask/<m> (masked fraction of
    # valid patches), loss/contrastive (av only); a modality with no masked token has no ce/acc key
    metrics: dict[str, torch.Tensor]


@dataclass
class MAEEncoding:
    features: dict[str, torch.Tensor]  # [B, N, width] encoder outputs, zero where not visible
    padding: dict[str, torch.Tensor]  # [B, N] bool, True = padding patch
    visible: dict[str, torch.Tensor]  # [B, N] bool, patches the encoder saw


@dataclass
class MAEInputs:
    ids: dict[str, torch.Tensor]  # [B, N, P] int64, padded ids set to 0
    token_valid: dict[str, torch.Tensor]  # [B, N, P] bool
    padding: dict[str, torch.Tensor]  # [B, N] bool


class MAEModel(nn.Module):
    """Masked-token transformer (VQ-MAE-AV). Pure: no I/O, no optimizer, no printing.

    `MAEModel(cfg, dims)` with `dims` an `MAEDims` or a token store's specs
    (`{"audio": ModalitySpec | dict, "visual": ...}`).
    """

    def __init__(self, cfg: MAEConfig, dims: MAEDims | Mapping[str, Any]):
        super().__init__()
        self.cfg = cfg
        self.dims = dims if isinstance(dims, MAEDims) else MAEDims.from_specs(dims, cfg)
        self.names = ("audio", "visual") if cfg.modalities == "av" else (cfg.modalities,)
        self._check_config()
        w = cfg.width
        self.layouts = {m: patch_layout(m, self.dims.get(m), cfg) for m in self.names}
        self.token_embed = nn.ModuleDict()
        self.patch_proj = nn.ModuleDict()
        self.head = nn.ModuleDict()
        for m, lay in self.layouts.items():
            e, c = self._embed_dim(m), self.dims.get(m).codebook_size
            self.token_embed[m] = nn.Embedding(c, e)
            flat = lay.patch_ids * e
            self.patch_proj[m] = nn.Linear(flat, w) if flat != w else nn.Identity()
            self.head[m] = _Head(w, lay.patch_ids, c, cfg.head_dim)
        # Per token position (grid cell), the log-frequency of each code: added to the head's
        # logits so the decoder learns what context adds to the unigram (zeros = no prior).
        self.prior = nn.Module()
        self._prior_index: dict[str, torch.Tensor] = {}  # [n_patches, patch_ids] grid cell of each id
        for m, lay in self.layouts.items():
            k = math.prod(lay.grid)
            self.prior.register_buffer(m, torch.zeros(k, self.dims.get(m).codebook_size))
            cells = torch.arange(k).view(1, 1, *lay.grid).expand(1, lay.frames, *lay.grid)
            self._prior_index[m] = lay.patchify(cells)[0]
        self.enc_pos = nn.ParameterDict({m: nn.Parameter(torch.zeros(1, lay.n_patches, w))
                                         for m, lay in self.layouts.items()})
        self.dec_pos = nn.ParameterDict({m: nn.Parameter(torch.zeros(1, lay.n_patches, w))
                                         for m, lay in self.layouts.items()})
        self.enc_modality = nn.ParameterDict({m: nn.Parameter(torch.zeros(1, 1, w))
                                              for m in self.names})
        self.dec_modality = nn.ParameterDict({m: nn.Parameter(torch.zeros(1, 1, w))
                                              for m in self.names})
        self.mask_token = nn.Parameter(torch.zeros(1, 1, w))
        if cfg.fusion == "joint":
            self.encoder = nn.ModuleList([Block(w, cfg.heads, cfg.mlp_ratio, cfg.dropout)
                                          for _ in range(cfg.encoder_depth)])
        else:
            self.encoder = CrossEncoder(self.names, cfg)
        self.encoder_norm = nn.LayerNorm(w)
        self.decoder = nn.ModuleList([Block(w, cfg.heads, cfg.mlp_ratio, cfg.dropout)
                                      for _ in range(cfg.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(w)
        self.apply(_init_weights)
        for p in [*self.enc_pos.values(), *self.dec_pos.values(), *self.enc_modality.values(),
                  *self.dec_modality.values(), self.mask_token]:
            nn.init.trunc_normal_(p, std=0.02)
        if cfg.pos_init == "sincos":
            with torch.no_grad():
                for m, lay in self.layouts.items():
                    table = sincos_positions(lay, w)
                    self.enc_pos[m].copy_(table)
                    self.dec_pos[m].copy_(table)

    def _check_config(self) -> None:
        cfg = self.cfg
        for m in self.names:
            if self.dims.get(m) is None:
                raise ValueError(f"mae.modalities={cfg.modalities!r} needs {m} codes, but the "
                                 f"token store has none")
        if cfg.masking in ("audio2visual", "visual2audio") and len(self.names) != 2:
            raise ValueError(f"mae.masking={cfg.masking!r} needs mae.modalities='av', "
                             f"got {cfg.modalities!r}")
        for key in ("mask_ratio_audio", "mask_ratio_visual"):
            if not 0.0 <= getattr(cfg, key) <= 1.0:
                raise ValueError(f"mae.{key}={getattr(cfg, key)} must lie in [0, 1]")
        if cfg.head_dim < 0:
            raise ValueError(f"mae.head_dim={cfg.head_dim} must be 0 (linear head) or positive")
        if cfg.pos_init not in ("sincos", "random"):
            raise ValueError(f"mae.pos_init={cfg.pos_init!r}: expected 'sincos' or 'random'")
        if cfg.fusion not in ("joint", "cross"):
            raise ValueError(f"mae.fusion={cfg.fusion!r}: expected 'joint' or 'cross'")

    def _embed_dim(self, name: str) -> int:
        return self.cfg.visual_embed_dim if name == "visual" else self.cfg.audio_embed_dim

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- inputs ------------------------------------------------------------------------------

    def prepare(self, batch: Mapping[str, torch.Tensor]) -> MAEInputs:
        """Check a batch's shapes and patchify codes and validity (see the module docstring)."""
        ids, token_valid, padding, sizes = {}, {}, {}, {}
        for m in self.names:
            codes, valid = self._check_batch(batch, m)
            lay = self.layouts[m]
            tv = valid.reshape(*valid.shape, *[1] * len(lay.grid)).expand(codes.shape)
            token_valid[m] = lay.patchify(tv)  # [B, N, P]
            ids[m] = lay.patchify(codes).masked_fill(~token_valid[m], 0)  # [B, N, P]
            padding[m] = ~token_valid[m].any(-1)  # [B, N]
            sizes[m] = codes.shape[0]
        # While tracing (vqmae export) sizes are tensors, which a set compares by identity.
        if not torch.jit.is_tracing() and len(set(sizes.values())) > 1:
            raise ValueError(f"batch sizes differ between modalities: {sizes}")
        return MAEInputs(ids, token_valid, padding)

    def _check_batch(self, batch: Mapping[str, torch.Tensor],
                     m: str) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.dims.get(m)
        if m not in batch:
            raise ValueError(f"batch has no {m!r} codes; this model (modalities="
                             f"{self.cfg.modalities!r}) needs {list(self.names)}")
        codes = batch[m]
        if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.is_complex():
            raise ValueError(f"batch[{m!r}]: codes must be integers, got {codes.dtype}")
        n_tokens = math.prod(d.grid)
        if codes.dim() == 3 and codes.shape[-1] == n_tokens and len(d.grid) > 1:
            codes = codes.reshape(*codes.shape[:2], *d.grid)  # flat store rows
        if tuple(codes.shape[1:]) != (d.frames, *d.grid):
            raise ValueError(f"batch[{m!r}]: codes of shape {tuple(codes.shape)}, expected "
                             f"[B, {d.frames}, {', '.join(map(str, d.grid))}]")
        valid = batch.get(f"{m}_valid")
        if valid is None:
            valid = torch.ones(codes.shape[:2], dtype=torch.bool, device=codes.device)
        if tuple(valid.shape) != tuple(codes.shape[:2]):
            raise ValueError(f"batch[{m + '_valid'!r}]: shape {tuple(valid.shape)}, expected "
                             f"{tuple(codes.shape[:2])}")
        valid = valid.bool()
        codes = codes.long()
        # On an accelerator this check would stall the pipeline; the store validates codes on write.
        if codes.device.type == "cpu" and codes.numel():
            picked = codes[valid]
            if picked.numel() and (picked.min() < 0 or picked.max() >= d.codebook_size):
                raise ValueError(f"batch[{m!r}]: ids in [{int(picked.min())}, {int(picked.max())}]"
                                 f" outside the codebook [0, {d.codebook_size})")
        return codes, valid

    def embed(self, inp: MAEInputs) -> dict[str, torch.Tensor]:
        """Patch embeddings `[B, N, width]` plus encoder position and modality embeddings."""
        out = {}
        for m in self.names:
            e = self.token_embed[m](inp.ids[m])  # [B, N, P, e]
            e = e * inp.token_valid[m].unsqueeze(-1).to(e.dtype)  # padded ids carry nothing
            x = self.patch_proj[m](e.flatten(2))  # [B, N, width]
            out[m] = x + self.enc_pos[m] + self.enc_modality[m]
        return out

    def sample_masking(self, padding: Mapping[str, torch.Tensor],
                       generator: torch.Generator | None) -> Masking:
        ratios = {"audio": self.cfg.mask_ratio_audio, "visual": self.cfg.mask_ratio_visual}
        return sample_masking(self.cfg.masking, padding, self.layouts, ratios, generator)

    # -- encoder -----------------------------------------------------------------------------

    def encode_visible(self, x: dict[str, torch.Tensor], masking: Masking) -> dict[str, torch.Tensor]:
        """Run the encoder on visible patches only → `[B, N, width]` per modality, 0 elsewhere."""
        if self.cfg.fusion == "joint":
            out = self._encode_joint(x, masking)
        else:
            out = self._encode_cross(x, masking)
        return {m: torch.where(masking.visible(m).unsqueeze(-1), out[m], 0.0) for m in self.names}

    def _encode_joint(self, x: dict[str, torch.Tensor], masking: Masking) -> dict[str, torch.Tensor]:
        seq = torch.cat([x[m] for m in self.names], 1)  # [B, N_total, D]
        key = torch.cat([masking.key[m] for m in self.names], 1)  # [B, N_total]
        n_vis = sum(masking.n_visible[m] for m in self.names)  # [B]
        ids_shuffle = torch.argsort(key, dim=1, stable=True)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        enc = _restore(self._run_encoder(_gather(seq, ids_shuffle, n_vis)), ids_restore)
        return dict(zip(self.names, enc.split([self.layouts[m].n_patches for m in self.names], 1)))

    def _run_encoder(self, packed: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h, valid = packed  # [B, K, D], [B, K]
        for block in self.encoder:
            h = block(h, valid)
        return self.encoder_norm(h)

    def _encode_cross(self, x: dict[str, torch.Tensor], masking: Masking) -> dict[str, torch.Tensor]:
        packed = {m: _gather(x[m], masking.ids_shuffle[m], masking.n_visible[m]) for m in self.names}
        h = self.encoder({m: p[0] for m, p in packed.items()}, {m: p[1] for m, p in packed.items()})
        return {m: _restore(self.encoder_norm(h[m]), masking.ids_restore[m]) for m in self.names}

    def encode(self, batch: Mapping[str, torch.Tensor],
               mask: Mapping[str, torch.Tensor] | None = None) -> MAEEncoding:
        """Encoder features for fine-tuning: every valid patch visible unless `mask` ([B, N] bool
        per modality, True = hidden) says otherwise. Features are `[B, N, width]` per modality."""
        inp = self.prepare(batch)
        masking = masking_from(mask or {}, inp.padding)
        feats = self.encode_visible(self.embed(inp), masking)
        return MAEEncoding(feats, inp.padding, {m: masking.visible(m) for m in self.names})

    # -- decoder and loss --------------------------------------------------------------------

    def decode(self, enc: dict[str, torch.Tensor], masking: Masking) -> dict[str, torch.Tensor]:
        """Encoded visible patches + mask tokens elsewhere → decoder features `[B, N, width]`."""
        parts = []
        for m in self.names:
            vis = masking.visible(m).unsqueeze(-1)
            y = torch.where(vis, enc[m], self.mask_token.to(enc[m].dtype))
            parts.append(y + self.dec_pos[m] + self.dec_modality[m])
        h = torch.cat(parts, 1)  # [B, N_total, D]
        valid = torch.cat([~masking.padding[m] for m in self.names], 1)  # [B, N_total]
        for block in self.decoder:
            h = block(h, valid)
        h = self.decoder_norm(h)
        return dict(zip(self.names, h.split([self.layouts[m].n_patches for m in self.names], 1)))

    def logits(self, m: str, h: torch.Tensor, patches: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder features → logits `[..., patch_ids, codebook_size]`, the unigram log-prior of
        each id's grid cell included: `h` `[B, n_patches, width]` (every patch), or `[M, width]`
        with `patches` `[M]` the patch index of each row."""
        out = self.head[m](h)
        if not self.cfg.unigram_prior:  # the buffer stays zero: skip the gather (a logits-sized copy)
            return out
        index = self._prior_index[m].to(out.device)
        if patches is not None:
            index = index[patches]
        return out + self.prior.get_buffer(m)[index].to(out.dtype)

    @torch.no_grad()
    def set_prior(self, m: str, counts: torch.Tensor | Any) -> None:
        """The log-prior of modality `m` from code counts per token position `[K, C]` (add-one
        smoothed): the model starts at the per-position unigram baseline."""
        counts = torch.as_tensor(counts, dtype=torch.float64)
        buf = self.prior.get_buffer(m)
        if tuple(counts.shape) != tuple(buf.shape):
            raise ValueError(f"{m} prior counts {list(counts.shape)}, expected {list(buf.shape)}")
        buf.copy_(torch.log((counts + 1) / (counts + 1).sum(1, keepdim=True)).to(buf.dtype))

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """As `nn.Module.load_state_dict`; checkpoints written before the unigram prior existed
        load with a zero prior (their logits are unchanged)."""
        state = dict(state_dict)
        for key, value in self.state_dict().items():
            if key.startswith("prior.") and key not in state:
                state[key] = torch.zeros_like(value)
        return super().load_state_dict(state, strict, assign)

    def forward(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None,
                mask: Mapping[str, torch.Tensor] | None = None,
                return_logits: bool = False,
                ce_denominator: Mapping[str, torch.Tensor | float] | None = None,
                gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> MAEOutput:
        """Mask (drawn from `generator`, which must live on the model's device, or the given
        `mask`: `[B, N]` bool per modality), encode the visible patches, decode, score the masked.

        The heads run on masked patches only unless `return_logits`: the full visual logits are
        14.7 M numbers per window, and the heads over every patch would cost more than the
        transformer.

        Data-parallel training over a global batch split into equal rank slices (see
        `reconstruction_loss` and `contrastive_loss`): `ce_denominator[m]` divides the summed
        per-token CE and the hit count of modality `m` instead of this batch's own masked-token
        count, and `gather` maps this rank's rows `[b, ...]` to the global batch's `[B, ...]`.
        """
        inp = self.prepare(batch)
        if mask is None:
            masking = self.sample_masking(inp.padding, generator)
        else:
            masking = masking_from(mask, inp.padding)
        enc = self.encode_visible(self.embed(inp), masking)
        dec = self.decode(enc, masking)
        loss, metrics = self.reconstruction_loss(inp, masking, dec, ce_denominator)
        if len(self.names) == 2:
            contrastive = self.contrastive_loss(enc, masking, gather)
            metrics["loss/contrastive"] = contrastive.detach()
            if self.cfg.contrastive_weight:
                loss = loss + self.cfg.contrastive_weight * contrastive
        logits = {m: self.logits(m, dec[m]) for m in self.names} if return_logits else {}
        return MAEOutput(loss, logits, dict(masking.mask), metrics)

    def reconstruction_loss(self, inp: MAEInputs, masking: Masking, dec: dict[str, torch.Tensor],
                            ce_denominator: Mapping[str, torch.Tensor | float] | None = None
                            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per modality: summed CE over the valid ids of masked patches / the denominator (by
        default this batch's count of them: the mean), summed over modalities.

        With `ce_denominator` (global masked-token count / world size under DDP), each rank's
        CE and accuracy are its share of the global ones: their mean over ranks, and the mean of
        the ranks' gradients, equal one process's on the global batch. Then every modality
        always has its ce / acc keys (NaN where the denominator is 0), so ranks agree on keys.
        """
        loss = dec[self.names[0]].new_zeros((), dtype=torch.float32)
        metrics = {}
        for m in self.names:
            mask = masking.mask[m]
            n_valid = (~masking.padding[m]).sum().clamp(min=1)
            metrics[f"mask/{m}"] = (mask.sum() / n_valid).detach().float()
            tokens = inp.token_valid[m][mask]  # [M, P]
            if ce_denominator is None:
                if not tokens.any():
                    continue
                denom = tokens.sum().float()
            else:
                denom = torch.as_tensor(ce_denominator[m], dtype=torch.float32, device=loss.device)
            # Padded ids of partly padded patches are ignored rather than indexed away: boolean
            # indexing would copy the (large) logits forward and scatter them back in backward.
            target = inp.ids[m][mask].masked_fill(~tokens, IGNORE)  # [M, P]
            logits = self.logits(m, dec[m][mask], mask.nonzero(as_tuple=True)[1]).flatten(0, 1)  # [M·P, C]
            total = F.cross_entropy(logits, target.flatten(), ignore_index=IGNORE,
                                    reduction="sum")
            ce = total / denom.clamp(min=1e-12)  # a zero count has a zero sum: adds nothing
            loss = loss + ce
            hits = (logits.detach().argmax(-1) == target.flatten()) & tokens.flatten()
            none = torch.full_like(denom, math.nan)
            metrics[f"loss/{m}_ce"] = torch.where(denom > 0, ce.detach(), none)
            metrics[f"acc/{m}"] = torch.where(denom > 0, hits.sum() / denom.clamp(min=1e-12), none)
        return loss, metrics

    def contrastive_loss(self, enc: dict[str, torch.Tensor], masking: Masking,
                         gather: Callable[[torch.Tensor], torch.Tensor] | None = None
                         ) -> torch.Tensor:
        """Symmetric InfoNCE between mean-pooled visible audio and visual encoder outputs, over the
        samples with both modalities visible (0 when fewer than two such samples).

        `gather`: this rank's rows `[b, ...]` → the global batch's `[B, ...]` with only this
        rank's slice carrying gradient (`vqmae.pretrain.gather_rows`). The term is then the global
        batch's, the same value on every rank, and its gradient is scaled by B / b = world size
        so that DDP's averaging of the ranks' (partial) gradients gives one process's gradient.
        """
        pooled, count = {}, {}
        for m in self.names:
            count[m] = masking.n_visible[m]
            pooled[m] = enc[m].float().sum(1) / count[m].clamp(min=1).unsqueeze(-1)  # [b, D]
        world = 1
        if gather is not None:
            b = count["audio"].shape[0]
            pooled = {m: gather(p) for m, p in pooled.items()}  # [B, D]
            count = {m: gather(c) for m, c in count.items()}  # [B]
            world = count["audio"].shape[0] // max(b, 1)
        both = (count["audio"] > 0) & (count["visual"] > 0)  # [B]
        if int(both.sum()) < 2:
            return enc["audio"].new_zeros((), dtype=torch.float32)
        a = F.normalize(pooled["audio"][both], dim=-1)
        v = F.normalize(pooled["visual"][both], dim=-1)
        logits = a @ v.t() / CONTRASTIVE_TEMPERATURE  # [B', B']
        target = torch.arange(len(a), device=a.device)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
        # value unchanged, gradient × world (see the docstring)
        return loss if world == 1 else world * loss - (world - 1) * loss.detach()


class _Head(nn.Module):
    """Decoder feature `[..., width]` → logits `[..., n_ids, codebook_size]`.

    `head_dim` 0: one linear layer to n_ids × codebook_size (DESIGN.md §2; 16.4 M parameters at
    the paper sizes, more than the transformer). `head_dim` d > 0: width → n_ids × d, GELU, then one
    d → codebook_size layer shared by every id of the patch (12× fewer head FLOPs at d = 16).
    """

    def __init__(self, width: int, n_ids: int, codebook_size: int, head_dim: int):
        super().__init__()
        self.n_ids = n_ids
        if head_dim:
            self.proj = nn.Linear(width, n_ids * head_dim)
            self.classify = nn.Linear(head_dim, codebook_size)
        else:
            self.proj = nn.Linear(width, n_ids * codebook_size)
            self.classify = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.proj(h).unflatten(-1, (self.n_ids, -1))  # [..., n_ids, d or C]
        return x if self.classify is None else self.classify(F.gelu(x))


def _gather(x: torch.Tensor, ids_shuffle: torch.Tensor, n_visible: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Visible patches first: `[B, N, D]` → `[B, K, D]` with K = max visible count, and the
    key validity `[B, K]` (False past a sample's own visible count)."""
    k = int(n_visible.max()) if n_visible.numel() else 0
    idx = ids_shuffle[:, :k]
    seq = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    valid = torch.arange(k, device=x.device) < n_visible[:, None]
    if k:
        # A sample with nothing visible (possible only with a caller's mask) attends to one
        # dummy key instead of an empty softmax (NaN); its outputs are discarded afterwards.
        valid[:, 0] |= n_visible == 0
    return seq, valid


def _restore(seq: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """`[B, K, D]` encoded (shuffled order) → `[B, N, D]` in patch order; positions past K are 0."""
    b, k, d = seq.shape
    pad = seq.new_zeros(b, ids_restore.shape[1] - k, d)
    full = torch.cat([seq, pad], 1)
    return torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=1.0)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------------------------
# cost


def flops_per_window(cfg: MAEConfig, dims: MAEDims, mask_ratio: float = 0.5) -> float:
    """Forward + backward FLOPs for one training window (≈ 3 × forward, 2 FLOPs per MAC).

    Counts the patch projection (every patch), the encoder on `(1 − mask_ratio)` of the patches,
    the decoder on every patch, attention scores and mixing (4 · L² · width per layer), and the
    heads on masked patches only. `mask_ratio` 0.5 is the mean under "coupled" masking.
    """
    names = ("audio", "visual") if cfg.modalities == "av" else (cfg.modalities,)
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
        d = cfg.head_dim
        head_macs = lay.patch_ids * (d * (w + dims.get(m).codebook_size) if d
                                     else w * dims.get(m).codebook_size)
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
