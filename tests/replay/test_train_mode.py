"""Train-mode layers replayed as they were trained (issue 11): BatchNorm on batch statistics, dropout with the
step's masks, micro-batches of gradient accumulation replayed separately.

Every run is recorded by the real training loop (the Recorder's forward pre-hook keeps the train flags and
RNG state of each forward pass), analysed by ``trajscope analyze``, and checked against references built
here without trajscope's replay: ``torch.func.hessian`` (float64) of the training loss as training
computed it (BatchNorm without running statistics, i.e. on batch statistics; dropout masks drawn again from
the recorded RNG state and applied as fixed factors).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import trajscope
from tests.helpers.calls import node_curvature, sharpness
from trajscope.analysis.pipeline import recorded_node_layers
from trajscope.cli.main import main
from trajscope.curvature.blocks import dense_blocks
from trajscope.io.records import ForwardState
from trajscope.io.results import open_results
from trajscope.replay import trainmode as replay_mod
from trajscope.zoo import mnist_net, resnet_block

F64 = torch.float64
RESNET = {"in_channels": 3, "width": 3, "classes": 3}
MNIST = {"size": 12, "channels": [3, 4], "hidden": 8, "classes": 10}


# --------------------------------------------------------------------------- recording
def _record(path, model, opt, loss_fn, data, spec, kwargs, accumulate=1, probe=None):
    """The usual loop (train mode, `accumulate` micro-batches per step, loss / accumulate)."""
    model.train()
    with trajscope.Recorder(path, model, opt, loss_fn, model_spec=spec, model_kwargs=kwargs, probe=probe) as rec:
        for i in range(0, len(data), accumulate):
            opt.zero_grad()
            for x, y in data[i : i + accumulate]:
                (loss_fn(model(x), y) / accumulate).backward()
                rec.batch(x, y)
            opt.step()
    return trajscope.open_run(path)


def _resnet_run(path, accumulate=1, steps=3, b=6, probe=False, cfg=RESNET):
    torch.manual_seed(0)
    model = resnet_block(**cfg).to(F64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    data = [
        (
            torch.randn(b, cfg["in_channels"], 4, 4, generator=g, dtype=F64),
            torch.randint(0, cfg["classes"], (b,), generator=g),
        )
        for _ in range(steps * accumulate)
    ]
    return _record(
        path,
        model,
        opt,
        nn.CrossEntropyLoss(),
        data,
        "trajscope.zoo:resnet_block",
        cfg,
        accumulate,
        probe=data[0] if probe else None,
    )


def _mnist_run(path, steps=3):
    torch.manual_seed(0)
    model = mnist_net(**MNIST).to(F64)
    opt = torch.optim.Adadelta(model.parameters(), lr=1.0)
    g = torch.Generator().manual_seed(2)
    data = [
        (torch.randn(8, 1, 12, 12, generator=g, dtype=F64), torch.randint(0, 10, (8,), generator=g))
        for _ in range(steps)
    ]
    return _record(path, model, opt, nn.NLLLoss(), data, "trajscope.zoo:mnist_net", MNIST)


# --------------------------------------------------------------------------- references (no trajscope replay)
def _node_loss(model, params, layer, i, loss_of_params):
    """w ↦ L(θ with node i of ``layer`` (weight row i, then bias i) set to w), and θ_i."""
    wname, bname = f"{layer}.weight", f"{layer}.bias"
    W = params[wname]
    w0 = W[i].reshape(-1)
    has_b = bname in params
    theta = torch.cat([w0, params[bname][i : i + 1]]) if has_b else w0

    def f(v):
        p = dict(params)
        p[wname] = torch.cat([W[:i], v[: w0.numel()].reshape(1, *W.shape[1:]), W[i + 1 :]])
        if has_b:
            b = params[bname]
            p[bname] = torch.cat([b[:i], v[-1:], b[i + 1 :]])
        return loss_of_params(p)

    return f, theta


def _batch_stat_model(model):
    """A copy whose BatchNorm modules keep no running statistics: in train mode they normalise with the
    batch's statistics exactly as training did, and torch.func can differentiate them (no in-place
    buffer update)."""
    twin = copy.deepcopy(model).train()
    torch.func.replace_all_batch_norm_modules_(twin)
    return twin


def _bn_loss(model, params, micro_inputs, targets, loss_fn):
    """The training loss with train-mode BatchNorm, one forward pass per micro-batch."""
    twin = _batch_stat_model(model)

    def loss(p):
        out = torch.cat([torch.func.functional_call(twin, p, (x,)) for x in micro_inputs])
        return loss_fn(out, targets)

    return twin, loss


def _dropout_masks(model, x, rng_state):
    """The masks the step's forward pass drew: the same draws (same shapes, same order) from the recorded
    RNG state (nothing but the dropout modules draws random numbers in this net)."""
    shapes = {}
    hooks = [
        m.register_forward_hook(lambda mod, a, o, n=n: shapes.__setitem__(n, (type(mod), o.shape)))
        for n, m in model.named_modules()
        if isinstance(m, (nn.Dropout, nn.Dropout2d))
    ]
    with torch.no_grad():
        copy.deepcopy(model).eval()(x)
    for h in hooks:
        h.remove()
    state = torch.get_rng_state()
    torch.set_rng_state(rng_state)
    masks = {}
    for n, (cls, shape) in shapes.items():
        p = model.get_submodule(n).p
        ones = torch.ones(shape, dtype=x.dtype)
        masks[n] = TF.dropout2d(ones, p, True) if cls is nn.Dropout2d else TF.dropout(ones, p, True)
    torch.set_rng_state(state)
    return masks


def _masked_loss(model, x, y, loss_fn, masks):
    """The training loss with the step's dropout masks as fixed factors (model in eval mode + hooks)."""
    twin = copy.deepcopy(model).eval()
    for n, mask in masks.items():
        twin.get_submodule(n).register_forward_hook(lambda mod, a, o, m=mask: o * m)
    return lambda p: loss_fn(torch.func.functional_call(twin, p, (x,)), y)


def _analyse(run, *args):
    assert main(["analyze", str(run.path), "--no-progress", "--no-sharpness", "--dtype", "float64", *args]) == 0
    return open_results(run.path)


def _curvature(run, step, kind):
    ck = run.checkpoint(step)
    model = run.model().to(F64)
    rp, issue = replay_mod.plan(model, ck.forward, ck.inputs, "cpu")
    assert issue is None
    cr = node_curvature(
        model,
        ck.params,
        ck.buffers,
        ck.inputs,
        ck.targets,
        run.loss_fn(),
        recorded_node_layers(run),
        kind=kind,
        replay=rp,
    )
    return ck, model, cr


# --------------------------------------------------------------------------- BatchNorm (ResNet block layout)
def test_resnet_block_batchnorm_exact_blocks_equal_hessian_of_training_loss(tmp_path, capsys):
    run = _resnet_run(tmp_path / "run")
    res = _analyse(run, "--curvature", "exact")
    out = " ".join(capsys.readouterr().out.split())
    assert "train-mode layers replayed as trained" in out and "cross-sample terms" in out and "WARNING" not in out
    mism = res.global_series("loss_mismatch")
    assert len(mism) == 2 and (mism <= 1e-5).all()
    assert res.attrs["train_mode"] == "replay" and res.attrs["train_mode_replay"]["coupled_curvature"] is True

    ck, model, cr = _curvature(run, 1, "exact")
    twin, loss = _bn_loss(model, ck.params, [ck.inputs], ck.targets, nn.CrossEntropyLoss())
    assert abs(float(loss(ck.params)) - ck.loss) <= 1e-5 * abs(ck.loss)
    assert abs(float(cr.loss) - ck.loss) <= 1e-5 * abs(ck.loss)
    for layer, nodes in (("conv0", [0, 2]), ("conv1", [1]), ("conv2", [0, 2]), ("fc", [0, 2])):
        blocks = dense_blocks(cr.factors[layer], nodes)
        for k, i in enumerate(nodes):
            f, theta = _node_loss(twin, ck.params, layer, i, loss)
            ref = torch.func.hessian(f)(theta)
            assert torch.allclose(blocks[k], ref, rtol=1e-7, atol=1e-9 * ref.abs().max()), (layer, i)
            ev = torch.linalg.eigvalsh(ref).flip(0)
            got = cr.eigvals[layer][i]
            assert torch.allclose(got, ev[: len(got)], atol=1e-8 * ev.abs().max()), (layer, i)
    # the eval-mode function is another one: its Hessian differs (so the check above can fail)
    eval_cr = node_curvature(
        model, ck.params, ck.buffers, ck.inputs, ck.targets, run.loss_fn(), recorded_node_layers(run), kind="exact"
    )
    assert not torch.allclose(eval_cr.eigvals["conv1"], cr.eigvals["conv1"], rtol=1e-3)
    # the recorded running statistics are untouched by the replay
    assert torch.equal(run.checkpoint(1).buffers["bn1.running_mean"], ck.buffers["bn1.running_mean"])


def test_resnet_block_batchnorm_ggn_blocks_equal_dense_ggn(tmp_path):
    run = _resnet_run(tmp_path / "run", steps=2, b=5)
    ck, model, cr = _curvature(run, 1, "ggn")
    twin = _batch_stat_model(model)
    loss_fn = nn.CrossEntropyLoss()
    out_of = lambda p: torch.func.functional_call(twin, p, (ck.inputs,))
    out = out_of(ck.params)
    HL = torch.func.hessian(lambda z: loss_fn(z, ck.targets))(out).reshape(out.numel(), out.numel())
    assert abs(float(cr.loss) - ck.loss) <= 1e-5 * abs(ck.loss)
    for layer, nodes in (("conv0", [1]), ("conv2", [0, 2]), ("fc", [1])):
        blocks = dense_blocks(cr.factors[layer], nodes)
        for k, i in enumerate(nodes):
            g, theta = _node_loss(twin, ck.params, layer, i, out_of)
            J = torch.func.jacrev(g)(theta).reshape(out.numel(), -1)
            ref = J.T @ HL @ J
            assert torch.allclose(blocks[k], ref, rtol=1e-7, atol=1e-9 * ref.abs().max()), (layer, i)
    # and the GGN is not the exact Hessian here (BatchNorm is not piecewise linear)
    f, theta = _node_loss(twin, ck.params, "conv2", 0, lambda p: loss_fn(out_of(p), ck.targets))
    assert not torch.allclose(dense_blocks(cr.factors["conv2"], [0])[0], torch.func.hessian(f)(theta), rtol=1e-4)


def test_gradient_accumulation_replays_each_micro_batch(tmp_path):
    run = _resnet_run(tmp_path / "run", accumulate=2, steps=2, b=4)
    ck = run.checkpoint(1)
    assert [fs.size for fs in ck.forward] == [4, 4] and all(fs.training for fs in ck.forward)
    res = _analyse(run, "--all-steps")
    assert (res.global_series("loss_mismatch") <= 1e-5).all()
    # the per-micro-batch replay is what matches: one pass over the joined batch does not
    ck, model, cr = _curvature(run, 1, "exact")
    loss_fn = nn.CrossEntropyLoss()
    whole_twin, whole = _bn_loss(model, ck.params, [ck.inputs], ck.targets, loss_fn)
    assert abs(float(whole(ck.params)) - ck.loss) > 1e-4 * abs(ck.loss)
    twin, loss = _bn_loss(model, ck.params, list(ck.inputs.split(4)), ck.targets, loss_fn)
    assert abs(float(cr.loss) - ck.loss) <= 1e-5 * abs(ck.loss)
    for layer, i in (("conv1", 2), ("fc", 1)):
        f, theta = _node_loss(twin, ck.params, layer, i, loss)
        ref = torch.func.hessian(f)(theta)
        got = dense_blocks(cr.factors[layer], [i])[0]
        assert torch.allclose(got, ref, rtol=1e-7, atol=1e-9 * ref.abs().max()), layer
        # samples of different micro-batches are not coupled: the block is the sum of the two micro-batches'
        halves = []
        for h in range(2):
            xs, ys = ck.inputs[4 * h : 4 * h + 4], ck.targets[4 * h : 4 * h + 4]
            _, lh = _bn_loss(model, ck.params, [xs], ys, loss_fn)
            fh, _ = _node_loss(twin, ck.params, layer, i, lh)
            halves.append(torch.func.hessian(fh)(theta) / 2)
        assert torch.allclose(got, halves[0] + halves[1], rtol=1e-7, atol=1e-9 * ref.abs().max())


# --------------------------------------------------------------------------- dropout (pytorch/examples MNIST)
def test_mnist_dropout_replayed_with_the_steps_masks(tmp_path, capsys):
    run = _mnist_run(tmp_path / "run")
    res = _analyse(run, "--curvature", "exact")
    out = " ".join(capsys.readouterr().out.split())
    assert "WARNING: trajscope has no update map for Adadelta" in out
    assert "train-mode layers replayed as trained" in out
    mism = res.global_series("loss_mismatch")
    assert (mism <= 1e-5).all()
    assert res.attrs["train_mode_replay"]["modules"] == ["dropout1", "dropout2"]

    ck, model, cr = _curvature(run, 1, "exact")
    masks = _dropout_masks(model, ck.inputs, ck.forward[0].rng_cpu)
    assert set(masks) == {"dropout1", "dropout2"} and bool((masks["dropout2"] == 0).any())
    loss = _masked_loss(model, ck.inputs, ck.targets, nn.NLLLoss(), masks)
    assert abs(float(loss(ck.params)) - ck.loss) <= 1e-10 * abs(ck.loss)
    for layer, nodes in (("conv1", [0]), ("conv2", [1, 3]), ("fc1", [0, 5]), ("fc2", [3])):
        blocks = dense_blocks(cr.factors[layer], nodes)
        for k, i in enumerate(nodes):
            f, theta = _node_loss(model, ck.params, layer, i, loss)
            ref = torch.func.hessian(f)(theta)
            assert torch.allclose(blocks[k], ref, rtol=1e-7, atol=1e-9 * max(ref.abs().max(), 1e-12)), (layer, i)
    # the RNG state of the analysing process is left as it was
    rp, _ = replay_mod.plan(model, ck.forward, ck.inputs, "cpu")
    before = torch.get_rng_state()
    node_curvature(
        model,
        ck.params,
        ck.buffers,
        ck.inputs,
        ck.targets,
        nn.NLLLoss(),
        recorded_node_layers(run),
        kind="ggn",
        replay=rp,
    )
    assert torch.equal(torch.get_rng_state(), before)


def test_train_mode_off_is_the_eval_mode_analysis(tmp_path, capsys):
    run = _mnist_run(tmp_path / "run", steps=2)
    res = _analyse(run, "--train-mode", "off", "--curvature", "exact", "--all-steps")
    out = " ".join(capsys.readouterr().out.split())
    assert "--train-mode off: BatchNorm and dropout (2 module(s)) replayed in eval mode" in out
    assert "WARNING: the replayed loss differs from the recorded loss" in out
    assert res.attrs["train_mode"] == "off" and res.attrs["train_mode_replay"]["replayed_checkpoints"] == 0
    ck = run.checkpoint(1)
    model = run.model().to(F64)
    cr = node_curvature(
        model, ck.params, ck.buffers, ck.inputs, ck.targets, run.loss_fn(), recorded_node_layers(run), kind="exact"
    )  # today's eval-mode route
    assert res.global_series("loss")[1] == pytest.approx(float(cr.loss), rel=1e-12)
    hmax = res.node("fc1", "hess_max", 1)
    assert torch.allclose(torch.from_numpy(hmax).to(F64), cr.eigvals["fc1"].amax(1).clamp_min(0), rtol=1e-6)
    # without a replay the masks are off: the eval-mode loss is not the recorded one
    assert abs(float(cr.loss) - ck.loss) > 1e-4 * ck.loss


# --------------------------------------------------------------------------- what the store holds
@pytest.mark.parametrize("order", ["forward_first", "batch_first", "all_forwards_first"])
def test_forward_passes_pair_with_batches_in_order(tmp_path, order):
    """A plain loop (forward, backward, batch), Lightning (batch, then the closure's forward) and the HF
    Trainer (k forwards, then k batch calls) pair each micro-batch with its own forward pass; two
    Recorders on one model both see them, and closing one leaves the other watching."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).to(F64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    other = trajscope.Recorder(tmp_path / "other", model, opt, nn.MSELoss(), export=False)
    states = []
    with trajscope.Recorder(tmp_path / "run", model, opt, nn.MSELoss(), export=False) as rec:

        def give(x, y):
            rec.batch(x, y)
            other.batch(x, y)  # a no-op once closed

        for t in range(3):
            if t == 2:
                other.close()
            xs = [(torch.randn(3, 3, dtype=F64), torch.randn(3, 2, dtype=F64)) for _ in range(2)]
            if order == "all_forwards_first":
                for x, y in xs:
                    states.append(torch.get_rng_state())
                    nn.MSELoss()(model(x), y).backward()
                for x, y in xs:
                    give(x, y)
            for x, y in xs if order != "all_forwards_first" else ():
                if order == "batch_first":
                    give(x, y)
                states.append(torch.get_rng_state())
                nn.MSELoss()(model(x), y).backward()
                if order == "forward_first":
                    give(x, y)
            opt.step()
            opt.zero_grad()
    for path, steps in ((tmp_path / "run", 3), (tmp_path / "other", 2)):
        run = trajscope.open_run(path)
        assert len(run.steps) == steps
        for t in range(steps):
            fw = run.checkpoint(t).forward
            assert len(fw) == 2 and all(torch.equal(fs.rng_cpu, states[2 * t + k]) for k, fs in enumerate(fw))


def test_forward_state_recorded_per_micro_batch(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2)).to(F64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    states = []
    with trajscope.Recorder(tmp_path / "run", model, opt, nn.MSELoss(), export=False) as rec:
        for t in range(3):
            model[2].train(t != 2)  # step 2: dropout off, BatchNorm in train mode
            for _ in range(2):
                x, y = torch.randn(3, 3, dtype=F64), torch.randn(3, 2, dtype=F64)
                states.append(torch.get_rng_state())
                nn.MSELoss()(model(x), y).backward()
                rec.batch(x, y)
            opt.step()
            opt.zero_grad()
    run = trajscope.open_run(tmp_path / "run")
    for t in range(3):
        fw = run.checkpoint(t).forward
        assert [fs.size for fs in fw] == [3, 3]
        assert all(torch.equal(fs.rng_cpu, states[2 * t + k]) for k, fs in enumerate(fw))
        assert all(fs.training and fs.differ == (("2",) if t == 2 else ()) and fs.rng_cuda is None for fs in fw)
    assert run.attrs["model"]["mode_sensitive"] == ["1", "2"]
    run.reader.verify_records()
    run.reader.check_structure()


def test_old_run_without_forward_state_is_replayed_in_eval_mode_and_says_so(tmp_path, capsys):
    run = _mnist_run(tmp_path / "run", steps=2)
    attrs = dict(run.attrs)
    del attrs["forward_from"]  # as a run recorded before the forward state was
    from trajscope.io.files import _write_group

    _write_group(run.reader.path, attrs)
    run = trajscope.open_run(run.path)
    assert run.checkpoint(0).forward is None
    _analyse(run, "--all-steps")
    out = " ".join(capsys.readouterr().out.split())
    assert "WARNING: the run does not record its forward passes' train/eval flags and RNG state" in out


def test_probe_batch_is_replayed_in_eval_mode(tmp_path, capsys):
    """The probe (here the same samples as step 0's batch) was never run by a recorded forward pass: eval
    mode, said in a note (the design, not a departure), and its curvature is the eval-mode one."""
    run = _resnet_run(tmp_path / "run", steps=2, probe=True)
    res = _analyse(run, "--batch", "probe", "--all-steps")
    out = " ".join(capsys.readouterr().out.split())
    assert "note: the probe batch is replayed in eval mode" in out and "WARNING" not in out
    ck = run.checkpoint(0)
    model = run.model().to(F64)
    cr = node_curvature(model, ck.params, ck.buffers, ck.inputs, ck.targets, run.loss_fn(), recorded_node_layers(run))
    assert res.global_series("loss")[0] == pytest.approx(float(cr.loss), rel=1e-12)
    assert res.attrs["train_mode_replay"]["coupled_curvature"] is False


@pytest.mark.parametrize("case", ["cuda", "compiled"])
def test_unreproducible_masks_are_a_warning(case):
    model = mnist_net(**MNIST).to(F64)
    x = torch.zeros(2, 1, 12, 12, dtype=F64)
    fs = ForwardState(
        size=2,
        training=True,
        differ=(),
        rng_cpu=torch.get_rng_state(),
        rng_cuda=torch.zeros(16, dtype=torch.uint8) if case == "cuda" else None,
        cuda_device=0 if case == "cuda" else None,
    )
    rp, why = replay_mod.plan(model, [fs], x, "cpu", compiled=case == "compiled")
    assert rp.micro and rp.dropout is False and "dropout cannot be replayed with the masks training used" in why
    assert ("CUDA" in why) if case == "cuda" else ("torch.compile" in why)
    out = rp.forward(model, dict(model.named_parameters()), dict(model.named_buffers()), x)
    ref = copy.deepcopy(model).eval()(x)
    assert torch.equal(out, ref)  # dropout off, deterministic


def test_a_validation_pass_between_backward_and_batch_does_not_replace_the_training_pass(tmp_path):
    torch.manual_seed(0)
    model = mnist_net(**MNIST).to(F64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.NLLLoss()
    g = torch.Generator().manual_seed(3)
    with trajscope.Recorder(
        tmp_path / "run", model, opt, loss_fn, model_spec="trajscope.zoo:mnist_net", model_kwargs=MNIST
    ) as rec:
        for _ in range(2):
            x, y = torch.randn(4, 1, 12, 12, generator=g, dtype=F64), torch.randint(0, 10, (4,), generator=g)
            model.train()
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            model.eval()
            with torch.no_grad():  # a metric pass on other data, in eval mode
                model(torch.randn(3, 1, 12, 12, dtype=F64))
            model.train()
            rec.batch(x, y)
            opt.step()
    run = trajscope.open_run(tmp_path / "run")
    fw = run.checkpoint(1).forward
    assert len(fw) == 1 and fw[0].training and fw[0].size == 4
    res = _analyse(run, "--all-steps")
    assert (res.global_series("loss_mismatch") <= 1e-5).all()


def test_run_replay_loss_replays_train_mode(tmp_path):
    run = _resnet_run(tmp_path / "run", accumulate=2, steps=1, b=3)
    ck, model, loss_fn = run.checkpoint(0), run.model().to(F64), run.loss_fn()
    assert run.replay_loss(ck, model, loss_fn).item() == pytest.approx(ck.loss, rel=1e-10)
    assert run.replay_loss(ck, model, loss_fn, train_mode="off").item() != pytest.approx(ck.loss, rel=1e-4)


def test_bad_train_mode_is_one_line(tmp_path):
    with pytest.raises(trajscope.errors.TrajscopeError, match="train_mode must be one of replay, off, got 'eval'"):
        trajscope.analyze(tmp_path, train_mode="eval")


def test_sharpness_is_that_of_the_training_loss(tmp_path):
    """Lanczos on the replayed function: λ_max of the dense Hessian of the train-mode loss (BatchNorm on
    the batch statistics of each of the step's two micro-batches)."""

    run = _resnet_run(tmp_path / "run", accumulate=2, steps=1, b=3, cfg={"in_channels": 1, "width": 2, "classes": 2})
    ck, model = run.checkpoint(0), run.model().to(F64)
    rp, _ = replay_mod.plan(model, ck.forward, ck.inputs, "cpu")
    got = sharpness(model, ck.params, ck.buffers, ck.inputs, ck.targets, nn.CrossEntropyLoss(), replay=rp, tol=1e-8)
    _, loss = _bn_loss(model, ck.params, list(ck.inputs.split(3)), ck.targets, nn.CrossEntropyLoss())
    names = list(ck.params)
    flat = torch.cat([ck.params[k].reshape(-1) for k in names])
    sizes = [ck.params[k].numel() for k in names]

    def f(v):
        return loss({k: t.reshape(ck.params[k].shape) for k, t in zip(names, v.split(sizes))})

    # The dense Hessian by plain double backward, one column at a time: torch.func.hessian (and jacrev of
    # jacrev) get the cross terms of BatchNorm weights wrong here (torch 2.13; off by up to 0.28 against
    # finite differences of the gradient, which this agrees with).
    v = flat.clone().requires_grad_(True)
    g = torch.autograd.grad(f(v), v, create_graph=True)[0]
    H = torch.stack([torch.autograd.grad(g[i], v, retain_graph=True)[0] for i in range(len(flat))])
    i = sum(sizes[: names.index("bn2.weight")])  # a column where torch.func's Hessian is wrong
    e = torch.zeros_like(flat)
    e[i] = 1e-5
    fd = (torch.func.grad(f)(flat + e) - torch.func.grad(f)(flat - e)) / 2e-5
    assert torch.allclose(H[i], fd, atol=1e-7)
    lam = torch.linalg.eigvalsh(0.5 * (H + H.T))[-1]
    assert got.converged and got.value == pytest.approx(float(lam), rel=1e-6)
    eval_value = sharpness(model, ck.params, ck.buffers, ck.inputs, ck.targets, nn.CrossEntropyLoss(), tol=1e-8).value
    assert eval_value != pytest.approx(float(lam), rel=1e-3)
