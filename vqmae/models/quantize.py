"""Vector quantizer with an EMA codebook and dead-code restarts (docs/design.md §2 "codebooks").

The codebook is a buffer, not a parameter: it moves only through exponential moving averages of the
encoder outputs assigned to each code (van den Oord et al. 2017, appendix), so the optimizer never
sees it. All codebook math (distances, EMA statistics) runs in fp32 whatever the ambient autocast:
in bf16 the 8-bit mantissa makes nearby codes tie and the argmin flips between steps.

Under DDP (`torch.distributed` initialised) the per-batch statistics are all-reduced and restart
vectors are broadcast from rank 0, so every replica holds the same codebook after every step. In
training mode every rank must therefore call `forward` in lockstep, as DDP already requires.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class QuantizedResult:
    """What `VectorQuantizer.forward` returns for an input `[..., D]`."""

    quantized: torch.Tensor  # [..., D] fp32, codebook vectors with straight-through gradient
    codes: torch.Tensor  # [...] int64
    commit_loss: torch.Tensor  # [] mean squared distance input → its code (code side detached)
    perplexity: torch.Tensor  # [] exp(entropy) of the batch's code histogram
    usage: torch.Tensor  # [] fraction of the codebook used in this batch


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantizer over `codebook_size` vectors of size `code_dim`.

    `decay` is the EMA decay, `eps` the Laplace smoothing of cluster sizes, `dead_threshold` the EMA
    count (assigned vectors per batch) below which a code is re-initialised from a random input
    vector of the current batch. The codebook starts with every count at zero, so the first training
    batch restarts all codes: a data-dependent initialisation with no extra mechanism.
    """

    def __init__(self, codebook_size: int, code_dim: int, decay: float = 0.99, eps: float = 1e-5,
                 dead_threshold: float = 1.0):
        super().__init__()
        if codebook_size < 1 or code_dim < 1:
            raise ValueError(f"codebook_size and code_dim must be ≥ 1, "
                             f"got {codebook_size}, {code_dim}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.decay = decay
        self.eps = eps
        self.dead_threshold = dead_threshold
        self.register_buffer("codebook", torch.randn(codebook_size, code_dim))  # [K, D]
        self.register_buffer("cluster_size", torch.zeros(codebook_size))  # [K] EMA counts
        self.register_buffer("embed_sum", torch.zeros(codebook_size, code_dim))  # [K, D] EMA sums

    def extra_repr(self) -> str:
        return (f"codebook_size={self.codebook_size}, code_dim={self.code_dim}, decay={self.decay}, "
                f"dead_threshold={self.dead_threshold}")

    def _flatten(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.code_dim:
            raise ValueError(f"quantizer expects [..., {self.code_dim}] inputs, got {tuple(x.shape)}")
        return x.reshape(-1, self.code_dim).float()  # [N, D]

    def distances(self, flat: torch.Tensor) -> torch.Tensor:
        """Euclidean distances `[N, K]` from `flat` [N, D] to every code, always in fp32.

        The direct difference form (no `|x|² − 2x·e + |e|²` matmul) is exact in fp32 and immune to
        TF32 matmuls; with D ≤ 8 it costs little.
        """
        with torch.autocast(flat.device.type, enabled=False):
            return torch.cdist(flat.float(), self.codebook.float(),
                               compute_mode="donot_use_mm_for_euclid_dist")

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest code ids `[...]` int64 for `x` [..., D]; never touches the codebook statistics."""
        return self.distances(self._flatten(x)).argmin(dim=1).reshape(x.shape[:-1])

    def codes_to_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook vectors `[..., D]` fp32 for integer `codes` [...]."""
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got range "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        return F.embedding(codes.long(), self.codebook.float())

    def forward(self, x: torch.Tensor) -> QuantizedResult:
        """Quantize `x` [..., D]; in training mode also restart dead codes and update the EMA."""
        flat = self._flatten(x)  # [N, D] fp32, keeps the gradient to x
        with torch.no_grad(), torch.autocast(flat.device.type, enabled=False):
            if self.training:
                self._restart_dead(flat.detach())
            codes = self.distances(flat.detach()).argmin(dim=1)  # [N]
            counts = torch.bincount(codes, minlength=self.codebook_size).float()  # [K]
            if self.training:
                counts = self._update_ema(flat.detach(), codes, counts)
        q = self.codebook[codes].float()  # [N, D]
        commit = F.mse_loss(flat, q.detach())
        # q + (x − x): the value is exactly q (so decode(encode(x)) matches bit for bit) while the
        # gradient passes straight through to x.
        quantized = q + (flat - flat.detach())
        return QuantizedResult(
            quantized=quantized.reshape(*x.shape[:-1], self.code_dim),
            codes=codes.reshape(x.shape[:-1]),
            commit_loss=commit,
            perplexity=_perplexity(counts),
            usage=(counts > 0).float().mean(),
        )

    def _update_ema(self, flat: torch.Tensor, codes: torch.Tensor,
                    counts: torch.Tensor) -> torch.Tensor:
        """EMA of per-code counts and vector sums, then codebook = smoothed mean; returns counts [K]."""
        sums = torch.zeros_like(self.embed_sum).index_add_(0, codes, flat)  # [K, D]
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        # Laplace smoothing keeps never-assigned codes from dividing by zero.
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        self.codebook.copy_(self.embed_sum / smoothed.unsqueeze(1))
        return counts

    def _restart_dead(self, flat: torch.Tensor) -> None:
        """Move codes whose EMA count < `dead_threshold` onto random input vectors of this batch."""
        dead = (self.cluster_size < self.dead_threshold).nonzero().squeeze(1)  # [n_dead]
        n_dead, n = dead.numel(), flat.shape[0]
        if n_dead == 0 or n == 0:
            return
        # Global RNG on purpose: reproducible under torch.manual_seed without threading a generator.
        if n >= n_dead:
            pick = torch.randperm(n, device=flat.device)[:n_dead]
        else:
            pick = torch.randint(n, (n_dead,), device=flat.device)
        fresh = flat[pick]  # [n_dead, D]
        if _distributed():
            dist.broadcast(fresh, src=0)
        self.codebook[dead] = fresh
        # A restarted code starts exactly at the threshold: it survives only if it gets used.
        self.cluster_size[dead] = self.dead_threshold
        self.embed_sum[dead] = fresh * self.dead_threshold
        log.debug("restarted %d dead codes of %d", n_dead, self.codebook_size)


def _perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of a code histogram `counts` [K]; K for uniform use, 1 for a single code."""
    p = counts / counts.sum().clamp_min(1.0)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum())
