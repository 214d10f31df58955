"""Stage 2's masking: which patches of a batch the encoder sees and the decoder predicts.

Masking follows facebookresearch/mae's ``random_masking``: a sort key (group + noise, groups
visible → masked → padding) is argsorted into ``ids_shuffle`` and ``ids_restore =
argsort(ids_shuffle)``; `vqmae.models.mae.MAEModel` gathers the visible patches with them. A
`Masking` comes either from a strategy (`sample_masking`, drawn from a generator) or from given
masks (`masking_from`). Padding patches (all frames padded) are never visible and never masked.

This is the place to add a masking strategy (`mae.masking`):

1. name it in `MAEConfig.masking` (vqmae/config.py);
2. a strategy that only decides HOW MANY valid patches to mask per sample (random ones, like
   "coupled", "fixed", "audio2visual") is a branch of `_mask_counts`; one that decides WHICH
   patches (like "time", whole time steps) is a branch of `sample_masking` setting `noise`
   (lowest-noise valid patches are masked) and `n_mask`;
3. a strategy that needs both modalities is refused in `MAEModel._check_config`, and
   benchmarks/pretrain.py `nominal_mask_ratio` gives its mean mask ratio for the FLOP count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

from vqmae.models.layout import PatchLayout

# Masking groups: the sort key is group + noise (noise in [0, 1)), so one argsort orders patches
# visible → masked → padding and, within a group, by noise.
_VISIBLE, _MASKED, _PADDING = 0.0, 1.0, 2.0


@dataclass(frozen=True)
class Bounds:
    """Upper bounds of any sample's visible and masked patch counts, per modality, known on the
    host: the model sizes its encoder input and its masked rows with them instead of reading the
    counts back from the device (no host sync in a training step; fixed shapes to compile)."""

    visible: dict[str, int]
    masked: dict[str, int]


@dataclass
class Masking:
    """Per-modality masking of one batch (all tensors on the model's device)."""

    mask: dict[str, torch.Tensor]  # [B, N] bool, True = masked (a valid patch the decoder predicts)
    padding: dict[str, torch.Tensor]  # [B, N] bool, True = padding patch (all frames padded)
    ids_shuffle: dict[str, torch.Tensor]  # [B, N] visible first, then masked, then padding
    ids_restore: dict[str, torch.Tensor]  # [B, N] argsort(ids_shuffle)
    n_visible: dict[str, torch.Tensor]  # [B] int64
    key: dict[str, torch.Tensor] = field(repr=False)  # [B, N] sort key: group + noise
    # Host-known upper bounds of every sample's visible and masked patch counts per modality, when
    # the strategy fixes them before drawing (`Bounds`); None: read from the device (a sync).
    bounds: Bounds | None = None

    def visible(self, name: str) -> torch.Tensor:
        return ~(self.mask[name] | self.padding[name])  # [B, N]


def _build_masking(mask: dict[str, torch.Tensor], padding: dict[str, torch.Tensor],
                   noise: dict[str, torch.Tensor], bounds: Bounds | None = None) -> Masking:
    key, shuffle, restore, n_vis = {}, {}, {}, {}
    for m in mask:
        group = torch.where(padding[m], _PADDING, torch.where(mask[m], _MASKED, _VISIBLE))
        key[m] = group + noise[m]
        shuffle[m] = order_by_key(key[m])
        restore[m] = torch.argsort(shuffle[m], dim=1)
        n_vis[m] = (~(mask[m] | padding[m])).sum(1)
    return Masking(mask, padding, shuffle, restore, n_vis, key, bounds)


def order_by_key(key: torch.Tensor) -> torch.Tensor:
    """`argsort(key, dim=1, stable=True)`. ONNX has no stable sort, so while exporting, ties are
    broken by position explicitly: ``key * N + index`` orders the same as the stable sort when keys
    are whole numbers, which they are in every exported graph (`masking_from`: no noise)."""
    if torch.onnx.is_in_onnx_export():
        n = key.shape[1]
        return torch.argsort(key * n + torch.arange(n, device=key.device, dtype=key.dtype), dim=1)
    return torch.argsort(key, dim=1, stable=True)


def masking_from(mask: Mapping[str, torch.Tensor], padding: Mapping[str, torch.Tensor],
                 bounds: Bounds | None = None) -> Masking:
    """A `Masking` from given masks (`[B, N]` bool per modality); padding patches are never masked.
    `bounds`: the caller's guarantee of the counts (from the `Masking` the masks were drawn in)."""
    masks = {m: (mask[m].bool() if m in mask else torch.zeros_like(p)) & ~p
             for m, p in padding.items()}
    noise = {m: torch.zeros(p.shape, device=p.device) for m, p in padding.items()}
    return _build_masking(masks, padding, noise, bounds)


def _host_seed(generator: torch.Generator) -> int:
    """A CPU seed from an accelerator generator's seed and how far it has been drawn from, so a
    generator used for several batches gives each its own ratio."""
    try:
        offset = int(generator.get_offset())
    except (AttributeError, RuntimeError):  # generators without an offset
        offset = 0
    return (generator.initial_seed() * 1_000_003 + offset) % (2 ** 63)


def _host_ratios(strategy: str, names: list[str], ratios: Mapping[str, float],
                 generator: torch.Generator | None) -> dict[str, torch.Tensor] | None:
    """The mask ratio of every sample, one float32 CPU scalar per modality, for the strategies
    that draw it per batch ("coupled_batch"; from `generator` when it is a CPU one, so CPU runs keep
    their random stream, else from a CPU generator seeded alike) or fix it; None for "coupled"."""
    if strategy == "coupled_batch":
        host = generator if generator is None or generator.device.type == "cpu" else \
            torch.Generator().manual_seed(_host_seed(generator))
        # Dirichlet(1, 1) = (u, 1 − u) with u ~ U(0, 1); a lone modality keeps that marginal
        u = torch.rand((1,), generator=host)[0]
        return {"visual": u, "audio": 1.0 - u} if len(names) == 2 else {names[0]: u}
    if strategy == "fixed":
        return {m: torch.tensor(float(ratios[m])) for m in names}
    if strategy in ("audio2visual", "visual2audio"):
        hidden = "visual" if strategy == "audio2visual" else "audio"
        return {m: torch.tensor(float(m == hidden)) for m in names}
    if strategy == "coupled":
        return None
    raise ValueError(f"unknown masking strategy {strategy!r}")


def _mask_counts(strategy: str, n_valid: dict[str, torch.Tensor], ratios: Mapping[str, float],
                 generator: torch.Generator | None,
                 layouts: Mapping[str, PatchLayout]) -> tuple[dict[str, torch.Tensor], Bounds | None]:
    """Patches to mask per sample `[B]` for the count-based strategies, and `Bounds` when the
    ratios are known on the host. With r fixed, a sample of n valid patches masks round(r·n)
    (float32, as on the device) and keeps n − round(r·n) visible; both grow with n, so the counts
    at n = all N patches bound every sample's (`_keep_one_visible` moves at most one patch from
    masked to visible, and only where none was visible: hence max(·, 1))."""
    names = list(n_valid)
    first = n_valid[names[0]]
    host = _host_ratios(strategy, names, ratios, generator)
    if host is None:  # "coupled": one ratio per sample, drawn on the device
        r_v = torch.rand(first.shape, generator=generator, device=first.device)
        r = {"visual": r_v, "audio": 1.0 - r_v} if len(names) == 2 else {names[0]: r_v}
        return {m: torch.round(r[m] * n_valid[m]).long() for m in names}, None
    counts = {m: torch.round(host[m].to(first.device) * n_valid[m]).long() for m in names}
    masked = {m: int(torch.round(host[m] * layouts[m].n_patches)) for m in names}
    visible = {m: max(layouts[m].n_patches - masked[m], 1) for m in names}
    return counts, Bounds(visible, masked)


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
        n_mask, bounds = {}, None
        for m in names:
            per_step = layouts[m].n_patches // layouts[m].n_time
            steps = torch.round(ratios[m] * n_valid[m].div(per_step, rounding_mode="floor"))
            n_mask[m] = steps.long() * per_step
    else:
        noise = {m: torch.rand(padding[m].shape, generator=generator, device=device) for m in names}
        n_mask, bounds = _mask_counts(strategy, n_valid, ratios, generator, layouts)
    _keep_one_visible(n_mask, n_valid)
    mask = {}
    for m in names:
        # Lowest-noise valid patches are masked; padding sorts last and is never masked.
        order = torch.argsort(torch.where(valid[m], noise[m], _PADDING), dim=1, stable=True)
        rank = torch.argsort(order, dim=1)
        mask[m] = valid[m] & (rank < n_mask[m][:, None])
    return _build_masking(mask, dict(padding), noise, bounds)


def masked_rows(masking: Masking, m: str, dec: torch.Tensor, token_valid: torch.Tensor,
                ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The masked patches of modality `m`, from its decoder features `dec` `[B, N, width]`, valid
    ids `token_valid` `[B, N, P]` and codes `ids` `[B, N, P]`: features `[M, width]`, patch index
    `[M]`, valid ids `[M, P]` and codes `[M, P]`. With `Bounds`, M = B × the masked bound: the masked
    patches sit right after the visible ones in `ids_shuffle`, so each sample's are a fixed-size
    slice of it, and rows past its own count have no valid id. Otherwise the rows of the boolean
    mask (their count read from the device)."""
    if masking.bounds is None:
        mask = masking.mask[m]
        return dec[mask], mask.nonzero(as_tuple=True)[1], token_valid[mask], ids[mask]
    n = masking.ids_shuffle[m].shape[1]
    j = torch.arange(min(masking.bounds.masked[m], n), device=dec.device)
    pos = (masking.n_visible[m][:, None] + j).clamp(max=n - 1)  # [B, M_b] in shuffled order
    patch = torch.gather(masking.ids_shuffle[m], 1, pos)  # [B, M_b] patch index
    ok = j < masking.mask[m].sum(1, keepdim=True)  # [B, M_b]
    p = ids.shape[-1]
    rows = torch.gather(dec, 1, patch.unsqueeze(-1).expand(-1, -1, dec.shape[-1])).flatten(0, 1)
    tokens = torch.gather(token_valid, 1, patch.unsqueeze(-1).expand(-1, -1, p)) & ok[..., None]
    codes = torch.gather(ids, 1, patch.unsqueeze(-1).expand(-1, -1, p))
    return rows, patch.flatten(), tokens.flatten(0, 1), codes.flatten(0, 1)
