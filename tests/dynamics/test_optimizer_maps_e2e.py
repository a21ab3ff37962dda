"""RMSprop and Adagrad runs analyse with their own update maps (the spectrum of a node equals the one
formed by hand from the dense block and the optimizer's real denominator); an optimizer without a
map says so in a WARNING line."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import trajscope
from tests.helpers.analysis import batches, make_mlp, mlp_spec, node_rows
from trajscope.cli.main import main
from trajscope.dynamics.optimizers import preconditioner, update_rule
from trajscope.dynamics.updatemap import node_update_spectra

SIZES = (3, 4, 2)


def _record(path, opt_factory):
    model = make_mlp(SIZES)
    opt = opt_factory(model.parameters())
    loss_fn = nn.MSELoss()
    with trajscope.Recorder(path, model, opt, loss_fn, export=False, **mlp_spec(SIZES)) as rec:
        for x, y in batches(4, SIZES[0], SIZES[-1], b=8):
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            rec.batch(x, y)
            opt.step()


@pytest.mark.parametrize(
    "name, factory, kind",
    [
        ("rmsprop", lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5, weight_decay=0.1), "rmsprop_momentum"),
        ("adagrad", lambda p: torch.optim.Adagrad(p, lr=0.05, lr_decay=0.01), "adagrad"),
    ],
)
def test_rmsprop_adagrad_runs_use_their_maps(tmp_path, capsys, name, factory, kind):
    path = tmp_path / name
    _record(path, factory)
    capsys.readouterr()
    assert main(["analyze", str(path), "--no-progress", "--curvature", "exact", "--dtype", "float64"]) == 0
    out = capsys.readouterr().out
    assert "no update map" not in out
    res = trajscope.io.results.open_results(path)
    assert [m["kind"] for m in res.attrs["optimizer_map"]] == [kind]
    # node 1 of layer 0 at step 2 against a hand-made spectrum from the dense block
    run = trajscope.open_run(path)
    ck = run.checkpoint(2)
    rule = update_rule(run.optimizer_class, ck.hparams[0], ck.optimizer_state["0.weight"])
    model, loss_fn = run.model(), run.loss_fn()
    i = 1

    def loss_of(params):
        return loss_fn(torch.func.functional_call(model, params, (ck.inputs,)), ck.targets)

    grads = torch.func.grad(loss_of)(ck.params)
    d = torch.cat(
        [
            preconditioner(rule, ck.optimizer_state["0.weight"], grads["0.weight"], ck.params["0.weight"])[i],
            preconditioner(rule, ck.optimizer_state["0.bias"], grads["0.bias"], ck.params["0.bias"])[i : i + 1],
        ]
    )
    theta = node_rows(ck.params, "0")[i]

    def node_loss(v):
        params = {
            **ck.params,
            "0.weight": ck.params["0.weight"].index_put((torch.tensor([i]),), v[:-1][None]),
            "0.bias": ck.params["0.bias"].index_put((torch.tensor([i]),), v[-1:]),
        }
        return loss_of(params)

    h = torch.func.hessian(node_loss)(theta) + rule.coupled_shift * torch.eye(theta.numel(), dtype=torch.float64)
    k = d.sqrt()[:, None] * h * d.sqrt()[None, :]
    want = node_update_spectra(torch.linalg.eigvalsh(k).flip(0)[None, :], theta.numel(), rule).radius[0]
    assert res.node("0", "spectral_radius", 2)[i] == pytest.approx(float(want), rel=1e-5)


def test_optimizer_without_a_map_is_a_warning_line(tmp_path, capsys):
    path = tmp_path / "adadelta"
    _record(path, lambda p: torch.optim.Adadelta(p, lr=0.5))
    capsys.readouterr()
    assert main(["analyze", str(path), "--no-progress", "--no-sharpness"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "WARNING: trajscope has no update map for Adadelta" in out
