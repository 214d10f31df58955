"""Stage 2's transformer parts: pre-LN self- and cross-attention blocks.

`Block` is the encoder's (`fusion="joint"`) and the decoder's layer, and the classifier's
(`vqmae.models.classifier`); `CrossEncoder` is the encoder of `fusion="cross"`. Sequences are
`[B, L, width]` with a key validity `[B, L]` bool (False = padding, never attended to).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqmae.config import MAEConfig


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


class _LeanMLP(torch.autograd.Function):
    """Linear → GELU → Linear that keeps its input and the first layer's output for backward and
    recomputes the GELU there, instead of also keeping the GELU's output: 4 × width fewer numbers
    per token and layer in training (a quarter of a block's activations), for one elementwise pass.
    x `[N, D]` → `[N, D]`; fp32 (the autocast path uses the plain modules)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        h = torch.addmm(b1, x, w1.t())
        ctx.save_for_backward(x, h, w1, w2)
        return torch.addmm(b2, F.gelu(h), w2.t())

    @staticmethod
    def backward(ctx, gy):
        x, h, w1, w2 = ctx.saved_tensors
        gw2 = gy.t() @ F.gelu(h)
        gh = torch.ops.aten.gelu_backward(gy @ w2, h)
        return gh @ w1, gh.t() @ x, gh.sum(0), gw2, gy.sum(0)


def _mlp(mlp: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """`mlp` (Linear, GELU, Dropout, Linear, Dropout) on `x` `[..., D]`: through `_LeanMLP` when it
    trains in fp32 without dropout, else module by module."""
    fc1, fc2 = mlp[0], mlp[3]
    if (not torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type)
            or (mlp.training and mlp[2].p > 0) or x.dtype != torch.float32):
        return mlp(x)
    return _LeanMLP.apply(x.flatten(0, -2), fc1.weight, fc1.bias, fc2.weight,
                          fc2.bias).view(x.shape)


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
        return x + _mlp(self.mlp, self.norm2(x))


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
        first = torch.arange(key_valid.shape[1], device=key_valid.device) == 0
        safe = key_valid | (first & ~has_keys[:, None])
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

    def forward(self, seq: dict[str, torch.Tensor], valid: dict[str, torch.Tensor],
                context_valid: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """seq `[B, K_m, D]` and key validity `[B, K_m]` per modality → `[B, K_m, D]`.
        `context_valid`: the keys the other modality may attend to (default `valid`); without a
        self-attention dummy key, which is a masked patch."""
        names = list(seq)
        context_valid = valid if context_valid is None else context_valid
        for layer in range(len(self.self_blocks[names[0]])):
            seq = {m: self.self_blocks[m][layer](seq[m], valid[m]) for m in names}
            if len(names) == 2:
                a, b = names
                seq = {a: self.cross_blocks[a][layer](seq[a], seq[b], context_valid[b]),
                       b: self.cross_blocks[b][layer](seq[b], seq[a], context_valid[a])}
        return seq
