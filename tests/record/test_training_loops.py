"""Loops as people write them (SPEC 2): gradient accumulation (several rec.batch per step) and
optimizer.step(closure) (Lightning, LBFGS). The record of step t holds the batch and loss that step's
gradient used, θ_t before the update, and replay reproduces the recorded loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import trajscope
from tests.helpers.analysis import make_mlp, mlp_spec, node_rows

SIZES = (3, 6, 2)
F64 = torch.float64


def _data(n: int, sizes: list[int], seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(b, SIZES[0], generator=g, dtype=F64), torch.randn(b, SIZES[-1], generator=g, dtype=F64))
        for _ in range(n)
        for b in sizes
    ]


@pytest.mark.parametrize("sizes, reduction", [([4, 4], "mean"), ([3, 5], "mean"), ([4, 2, 3], "sum")])
def test_gradient_accumulation_records_the_union_of_micro_batches(tmp_path, sizes, reduction):
    k, steps = len(sizes), 4
    data = _data(steps, sizes)
    model = make_mlp(SIZES)
    before = []
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.MSELoss(reduction=reduction)
    total = sum(sizes)
    with trajscope.Recorder(tmp_path / "run", model, opt, loss_fn, export=False, **mlp_spec(SIZES)) as rec:
        for t in range(steps):
            before.append({n: p.detach().clone() for n, p in model.named_parameters()})
            opt.zero_grad()
            for x, y in data[t * k : (t + 1) * k]:
                loss = loss_fn(model(x), y)
                # the gradient of the joined batch's loss: mean -> weight by micro-batch size
                (loss * (len(x) / total) if reduction == "mean" else loss).backward()
                rec.batch(x, y)
            opt.step()
    run = trajscope.open_run(tmp_path / "run")
    m, lf = run.model(), run.loss_fn()
    for t in range(steps):
        ck = run.checkpoint(t)
        xs, ys = zip(*data[t * k : (t + 1) * k])
        assert torch.equal(ck.inputs, torch.cat(xs)) and torch.equal(ck.targets, torch.cat(ys))
        assert run.replay_loss(ck, m, lf).item() == pytest.approx(ck.loss, rel=1e-10)
        for n, p in before[t].items():
            assert torch.equal(ck.params[n], p)
    # the exact node block of the analysis is the Hessian of the loss of the joined batch
    res = trajscope.analyze(tmp_path / "run", curvature="exact", dtype="float64", sharpness=False)[tmp_path / "run"]
    ck = run.checkpoint(1)
    i = 2
    theta = node_rows(ck.params, "0")[i]

    def loss_of(v):
        params = {
            **ck.params,
            "0.weight": ck.params["0.weight"].index_put((torch.tensor([i]),), v[:-1][None]),
            "0.bias": ck.params["0.bias"].index_put((torch.tensor([i]),), v[-1:]),
        }
        return lf(torch.func.functional_call(m, params, (ck.inputs,)), ck.targets)

    eig = torch.linalg.eigvalsh(torch.func.hessian(loss_of)(theta))
    assert res.node("0", "hess_max", 1)[i] == pytest.approx(eig[-1].item(), rel=1e-5, abs=1e-9)
    assert res.node("0", "hess_min", 1)[i] == pytest.approx(eig[0].item(), rel=1e-5, abs=1e-9)


def test_micro_batches_that_cannot_be_joined_record_the_last_with_one_warning(tmp_path):
    model = make_mlp(SIZES)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.MSELoss()
    x1, y1 = torch.randn(4, 3, dtype=F64), torch.randn(4, 2, dtype=F64)
    with pytest.warns(UserWarning, match="cannot be joined") as w:
        with trajscope.Recorder(tmp_path / "run", model, opt, loss_fn, export=False, **mlp_spec(SIZES)) as rec:
            for _ in range(2):
                opt.zero_grad()
                loss_fn(model(x1), y1).backward()
                rec.batch(x1, y1)
                rec.batch({"x": x1}, y1)  # another structure
                opt.step()
    assert sum("cannot be joined" in str(r.message) for r in w) == 1
    run = trajscope.open_run(tmp_path / "run")
    assert set(run.checkpoint(0).inputs) == {"x"}


def _closure_run(path, opt_factory, steps: int = 4, record: bool = True):
    data = _data(steps, [5])
    model = make_mlp(SIZES)
    opt = opt_factory(model.parameters())
    loss_fn = nn.MSELoss()
    before, calls = [], []
    rec = trajscope.Recorder(path, model, opt, loss_fn, export=False, **mlp_spec(SIZES)) if record else None
    for t, (x, y) in enumerate(data):
        before.append({n: p.detach().clone() for n, p in model.named_parameters()})

        def closure(x=x, y=y):
            calls.append(t)
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            if rec is not None:
                rec.batch(x, y)
            return loss

        opt.step(closure)
    if rec is not None:
        rec.close()
        assert rec.failed is None, rec.failed
    return data, before, calls, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "name, factory",
    [
        ("sgd", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
        ("adam", lambda p: torch.optim.Adam(p, lr=0.01)),
        ("lbfgs", lambda p: torch.optim.LBFGS(p, lr=0.5, max_iter=4)),
    ],
)
def test_closure_steps_record_their_own_batch(tmp_path, name, factory):
    data, before, calls, final = _closure_run(tmp_path / "run", factory)
    _, _, ref_calls, ref_final = _closure_run(None, factory, record=False)
    assert calls == ref_calls  # the closure runs as often as without the recorder
    for n in final:
        assert torch.equal(final[n], ref_final[n])  # training is unchanged
    run = trajscope.open_run(tmp_path / "run")
    assert list(run.steps) == [0, 1, 2, 3]
    m, lf = run.model(), run.loss_fn()
    for t, (x, y) in enumerate(data):
        ck = run.checkpoint(t)
        assert torch.equal(ck.inputs, x) and torch.equal(ck.targets, y)  # not one step late
        for n, p in before[t].items():
            assert torch.equal(ck.params[n], p)  # θ_t before the update
        assert run.replay_loss(ck, m, lf).item() == pytest.approx(ck.loss, rel=1e-10)


def test_closure_passed_by_keyword(tmp_path):
    model = make_mlp(SIZES)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.MSELoss()
    data = _data(3, [4])
    with trajscope.Recorder(tmp_path / "run", model, opt, loss_fn, export=False, **mlp_spec(SIZES)) as rec:
        for x, y in data:

            def closure(x=x, y=y):
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                rec.batch(x, y)
                return loss

            opt.step(closure=closure)
    run = trajscope.open_run(tmp_path / "run")
    assert all(torch.equal(run.checkpoint(t).inputs, data[t][0]) for t in range(3))
