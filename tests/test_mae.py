"""MAE invariants on tiny models: patching, exact mask counts, visible-only encoder, loss and
gradient only where masked, padding inert, overfit, determinism, modalities, fusion, bf16."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from vqmae.config import MAEConfig, load_config
from vqmae.models.layout import MAEDims, ModalityDims, flops_per_window, patch_layout, sincos_positions
from vqmae.models.mae import MAEModel
from vqmae.models.masking import masking_from

# Paper patch sizes on smaller grids: visual 8×8 tokens × 50 frames → 2×2×10 = 40 tubes of 80 ids,
# audio 8 tokens × 100 frames → 2×10 = 20 patches of 40 ids; 10 time steps in both.
DIMS = MAEDims(audio=ModalityDims(16, (8,), 100), visual=ModalityDims(32, (8, 8), 50))
CFG = MAEConfig(width=32, heads=2, mlp_ratio=2.0, encoder_depth=2, decoder_depth=1, head_dim=0)
PAPER_DIMS = MAEDims(audio=ModalityDims(256, (64,), 100), visual=ModalityDims(512, (24, 24), 50))
SPECS = {"audio": {"codebook_size": 256, "grid": [64], "frame_rate": 50.0, "tokenizer_sha256": "a"},
         "visual": {"codebook_size": 512, "grid": [24, 24], "frame_rate": 25.0,
                    "tokenizer_sha256": "v"}}


def make_batch(b: int = 4, seed: int = 0, dims: MAEDims = DIMS, pad: bool = True) -> dict:
    """Random codes; sample 1 is a 1.2 s clip (padded after frame 30 / 60), sample 2 a 0.9 s one
    (its last valid patch is partly padded)."""
    g = torch.Generator().manual_seed(seed)
    batch = {}
    for m in ("audio", "visual"):
        d = dims.get(m)
        batch[m] = torch.randint(0, d.codebook_size, (b, d.frames, *d.grid), generator=g)
        valid = torch.ones(b, d.frames, dtype=torch.bool)
        if pad:
            per_s = d.frames // 2
            valid[1, int(1.2 * per_s):] = False
            valid[2, int(0.9 * per_s):] = False
        batch[f"{m}_valid"] = valid
    return batch


def model(seed: int = 0, **overrides) -> MAEModel:
    torch.manual_seed(seed)
    return MAEModel(replace(CFG, **overrides), DIMS)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- patching ----------------------------------------------------------------------------------

def test_patchify_round_trip_and_layout():
    cfg = MAEConfig()
    vis = patch_layout("visual", PAPER_DIMS.visual, cfg)
    aud = patch_layout("audio", PAPER_DIMS.audio, cfg)
    assert (vis.n_patches, vis.patch_ids, aud.n_patches, aud.patch_ids) == (360, 80, 160, 40)
    b = make_batch(2, dims=PAPER_DIMS, pad=False)
    pv = vis.patchify(b["visual"])  # [2, 360, 80]
    pa = aud.patchify(b["audio"])  # [2, 160, 40]
    assert pv.shape == (2, 360, 80) and pa.shape == (2, 160, 40)
    assert torch.equal(vis.unpatchify(pv), b["visual"])
    assert torch.equal(aud.unpatchify(pa), b["audio"])
    # time-major: tube 0 = frames 0-4, rows 0-3, cols 0-3; tube 37 = time step 1, row 0, col 1
    assert torch.equal(pv[:, 0], b["visual"][:, 0:5, 0:4, 0:4].reshape(2, 80))
    assert torch.equal(pv[:, 37], b["visual"][:, 5:10, 0:4, 4:8].reshape(2, 80))
    assert torch.equal(pa[:, 17], b["audio"][:, 10:20, 4:8].reshape(2, 40))
    assert vis.time_index()[37] == 1 and aud.time_index()[17] == 1
    # trailing dims (logits) follow the ids back into place
    logits = torch.randn(2, 160, 40, 3)
    assert torch.equal(aud.patchify(aud.unpatchify(logits)[..., 1]), logits[..., 1])


def test_sincos_positions_code_time_and_grid_in_patch_order():
    m = model()
    lay_a, lay_v = m.layouts["audio"], m.layouts["visual"]
    pa, pv = sincos_positions(lay_a, 32)[0], sincos_positions(lay_v, 32)[0]
    assert pa.shape == (lay_a.n_patches, 32) and pv.shape == (lay_v.n_patches, 32)
    d_time = 32 // 3 // 2 * 2
    ta, tv = lay_a.time_index(), lay_v.time_index()
    # the time channels depend on the time step only, and equally in both modalities
    for t in range(lay_v.n_time):
        assert torch.allclose(pv[tv == t, :d_time], pa[ta == t][0, :d_time].expand(int((tv == t).sum()), -1))
    assert not torch.allclose(pv[tv == 0, :d_time][0], pv[tv == 1, :d_time][0])
    # every patch of a modality has its own code
    assert torch.cdist(pv, pv).add(torch.eye(len(pv)) * 9).min() > 1e-3
    assert torch.cdist(pa, pa).add(torch.eye(len(pa)) * 9).min() > 1e-3
    # patch 1 is the next grid column of patch 0 (time-major, then rows, then columns)
    assert torch.allclose(pv[0, :d_time], pv[1, :d_time])
    # the model starts from them (learnable), or from small random values
    assert torch.allclose(m.enc_pos["visual"].detach()[0], pv) and m.enc_pos["visual"].requires_grad
    assert torch.allclose(m.dec_pos["audio"].detach()[0], pa)
    assert model(pos_init="random").enc_pos["visual"].abs().max() < 0.1
    with pytest.raises(ValueError, match="pos_init"):
        model(pos_init="rope")


@pytest.mark.parametrize("field,value,message", [
    ("visual_tube", (5, 4, 5), "grid axis 0 has 24 tokens, not divisible by patch size 5"),
    ("visual_tube", (4, 4, 7), "window of 50 frames is not divisible by 7"),
    ("audio_patch", (3, 10), "grid axis 0 has 64 tokens, not divisible by patch size 3"),
    ("audio_patch", (4, 3), "window of 100 frames is not divisible by 3"),
    ("audio_patch", (4, 4, 10), "expected 2 positive sizes"),
    ("window_seconds", 2.01, "not a whole number"),
    ("heads", 3, "width=320 is not divisible by mae.heads=3"),
])
def test_divisibility_errors(field, value, message):
    with pytest.raises(ValueError, match=message):
        MAEModel(replace(MAEConfig(encoder_depth=1, decoder_depth=1), **{field: value}), SPECS)


def test_dims_from_specs_and_round_trip():
    from vqmae.store import ModalitySpec

    specs = {m: ModalitySpec.from_dict(m, s) for m, s in SPECS.items()}
    dims = MAEDims.from_specs(specs, MAEConfig())
    assert dims == PAPER_DIMS == MAEDims.from_specs(SPECS, MAEConfig())
    assert MAEDims.from_dict(dims.to_dict()) == dims
    audio_only = MAEDims.from_specs({"audio": SPECS["audio"]}, MAEConfig())
    assert audio_only.visual is None
    with pytest.raises(ValueError, match="needs visual codes"):
        MAEModel(MAEConfig(modalities="av", encoder_depth=1, decoder_depth=1), audio_only)
    # "auto" (the default) takes the modalities the dims have
    assert MAEModel(MAEConfig(encoder_depth=1, decoder_depth=1), audio_only).names == ("audio",)
    assert MAEModel(MAEConfig(encoder_depth=1, decoder_depth=1), dims).names == ("audio", "visual")


# -- masking -----------------------------------------------------------------------------------

def _masking(strategy: str, seed: int = 0, b: int = 16, **cfg):
    m = model(masking=strategy, **cfg)
    batch = make_batch(b, seed)
    inp = m.prepare(batch)
    return m, inp, m.sample_masking(inp.padding, gen(seed))


def _check_order(masking):
    for name, mask in masking.mask.items():
        shuffle, restore = masking.ids_shuffle[name], masking.ids_restore[name]
        b, n = mask.shape
        assert torch.equal(torch.gather(shuffle, 1, restore), torch.arange(n).expand(b, n))
        assert not (mask & masking.padding[name]).any(), "padding is never masked"
        visible = masking.visible(name)
        assert torch.equal(masking.n_visible[name], visible.sum(1))
        for i in range(b):  # visible first, then masked, then padding
            k, km = int(visible[i].sum()), int(mask[i].sum())
            assert visible[i, shuffle[i, :k]].all()
            assert mask[i, shuffle[i, k:k + km]].all()
            assert masking.padding[name][i, shuffle[i, k + km:]].all()


def test_fixed_masking_exact_counts_and_restore():
    _, inp, mk = _masking("fixed", mask_ratio_audio=0.75, mask_ratio_visual=0.3)
    n_valid = {m: (~p).sum(1) for m, p in inp.padding.items()}
    assert n_valid["visual"][:3].tolist() == [40, 24, 20]
    assert n_valid["audio"][:3].tolist() == [20, 12, 10]
    assert torch.equal(mk.mask["audio"].sum(1), torch.round(0.75 * n_valid["audio"]).long())
    assert torch.equal(mk.mask["visual"].sum(1), torch.round(0.3 * n_valid["visual"]).long())
    _check_order(mk)
    # per clip: different samples mask different patches
    assert not torch.equal(mk.mask["visual"][0], mk.mask["visual"][3])


def test_coupled_masking_ratios_sum_to_one():
    _, inp, mk = _masking("coupled", b=64)
    r = {m: mk.mask[m].sum(1) / (~inp.padding[m]).sum(1) for m in ("audio", "visual")}
    slack = 0.5 / (~inp.padding["audio"]).sum(1) + 0.5 / (~inp.padding["visual"]).sum(1)
    assert ((r["audio"] + r["visual"] - 1).abs() <= slack + 1e-6).all()
    assert r["visual"].std() > 0.2 and 0.3 < r["visual"].mean() < 0.7  # U(0, 1), per clip
    assert (sum(mk.n_visible.values()) >= 1).all()
    _check_order(mk)


def test_coupled_batch_masking_shares_one_ratio_and_pads_nothing():
    """One Dirichlet draw per batch: every full-length clip keeps the same visible count (the
    encoder input has no padding), the two ratios sum to one, and the ratio changes per batch."""
    ratios = []
    for seed in range(6):
        _, inp, mk = _masking("coupled_batch", seed=seed, b=8)
        full = ~inp.padding["visual"].any(1) & ~inp.padding["audio"].any(1)
        assert full.sum() >= 2
        for m in ("audio", "visual"):
            assert mk.n_visible[m][full].unique().numel() == 1
        r = {m: mk.mask[m].sum(1) / (~inp.padding[m]).sum(1) for m in ("audio", "visual")}
        slack = 0.5 / (~inp.padding["audio"]).sum(1) + 0.5 / (~inp.padding["visual"]).sum(1)
        assert ((r["audio"] + r["visual"] - 1).abs() <= slack + 1e-6).all()
        ratios.append(float(r["visual"][full][0]))
        _check_order(mk)
    assert max(ratios) - min(ratios) > 0.2


def test_time_masking_masks_whole_aligned_steps():
    m, inp, mk = _masking("time", mask_ratio_audio=0.4, mask_ratio_visual=0.4)
    steps = {}
    for name in ("audio", "visual"):
        lay = m.layouts[name]
        per_step = mk.mask[name].view(-1, lay.n_time, lay.n_patches // lay.n_time)  # [B, 10, S]
        assert (per_step.all(-1) == per_step.any(-1)).all(), "whole time steps only"
        steps[name] = per_step.any(-1)
    assert torch.equal(steps["audio"], steps["visual"]), "same time steps in both modalities"
    n_steps = (~inp.padding["visual"]).view(-1, 10, 4).any(-1).sum(1)
    assert torch.equal(steps["visual"].sum(1), torch.round(0.4 * n_steps).long())
    _check_order(mk)


def test_time_masking_nested_when_ratios_differ():
    _, _, mk = _masking("time", mask_ratio_audio=0.2, mask_ratio_visual=0.6)
    a = mk.mask["audio"].view(-1, 10, 2).any(-1)
    v = mk.mask["visual"].view(-1, 10, 4).any(-1)
    assert (a <= v).all() and (a.sum(1) < v.sum(1)).all()


def test_cross_modal_masking_and_one_visible_kept():
    _, inp, mk = _masking("audio2visual")
    assert torch.equal(mk.mask["visual"], ~inp.padding["visual"]) and not mk.mask["audio"].any()
    _, inp, mk = _masking("visual2audio")
    assert torch.equal(mk.mask["audio"], ~inp.padding["audio"]) and not mk.mask["visual"].any()
    # a clip without audio frames: audio2visual would hide everything; one visual patch stays
    m = model(masking="audio2visual")
    batch = make_batch(3)
    batch["audio_valid"][0] = False
    mk = m.sample_masking(m.prepare(batch).padding, gen(0))
    assert mk.n_visible["visual"][0] == 1 and mk.mask["visual"][0].sum() == 39
    _check_order(mk)
    with pytest.raises(ValueError, match="masking='audio2visual' needs mae.modalities='av'"):
        model(masking="audio2visual", modalities="audio")


# -- encoder, loss, gradients ------------------------------------------------------------------

def test_encoder_sees_visible_patches_only():
    m = model()
    seen = []
    m.encoder[0].register_forward_hook(lambda mod, args, out: seen.append((args[0].shape, args[1])))
    out = m(make_batch(), gen(3))
    n_vis = sum((~out.mask[k] & ~m.prepare(make_batch()).padding[k]).sum(1) for k in out.mask)
    (shape, key_valid), = seen
    assert shape[1] == int(n_vis.max()), "padded to the largest visible count only"
    assert torch.equal(key_valid.sum(1), n_vis)
    # fixed ratio, no padding: the sequence is exactly the visible patches
    seen.clear()
    m = model(masking="fixed", mask_ratio_audio=0.5, mask_ratio_visual=0.75)
    m.encoder[0].register_forward_hook(lambda mod, args, out: seen.append(args[0].shape))
    m(make_batch(pad=False), gen(0))
    assert seen[0][1] == 10 + 10


def test_loss_only_on_masked_targets():
    m = model().eval()
    batch = make_batch()
    with torch.no_grad():
        inp = m.prepare(batch)
        mk = m.sample_masking(inp.padding, gen(5))
        dec = m.decode(m.encode_visible(m.embed(inp), mk), mk)
        base, _ = m.reconstruction_loss(inp, mk, dec)
        for name in ("audio", "visual"):
            vis_i = mk.visible(name)[0].nonzero()[0, 0]
            msk_i = mk.mask[name][0].nonzero()[0, 0]
            ids = inp.ids[name].clone()
            ids[0, vis_i] = (ids[0, vis_i] + 1) % DIMS.get(name).codebook_size
            same, _ = m.reconstruction_loss(replace(inp, ids={**inp.ids, name: ids}), mk, dec)
            assert same == base
            ids = inp.ids[name].clone()
            ids[0, msk_i] = (ids[0, msk_i] + 1) % DIMS.get(name).codebook_size
            moved, _ = m.reconstruction_loss(replace(inp, ids={**inp.ids, name: ids}), mk, dec)
            assert moved != base


def test_masked_codes_do_not_leak_into_predictions():
    m = model().eval()
    batch = make_batch()
    with torch.no_grad():
        out = m(batch, gen(5), return_logits=True)
        changed = {k: v.clone() for k, v in batch.items()}
        lay = m.layouts["visual"]
        ids = lay.patchify(changed["visual"])
        i = out.mask["visual"][0].nonzero()[0, 0]
        ids[0, i] = (ids[0, i] + 7) % 32
        changed["visual"] = lay.unpatchify(ids)
        again = m(changed, gen(5), return_logits=True)
    assert torch.equal(again.logits["visual"], out.logits["visual"])
    assert torch.equal(again.logits["audio"], out.logits["audio"])
    assert again.loss != out.loss
    assert out.logits["visual"].shape == (4, 40, 80, 32)
    assert out.logits["audio"].shape == (4, 20, 40, 16)


def test_padding_is_inert():
    m = model().eval()
    batch = make_batch()
    noisy = {k: v.clone() for k, v in batch.items()}
    for name in ("audio", "visual"):
        pad = ~noisy[f"{name}_valid"]
        noisy[name][pad] = torch.randint(0, 1000, (int(pad.sum()), *noisy[name].shape[2:]))
    with torch.no_grad():
        a = m(batch, gen(2), return_logits=True)
        b = m(noisy, gen(2), return_logits=True)  # out-of-codebook ids on padded frames are fine
        fa, fb = m.encode(batch), m.encode(noisy)
    assert a.loss == b.loss
    padding = m.prepare(batch).padding
    for name in ("audio", "visual"):
        keep = ~padding[name]
        assert torch.equal(a.logits[name][keep], b.logits[name][keep])
        assert torch.equal(fa.features[name], fb.features[name])
        assert torch.equal(fa.visible[name], keep)
        assert not (a.mask[name] & padding[name]).any()
    # sample 2's last valid visual tube (frames 20-24, valid up to 21) is partly padded and still counts
    assert padding["visual"][2].view(10, 4).all(-1).tolist() == [False] * 5 + [True] * 5


def test_no_gradient_reaches_masked_or_padded_inputs():
    m = model()
    grabbed = {}

    def keep(name):
        def hook(mod, args, out):
            out.retain_grad()
            grabbed[name] = out  # [B, N, P, e]
        return hook

    for name in ("audio", "visual"):
        m.token_embed[name].register_forward_hook(keep(name))
    out = m(make_batch(), gen(4))
    out.loss.backward()
    padding = m.prepare(make_batch()).padding
    for name, emb in grabbed.items():
        g = emb.grad.abs().sum((-1, -2))  # [B, N]
        assert (g[out.mask[name]] == 0).all(), f"{name}: gradient reached masked inputs"
        assert (g[padding[name]] == 0).all()
        assert (g[~out.mask[name] & ~padding[name]] > 0).all()


def test_contrastive_term_and_metric_keys():
    batch = make_batch(6)
    plain = model()(batch, gen(1))
    assert set(plain.metrics) == {"loss/audio_ce", "loss/visual_ce", "acc/audio", "acc/visual",
                                  "loss/contrastive", "mask/audio", "mask/visual"}
    ce = plain.metrics["loss/audio_ce"] + plain.metrics["loss/visual_ce"]
    assert torch.allclose(plain.loss, ce)
    with_c = model(contrastive_weight=0.5)(batch, gen(1))
    assert torch.allclose(with_c.loss, ce + 0.5 * plain.metrics["loss/contrastive"])
    assert plain.metrics["loss/contrastive"] > 0
    # audio2visual: audio has no masked tokens (no CE key), contrastive has no visual summary
    a2v = model(masking="audio2visual")(batch, gen(1))
    assert "loss/audio_ce" not in a2v.metrics and a2v.metrics["loss/contrastive"] == 0
    assert torch.isfinite(a2v.loss)


# -- training behaviour ------------------------------------------------------------------------

def test_overfits_one_batch():
    m = model(seed=1)
    batch = make_batch(4, pad=False)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        out = m(batch, gen(0))  # one batch, one mask: pure memorisation
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.2 * losses[0], losses[::10]
    assert out.metrics["acc/visual"] > 0.9 and out.metrics["acc/audio"] > 0.9


def test_same_seed_same_loss():
    batch = make_batch()
    a = [model(seed=7)(batch, gen(s)).loss.item() for s in (0, 0, 1)]
    assert a[0] == a[1] != a[2]
    assert model(seed=8)(batch, gen(0)).loss.item() != a[0]

    def trace() -> list[float]:  # three optimiser steps, masks from one seeded generator
        m, g = model(seed=3), gen(11)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        out = []
        for _ in range(3):
            loss = m(batch, g).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.item())
        return out

    assert trace() == trace()


@pytest.mark.parametrize("modality", ["audio", "visual"])
def test_single_modality(modality):
    m = model(modalities=modality)
    assert set(m.layouts) == {modality}
    batch = {k: v for k, v in make_batch().items() if k.startswith(modality)}
    out = m(batch, gen(0))
    assert set(out.mask) == {modality} and torch.isfinite(out.loss)
    assert set(out.metrics) == {f"loss/{modality}_ce", f"acc/{modality}", f"mask/{modality}"}
    out.loss.backward()
    enc = m.encode(batch)
    assert enc.features[modality].shape == (4, {"audio": 20, "visual": 40}[modality], 32)


def test_cross_fusion_runs_and_differs():
    batch = make_batch()
    joint, cross = model(), model(fusion="cross")
    assert cross.num_params() > joint.num_params()
    out = cross(batch, gen(0))
    assert torch.isfinite(out.loss) and out.loss != joint(batch, gen(0)).loss
    out.loss.backward()
    assert cross.encoder.cross_blocks["audio"][0].attn.q.weight.grad.abs().sum() > 0
    a2v = model(fusion="cross", masking="audio2visual")(batch, gen(0))  # no visual keys at all
    assert torch.isfinite(a2v.loss)
    enc = cross.encode(batch)
    assert enc.features["visual"].shape == (4, 40, 32)


def test_bf16_autocast_cpu():
    m = model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(make_batch(), gen(0), return_logits=True)
    assert out.logits["visual"].dtype == torch.bfloat16
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_given_mask_and_encode():
    m = model().eval()
    batch = make_batch()
    padding = m.prepare(batch).padding
    hide = {k: torch.zeros_like(p) for k, p in padding.items()}
    hide["visual"][:, :4] = True  # first time step of video hidden
    enc = m.encode(batch, hide)
    assert (enc.features["visual"][:, :4] == 0).all()
    assert torch.equal(enc.visible["visual"], ~hide["visual"] & ~padding["visual"])
    out = m(batch, None, mask=hide)
    assert torch.equal(out.mask["visual"], hide["visual"]) and not out.mask["audio"].any()
    assert torch.equal(masking_from(hide, padding).mask["visual"], hide["visual"])
    # a caller may hide a whole sample (modality dropout): finite, zero features for it alone
    for fusion in ("joint", "cross"):
        m = model(fusion=fusion).eval()
        with torch.no_grad():
            full = m.encode(batch)
            gone = m.encode(batch, {"audio": torch.ones(4, 20, dtype=torch.bool),
                                    "visual": torch.arange(4)[:, None].expand(4, 40) == 0})
        assert (gone.features["visual"][0] == 0).all() and (gone.features["audio"] == 0).all()
        assert torch.isfinite(gone.features["visual"]).all()
        assert not torch.allclose(gone.features["visual"][1:], full.features["visual"][1:])


# -- bad input ---------------------------------------------------------------------------------

def test_bad_batches_name_the_key_and_reason():
    m = model()
    batch = make_batch()
    with pytest.raises(ValueError, match=r"batch\['visual'\]: codes of shape \(4, 49, 8, 8\), "
                                         r"expected \[B, 50, 8, 8\]"):
        m({**batch, "visual": batch["visual"][:, :49]}, gen(0))
    with pytest.raises(ValueError, match="batch has no 'audio' codes"):
        m({k: v for k, v in batch.items() if not k.startswith("audio")}, gen(0))
    with pytest.raises(ValueError, match="codes must be integers, got torch.float32"):
        m({**batch, "audio": batch["audio"].float()}, gen(0))
    bad = batch["audio"].clone()
    bad[0, 0, 0] = 16
    with pytest.raises(ValueError, match=r"batch\['audio'\]: ids in \[0, 16\] outside "
                                         r"the codebook \[0, 16\)"):
        m({**batch, "audio": bad}, gen(0))
    with pytest.raises(ValueError, match=r"batch\['visual_valid'\]: shape \(4, 10\)"):
        m({**batch, "visual_valid": torch.ones(4, 10, dtype=torch.bool)}, gen(0))
    # flat store rows [B, T, 64] are accepted for the 8×8 grid
    flat = {**batch, "visual": batch["visual"].flatten(2)}
    assert m(flat, gen(0)).loss == m(batch, gen(0)).loss


# -- size and cost -----------------------------------------------------------------------------

def test_paper_size_and_flops():
    cfg = load_config("paper", ["mae.head_dim=0"]).mae  # the dense head
    m = MAEModel(cfg, SPECS)
    blocks = sum(p.numel() for p in [*m.encoder.parameters(), *m.decoder.parameters()])
    heads = sum(p.numel() for p in m.head.parameters())
    assert 7.3e6 < blocks < 7.5e6  # docs/design.md §7's 7.4 M: the nine transformer blocks
    assert heads == 320 * 80 * 512 + 80 * 512 + 320 * 40 * 256 + 40 * 256
    flops = flops_per_window(cfg, m.dims)
    # 6 × block params × tokens seen (260 encoder + 520 decoder at 50 % masking) is the bulk
    bulk = 6 * (blocks * 6 / 9 * 260 + blocks * 3 / 9 * 520)
    assert bulk < flops < bulk + 6 * heads * 260 + 5e9
    # more masking: a shorter encoder sequence but more patches through the heads
    enc_saved = 6 * 6 * (blocks / 9) * 130 + 3 * 6 * 4 * (260**2 - 130**2) * 320
    heads_added = 6 * (320 * 40960 * 90 + 320 * 10240 * 40)
    delta = flops_per_window(cfg, m.dims, 0.75) - flops
    assert delta == pytest.approx(heads_added - enc_saved, rel=0.01)
    assert flops_per_window(replace(cfg, fusion="cross"), m.dims) != flops


def test_factorised_head():
    cfg = load_config("paper", ["mae.head_dim=16"]).mae
    m = MAEModel(cfg, SPECS)
    heads = sum(p.numel() for p in m.head.parameters())
    assert heads == (320 * 80 * 16 + 80 * 16 + 16 * 512 + 512
                     + 320 * 40 * 16 + 40 * 16 + 16 * 256 + 256)
    assert 8.3e6 < m.num_params() < 8.5e6
    flops = flops_per_window(cfg, m.dims)
    assert 20e9 < flops < 22e9 < flops_per_window(replace(cfg, head_dim=0), m.dims)
    small = model(head_dim=8)
    out = small(make_batch(), gen(0), return_logits=True)
    assert out.logits["visual"].shape == (4, 40, 80, 32) and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="head_dim=-2: expected -1"):
        model(head_dim=-2)


def test_paper_head_reads_one_slice_of_the_width_per_id():
    """The paper preset's head: the decoder feature is n_ids slices (4 × 80 visual, 8 × 40 audio),
    each scored by one shared Linear(slice → codebook); changing one slice changes only that id's
    logits."""
    cfg = load_config("paper").mae
    assert cfg.head_dim == -1
    m = MAEModel(cfg, SPECS)
    heads = sum(p.numel() for p in m.head.parameters())
    assert heads == 4 * 512 + 512 + 8 * 256 + 256
    assert flops_per_window(cfg, m.dims) < flops_per_window(replace(cfg, head_dim=16), m.dims)
    h = torch.randn(3, 320)
    out = m.head["visual"](h)
    assert out.shape == (3, 80, 512)
    h2 = h.clone()
    h2[:, 4 * 7:4 * 8] += 1.0  # slice of id 7
    changed = (m.head["visual"](h2) - out).abs().amax(-1) > 0  # [3, 80]
    assert changed[:, 7].all() and changed.sum() == 3
    with pytest.raises(ValueError, match="mae.width=64 is not divisible by the 40 ids"):
        model(head_dim=-1, width=64)


def test_unigram_prior_starts_the_head_at_each_positions_most_frequent_code():
    """With the head's own output zeroed, the prior alone predicts each grid cell's most frequent
    code, for the masked-patch path of the loss and the every-patch path alike; an old checkpoint
    without prior buffers loads with a zero prior."""
    m = model(seed=1, unigram_prior=True)
    g = torch.Generator().manual_seed(3)
    counts = {k: torch.randint(0, 50, (int(torch.tensor(DIMS.get(k).grid).prod()), DIMS.get(k).codebook_size),
                               generator=g) for k in m.names}
    for k in m.names:
        m.set_prior(k, counts[k])
        torch.nn.init.zeros_(m.head[k].proj.weight)
        torch.nn.init.zeros_(m.head[k].proj.bias)
    batch = make_batch(pad=False)
    out = m(batch, gen(0), return_logits=True)
    for k in m.names:
        mode = counts[k].argmax(1)  # [K]
        lay = m.layouts[k]
        cells = torch.arange(len(mode)).view(1, 1, *lay.grid).expand(1, lay.frames, *lay.grid)
        want = mode[lay.patchify(cells)[0]]  # [N, P]
        assert torch.equal(out.logits[k].argmax(-1), want.expand_as(out.logits[k].argmax(-1)))
        mask = out.mask[k]
        rows = m.logits(k, torch.zeros(int(mask.sum()), CFG.width), mask.nonzero(as_tuple=True)[1])
        assert torch.equal(rows.argmax(-1), want[mask.nonzero(as_tuple=True)[1]])
    old = {k: v for k, v in m.state_dict().items() if not k.startswith("prior.")}
    fresh = model(seed=1, unigram_prior=True)
    fresh.load_state_dict(old)
    assert all((fresh.prior.get_buffer(k) == 0).all() for k in fresh.names)
    with pytest.raises(ValueError, match="prior counts"):
        m.set_prior("audio", torch.ones(3, 3))


def test_ce_denominator_splits_a_batch_exactly():
    """Two half batches with the global count / 2 as denominator: their mean loss, gradient and
    metrics equal the whole batch's (what DDP's gradient averaging relies on)."""
    m = model(contrastive_weight=0.0)
    batch = make_batch(4)
    inp = m.prepare(batch)
    mask = m.sample_masking(inp.padding, gen(3)).mask
    count = {n: inp.token_valid[n][mask[n]].sum() for n in m.names}
    full = m(batch, None, mask=mask)
    full.loss.backward()
    want = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
    parts, grads = [], {k: 0.0 for k in want}
    for sl in (slice(0, 2), slice(2, 4)):
        m.zero_grad()
        out = m({k: v[sl] for k, v in batch.items()}, None, mask={n: mask[n][sl] for n in m.names},
                ce_denominator={n: c / 2 for n, c in count.items()})
        out.loss.backward()
        parts.append(out)
        grads = {k: grads[k] + m.get_parameter(k).grad / 2 for k in want}
    assert torch.allclose((parts[0].loss + parts[1].loss) / 2, full.loss, rtol=1e-5)
    for key in ("loss/audio_ce", "loss/visual_ce", "acc/audio", "acc/visual"):
        assert torch.allclose((parts[0].metrics[key] + parts[1].metrics[key]) / 2,
                              full.metrics[key], rtol=1e-5)
    assert all(torch.allclose(grads[k], want[k], rtol=1e-4, atol=1e-7) for k in want)
    # a zero global count: no loss, NaN metrics, but the keys are there on every rank
    none = m(batch, None, mask={n: torch.zeros_like(mask[n]) for n in m.names},
             ce_denominator={n: 0.0 for n in m.names})
    assert torch.isnan(none.metrics["loss/audio_ce"]) and torch.isnan(none.metrics["acc/visual"])
    assert none.loss == 0


def test_chunked_masked_ce_equals_the_whole_loss_and_its_gradient():
    """Above the logits budget the loss runs in checkpointed chunks: the same sum, hits and
    gradients as one pass over every masked patch; IGNORE targets count nowhere."""
    from vqmae.models.heads import IGNORE, Head, masked_ce
    torch.manual_seed(0)
    head = Head(32, 8, 50, 16)
    h = torch.randn(37, 32, requires_grad=True)
    target = torch.randint(0, 50, (37, 8))
    target[3, :4] = IGNORE
    patches = torch.arange(37)
    results = []
    # one pass; checkpointed chunks of 5 patches; the fused linear CE in one and in 7-row chunks
    for budget, fused in ((10 ** 9, None), (8 * 50 * 5, None), (10 ** 9, head), (50 * 7, head)):
        head.zero_grad()
        h.grad = None
        total, hits = masked_ce(lambda x, p: head(x), h, patches, target, 50, budget=budget, head=fused)
        (2.0 * total).backward()
        results.append((total.detach(), hits, h.grad.clone(), head.classify.weight.grad.clone(),
                        head.classify.bias.grad.clone(), head.proj.weight.grad.clone()))
    t1, n1, g1, w1, b1, p1 = results[0]
    for t2, n2, g2, w2, b2, p2 in results[1:]:
        assert torch.allclose(t1, t2, rtol=1e-5) and int(n1) == int(n2)
        assert torch.allclose(g1, g2, atol=1e-5) and torch.allclose(w1, w2, atol=1e-4)
        assert torch.allclose(b1, b2, atol=1e-4) and torch.allclose(p1, p2, atol=1e-4)
    logits = head(h).detach()
    keep = target != IGNORE
    expect = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
    assert torch.allclose(t1, expect, rtol=1e-5)
    assert int(n1) == int((logits.argmax(-1) == target)[keep].sum())


def test_lean_mlp_matches_the_modules_and_keeps_less_for_backward():
    """The block's fp32 training MLP recomputes its GELU in backward: the same output and gradients
    as the modules applied one by one, with the GELU's output not kept."""
    from vqmae.models.transformer import Block
    torch.manual_seed(0)
    block = Block(32, 4, 2.0, 0.0).train()
    x = torch.randn(3, 7, 32, requires_grad=True)
    g = torch.randn(3, 7, 32)
    saved: list[torch.Size] = []
    out = {}
    for lean in (True, False):
        block.zero_grad()
        x.grad = None
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
            h = block.norm2(x)
            y = (h + (block.mlp(h) if not lean else _lean(block, h)))
        (y * g).sum().backward()
        out[lean] = (y.detach(), x.grad.clone(), [p.grad.clone() for p in block.mlp.parameters()],
                     sum(1 for s in saved if s.numel() == 3 * 7 * 64))
    assert torch.allclose(out[True][0], out[False][0], atol=1e-6)
    assert torch.allclose(out[True][1], out[False][1], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(out[True][2], out[False][2]))
    assert out[True][3] == 1 and out[False][3] == 2  # hidden-width tensors kept: h only vs h and GELU(h)


def _lean(block, h):
    from vqmae.models.transformer import _mlp
    return _mlp(block.mlp, h)
