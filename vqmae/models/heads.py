"""Stage 2's prediction heads and loss: decoder features → logits over the codebook for every id of
a patch (`Head`), and the cross-entropy over masked ids that never holds more than a budget of
logits at once (`masked_ce`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE = -100  # target of a padded id in a partly padded masked patch
LOGITS_BUDGET = 2 ** 25  # most logits held at once by the loss (128 MB in fp32): `masked_ce`
# The fused loss's chunk on CPU: 2 MB of logits stay in cache from the matmul through the softmax
# to the gradient matmuls (the visual loss and its gradients for 230k masked ids on 2 cores: 0.14 s
# in 2 MB chunks, 0.18 s in 16 MB). GPUs take the large chunks (fewer launches).
CPU_CHUNK = 2 ** 19


class Head(nn.Module):
    """Decoder feature `[..., width]` → logits `[..., n_ids, codebook_size]`.

    `head_dim` −1 (the paper's head): the feature is read as n_ids slices of width / n_ids (the
    inverse of the patch embedding, which flattens n_ids embeddings into the width) and one
    Linear(width / n_ids → codebook_size) shared by every id scores each slice. `head_dim` 0: one
    linear layer to n_ids × codebook_size (16.4 M parameters at the paper sizes, more than the
    transformer). `head_dim` d > 0: width → n_ids × d, GELU, then one d → codebook_size layer shared
    by every id of the patch.
    """

    def __init__(self, width: int, n_ids: int, codebook_size: int, head_dim: int):
        super().__init__()
        self.n_ids = n_ids
        self.proj: nn.Module | None = None
        self.classify: nn.Module | None = None
        if head_dim < 0:
            self.classify = nn.Linear(width // n_ids, codebook_size)
        elif head_dim:
            self.proj = nn.Linear(width, n_ids * head_dim)
            self.classify = nn.Linear(head_dim, codebook_size)
        else:
            self.proj = nn.Linear(width, n_ids * codebook_size)

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """What the shared last layer `classify` reads: `[..., n_ids, e]` (not for `head_dim` 0)."""
        if self.proj is None:  # the paper's head: per-id slices of the feature
            return h.unflatten(-1, (self.n_ids, -1))
        return F.gelu(self.proj(h).unflatten(-1, (self.n_ids, -1)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.classify is None:
            return self.proj(h).unflatten(-1, (self.n_ids, -1))  # [..., n_ids, C]
        return self.classify(self.features(h))


class _LinearCE(torch.autograd.Function):
    """Summed cross-entropy (and hit count) of `x @ weight.T + bias` against `target`, computed in
    row chunks with each chunk's gradients taken in the same pass: the logits of one chunk exist at
    a time and are never recomputed (the idea of fused linear cross-entropy kernels such as
    Liger's, in plain torch). x `[N, e]`, weight `[C, e]`, bias `[C]`, target `[N]` (IGNORE
    skipped) → (loss `[]` fp32, hits `[]` int64)."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, rows: int, grad_enabled: bool):
        grads = grad_enabled and any(ctx.needs_input_grad[:3])
        total = x.new_zeros((), dtype=torch.float32)
        hits = target.new_zeros(())
        # the bias as one more input column: one matmul writes the logits (no bias pass) and one
        # gives the weight's and the bias's gradients together (no column-sum pass)
        xa = torch.cat([x, x.new_ones(len(x), 1)], 1)  # [N, e + 1]
        wa = torch.cat([weight, bias[:, None]], 1).to(x.dtype)  # [C, e + 1]
        wt = wa.t().contiguous()  # [e + 1, C]
        # skinny matmuls run 2-5x faster on CPU with the long dimension last in the output, so
        # both gradients are taken transposed: d x^T = w^T p^T and d w_a^T = x_a^T p
        gxt = x.new_empty(x.shape[1], len(x)) if grads else None
        gwt = torch.zeros_like(wt, dtype=torch.float32) if grads else None
        for a in range(0, len(x), rows):
            xc, tc = xa[a:a + rows], target[a:a + rows]
            logits = (xc @ wt).float()  # [n, C]
            valid = (tc != IGNORE).to(logits.dtype)
            safe = tc.clamp(min=0)[:, None]
            picked = logits.gather(1, safe)[:, 0]
            top = logits.amax(-1)
            # a hit: the target's logit is the largest (a tie, which argmax might have resolved
            # either way, counts as a hit)
            hits = hits + ((picked >= top) & (valid > 0)).sum()
            e = logits.sub_(top[:, None]).exp_()  # in place: one pass for the softmax's numerator
            norm = e.sum(-1)
            total = total - ((picked - top - norm.log()) * valid).sum()
            if grads:  # d(sum CE)/d logits = softmax − one-hot, on valid rows
                p = e.mul_((valid / norm)[:, None])
                p.scatter_add_(1, safe, -valid[:, None])
                p = p.to(xc.dtype)
                gxt[:, a:a + rows] = wt[:-1] @ p.t()
                if p.dtype == gwt.dtype:
                    gwt.addmm_(xc.t(), p)
                else:  # bf16 operands, fp32 sum
                    gwt += (xc.t() @ p).float()
        gx = gxt.t().contiguous() if grads else None
        gw = gwt[:-1].t().contiguous() if grads else None
        gb = gwt[-1].contiguous() if grads else None
        ctx.save_for_backward(gx, gw, gb)
        ctx.mark_non_differentiable(hits)
        ctx.dtypes = (weight.dtype, bias.dtype)
        return total, hits

    @staticmethod
    def backward(ctx, g_total, g_hits):
        gx, gw, gb = ctx.saved_tensors
        if gx is None:
            return None, None, None, None, None, None
        return (gx * g_total.to(gx.dtype), (gw * g_total).to(ctx.dtypes[0]),
                (gb * g_total).to(ctx.dtypes[1]), None, None, None)


def masked_ce(logits_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], h: torch.Tensor,
              patches: torch.Tensor, target: torch.Tensor, codebook_size: int,
              budget: int = LOGITS_BUDGET, head: Head | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy and hit count over `target` `[M, P]` (IGNORE skipped), the logits
    `logits_fn(h_rows, patch_rows)` → `[m, P, C]` of the masked patches' decoder features `h`
    `[M, width]`, without ever holding more than `budget` logits.

    Given the `head` (whose logits `logits_fn` must then be, with nothing added) and a shared last
    layer, the loss is `_LinearCE` over its features: chunks of logits, each with its gradient
    taken at once. Otherwise, above the budget, the rows go in chunks under activation
    checkpointing (each chunk's logits freed after its loss and recomputed in backward). Memory
    follows the chunk either way, not M × P × codebook_size (470 MB of visual logits per batch of
    16 at the paper sizes).
    """
    if head is not None and head.classify is not None:
        x = head.features(h).flatten(0, 1)  # [M·P, e]
        rows = max(1, min(budget, CPU_CHUNK if h.device.type == "cpu" else budget) // codebook_size)
        return _LinearCE.apply(x, head.classify.weight, head.classify.bias, target.flatten(), rows,
                               torch.is_grad_enabled())
    rows = max(1, budget // max(1, target.shape[1] * codebook_size))

    def chunk(hc: torch.Tensor, pc: torch.Tensor, tc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits_fn(hc, pc).flatten(0, 1)  # [m·P, C]
        t = tc.flatten()
        total = F.cross_entropy(logits.float(), t, ignore_index=IGNORE, reduction="sum")
        hits = ((logits.detach().argmax(-1) == t) & (t != IGNORE)).sum()
        return total, hits

    if len(h) <= rows:
        return chunk(h, patches, target)
    total, hits = h.new_zeros((), dtype=torch.float32), target.new_zeros(())
    for a in range(0, len(h), rows):
        t, n = checkpoint(chunk, h[a:a + rows], patches[a:a + rows], target[a:a + rows],
                          use_reentrant=False)
        total, hits = total + t, hits + n
    return total, hits
