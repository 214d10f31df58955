"""Stage 2: masked-token transformer over audio and visual codes (VQ-MAE-AV, docs/design.md §2).

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

This module holds the model (embedding, encoder / decoder wiring, prediction heads, losses); the
dims and patch layouts are in `vqmae.models.layout`, the masking strategies (where a new one is
added) in `vqmae.models.masking`, the transformer blocks in `vqmae.models.transformer`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from vqmae.config import MAEConfig, mae_modalities
from vqmae.models.heads import IGNORE, Head, masked_ce
from vqmae.models.layout import MODALITIES, MAEDims, patch_layout, sincos_positions
from vqmae.models.masking import Bounds, Masking, masked_rows, masking_from, order_by_key, sample_masking
from vqmae.models.transformer import Block, CrossBlock, CrossEncoder

# InfoNCE temperature of the optional contrastive term (CLIP's initial value is 0.07; pooled
# summaries of a small model saturate less with a softer 0.1).
CONTRASTIVE_TEMPERATURE = 0.1


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
        mode = mae_modalities(cfg.modalities, [m for m in MODALITIES if self.dims.get(m) is not None])
        self.names = ("audio", "visual") if mode == "av" else (mode,)
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
            self.head[m] = Head(w, lay.patch_ids, c, cfg.head_dim)
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
        if cfg.head_dim < -1:
            raise ValueError(f"mae.head_dim={cfg.head_dim}: expected -1 (the paper's per-id head), "
                             f"0 (one linear layer) or a positive size")
        for m in self.names if cfg.head_dim == -1 else ():
            ids = patch_layout(m, self.dims.get(m), cfg).patch_ids
            if cfg.width % ids:
                raise ValueError(f"mae.head_dim=-1 reads the width as one slice per id: mae.width="
                                 f"{cfg.width} is not divisible by the {ids} ids of a {m} patch")
        if cfg.pos_init not in ("sincos", "random"):
            raise ValueError(f"mae.pos_init={cfg.pos_init!r}: expected 'sincos' or 'random'")
        if cfg.fusion not in ("joint", "cross"):
            raise ValueError(f"mae.fusion={cfg.fusion!r}: expected 'joint' or 'cross'")

    def _embed_dim(self, name: str) -> int:
        return self.cfg.visual_embed_dim if name == "visual" else self.cfg.audio_embed_dim

    def compile_blocks(self, backend: str = "inductor") -> None:
        """`torch.compile` every transformer block in place, each as one graph (`fullgraph`: a
        graph break is an error). Regional: masking, gathers and the chunked loss stay eager, so
        the varying visible count costs one recompile (to dynamic shapes), not one per value."""
        for module in self.modules():
            if isinstance(module, (Block, CrossBlock)):
                module.compile(fullgraph=True, backend=backend)

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
        # On an accelerator this check would stall the pipeline, and compiled it would break the
        # graph; the store validates codes on write.
        if codes.device.type == "cpu" and codes.numel() and not torch.compiler.is_compiling():
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
        ids_shuffle = order_by_key(key)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        k = None if masking.bounds is None else sum(masking.bounds.visible[m] for m in self.names)
        enc = _restore(self._run_encoder(_gather(seq, ids_shuffle, n_vis, k)), ids_restore)
        return dict(zip(self.names, enc.split([self.layouts[m].n_patches for m in self.names], 1)))

    def _run_encoder(self, packed: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h, valid, _ = packed  # [B, K, D], [B, K]
        for block in self.encoder:
            h = block(h, valid)
        return self.encoder_norm(h)

    def _encode_cross(self, x: dict[str, torch.Tensor], masking: Masking) -> dict[str, torch.Tensor]:
        packed = {m: _gather(x[m], masking.ids_shuffle[m], masking.n_visible[m],
                             None if masking.bounds is None else masking.bounds.visible[m])
                  for m in self.names}
        h = self.encoder({m: p[0] for m, p in packed.items()}, {m: p[1] for m, p in packed.items()},
                         {m: p[2] for m, p in packed.items()})
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
                gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
                bounds: Bounds | None = None) -> MAEOutput:
        """Mask (drawn from `generator`, which must live on the model's device, or the given
        `mask`: `[B, N]` bool per modality), encode the visible patches, decode, score the masked.

        The heads run on masked patches only unless `return_logits`: the full visual logits are
        14.7 M numbers per window, and the heads over every patch would cost more than the
        transformer.

        Data-parallel training over a global batch split into equal rank slices (see
        `reconstruction_loss` and `contrastive_loss`): `ce_denominator[m]` divides the summed
        per-token CE and the hit count of modality `m` instead of this batch's own masked-token
        count, and `gather` maps this rank's rows `[b, ...]` to the global batch's `[B, ...]`.
        `bounds` (with `mask`): the `Bounds` of the masking the masks come from, so that the step
        sizes its tensors without reading counts back from the device.
        """
        inp = self.prepare(batch)
        if mask is None:
            masking = self.sample_masking(inp.padding, generator)
        else:
            masking = masking_from(mask, inp.padding, bounds)
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
            h, patches, tokens, ids = masked_rows(masking, m, dec[m], inp.token_valid[m], inp.ids[m])
            if ce_denominator is None:
                # nothing masked: no keys (with bounds, decided on the host from the bound, so a
                # bound above 0 whose patches are all padding gives NaN keys instead)
                if (masking.bounds.masked[m] == 0 if masking.bounds is not None
                        else not tokens.any()):
                    continue
                denom = tokens.sum().float()
            else:
                denom = torch.as_tensor(ce_denominator[m], dtype=torch.float32, device=loss.device)
            # Padded ids of partly padded patches are ignored rather than indexed away: boolean
            # indexing would copy the (large) logits forward and scatter them back in backward.
            target = ids.masked_fill(~tokens, IGNORE)  # [M, P]
            total, hits = masked_ce(lambda h, p, m=m: self.logits(m, h, p), h, patches, target,
                                    self.dims.get(m).codebook_size,
                                    head=None if self.cfg.unigram_prior else self.head[m])
            ce = total / denom.clamp(min=1e-12)  # a zero count has a zero sum: adds nothing
            loss = loss + ce
            none = torch.full_like(denom, math.nan)
            metrics[f"loss/{m}_ce"] = torch.where(denom > 0, ce.detach(), none)
            metrics[f"acc/{m}"] = torch.where(denom > 0, hits / denom.clamp(min=1e-12), none)
        return loss, metrics

    def contrastive_loss(self, enc: dict[str, torch.Tensor], masking: Masking,
                         gather: Callable[[torch.Tensor], torch.Tensor] | None = None
                         ) -> torch.Tensor:
        """Symmetric InfoNCE between mean-pooled visible audio and visual encoder outputs, over the
        samples with both modalities visible (0 when fewer than two such samples).

        `gather`: this rank's rows `[b, ...]` → the global batch's `[B, ...]` with only this
        rank's slice carrying gradient (`vqmae.stages.pretrain.gather_rows`). The term is then the global
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
        n_both = both.sum()
        # Over the samples in `both` only, without selecting them (no host sync): the others'
        # columns are left out of every softmax and their rows out of the mean.
        a = F.normalize(pooled["audio"], dim=-1)
        v = F.normalize(pooled["visual"], dim=-1)
        sim = a @ v.t() / CONTRASTIVE_TEMPERATURE  # [B, B]
        target = torch.arange(len(a), device=a.device)
        per_row = (F.cross_entropy(sim.masked_fill(~both[None, :], _LEFT_OUT), target, reduction="none")
                   + F.cross_entropy(sim.t().masked_fill(~both[None, :], _LEFT_OUT), target,
                                     reduction="none"))
        loss = 0.5 * (per_row * both).sum() / n_both.clamp(min=1)
        loss = torch.where(n_both >= 2, loss, torch.zeros_like(loss))  # fewer than two: no term
        # value unchanged, gradient × world (see the docstring)
        return loss if world == 1 else world * loss - (world - 1) * loss.detach()


_LEFT_OUT = -1e4  # a logit whose exp is 0 in fp32 and bf16 against |logits| ≤ 1 / temperature


def _gather(x: torch.Tensor, ids_shuffle: torch.Tensor, n_visible: torch.Tensor,
            k: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Visible patches first: `[B, N, D]` → `[B, K, D]` with K = `k`, a host-known bound of the
    visible counts (`Bounds`), else the largest visible count (read from the device), the key
    validity `[B, K]` for self-attention and the strict one (False past a sample's own visible
    count, also where it is 0) for cross-attention."""
    if k is None:
        k = int(n_visible.max()) if n_visible.numel() else 0
    k = min(k, x.shape[1])
    idx = ids_shuffle[:, :k]
    seq = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    pos = torch.arange(k, device=x.device)
    # A sample with nothing visible attends to one dummy key in self-attention instead of an
    # empty softmax (NaN); its outputs are discarded afterwards. The dummy is a masked patch, so
    # the other modality's cross-attention gets the strict validity, without it. (No in-place
    # update: ONNX has none.)
    strict = pos < n_visible[:, None]
    valid = strict | ((pos == 0) & (n_visible == 0)[:, None])
    return seq, valid, strict


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
