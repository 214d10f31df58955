"""Stage 2's training step without host syncs: host-known bounds of the mask counts size the
encoder input and the masked rows; the step gives what the count-reading path gives; the whole
forward traces as one graph; `pretrain.compile` compiles every block as one graph."""

from __future__ import annotations

import pytest
import torch

from vqmae.models.masking import masking_from, sample_masking
from tests.test_mae import gen, make_batch, model


@pytest.mark.parametrize("strategy", ["coupled_batch", "fixed", "audio2visual"])
def test_bounds_hold_for_every_sample(strategy):
    """Over many draws, padded samples included, no sample has more visible or masked patches
    than the bounds say; without padding the masked bound is exact."""
    m = model(masking=strategy, mask_ratio_visual=0.7, mask_ratio_audio=0.3)
    for seed in range(40):
        for pad in (True, False):
            inp = m.prepare(make_batch(6, seed, pad=pad))
            mk = m.sample_masking(inp.padding, gen(seed))
            assert mk.bounds is not None
            for name in m.names:
                assert int(mk.n_visible[name].max()) <= mk.bounds.visible[name]
                assert int(mk.mask[name].sum(1).max()) <= mk.bounds.masked[name]
                if not pad:
                    assert int(mk.mask[name].sum(1).max()) == mk.bounds.masked[name]
    # one ratio per sample, drawn on the device: no bounds, the counts are read back
    inp = m.prepare(make_batch(4, 0))
    assert sample_masking("coupled", inp.padding, m.layouts, {}, gen(0)).bounds is None


def test_the_bounded_step_equals_the_count_reading_step():
    """Loss, metrics and every gradient are those of the path that reads the counts from the
    device (boolean masks), padded samples and both fusions included."""
    for fusion in ("joint", "cross"):
        m = model(masking="coupled_batch", fusion=fusion, contrastive_weight=0.5)
        batch = make_batch(5, 3)
        mk = m.sample_masking(m.prepare(batch).padding, gen(3))
        results = []
        for bounds in (mk.bounds, None):
            m.zero_grad()
            out = m(batch, None, mask=mk.mask, bounds=bounds)
            out.loss.backward()
            results.append((out.loss.detach(), {k: v.detach() for k, v in out.metrics.items()},
                            {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
        (l1, m1, g1), (l2, m2, g2) = results
        assert torch.allclose(l1, l2, rtol=1e-5), fusion
        assert m1.keys() == m2.keys()
        assert all(torch.allclose(m1[k], m2[k], rtol=1e-5, equal_nan=True) for k in m1)
        assert g1.keys() == g2.keys()
        assert all(torch.allclose(g1[k], g2[k], rtol=1e-4, atol=1e-6) for k in g1), fusion


def test_contrastive_term_over_the_samples_with_both_modalities():
    """Samples with a modality fully hidden are left out of the InfoNCE term by weights, not by
    selection: the term equals the one computed on the selected samples alone."""
    m = model(masking="coupled_batch", contrastive_weight=1.0)
    batch = make_batch(6, 1)
    inp = m.prepare(batch)
    hide = {"audio": torch.zeros_like(inp.padding["audio"]),
            "visual": torch.zeros_like(inp.padding["visual"])}
    hide["audio"][0] = True  # sample 0: no audio visible
    hide["visual"][4] = True  # sample 4: no visual visible
    mk = masking_from(hide, inp.padding)
    enc = m.encode_visible(m.embed(inp), mk)
    term = m.contrastive_loss(enc, mk)
    keep = torch.tensor([1, 2, 3, 5])
    sub = masking_from({k: v[keep] for k, v in hide.items()}, {k: v[keep] for k, v in inp.padding.items()})
    alone = m.contrastive_loss({k: v[keep] for k, v in enc.items()}, sub)
    assert torch.allclose(term, alone, rtol=1e-5) and term > 0
    # fewer than two such samples: no term
    hide["audio"][1:4] = True
    none = masking_from(hide, inp.padding)
    assert m.contrastive_loss(m.encode_visible(m.embed(inp), none), none) == 0


def test_the_training_forward_traces_as_one_graph():
    """With bounds, the whole forward (masking given, loss, metrics) has no host sync and no
    data-dependent Python branch: torch.compile with fullgraph=True traces it without a break,
    and it computes what eager computes."""
    m = model(masking="coupled_batch")
    batch = make_batch(4, 2)
    mk = m.sample_masking(m.prepare(batch).padding, gen(2))
    denom = {n: torch.tensor(50.0) for n in m.names}
    eager = m(batch, None, mask=mk.mask, bounds=mk.bounds, ce_denominator=denom)
    traced = torch.compile(m, fullgraph=True, backend="eager")
    out = traced(batch, None, mask=mk.mask, bounds=mk.bounds, ce_denominator=denom)
    out.loss.backward()
    assert torch.allclose(out.loss, eager.loss, rtol=1e-5)
    torch._dynamo.reset()


def test_compile_blocks_compiles_each_block_as_one_graph():
    """`pretrain.compile`: every transformer block compiled in place (fullgraph), the state dict's
    keys unchanged, the same loss as eager."""
    m = model(masking="fixed")
    keys = set(m.state_dict())
    batch = make_batch(3, 4)
    mk = m.sample_masking(m.prepare(batch).padding, gen(4))
    eager = m(batch, None, mask=mk.mask, bounds=mk.bounds).loss
    m.compile_blocks(backend="eager")
    assert set(m.state_dict()) == keys
    assert all(b._compiled_call_impl is not None for b in [*m.encoder, *m.decoder])
    out = m(batch, None, mask=mk.mask, bounds=mk.bounds).loss
    out.backward()
    assert torch.allclose(out, eager, rtol=1e-5)
    torch._dynamo.reset()


def test_cross_fusion_never_attends_to_a_masked_patch():
    """Cross fusion with the face fully masked (audio2visual): the voice's encoding does not depend
    on the hidden face codes, with bounds (a one-row visual sequence of a masked patch) or without."""
    m = model(masking="audio2visual", fusion="cross").eval()
    batch = make_batch(3, 5)
    other = dict(batch, visual=(batch["visual"] + 7) % m.dims.get("visual").codebook_size)
    mk = m.sample_masking(m.prepare(batch).padding, gen(5))
    assert bool(mk.mask["visual"][~mk.padding["visual"]].all())
    for bounds in (mk.bounds, None):
        enc = [m.encode_visible(m.embed(m.prepare(b)), masking_from(mk.mask, m.prepare(b).padding, bounds))
               for b in (batch, other)]
        assert torch.allclose(enc[0]["audio"], enc[1]["audio"], atol=1e-6), bounds
