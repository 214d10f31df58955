"""The one training loop (`vqmae.training.Fit`): logged rows, deferred finiteness checks."""

from __future__ import annotations

import math

import pytest
import torch

from vqmae.training import Fit, StepOut


def _fit(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return Fit("t", model, opt, total_steps=10, warmup_steps=0, grad_clip=1.0, bases=[0.1])


def test_rows_average_the_steps_since_the_last_row():
    model = torch.nn.Linear(1, 1)
    rows = []

    def step_fn(step):
        loss = (model.weight * 0).sum() + step  # losses 0, 1, 2, ...
        return StepOut(loss, {"m": float(step % 2), "t": torch.tensor(2.0 * step)}, 4)

    _fit(model).run(step_fn, start=0, stop=6, log_every=4, on_log=lambda s, r: rows.append((s, r)))
    assert [s for s, _ in rows] == [4, 6]
    assert rows[0][1]["loss/total"] == pytest.approx(1.5) and rows[1][1]["loss/total"] == pytest.approx(4.5)
    assert rows[0][1]["m"] == pytest.approx(0.5) and rows[1][1]["t"] == pytest.approx(9.0)
    assert rows[0][1]["samples_per_s"] > 0 and math.isfinite(rows[0][1]["grad_norm"])


def test_a_non_finite_loss_stops_the_run_before_the_next_hook():
    model = torch.nn.Linear(1, 1)
    saved = []

    def step_fn(step):
        bad = float("nan") if step == 2 else 0.0
        return StepOut((model.weight ** 2).sum() + bad, {}, 1)

    with pytest.raises(FloatingPointError, match="non-finite loss.*step 4"):
        _fit(model).run(step_fn, start=0, stop=10, log_every=5, hooks=[(2, saved.append)])
    assert saved == [2]  # the hook after the NaN step (step 4) never ran
