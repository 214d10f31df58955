"""Stage-3 model: the MAE encoder, per-modality pooling and a linear head (docs/design.md §2, fine-tune).

    EmotionModel(mae_cfg, dims, n_outputs, pooling)(batch) → [B, n_outputs] logits / values

The backbone is a `MAEModel` with its decoder side removed (decoder blocks, decoder position and
modality embeddings, mask token, token-prediction heads): what remains has exactly the encoder's
parameter names, so a pretrained MAE state dict loads into it after dropping those keys, and
`load_encoder` asserts that nothing else was missing or left over (facebookresearch/mae's habit).

Every valid patch is visible to the encoder. Each modality's encoder features are pooled over its
visible patches into one `[B, width]` vector:

* ``attention``: a learned query scores each patch (softmax over the visible ones);
* ``mean``: the mean of the visible patches;
* ``cls``: a learned class token attends to the patches through one extra transformer block
  (class attention, as in CaiT);
* ``stats``: attentive statistics pooling (Okabe et al., 2018): the attention-weighted mean and
  standard deviation of the patches, concatenated and projected back to the width — the spread of
  a feature over the window (a pitch or loudness range) next to its level;
* ``position``: the mean over time at each spatial patch position (audio: each band of the
  spectrum; face: each region of the crop), concatenated: ``positions × width`` features. Where in
  the spectrum or the face something happens stays readable by a linear head, as in the
  per-position bag-of-tokens baseline; pooling over every patch keeps ``width`` numbers for all of
  it. The modalities' vectors are zero-padded to the widest one, so every modality has
  ``model.pool_dim`` features.

Clips: a clip longer than one window is several windows, each encoded on its own; each modality's
window vectors are then pooled into one clip vector by a learned *clip pooling* (``attention``: a
learned query scores every window of the clip, softmax over the windows where the modality is
present; ``mean``: their average), and the head scores the clip vector. The windows of a batch are
flattened; ``clip`` `[n_windows]` says which clip each belongs to. A one-window clip's vector is its
window's, so per-window outputs (prediction timelines) are the head applied to each window alone.

A modality with no visible patch in a window (an audio-only clip, or a modality dropped at train
time or absent at test time) is represented by a learned *absent* vector instead, so one
audiovisual model scores audio alone, video alone, or both. The pooled vectors are concatenated in
`model.names` order, normalised, and mapped to the outputs by one linear layer.

Speaker normalisation (``speaker_norm=True``): before concatenation each present modality's pooled
vector has its speaker's mean subtracted, the mean over that speaker's windows scored with the same
modalities present (``presence pattern``). Speaker-level feature normalisation is a standard remedy
for speaker variability in emotion recognition; here it is part of training (the means of the
training speakers are recomputed each epoch) and of scoring (a test speaker's mean comes from its own
unlabelled clips). The caller passes the means as a table ``[groups, patterns, M, D]`` and each
sample's group; a sample whose group has no mean for its pattern, or a call without a table (one
clip of an unknown speaker, the exported model), uses the ``center`` buffer: the average of the
training speakers' means, stored with the weights.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from vqmae.config import MAEConfig
from vqmae.models.layout import MAEDims
from vqmae.models.mae import MAEModel
from vqmae.models.transformer import Block

# Parameters of a pretrained MAE that fine-tuning does not use (prefixes of state-dict keys).
DECODER_KEYS = ("decoder.", "decoder_norm.", "head.", "dec_pos.", "dec_modality.", "mask_token", "prior.")
POOLINGS = ("attention", "mean", "cls", "stats", "position")
CLIP_POOLINGS = ("attention", "mean")
# Where the head's LayerNorm sits: "centered" normalises the speaker-centered concatenation (a clip
# close to its speaker's mean — a neutral one — is scaled up to unit variance like any other);
# "pooled" normalises each modality's window vector before centering, so the distance from the
# speaker's mean reaches the linear layer as it is.
HEAD_NORMS = ("centered", "pooled", "none")  # "none": the linear layer alone (a linear probe)


class Pool(nn.Module):
    """Encoder features `[B, N, D]` + visible `[B, N]` bool → pooled `[B, D]`, present `[B]` bool."""

    def __init__(self, width: int, kind: str, heads: int, positions: int = 1, out_dim: int | None = None):
        super().__init__()
        if kind not in POOLINGS:
            raise ValueError(f"pooling {kind!r}: expected one of {list(POOLINGS)}")
        self.kind = kind
        self.positions = positions  # spatial patch positions per time step (``position``)
        self.pad = (out_dim or width) - (positions * width if kind == "position" else width)
        if kind in ("attention", "stats"):
            self.norm = nn.LayerNorm(width)
            self.query = nn.Parameter(torch.zeros(width))
        if kind == "stats":
            self.proj = nn.Linear(2 * width, width)
        elif kind == "cls":
            self.token = nn.Parameter(torch.zeros(1, 1, width))
            nn.init.trunc_normal_(self.token, std=0.02)
            self.block = Block(width, heads, 2.0, 0.0)
            self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, present = self._pool(x, visible)
        return (nn.functional.pad(out, (0, self.pad)) if self.pad else out), present

    def _pool(self, x: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        present = visible.any(1)  # [B]
        if self.kind == "position":  # patches are time-major: [B, n_time · positions, D]
            b, n, d = x.shape
            w = visible.to(x.dtype).view(b, n // self.positions, self.positions, 1)
            x = x.view(b, n // self.positions, self.positions, d)
            return ((x * w).sum(1) / w.sum(1).clamp_min(1.0)).flatten(1), present
        if self.kind == "mean":
            w = visible.to(x.dtype)
            return (x * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0), present
        if self.kind in ("attention", "stats"):
            score = self.norm(x) @ self.query.to(x.dtype) / x.shape[-1] ** 0.5  # [B, N]
            score = score.masked_fill(~visible, float("-inf"))
            # rows with nothing visible: uniform weights over zeros, replaced by `absent` later
            weight = torch.softmax(torch.where(present[:, None], score, 0.0), dim=1)
            mean = torch.einsum("bn,bnd->bd", weight, x)
            if self.kind == "attention":
                return mean, present
            var = torch.einsum("bn,bnd->bd", weight, (x - mean[:, None]) ** 2)
            return self.proj(torch.cat([mean, (var + 1e-5).sqrt()], -1)), present
        seq = torch.cat([self.token.expand(x.shape[0], -1, -1).to(x.dtype), x], 1)  # [B, 1+N, D]
        key = torch.cat([torch.ones_like(visible[:, :1]), visible], 1)
        return self.norm(self.block(seq, key)[:, 0]), present


def segment_pool(x: torch.Tensor, ok: torch.Tensor, score: torch.Tensor | None, seg: torch.Tensor,
                 n_seg: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows `x` `[n, D]` pooled per segment `seg` `[n]` (ids < n_seg) over the rows where `ok` `[n]`:
    a softmax of `score` `[n]` within each segment (None: a plain mean) → `[n_seg, D]`, and which
    segments had any `ok` row `[n_seg]` (their output is 0 otherwise). Memory is linear in n."""
    okf = ok.to(x.dtype)
    if torch.onnx.is_in_onnx_export():
        return _segment_pool_dense(x, okf, score, seg, n_seg)
    if score is None:
        e = okf
    else:
        s = score.float().masked_fill(~ok, float("-inf"))
        top = torch.full((n_seg,), float("-inf"), device=x.device).scatter_reduce(0, seg, s, "amax")
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        e = torch.exp(s - top[seg]).to(x.dtype) * okf
    den = torch.zeros(n_seg, dtype=x.dtype, device=x.device).index_add(0, seg, e)
    w = e / den[seg].clamp_min(1e-12)
    out = torch.zeros(n_seg, x.shape[1], dtype=x.dtype, device=x.device).index_add(0, seg, x * w[:, None])
    count = torch.zeros(n_seg, dtype=torch.int64, device=x.device).index_add(0, seg, ok.long())
    return out, count > 0


def _segment_pool_dense(x: torch.Tensor, okf: torch.Tensor, score: torch.Tensor | None,
                        seg: torch.Tensor, n_seg: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`segment_pool` through a `[n_seg, n]` membership matrix, for ONNX graphs: their scatter
    overwrites instead of adding, so the sums are matrix products here."""
    member = (seg[None, :] == torch.arange(n_seg, device=x.device)[:, None]) & (okf > 0)[None, :]
    if score is None:
        e = member.to(x.dtype)
    else:
        s = score.float()[None, :].masked_fill(~member, float("-inf"))  # [n_seg, n]
        top = s.amax(1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        e = torch.exp(s - top).masked_fill(~member, 0.0).to(x.dtype)
    w = e / e.sum(1, keepdim=True).clamp_min(1e-12)
    return w @ x, member.any(1)


class ClipPool(nn.Module):
    """Window vectors `[n, D]` of one modality + present `[n]` + clip ids `[n]` → clip vectors
    `[n_clips, D]` and present `[n_clips]` (see the module doc)."""

    def __init__(self, width: int, kind: str):
        super().__init__()
        if kind not in CLIP_POOLINGS:
            raise ValueError(f"clip pooling {kind!r}: expected one of {list(CLIP_POOLINGS)}")
        self.kind = kind
        if kind == "attention":
            self.norm = nn.LayerNorm(width)
            self.query = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor, present: torch.Tensor, clip: torch.Tensor,
                n_clips: int) -> tuple[torch.Tensor, torch.Tensor]:
        score = None
        if self.kind == "attention":
            score = self.norm(x) @ self.query.to(x.dtype) / x.shape[-1] ** 0.5
        return segment_pool(x, present, score, clip, n_clips)


class EmotionModel(nn.Module):
    """MAE encoder → per-modality pooling → linear head. Pure: no I/O.

    Input: a batch dict as `MAEModel` takes (codes and ``*_valid`` per modality of the backbone).
    A modality is *absent* for a sample when none of its frames is valid.
    """

    def __init__(self, mae_cfg: MAEConfig, dims: MAEDims | Mapping[str, Any], n_outputs: int,
                 pooling: str = "attention", dropout: float = 0.0, speaker_norm: bool = False,
                 clip_pooling: str = "attention", head_norm: str = "centered"):
        super().__init__()
        if n_outputs < 1:
            raise ValueError(f"n_outputs={n_outputs} must be positive")
        self.backbone = MAEModel(mae_cfg, dims)
        for key in ("decoder", "decoder_norm", "head", "dec_pos", "dec_modality", "mask_token", "prior"):
            delattr(self.backbone, key)
        self.names = self.backbone.names
        positions = {m: math.prod(lay.n_spatial) for m, lay in self.backbone.layouts.items()}
        # features per modality after pooling (`position`: every position's, padded to the widest)
        w = self.pool_dim = mae_cfg.width * (max(positions.values()) if pooling == "position" else 1)
        self.pool = nn.ModuleDict({m: Pool(mae_cfg.width, pooling, mae_cfg.heads, positions[m], w)
                                   for m in self.names})
        self.clip_pool = nn.ModuleDict({m: ClipPool(w, clip_pooling) for m in self.names})
        self.absent = nn.ParameterDict({m: nn.Parameter(torch.zeros(w)) for m in self.names})
        self.speaker_norm = bool(speaker_norm)
        if self.speaker_norm:  # fallback speaker mean per presence pattern (see the module doc)
            self.register_buffer("center", torch.zeros(n_patterns(len(self.names)), len(self.names), w))
        if head_norm not in HEAD_NORMS:
            raise ValueError(f"head_norm {head_norm!r}: expected one of {list(HEAD_NORMS)}")
        self.head_norm = head_norm
        if head_norm == "pooled":  # per modality, on each window vector, before any centering
            self.pool_norm = nn.ModuleDict({m: nn.LayerNorm(w) for m in self.names})
            self.norm = nn.Identity()
        elif head_norm == "centered":  # on the centered, concatenated vector
            self.norm = nn.LayerNorm(w * len(self.names))
        else:
            self.norm = nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(w * len(self.names), n_outputs)
        nn.init.trunc_normal_(self.out.weight, std=0.02)
        nn.init.zeros_(self.out.bias)

    def pooled(self, batch: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-modality pooled encoder features `[B, M, D]` and which modalities are present
        `[B, M]` bool, in `model.names` order (before speaker normalisation and the head).
        `mask` (`[B, N]` bool per modality, True = hidden): patches the encoder does not see
        (training-time patch dropout)."""
        enc = self.backbone.encode(batch, mask)
        xs, present = [], []
        for m in self.names:
            x, p = self.pool[m](enc.features[m], enc.visible[m])  # [B, D], [B]
            xs.append(self.pool_norm[m](x) if self.head_norm == "pooled" else x)
            present.append(p)
        return torch.stack(xs, 1), torch.stack(present, 1)

    def patch_mask(self, batch_size: int, ratio: float, gen: torch.Generator,
                   device: torch.device | str) -> dict[str, torch.Tensor] | None:
        """A random `[B, N]` mask per modality hiding each patch with probability `ratio` (None
        when 0): patch dropout, drawn on the CPU from `gen`."""
        if ratio <= 0:
            return None
        return {m: (torch.rand(batch_size, lay.n_patches, generator=gen) < ratio).to(device)
                for m, lay in self.backbone.layouts.items()}

    def clip_pooled(self, x: torch.Tensor, present: torch.Tensor, clip: torch.Tensor,
                    n_clips: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Window vectors `[n, M, D]`, present `[n, M]` and each window's clip `[n]` (ids below
        `n_clips`) → clip vectors `[n_clips, M, D]` and present `[n_clips, M]`."""
        xs, ps = [], []
        for i, m in enumerate(self.names):
            x_m, p_m = self.clip_pool[m](x[:, i], present[:, i], clip, n_clips)
            xs.append(x_m)
            ps.append(p_m)
        return torch.stack(xs, 1), torch.stack(ps, 1)

    def centered(self, x: torch.Tensor, present: torch.Tensor, table: torch.Tensor | None = None,
                 group: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled `[B, M, D]` + present `[B, M]` → the head's input `[B, M × D]`: with speaker
        normalisation, each sample's speaker mean subtracted (`table` `[G, P, M, D]`, NaN where a
        group lacks a pattern, and `group` `[B]`; without them the `center` buffer); an absent
        modality replaced by its learned `absent` vector."""
        if self.speaker_norm:
            pattern = presence_pattern(present)
            c = self.center[pattern]  # [B, M, D]
            if table is not None:
                if group is None:
                    raise ValueError("a speaker-mean table needs each sample's group")
                own = table[group, pattern].to(c.dtype)
                c = torch.where(torch.isnan(own), c, own)
            x = x - c.to(x.dtype)
        absent = torch.stack([self.absent[m] for m in self.names], 0).to(x.dtype)  # [M, D]
        return torch.where(present[..., None], x, absent).flatten(1)

    def head(self, x: torch.Tensor, present: torch.Tensor, table: torch.Tensor | None = None,
             group: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled `[B, M, D]` + present `[B, M]` → outputs `[B, n_outputs]` (see `centered`)."""
        return self.out(self.drop(self.norm(self.centered(x, present, table, group))))

    def forward(self, batch: Mapping[str, torch.Tensor], table: torch.Tensor | None = None,
                group: torch.Tensor | None = None, clip: torch.Tensor | None = None,
                n_clips: int | None = None, mask: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Windows `batch` → outputs `[n_clips, n_outputs]`: with `clip` `[B]` (each window's clip,
        ids below `n_clips`) the windows of a clip are pooled into one; without it every window is
        its own clip. `group` is per clip; `mask` as in `pooled`."""
        x, present = self.pooled(batch, mask)
        if clip is not None:
            x, present = self.clip_pooled(x, present, clip, int(n_clips if n_clips is not None
                                                               else int(clip.max()) + 1))
        return self.head(x, present, table, group)  # [n_clips, n_outputs]


def clip_table(model: EmotionModel, x: torch.Tensor, present: torch.Tensor,
               group: torch.Tensor | None) -> torch.Tensor | None:
    """The center table of vectors `x` `[N, M, D]` by `group` `[N]` (None: no table, or a model
    without speaker normalisation)."""
    if not model.speaker_norm or group is None or not len(x):
        return None
    return center_table(x, present, group, int(group.max()) + 1)


@torch.no_grad()
def head_outputs(model: EmotionModel, x: torch.Tensor, present: torch.Tensor, group: torch.Tensor | None,
                 batch_size: int, table: torch.Tensor | None = None) -> torch.Tensor:
    """Outputs `[N, n_outputs]` (float32, CPU) of pooled vectors `x` `[N, M, D]`, `present`
    `[N, M]`, in batches. With `group` `[N]` (dense ids from 0) a speaker-normalised model subtracts
    each group's mean: from `table` when given, else the mean over these vectors; without a group,
    its stored mean."""
    if table is None:
        table = clip_table(model, x, present, group)
    if table is None:
        group = None
    outs = [model.head(x[a:a + batch_size], present[a:a + batch_size], table,
                       None if group is None else group[a:a + batch_size]).float().cpu()
            for a in range(0, len(x), batch_size)]
    return torch.cat(outs) if outs else torch.zeros(0, model.out.out_features)


@torch.no_grad()
def clip_and_window_outputs(model: EmotionModel, x: torch.Tensor, present: torch.Tensor, clip: torch.Tensor,
                            n_clips: int, group: torch.Tensor | None, batch_size: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Window vectors `x` `[n, M, D]` (present `[n, M]`, clip ids `[n]`) → (clip outputs
    `[n_clips, C]`, window outputs `[n, C]`: the head on each window alone, for timelines), float32
    on the CPU. With `group` `[n_clips]` (dense ids), a speaker-normalised model subtracts each
    group's mean clip vector from its clips and their windows; without it, its stored mean."""
    cx, cp = model.clip_pooled(x, present, clip, n_clips)
    cx = cx.float()
    clip_out = head_outputs(model, cx, cp, group, batch_size)
    win_out = head_outputs(model, x, present, None if group is None else group[clip], batch_size,
                           clip_table(model, cx, cp, group))
    return clip_out, win_out


def n_patterns(n_modalities: int) -> int:
    """Presence patterns of `n_modalities` (bit m set: modality m present); 0 is never scored."""
    return 2 ** n_modalities


def presence_pattern(present: torch.Tensor) -> torch.Tensor:
    """`[B, M]` bool → `[B]` int64 pattern index (bit m set when modality m is present)."""
    bits = 2 ** torch.arange(present.shape[1], device=present.device)
    return (present.long() * bits).sum(1)


def center_table(x: torch.Tensor, present: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Mean pooled features per (group, presence pattern): x `[N, M, D]`, present `[N, M]`, group
    `[N]` → `[n_groups, P, M, D]` float32, NaN where a group has no sample with that pattern and
    for the modalities a pattern lacks."""
    n, m, d = x.shape
    p = n_patterns(m)
    key = group.long() * p + presence_pattern(present)
    total = torch.zeros(n_groups * p, m, d, dtype=torch.float32, device=x.device)
    total.index_add_(0, key, x.float())
    count = torch.zeros(n_groups * p, dtype=torch.float32, device=x.device)
    count.index_add_(0, key, torch.ones(n, dtype=torch.float32, device=x.device))
    mean = total / count.clamp_min(1.0)[:, None, None]
    bits = 2 ** torch.arange(m, device=x.device)
    has = ((torch.arange(p, device=x.device)[:, None] & bits) > 0)  # [P, M]
    ok = (count.view(n_groups, p, 1) > 0) & has[None]  # [G, P, M]
    return torch.where(ok[..., None], mean.view(n_groups, p, m, d), torch.nan)


def mean_center(table: torch.Tensor) -> torch.Tensor:
    """The average over groups of a center table `[G, P, M, D]` → `[P, M, D]` (0 where no group
    has the pattern): the fallback mean stored with a speaker-normalised model."""
    ok = ~torch.isnan(table)
    return torch.where(ok, table, 0.0).sum(0) / ok.sum(0).clamp_min(1)


def load_encoder(model: EmotionModel, mae_state: Mapping[str, torch.Tensor]) -> None:
    """Load a pretrained MAE's encoder into `model.backbone`; the decoder-side keys are dropped and
    any other missing or unexpected key is an error naming it."""
    state = {k: v for k, v in mae_state.items() if not k.startswith(DECODER_KEYS)}
    result = model.backbone.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"pretrained MAE does not match the fine-tuning backbone: missing "
                         f"{result.missing_keys}, unexpected {result.unexpected_keys}")


def drop_modality(batch: Mapping[str, torch.Tensor], name: str,
                  rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A copy of `batch` where modality `name` is absent (all frames invalid, codes 0) for the
    samples selected by `rows` ([B] bool; default all)."""
    out = dict(batch)
    key = f"{name}_valid"
    if name not in out:
        return out
    valid = out.get(key)
    if valid is None:
        valid = torch.ones(out[name].shape[:2], dtype=torch.bool, device=out[name].device)
    keep = torch.zeros_like(valid) if rows is None else valid & ~rows[:, None]
    out[key] = valid & keep
    return out
