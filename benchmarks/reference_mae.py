"""A plain reference implementation of the VQ-MAE-AV stage-2 model, computed the way the paper's
public code computes it, for `benchmarks/pretrain.py` to time vqmae's model against.

Written for this benchmark from the paper and a reading of its public code
(github.com/samsad35/VQ-MAE-AudioVisual-code, `CMDMAE`); nothing is copied. What it keeps of that
code's way of computing a step, since that is what the comparison is about:

- tubes: visual 4×4 tokens × 5 frames (80 ids, 360 tubes per 2 s), audio 4 frequency tokens × 10
  frames (40 ids, 160 tubes); each id embedded (visual 4, audio 8 dims) and the tube flattened
  into the width, 320, with no projection (the committed audio settings do not fit together;
  these are the ones its classifier and demo use);
- masking on the host: one Dirichlet(1, 1) draw of (visual, audio) ratios per batch, one NumPy
  permutation per sample and modality, its inverse by argsort, both copied to the device every step;
- learned position and modality embeddings, encoder on the visible tubes of both modalities
  (6 pre-LN blocks, 4 heads, MLP ratio 2, final LayerNorm), decoder on every tube with one shared
  mask token (3 blocks, no final norm);
- attention written out: q·kᵀ · scale, softmax, · v (the timm `Block` of its time);
- the head on EVERY tube: the width read as ids × embedding dims and a shared
  Linear(embedding dims → codebook) per modality; cross-entropy averaged over the masked ids only,
  selected by boolean indexing; the two modalities' losses summed.

Its parameter count equals vqmae's paper preset within 0.1 % (`benchmarks/pretrain.py` prints both).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

WIDTH, HEADS, MLP, ENC, DEC = 320, 4, 2.0, 6, 3
VISUAL = {"codebook": 512, "emb": 4, "ids": 80, "tubes": 360}
AUDIO = {"codebook": 256, "emb": 8, "ids": 40, "tubes": 160}


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (width // heads) ** -0.5
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = _Attention(width, heads)
        hidden = int(width * mlp)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def to_tubes(visual: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """visual `[B, 50, 24, 24]` → `[B, 360, 80]` (time, row, column of tubes; ids row, column,
    frame); audio `[B, 100, 64]` → `[B, 160, 40]` (time, band; ids band, frame)."""
    b = visual.shape[0]
    v = visual.reshape(b, 10, 5, 6, 4, 6, 4).permute(0, 1, 3, 5, 4, 6, 2).reshape(b, 360, 80)
    a = audio.reshape(b, 10, 10, 16, 4).permute(0, 1, 3, 4, 2).reshape(b, 160, 40)
    return v, a


def _shuffle(b: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    forward = np.stack([rng.permutation(n) for _ in range(b)])
    return forward, np.argsort(forward, axis=1)


class ReferenceMAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.mods = {"visual": VISUAL, "audio": AUDIO}
        self.embed = nn.ModuleDict({m: nn.Embedding(s["codebook"], s["emb"]) for m, s in self.mods.items()})
        self.enc_pos = nn.ParameterDict({m: nn.Parameter(torch.zeros(1, s["tubes"], WIDTH))
                                         for m, s in self.mods.items()})
        self.dec_pos = nn.ParameterDict({m: nn.Parameter(torch.zeros(1, s["tubes"], WIDTH))
                                         for m, s in self.mods.items()})
        self.enc_mod = nn.ParameterDict({m: nn.Parameter(torch.zeros(1, 1, WIDTH)) for m in self.mods})
        self.dec_mod = nn.ParameterDict({m: nn.Parameter(torch.zeros(1, 1, WIDTH)) for m in self.mods})
        self.mask_token = nn.Parameter(torch.zeros(1, 1, WIDTH))
        self.encoder = nn.Sequential(*[_Block(WIDTH, HEADS, MLP) for _ in range(ENC)])
        self.enc_norm = nn.LayerNorm(WIDTH)
        self.decoder = nn.Sequential(*[_Block(WIDTH, HEADS, MLP) for _ in range(DEC)])
        self.head = nn.ModuleDict({m: nn.Linear(s["emb"], s["codebook"]) for m, s in self.mods.items()})
        for p in [*self.enc_pos.values(), *self.dec_pos.values(), *self.enc_mod.values(),
                  *self.dec_mod.values(), self.mask_token]:
            nn.init.trunc_normal_(p, std=0.02)

    def forward(self, visual: torch.Tensor, audio: torch.Tensor, rng: np.random.Generator,
                ratio_v: float | None = None) -> torch.Tensor:
        """Codes (visual `[B, 50, 24, 24]`, audio `[B, 100, 64]`) → the summed masked CE; the
        visual mask ratio drawn from `rng` unless given (the benchmark gives both models the same)."""
        device = visual.device
        ids = dict(zip(("visual", "audio"), to_tubes(visual, audio)))
        if ratio_v is None:
            ratio_v = float(rng.dirichlet((1.0, 1.0))[0])  # one draw per batch
        ratios = {"visual": ratio_v, "audio": 1.0 - ratio_v}
        keep, back, kept = {}, {}, []
        for m, s in self.mods.items():
            b, n = ids[m].shape[:2]
            x = self.embed[m](ids[m]).reshape(b, n, -1) + self.enc_pos[m] + self.enc_mod[m]
            remain = int(round(n * (1 - ratios[m])))
            fwd, bwd = _shuffle(b, n, rng)
            keep[m] = remain
            fwd_t = torch.as_tensor(fwd, device=device)
            back[m] = torch.as_tensor(bwd, device=device)
            x = torch.gather(x, 1, fwd_t[:, :, None].expand(-1, -1, WIDTH))[:, :remain]
            kept.append(x)
        h = self.enc_norm(self.encoder(torch.cat(kept, 1)))
        parts, start = [], 0
        for m, s in self.mods.items():
            b, n = ids[m].shape[:2]
            x = h[:, start:start + keep[m]]
            start += keep[m]
            x = torch.cat([x, self.mask_token.expand(b, n - keep[m], -1)], 1)
            x = torch.gather(x, 1, back[m][:, :, None].expand(-1, -1, WIDTH))
            parts.append(x + self.dec_pos[m] + self.dec_mod[m])
        y = self.decoder(torch.cat(parts, 1))
        loss, start = y.new_zeros(()), 0
        for m, s in self.mods.items():
            b, n = ids[m].shape[:2]
            out = y[:, start:start + n]
            start += n
            logits = self.head[m](out.reshape(b, n, s["ids"], s["emb"]))  # every tube: [B, n, ids, K]
            masked = (back[m] >= keep[m])[:, :, None].expand(-1, -1, s["ids"])  # tube's shuffled place
            if masked.any():
                loss = loss + F.cross_entropy(logits[masked], ids[m][masked])
        return loss


def reference_flops_per_window(mask_ratio: float = 0.5) -> float:
    """Forward + backward FLOPs of one window (3 × forward, 2 per MAC), counted as
    `vqmae.models.layout.flops_per_window` counts vqmae's, with the head on every tube."""
    hidden = int(WIDTH * MLP)
    block = 4 * WIDTH * WIDTH + 2 * WIDTH * hidden
    n_total = VISUAL["tubes"] + AUDIO["tubes"]
    fwd = 0.0
    for depth, length in ((ENC, (1 - mask_ratio) * n_total), (DEC, n_total)):
        fwd += depth * (2 * length * block + 4 * length * length * WIDTH)
    for s in (VISUAL, AUDIO):
        fwd += 2 * s["tubes"] * s["ids"] * s["emb"] * s["codebook"]
    return 3.0 * fwd


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":  # a smoke run: one step on random codes
    torch.manual_seed(0)
    net = ReferenceMAE()
    rng = np.random.default_rng(0)
    v = torch.randint(0, 512, (2, 50, 24, 24))
    a = torch.randint(0, 256, (2, 100, 64))
    loss = net(v, a, rng)
    loss.backward()
    print(f"{parameter_count(net) / 1e6:.2f} M parameters, loss {loss.item():.3f} "
          f"(ln 512 = {math.log(512):.3f})")
