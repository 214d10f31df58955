"""The stage-3 model: encoder loading, pooling, absent modalities."""

from __future__ import annotations

import pytest
import torch

from vqmae.models.classifier import (EmotionModel, center_table, drop_modality, load_encoder, mean_center,
                                     presence_pattern, segment_pool)
from vqmae.config import MAEConfig
from vqmae.models.layout import MAEDims, ModalityDims
from vqmae.models.mae import MAEModel

CFG = MAEConfig(width=32, heads=2, encoder_depth=1, decoder_depth=1, head_dim=8, window_seconds=0.4)
DIMS = MAEDims(audio=ModalityDims(16, (8,), 20), visual=ModalityDims(8, (8, 8), 10))


def batch(b: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"audio": torch.randint(0, 16, (b, 20, 8), generator=g),
            "visual": torch.randint(0, 8, (b, 10, 8, 8), generator=g),
            "audio_valid": torch.ones(b, 20, dtype=torch.bool),
            "visual_valid": torch.ones(b, 10, dtype=torch.bool)}


@pytest.mark.parametrize("pooling", ["attention", "mean", "cls", "stats", "position"])
def test_shapes_and_pretrained_encoder_loads(pooling):
    torch.manual_seed(0)
    mae = MAEModel(CFG, DIMS).eval()
    model = EmotionModel(CFG, DIMS, 5, pooling).eval()
    load_encoder(model, mae.state_dict())
    x = batch()
    assert model(x).shape == (3, 5)
    ref, got = mae.encode(x), model.backbone.encode(x)
    for m in ("audio", "visual"):
        torch.testing.assert_close(got.features[m], ref.features[m])


def test_position_pooling_keeps_each_spatial_position():
    """``position``: per modality, the mean over time at each spatial patch position over visible
    patches, concatenated and zero-padded to the widest modality (`pool_dim`)."""
    torch.manual_seed(0)
    model = EmotionModel(CFG, DIMS, 4, "position").eval()
    lay = {m: model.backbone.layouts[m] for m in ("audio", "visual")}
    n_pos = {m: lay[m].n_patches // lay[m].n_time for m in lay}
    assert model.pool_dim == 32 * max(n_pos.values()) and model.out.in_features == 2 * model.pool_dim
    x = batch()
    x["audio_valid"][0, 10:] = False  # a padded tail: those patches do not count
    enc = model.backbone.encode(x)
    pooled, present = model.pooled(x)
    assert present.all()
    for i, m in enumerate(("audio", "visual")):
        f = enc.features[m].view(3, lay[m].n_time, n_pos[m], 32)
        vis = enc.visible[m].view(3, lay[m].n_time, n_pos[m], 1).float()
        want = ((f * vis).sum(1) / vis.sum(1)).flatten(1)
        torch.testing.assert_close(pooled[:, i, :want.shape[1]], want)
        assert (pooled[:, i, want.shape[1]:] == 0).all()
    assert enc.visible["audio"][0].sum() < enc.visible["audio"][1].sum()


def test_encoder_mismatch_names_the_keys():
    other = MAEModel(MAEConfig(**{**CFG.__dict__, "encoder_depth": 2}), DIMS)
    with pytest.raises(ValueError, match="unexpected.*encoder.1"):
        load_encoder(EmotionModel(CFG, DIMS, 3), other.state_dict())


def test_decoder_side_is_removed():
    names = {n for n, _ in EmotionModel(CFG, DIMS, 3).named_parameters()}
    assert not any(n.startswith(("backbone.decoder", "backbone.head", "backbone.mask_token",
                                 "backbone.dec_")) for n in names)


@pytest.mark.parametrize("pooling", ["attention", "mean", "cls", "stats", "position"])
def test_absent_modality_ignores_its_codes_and_gets_no_gradient(pooling):
    torch.manual_seed(0)
    model = EmotionModel(CFG, DIMS, 4, pooling).eval()
    a, b = batch(seed=1), batch(seed=2)
    b["audio"] = a["audio"]  # same audio, different video
    ya = model(drop_modality(a, "visual"))
    yb = model(drop_modality(b, "visual"))
    torch.testing.assert_close(ya, yb)
    assert not torch.allclose(model(a), model(b))  # with the video present it matters
    model.zero_grad()
    ya.sum().backward()
    assert model.backbone.token_embed["visual"].weight.grad is None or \
        model.backbone.token_embed["visual"].weight.grad.abs().sum() == 0
    assert model.absent["visual"].grad.abs().sum() > 0
    assert model.absent["audio"].grad is None or model.absent["audio"].grad.abs().sum() == 0


def test_drop_modality_selects_rows():
    x = batch(4)
    out = drop_modality(x, "audio", torch.tensor([True, False, True, False]))
    assert out["audio_valid"].any(1).tolist() == [False, True, False, True]
    assert x["audio_valid"].all()  # the input is not modified


def test_overfits_a_batch():
    torch.manual_seed(0)
    model = EmotionModel(CFG, DIMS, 4, "attention")
    x, y = batch(8, seed=3), torch.arange(8) % 4
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_center_table_means_per_speaker_and_presence_pattern():
    x = torch.arange(6 * 2 * 3, dtype=torch.float32).view(6, 2, 3)
    present = torch.tensor([[1, 1], [1, 1], [1, 0], [1, 1], [0, 1], [1, 1]], dtype=torch.bool)
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    assert presence_pattern(present).tolist() == [3, 3, 1, 3, 2, 3]
    t = center_table(x, present, group, 3)
    assert t.shape == (3, 4, 2, 3)
    torch.testing.assert_close(t[0, 3], (x[0] + x[1]) / 2)
    torch.testing.assert_close(t[0, 1, 0], x[2, 0])
    assert torch.isnan(t[0, 1, 1]).all()  # pattern 1 (first modality only) has no second-modality mean
    torch.testing.assert_close(t[1, 2, 1], x[4, 1])
    assert torch.isnan(t[2]).all() and torch.isnan(t[:, 0]).all()  # no clips / nothing present
    fallback = mean_center(t)
    torch.testing.assert_close(fallback[3], (t[0, 3] + t[1, 3]) / 2)
    torch.testing.assert_close(fallback[1, 0], t[0, 1, 0])
    assert (fallback[0] == 0).all()


def test_speaker_norm_removes_a_per_speaker_offset():
    """A constant shift of one speaker's pooled features (a brighter face, a higher voice, as the
    encoder sees them) leaves that speaker's outputs unchanged when its own mean is subtracted, and
    changes them when the stored fallback mean is used instead."""
    torch.manual_seed(0)
    model = EmotionModel(CFG, DIMS, 4, "attention", speaker_norm=True).eval()
    assert "center" in model.state_dict()
    assert "center" not in EmotionModel(CFG, DIMS, 4, "attention").state_dict()
    x, present = model.pooled(batch(6, seed=5))
    present[4, 1] = False  # one sample lacks the second modality: its own pattern
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    shifted = x + torch.where(group[:, None, None] == 1, torch.randn(1, *x.shape[1:]), 0.0)
    with torch.no_grad():
        out = model.head(x, present, center_table(x, present, group, 2), group)
        out2 = model.head(shifted, present, center_table(shifted, present, group, 2), group)
        torch.testing.assert_close(out, out2, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(model.head(x, present)[3:], model.head(shifted, present)[3:])
        # without a table the stored fallback mean is subtracted (absent modalities stay absent)
        model.center.fill_(0.5)
        manual = EmotionModel(CFG, DIMS, 4, "attention").eval()
        manual.load_state_dict({k: v for k, v in model.state_dict().items() if k != "center"})
        torch.testing.assert_close(model.head(x, present), manual.head(x - 0.5, present))
        bx, bp = model.pooled(batch(6, seed=5))
        torch.testing.assert_close(model(batch(6, seed=5)), manual.head(bx - 0.5, bp))
    with pytest.raises(ValueError, match="needs each sample's group"):
        model.head(x, present, center_table(x, present, group, 2))


def test_top_level_api_resolves_every_export():
    import vqmae

    for name in vqmae._EXPORTS:
        assert callable(getattr(vqmae, name)), name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        vqmae.nope  # noqa: B018


def test_segment_pool_is_a_softmax_within_each_segment():
    g = torch.Generator().manual_seed(0)
    x, score = torch.randn(7, 5, generator=g), torch.randn(7, generator=g)
    seg = torch.tensor([2, 0, 2, 2, 0, 3, 3])
    ok = torch.tensor([True, True, True, False, True, False, False])  # segment 3: nothing present
    out, present = segment_pool(x, ok, score, seg, 4)
    assert present.tolist() == [True, False, True, False]
    for s in (0, 2):
        rows = (seg == s) & ok
        w = torch.softmax(score[rows], 0)
        torch.testing.assert_close(out[s], (w[:, None] * x[rows]).sum(0))
    assert out[1].abs().sum() == 0 and out[3].abs().sum() == 0
    mean, _ = segment_pool(x, ok, None, seg, 4)
    torch.testing.assert_close(mean[2], x[[0, 2]].mean(0))
    big, _ = segment_pool(x, ok, score + 200.0, seg, 4)  # no overflow (exp(200) is inf in float32)
    torch.testing.assert_close(big, out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("clip_pooling", ["attention", "mean"])
def test_clip_outputs_pool_windows_of_each_clip(clip_pooling):
    """A clip's output depends on its own windows only, not on their order or on other clips in
    the batch; a one-window clip's output is that window's."""
    torch.manual_seed(0)
    model = EmotionModel(CFG, DIMS, 3, clip_pooling=clip_pooling).eval()
    with torch.no_grad():
        model.clip_pool["audio"].query.normal_() if clip_pooling == "attention" else None
        x = batch(5, seed=3)
        clip = torch.tensor([0, 0, 1, 0, 2])
        out = model(x, clip=clip, n_clips=3)
        assert out.shape == (3, 3)
        torch.testing.assert_close(out[1], model({k: v[2:3] for k, v in x.items()})[0])
        order = torch.tensor([3, 1, 0])  # clip 0's windows, shuffled, alone in a batch
        alone = model({k: v[order] for k, v in x.items()}, clip=torch.zeros(3, dtype=torch.long), n_clips=1)
        torch.testing.assert_close(alone[0], out[0], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(out[0], model({k: v[:1] for k, v in x.items()})[0])
        # a window whose video is absent does not take part in the clip's visual vector
        v, p = model.pooled(drop_modality(x, "visual", torch.tensor([False, True, False, False, False])))
        cv, cp = model.clip_pooled(v, p, clip, 3)
        v0, _ = model.pooled({k: val[[0, 3]] for k, val in x.items()})
        ref, _ = model.clip_pooled(v0, torch.ones(2, 2, dtype=torch.bool), torch.zeros(2, dtype=torch.long), 1)
        torch.testing.assert_close(cv[0, 1], ref[0, 1], rtol=1e-4, atol=1e-5)
        assert cp.all()
