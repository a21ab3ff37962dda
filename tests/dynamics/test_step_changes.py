"""Everything that changes the step, recorded and reflected (issue 11): the gradient norms a step used
(as backward produced it, as the optimizer stepped with it), gradient clipping and loss scaling named
and reflected in the update map, a gradient changed in the loop reported, and losses given as the
user's own callables (a function, a functools.partial, an nn.Module class) replayed by spec.

Every run here is real torch training code; every replayed loss equals the recorded loss of its step
to 1e-5 relative."""

from __future__ import annotations

import json
import math
import shutil
import sys
import textwrap

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator
from torch import nn

import trajscope
from tests.helpers.analysis import event_files
from tests.helpers.calls import node_curvature
from tests.helpers.references import ref_exact
from trajscope.cli.main import main
from trajscope.dynamics.stepgrad import step_gradient
from trajscope.io.results import open_results
from trajscope.nodes import find_node_layers

F64 = torch.float64
REL = 1e-5


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def _analyze(run, capsys, *extra: str) -> str:
    capsys.readouterr()
    assert main(["analyze", str(run), "--no-progress", *extra]) == 0
    return " ".join(capsys.readouterr().out.split())


def _assert_faithful(run, res) -> None:
    """The replayed loss equals the recorded loss of every analysed step to 1e-5 relative."""
    recorded = trajscope.open_run(run).losses
    steps = list(trajscope.open_run(run).steps)
    for k, st in enumerate(res.steps):
        want = recorded[steps.index(int(st))]
        assert np.isfinite(want) and _rel(res.global_series("loss")[k], want) < REL, (int(st), want)
        assert res.global_series("loss_mismatch")[k] < REL


# --------------------------------------------------------------------------- accumulation, clipping, scaling
STEPS, MAX_NORM, SIZES = 8, 1.0, (4, 6, 3)


def _data(seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(5, SIZES[0], generator=g, dtype=F64), 2.0 * torch.randn(5, SIZES[-1], generator=g, dtype=F64))
        for _ in range(2 * STEPS)
    ]


def _norm(tensors) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def _train_clipped(path) -> list[dict[str, float]]:
    """Accumulation ×2 (loss / 2 per micro-batch), GradScaler (CPU), clip_grad_norm_, OneCycleLR on SGD with
    momentum. Returns per step what the loop itself saw: backward's (scaled) norm, the unscaled norm
    clip_grad_norm_ returned, the norm stepped with, the scale, the step's joined-batch loss."""
    torch.manual_seed(0)
    model = trajscope.zoo.mlp(SIZES, activation="tanh").to(F64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.3, total_steps=STEPS)
    scaler = torch.amp.GradScaler("cpu")
    loss_fn = nn.MSELoss()
    data, seen = _data(), []
    with trajscope.Recorder(
        path,
        model,
        opt,
        loss_fn,
        model_spec="trajscope.zoo:mlp",
        model_kwargs={"sizes": list(SIZES), "activation": "tanh"},
    ) as rec:
        for t in range(STEPS):
            opt.zero_grad()
            micro = data[2 * t : 2 * t + 2]
            for x, y in micro:
                scaler.scale(loss_fn(model(x), y) / 2).backward()
                rec.batch(x, y)
            backward = _norm(p.grad for p in model.parameters())
            scale = scaler.get_scale()
            scaler.unscale_(opt)
            total = float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM))
            stepped = _norm(p.grad for p in model.parameters())
            with torch.no_grad():
                x = torch.cat([m[0] for m in micro])
                loss = float(nn.functional.mse_loss(model(x), torch.cat([m[1] for m in micro])))
            scaler.step(opt)
            scaler.update()
            sched.step()
            seen.append({"backward": backward, "total": total, "stepped": stepped, "scale": scale, "loss": loss})
    return seen


def _clipped_map_reference(run, step: int, factor: float, module: str, i: int, clip: bool = True) -> float:
    """max |μ| of a finite-difference Jacobian of one real torch.optim.SGD step restricted to node i of
    ``module`` (its weight row and bias, and their momentum buffers), the gradient multiplied by the clip
    factor frozen at its value at θ_t (``clip=False``: the unclipped step)."""
    r = trajscope.open_run(run)
    ck = r.checkpoint(step)
    model = trajscope.zoo.mlp(SIZES, activation="tanh").to(F64)
    x, y = ck.batch
    hp = ck.hparams[0]
    wname, bname = f"{module}.weight", f"{module}.bias"

    def step_fn(z: torch.Tensor) -> torch.Tensor:
        p = ck.params[wname].shape[1] + 1
        params = {k: v.clone() for k, v in ck.params.items()}
        bufs = {k: ck.optimizer_state[k]["momentum_buffer"].clone() for k in params}
        params[wname][i], params[bname][i] = z[: p - 1], z[p - 1]
        bufs[wname][i], bufs[bname][i] = z[p : 2 * p - 1], z[2 * p - 1]
        leaves = {k: v.requires_grad_(True) for k, v in params.items()}
        loss = nn.functional.mse_loss(torch.func.functional_call(model, leaves, (x,)), y)
        grads = torch.autograd.grad(loss, list(leaves.values()))
        opt = torch.optim.SGD(list(leaves.values()), lr=hp["lr"], momentum=hp["momentum"])
        with torch.no_grad():
            for (k, p_), g in zip(leaves.items(), grads):
                p_.grad = g * (factor if clip else 1.0)
                opt.state[p_]["momentum_buffer"] = bufs[k]
        opt.step()
        w, b = leaves[wname].detach(), leaves[bname].detach()
        bw, bb = opt.state[leaves[wname]]["momentum_buffer"], opt.state[leaves[bname]]["momentum_buffer"]
        return torch.cat([w[i], b[i : i + 1], bw[i], bb[i : i + 1]])

    p = ck.params[wname].shape[1] + 1
    z0 = torch.cat(
        [
            ck.params[wname][i],
            ck.params[bname][i : i + 1],
            ck.optimizer_state[wname]["momentum_buffer"][i],
            ck.optimizer_state[bname]["momentum_buffer"][i : i + 1],
        ]
    )
    eps = 1e-6
    cols = []
    for k in range(2 * p):
        e = torch.zeros(2 * p, dtype=F64)
        e[k] = eps
        cols.append((step_fn(z0 + e) - step_fn(z0 - e)) / (2 * eps))
    jac = torch.stack(cols, dim=1)
    return float(torch.linalg.eigvals(jac).abs().max())


def test_accumulation_clipping_scaling_onecycle(tmp_path, capsys):
    run = tmp_path / "run"
    seen = _train_clipped(run)
    clipped = [t for t, s in enumerate(seen) if s["total"] > MAX_NORM]
    assert 2 <= len(clipped) < STEPS - 1, [s["total"] for s in seen]  # some steps clipped, some not

    # recorded: the norms the loop saw, independently computed
    r = trajscope.open_run(run)
    for t, s in enumerate(seen):
        got = r.reader.grad_norms(r.reader.row_of(t))
        assert _rel(got["backward"], s["backward"]) < 1e-9 and _rel(got["stepped"], s["stepped"]) < 1e-9
        assert _rel(r.losses[t], s["loss"]) < 1e-12  # both micro-batch losses, joined

    out = _analyze(run, capsys, "--dtype", "float64", "--curvature", "exact", "--all-steps")
    res = open_results(run)
    _assert_faithful(run, res)
    assert [int(s) for s in res.steps] == list(range(STEPS))
    factor, flag = res.global_series("step_factor"), res.global_series("clipped")
    for t, s in enumerate(seen):
        assert _rel(res.global_series("grad_norm")[t], s["total"]) < 1e-9  # replayed ‖∇L‖ = the loop's
        assert res.global_series("loss_scale")[t] == s["scale"]
        if t in clipped:
            assert flag[t] == 1 and _rel(factor[t], MAX_NORM / s["total"]) < 1e-5
        else:
            assert flag[t] == 0 and abs(factor[t] - 1) < 1e-9
    assert np.all(res.global_series("grad_norm_mismatch") == 0)
    ch = res.attrs["step_changes"]
    assert (
        ch["clipped_steps"] == clipped
        and _rel(ch["min_clip_factor"], min(MAX_NORM / seen[t]["total"] for t in clipped)) < 1e-5
    )
    assert ch["loss_scales"] == [65536.0]
    assert f"gradient clipping: {len(clipped)} of {STEPS} analysed steps were clipped (min factor" in out
    assert "loss scaling: backward's gradient was scaled by 65536 (GradScaler)" in out
    assert "WARNING" not in out
    assert res.attrs["fidelity"]["grad_norm"]["steps_over_tolerance"] == []

    # the analysed SGD map of a clipped step (with its momentum buffer) against finite differences
    t = next(t for t in clipped if t > 0)
    for i in (0, 3):
        want = _clipped_map_reference(run, t, MAX_NORM / seen[t]["total"], "0", i)
        got = float(res.node("0", "spectral_radius", t)[i])
        assert _rel(got, want) < 1e-5, (i, got, want)
        # the test can fail: the unclipped map is another one
        assert _rel(_clipped_map_reference(run, t, 1.0, "0", i, clip=False), want) > 1e-3


def test_hand_scaled_gradient_is_a_warning(tmp_path, capsys):
    """The user multiplies the gradient by 3 before the step: no clipping or scaling explains it."""
    torch.manual_seed(0)
    model = trajscope.zoo.mlp(SIZES).to(F64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.MSELoss()
    with trajscope.Recorder(
        tmp_path / "run", model, opt, loss_fn, model_spec="trajscope.zoo:mlp", model_kwargs={"sizes": list(SIZES)}
    ) as rec:
        for t, (x, y) in enumerate(_data()[:5]):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            rec.batch(x, y)
            if t >= 2:
                for p in model.parameters():
                    p.grad.mul_(3.0)
            opt.step()
    out = _analyze(tmp_path / "run", capsys, "--no-sharpness", "--all-steps")
    res = open_results(tmp_path / "run")
    _assert_faithful(tmp_path / "run", res)
    assert (
        "WARNING: the gradient the optimizer stepped with differs from the replayed gradient by up to 200% "
        "at 3 of 5 checkpoints (steps 2, 3, 4)" in out
    )
    gap = res.global_series("grad_norm_mismatch")
    assert np.allclose(gap, [0, 0, 2, 2, 2], atol=1e-5)
    assert res.attrs["fidelity"]["grad_norm"]["steps_over_tolerance"] == [2, 3, 4]
    assert "gradient clipping:" not in out
    acc = event_accumulator.EventAccumulator(
        str(event_files(tmp_path / "run")[-1]), size_guidance=event_accumulator.STORE_EVERYTHING_SIZE_GUIDANCE
    )
    acc.Reload()
    scalars = {e.step: e.value for e in acc.Scalars("trajscope/global/grad_norm_mismatch")}
    assert scalars[3] == pytest.approx(2.0, abs=1e-5) and scalars[1] == 0
    assert "trajscope/global/step_factor" in acc.Tags()["scalars"]


def test_run_without_grad_norms_still_analyses(tmp_path, capsys):
    """A store written before the gradient norms existed: they read NaN, nothing is claimed about them."""
    run = tmp_path / "run"
    _train_clipped(run)
    store = run / "trajectory.zarr"
    doc = json.loads((store / "zarr.json").read_text())
    del doc["attributes"]["grad_norms"]
    (store / "zarr.json").write_text(json.dumps(doc))
    shutil.rmtree(store / "grad_norms")
    r = trajscope.open_run(run)
    assert all(math.isnan(v) for v in r.checkpoint(1).grad_norms.values())
    assert main(["info", str(run)]) == 0
    out = _analyze(run, capsys, "--no-sharpness")
    res = open_results(run)
    assert "step_factor" not in res.global_names and "gradient clipping:" not in out and "WARNING" not in out
    assert res.attrs["step_changes"]["checked"] == 0


def test_step_gradient_rules():
    """The classification on hand-made norms (the cases the docstring names)."""
    plain = step_gradient(2.0, 2.0, 2.0)
    assert (plain.factor, plain.loss_scale, plain.clipped, plain.mismatch) == (1.0, 1.0, False, 0.0)
    scaled = step_gradient(2.0, 2.0, 2.0 * 1024)
    assert scaled.loss_scale == 1024 and scaled.mismatch == 0 and not scaled.clipped
    clipped = step_gradient(4.0, 1.0, 4.0 * 65536)
    assert clipped.clipped and clipped.map_factor == 0.25 and clipped.mismatch == 0
    assert step_gradient(2.0, 6.0, 2.0).mismatch == pytest.approx(2.0)  # c > 1
    assert step_gradient(2.0, 1.0, 3.0).mismatch == pytest.approx(0.25)  # backward 1.5×: not a power of two
    assert math.isnan(step_gradient(2.0, math.nan, math.nan).mismatch)  # nothing recorded
    assert not step_gradient(2.0, 1.0, math.nan).mismatch and step_gradient(2.0, 1.0, math.nan).clipped
    # no backward norm and a replayed loss that is not the recorded one: a mismatch, never clipping
    unfaithful = step_gradient(2.0, 1.0, math.nan, loss_faithful=False)
    assert not unfaithful.clipped and unfaithful.mismatch == pytest.approx(0.5)
    # with the backward norm the factor itself tells clipping (the loss check is not needed)
    assert step_gradient(4.0, 1.0, 4.0, loss_faithful=False).clipped


# --------------------------------------------------------------------------- the user's loss callables
USER_MODULE = '''
import torch
import torch.nn.functional as F
from torch import nn


class TinyGPT(nn.Module):
    """Embedding, one causal self-attention block from plain Linear layers, an LM head."""

    def __init__(self, vocab=11, d=8, ctx=6):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        self.q, self.k, self.v, self.proj = (nn.Linear(d, d) for _ in range(4))
        self.mlp_in, self.mlp_out = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, idx):
        T = idx.shape[1]
        h = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        q, k, v = self.q(h), self.k(h), self.v(h)
        att = (q @ k.transpose(1, 2)) / q.shape[-1] ** 0.5
        mask = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        h = h + self.proj(att @ v)
        h = h + self.mlp_out(torch.relu(self.mlp_in(h)))
        return self.lm_head(h)


def lm_loss(logits, y, label_smoothing=0.0):
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1), label_smoothing=label_smoothing)


class LMLoss(nn.Module):
    def __init__(self, vocab, label_smoothing=0.0):
        super().__init__()
        self.vocab, self.label_smoothing = vocab, label_smoothing

    def forward(self, logits, y):
        return F.cross_entropy(logits.reshape(-1, self.vocab), y.reshape(-1), label_smoothing=self.label_smoothing)


def picky_loss(logits, y):
    """Fails on a batch that holds token 0 as a target at position 0 of its first sample."""
    if int(y[0, 0]) == 0:
        raise RuntimeError("picky_loss: refuses this batch")
    return lm_loss(logits, y)
'''
VOCAB, CTX = 11, 6


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """The user's training module (model and loss), importable from sys.path as a user's would be."""
    folder = tmp_path / "user_code"
    folder.mkdir()
    (folder / "user_gpt.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(folder))
    sys.modules.pop("user_gpt", None)
    import user_gpt

    yield user_gpt
    sys.modules.pop("user_gpt", None)


def _train_gpt(path, mod, loss_fn, steps: int = 4, first_target: int | None = None) -> None:
    torch.manual_seed(0)
    model = mod.TinyGPT(VOCAB, 8, CTX).to(F64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(3)
    with trajscope.Recorder(
        path, model, opt, loss_fn, model_spec="user_gpt:TinyGPT", model_kwargs={"vocab": VOCAB, "d": 8, "ctx": CTX}
    ) as rec:
        for t in range(steps):
            seq = torch.randint(1, VOCAB, (4, CTX + 1), generator=g)
            if first_target is not None and t == 2:
                seq[0, 1] = first_target
            x, y = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            rec.batch(x, y, loss=loss)
            opt.step()


def _lm_head_hessian(model, ck, loss_fn, i: int) -> torch.Tensor:
    """torch.func.hessian of the training loss w.r.t. lm_head row i and bias i, float64."""
    layer = next(l for l in find_node_layers(model) if l.name == "lm_head")
    x, y = ck.batch
    return ref_exact(model, dict(ck.params), x, y, loss_fn, layer, i)


def _hessian_extremes(run, mod, step: int, rows: list[int]) -> list[tuple[float, float]]:
    """λmax, λmin of :func:`_lm_head_hessian` for the nodes ``rows``."""
    ck = trajscope.open_run(run).checkpoint(step)
    model = mod.TinyGPT(VOCAB, 8, CTX).to(F64)
    out = []
    for i in rows:
        ev = torch.linalg.eigvalsh(_lm_head_hessian(model, ck, mod.lm_loss, i))
        out.append((float(ev[-1]), float(ev[0])))
    return out


def test_gpt_with_the_users_lm_loss(tmp_path, capsys, user_module):
    run = tmp_path / "gpt"
    _train_gpt(run, user_module, user_module.lm_loss)
    assert trajscope.open_run(run).attrs["loss"] == {"function": "user_gpt:lm_loss"}
    out = _analyze(run, capsys, "--dtype", "float64", "--curvature", "exact")  # no --trust: the user's own run
    res = open_results(run)
    assert len(res.steps) == 3 and "WARNING" not in out  # the steps with a successor
    _assert_faithful(run, res)
    assert np.isfinite(res.global_series("sharpness")).all()
    assert np.all(res.global_series("grad_norm_mismatch") == 0)
    rows = [0, 4, 10]
    for k in (0, 2):
        for i, (hmax, hmin) in zip(rows, _hessian_extremes(run, user_module, int(res.steps[k]), rows)):
            assert res.node("lm_head", "hess_max", k)[i] == pytest.approx(hmax, rel=1e-5, abs=1e-7)
            assert res.node("lm_head", "hess_min", k)[i] == pytest.approx(hmin, rel=1e-5, abs=1e-7)


def test_gpt_node_spectra_by_the_replayed_spec(tmp_path, user_module):
    """The whole spectrum of lm_head node blocks from the run's own model and loss (rebuilt by spec, signed
    by this user) equals the eigenvalues of torch.func.hessian of the training loss, float64, exact kind."""
    from trajscope.analysis.pipeline import recorded_node_layers

    run = tmp_path / "gpt"
    _train_gpt(run, user_module, user_module.lm_loss, steps=2)
    r = trajscope.open_run(run)
    model, loss_fn = r.model(), r.loss_fn()
    assert loss_fn is user_module.lm_loss
    ck = r.checkpoint(1)
    layers = [l for l in recorded_node_layers(r) if l.name == "lm_head"]
    cr = node_curvature(model, ck.params, ck.buffers, ck.batch[0], ck.batch[1], loss_fn, layers, kind="exact")
    for i in (0, 7):
        want = torch.linalg.eigvalsh(_lm_head_hessian(model, ck, user_module.lm_loss, i)).flip(0)
        got = cr.eigvals["lm_head"][i]
        got = torch.cat([got, got.new_zeros(len(want) - len(got))]).sort(descending=True).values
        assert torch.allclose(got, want, rtol=1e-8, atol=1e-10), (i, got, want)


def test_an_edited_loss_description_needs_trust(tmp_path, capsys, user_module):
    """The signature covers the partial's keywords: once edited, the run's code needs --trust."""
    import functools

    run = tmp_path / "gpt"
    _train_gpt(run, user_module, functools.partial(user_module.lm_loss, label_smoothing=0.1), steps=2)
    store = run / "trajectory.zarr" / "zarr.json"
    doc = json.loads(store.read_text())
    doc["attributes"]["loss"]["kwargs"]["label_smoothing"] = 0.5
    store.write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(["analyze", str(run), "--no-progress", "--no-sharpness"]) == 2
    assert "not signed by you" in capsys.readouterr().err
    assert main(["analyze", str(run), "--no-progress", "--no-sharpness", "--trust"]) == 0
    assert open_results(run).global_series("loss_mismatch")[0] > 1e-3  # the edited loss is another function


@pytest.mark.parametrize("kind", ["partial", "module"])
def test_partial_and_loss_class_by_spec(tmp_path, capsys, user_module, kind):
    run = tmp_path / kind
    if kind == "partial":
        import functools

        loss_fn = functools.partial(user_module.lm_loss, label_smoothing=0.1)
        want = {"function": "user_gpt:lm_loss", "kwargs": {"label_smoothing": 0.1}}
    else:
        loss_fn = user_module.LMLoss(VOCAB, label_smoothing=0.1)
        want = {"class": "user_gpt:LMLoss", "kwargs": {"vocab": VOCAB, "label_smoothing": 0.1}}
    _train_gpt(run, user_module, loss_fn, steps=3)
    assert trajscope.open_run(run).attrs["loss"] == want
    out = _analyze(run, capsys, "--no-sharpness")
    assert "WARNING" not in out
    _assert_faithful(run, open_results(run))


def test_a_loss_that_cannot_take_the_targets_is_one_line(tmp_path, capsys, user_module):
    """Replaying `loss_fn(model(x), y)` with nn.CrossEntropyLoss on (B, T, V) logits: one line, exit 2."""
    run = tmp_path / "gpt"
    _train_gpt(run, user_module, user_module.lm_loss, steps=2)
    capsys.readouterr()
    assert main(["analyze", str(run), "--no-progress", "--loss", "torch.nn:CrossEntropyLoss"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "replaying the loss on step 0's batch failed" in err[0] and "Traceback" not in err[0]
    assert not (run / "analysis.zarr").exists()


def test_a_checkpoint_whose_loss_fails_is_a_nan_row(tmp_path, capsys, user_module):
    """The loss fails on one later checkpoint's batch: curvature and sharpness both fail there; that row is
    NaN with a warning, the others are analysed, no traceback."""
    run = tmp_path / "gpt"
    _train_gpt(run, user_module, user_module.lm_loss, steps=4, first_target=0)
    with pytest.warns(UserWarning, match="step 2: (curvature|sharpness) failed"):
        out = _analyze(run, capsys, "--all-steps", "--loss", "user_gpt:picky_loss")
    res = open_results(run)
    assert len(res.steps) == 4
    sharp = res.global_series("sharpness")
    assert np.isnan(sharp[2]) and np.isfinite(sharp[[0, 1, 3]]).all()
    assert np.isnan(res.node("lm_head", "hess_max", 2)).all() and np.isfinite(res.node("lm_head", "hess_max", 3)).all()
    assert (
        "Traceback" not in out
        and "note: step 2: curvature failed (RuntimeError: picky_loss: refuses this batch)" in out
    )
    assert "note: step 2: sharpness failed" in out


# --------------------------------------------------------------------------- clipping on the other map routes
def _train_groups(path, opt_factory, steps: int = 4) -> list[float]:
    """Every step clipped (max_norm 0.2); returns the clip factors max_norm/‖g‖ the loop applied."""
    torch.manual_seed(0)
    model = trajscope.zoo.mlp(SIZES, activation="tanh").to(F64)
    opt = opt_factory(model)
    loss_fn, factors = nn.MSELoss(), []
    with trajscope.Recorder(
        path,
        model,
        opt,
        loss_fn,
        model_spec="trajscope.zoo:mlp",
        model_kwargs={"sizes": list(SIZES), "activation": "tanh"},
    ) as rec:
        for x, y in _data()[:steps]:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            rec.batch(x, y)
            factors.append(0.2 / float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.2)))
            opt.step()
    return factors


def _sgd_two_groups(model):
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return torch.optim.SGD(
        [{"params": weights, "weight_decay": 0.01}, {"params": biases, "lr": 0.05}], lr=0.1, momentum=0.9
    )


def test_clipped_sgd_with_a_bias_group_equals_the_real_step(tmp_path, capsys):
    """The bias-group route (bias_group_eigvals) of a clipped step: finite differences of a real
    torch.optim.SGD step with two groups, the gradient times the frozen clip factor."""
    run = tmp_path / "run"
    factors = _train_groups(run, _sgd_two_groups)
    out = _analyze(run, capsys, "--dtype", "float64", "--curvature", "exact", "--no-sharpness")
    res = open_results(run)
    _assert_faithful(run, res)
    assert "gradient clipping: 3 of 3 analysed steps were clipped" in out
    r = trajscope.open_run(run)
    ck, t, i = r.checkpoint(2), 2, 1
    model = trajscope.zoo.mlp(SIZES, activation="tanh").to(F64)
    x, y = ck.batch
    p = ck.params["0.weight"].shape[1] + 1

    def step_fn(z):
        params = {k: v.clone().requires_grad_(True) for k, v in ck.params.items()}
        with torch.no_grad():
            params["0.weight"][i], params["0.bias"][i] = z[: p - 1], z[p - 1]
        loss = nn.functional.mse_loss(torch.func.functional_call(model, params, (x,)), y)
        grads = torch.autograd.grad(loss, list(params.values()))
        wts = [v for k, v in params.items() if k.endswith("weight")]
        opt = torch.optim.SGD(
            [
                {"params": wts, "weight_decay": 0.01},
                {"params": [v for k, v in params.items() if k.endswith("bias")], "lr": 0.05},
            ],
            lr=0.1,
            momentum=0.9,
        )
        with torch.no_grad():
            for (k, v), g in zip(params.items(), grads):
                v.grad = g * factors[t]
                buf = ck.optimizer_state[k]["momentum_buffer"].clone()
                if k == "0.weight":
                    buf[i] = z[p : 2 * p - 1]
                if k == "0.bias":
                    buf[i] = z[2 * p - 1]
                opt.state[v]["momentum_buffer"] = buf
        opt.step()
        st = opt.state
        return torch.cat(
            [
                params["0.weight"].detach()[i],
                params["0.bias"].detach()[i : i + 1],
                st[params["0.weight"]]["momentum_buffer"][i],
                st[params["0.bias"]]["momentum_buffer"][i : i + 1],
            ]
        )

    z0 = torch.cat(
        [
            ck.params["0.weight"][i],
            ck.params["0.bias"][i : i + 1],
            ck.optimizer_state["0.weight"]["momentum_buffer"][i],
            ck.optimizer_state["0.bias"]["momentum_buffer"][i : i + 1],
        ]
    )
    eps, cols = 1e-6, []
    for k in range(2 * p):
        e = torch.zeros(2 * p, dtype=F64)
        e[k] = eps
        cols.append((step_fn(z0 + e) - step_fn(z0 - e)) / (2 * eps))
    want = float(torch.linalg.eigvals(torch.stack(cols, dim=1)).abs().max())
    assert _rel(float(res.node("0", "spectral_radius", t)[i]), want) < 1e-5


def test_clipped_adam_uses_the_clipped_gradient(tmp_path, capsys):
    """Adam with coupled decay, every step clipped: the node spectrum equals the one formed by hand on
    D^{1/2}(c·H_i + wd)D^{1/2}, D from the clipped gradient c·∇L (the map's frozen second moment)."""
    from trajscope.dynamics.optimizers import preconditioner, update_rule
    from trajscope.dynamics.updatemap import node_update_spectra

    run = tmp_path / "run"
    factors = _train_groups(run, lambda m: torch.optim.Adam(m.parameters(), lr=0.01, weight_decay=0.1))
    _analyze(run, capsys, "--dtype", "float64", "--curvature", "exact", "--no-sharpness")
    res = open_results(run)
    _assert_faithful(run, res)
    r = trajscope.open_run(run)
    t, i = 2, 1
    ck = r.checkpoint(t)
    c = factors[t]
    rule = update_rule(r.optimizer_class, ck.hparams[0], ck.optimizer_state["0.weight"])
    model, loss_fn = r.model(), r.loss_fn()

    def loss_of(params):
        return loss_fn(torch.func.functional_call(model, params, (ck.inputs,)), ck.targets)

    grads = torch.func.grad(loss_of)(ck.params)
    d = torch.cat(
        [
            preconditioner(rule, ck.optimizer_state["0.weight"], c * grads["0.weight"], ck.params["0.weight"])[i],
            preconditioner(rule, ck.optimizer_state["0.bias"], c * grads["0.bias"], ck.params["0.bias"])[i : i + 1],
        ]
    )
    p = ck.params["0.weight"].shape[1] + 1

    def node_loss(z):
        params = dict(ck.params)
        w, b = params["0.weight"].clone(), params["0.bias"].clone()
        w[i], b[i] = z[:-1], z[-1]
        params["0.weight"], params["0.bias"] = w, b
        return loss_of(params)

    z0 = torch.cat([ck.params["0.weight"][i], ck.params["0.bias"][i : i + 1]])
    h = torch.func.hessian(node_loss)(z0)
    k = d.sqrt()[:, None] * (c * h + 0.1 * torch.eye(p, dtype=F64)) * d.sqrt()[None, :]
    want = node_update_spectra(torch.linalg.eigvalsh(k).flip(0)[None], p, rule).radius[0]
    unclipped = node_update_spectra(
        torch.linalg.eigvalsh(d.sqrt()[:, None] * (h + 0.1 * torch.eye(p, dtype=F64)) * d.sqrt()[None, :]).flip(0)[
            None
        ],
        p,
        rule,
    ).radius[0]
    got = float(res.node("0", "spectral_radius", t)[i])
    assert _rel(got, float(want)) < 1e-5 and _rel(float(unclipped), float(want)) > 1e-2  # the test can fail


def test_closure_step_records_the_closures_gradient(tmp_path):
    """optimizer.step(closure) (Lightning's way): backward and clipping happen inside the closure, after
    the step pre-hook; the recorded norms are those of the gradient the closure left."""
    torch.manual_seed(0)
    model = trajscope.zoo.mlp(SIZES).to(F64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn, seen = nn.MSELoss(), []
    with trajscope.Recorder(
        tmp_path / "run", model, opt, loss_fn, model_spec="trajscope.zoo:mlp", model_kwargs={"sizes": list(SIZES)}
    ) as rec:
        for x, y in _data()[:4]:

            def closure(x=x, y=y):
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                rec.batch(x, y)
                backward = _norm(p.grad for p in model.parameters())
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
                seen.append((backward, _norm(p.grad for p in model.parameters())))
                return loss

            opt.step(closure)
    r = trajscope.open_run(tmp_path / "run")
    for t, (backward, stepped) in enumerate(seen):
        got = r.checkpoint(t).grad_norms
        assert _rel(got["backward"], backward) < 1e-12 and _rel(got["stepped"], stepped) < 1e-12
        assert stepped < backward  # clipping was active
