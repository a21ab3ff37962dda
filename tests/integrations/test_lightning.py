"""``trajscope.integrations.lightning.TrajscopeCallback`` on a real Lightning 2.x ``Trainer`` (CPU):
every recorded step holds the batch (all micro-batches under gradient accumulation), θ_t and the
loss the step used, compared with what the LightningModule itself saw; the run replays from the
module's import spec and hparams; node blocks equal torch.func.hessian of the step's loss."""

from __future__ import annotations

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import trajscope
from tests.helpers.analysis import node_rows
from trajscope.integrations.lightning import TrajscopeCallback
from trajscope.zoo import mlp

SIZES = [3, 6, 2]
N, B = 24, 4  # 6 batches per epoch


class Net(L.LightningModule):
    """A user's LightningModule: the loss in a ``loss_fn`` attribute, its own record of every step."""

    def __init__(self, sizes: list[int] = SIZES, lr: float = 0.05, dtype: str = "float64", fail_at: int = -1) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = mlp(list(sizes), activation="tanh").to(getattr(torch, dtype))
        self.loss_fn = nn.MSELoss()
        self.pending: list[dict] = []  # the micro-batches since the last optimizer step
        self.steps: list[dict] = []  # per optimizer step: its micro-batches, losses, θ_t, gradient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == self.hparams.fail_at:
            raise RuntimeError("the user's training step failed")
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.pending.append({"x": x.clone(), "y": y.clone(), "loss": loss.detach().clone()})
        return loss

    def validation_step(self, batch, batch_idx):  # the loss module is called outside training steps too
        x, y = batch
        self.loss_fn(self(x), y)

    def on_before_optimizer_step(self, optimizer) -> None:
        self.steps.append(
            {
                "micro": self.pending,
                "step": self.trainer.global_step,
                "theta": {n: p.detach().clone() for n, p in self.named_parameters()},
                "grad": {n: p.grad.detach().clone() for n, p in self.named_parameters()},
            }
        )
        self.pending = []

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    def on_fit_end(self) -> None:
        out = getattr(self, "out_dir", None)  # spawned ranks: their record of the steps, to a file
        if out is not None:
            torch.save(self.steps, f"{out}/rank{self.global_rank}.pt")


def _data(dtype: torch.dtype, n: int = N, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, SIZES[0], generator=g).to(dtype), torch.randn(n, SIZES[-1], generator=g).to(dtype)
    )


def _fit(
    path,
    module: L.LightningModule,
    accumulate: int = 1,
    precision: str = "32-true",
    epochs: int = 2,
    callback: TrajscopeCallback | None = None,
    data: TensorDataset | None = None,
    val: bool = True,
) -> TrajscopeCallback:
    data = data if data is not None else _data(next(module.parameters()).dtype)
    cb = callback or TrajscopeCallback(path)
    trainer = L.Trainer(
        max_epochs=epochs,
        accumulate_grad_batches=accumulate,
        precision=precision,
        callbacks=[cb],
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
    )
    loader = DataLoader(data, batch_size=B, shuffle=True, generator=torch.Generator().manual_seed(2))
    trainer.fit(module, loader, DataLoader(data, batch_size=B) if val else None)
    return cb


def _loss_of_node(model, loss_fn, ck, layer: str, i: int):
    w, b = f"{layer}.weight", f"{layer}.bias"

    def loss_of(v):
        params = {
            **ck.params,
            w: ck.params[w].index_put((torch.tensor([i]),), v[:-1][None]),
            b: ck.params[b].index_put((torch.tensor([i]),), v[-1:]),
        }
        return loss_fn(torch.func.functional_call(model, params, (ck.inputs,)), ck.targets)

    return loss_of


@pytest.mark.parametrize("accumulate, precision", [(2, "32-true"), (1, "bf16-mixed"), (2, "bf16-mixed")])
def test_trainer_records_the_batch_theta_and_loss_each_step_used(tmp_path, accumulate, precision):
    path = tmp_path / "run"
    module = Net()
    cb = _fit(path, module, accumulate, precision)
    assert cb.recorder.failed is None and cb.recorder._closed
    run = trajscope.open_run(path)
    n_steps = 2 * N // (B * accumulate)
    assert [s["step"] for s in module.steps] == list(range(n_steps)) and list(run.steps) == list(range(n_steps))
    assert run.attrs["model"]["spec"] == f"{__name__}:Net"
    assert run.attrs["model"]["kwargs"] == {"sizes": SIZES, "lr": 0.05, "dtype": "float64", "fail_at": -1}
    model, loss_fn = run.model(), run.loss_fn()
    for seen in module.steps:
        ck = run.checkpoint(seen["step"])
        assert len(seen["micro"]) == accumulate
        # the step's batch, step 0 included: all its micro-batches, in order (not one step late)
        assert torch.equal(ck.inputs, torch.cat([m["x"] for m in seen["micro"]]))
        assert torch.equal(ck.targets, torch.cat([m["y"] for m in seen["micro"]]))
        for n, p in seen["theta"].items():
            assert torch.equal(ck.params[n], p)
        # the loss the module computed (not divided by accumulate_grad_batches), its mean over micro-batches
        assert ck.loss == pytest.approx(torch.stack([m["loss"] for m in seen["micro"]]).mean().item(), rel=1e-12)
        assert run.replay_loss(ck, model, loss_fn).item() == pytest.approx(ck.loss, rel=1e-5, abs=0)
        # and the replayed gradient of the joined batch is the one the optimizer stepped with
        grad = torch.func.grad(lambda p: loss_fn(torch.func.functional_call(model, p, (ck.inputs,)), ck.targets))(
            {n: v.clone() for n, v in ck.params.items()}
        )
        for n, g in grad.items():
            torch.testing.assert_close(g, seen["grad"][n], rtol=1e-9, atol=1e-12)
    res = trajscope.analyze(path, curvature="exact", dtype="float64", sharpness=False)[run.path]
    assert list(res.steps) == list(range(n_steps - 1))
    assert res.attrs["fidelity"]["max_loss_mismatch"] < 1e-5
    for k in (0, len(res.steps) - 1):
        ck = run.checkpoint(int(res.steps[k]))
        for layer, i in (("net.0", 0), ("net.0", 4), ("net.2", 1)):
            eig = torch.linalg.eigvalsh(
                torch.func.hessian(_loss_of_node(model, loss_fn, ck, layer, i))(node_rows(ck.params, layer)[i])
            )
            assert res.node(layer, "hess_max", k)[i] == pytest.approx(eig[-1].item(), rel=1e-6, abs=1e-10)
            assert res.node(layer, "hess_min", k)[i] == pytest.approx(eig[0].item(), rel=1e-6, abs=1e-10)


def test_bf16_autocast_records_the_loss_training_computed_and_the_replay_says_it_differs(tmp_path):
    """float32 layers under "bf16-mixed" really run in bf16: the recorded loss is the one training
    computed (autocast), the replay is full precision, and the fidelity check says they differ."""
    path = tmp_path / "run"
    module = Net(dtype="float32")
    _fit(path, module, 2, "bf16-mixed", epochs=1)
    run = trajscope.open_run(path)
    model, loss_fn = run.model(), run.loss_fn()
    gaps = []
    for seen in module.steps:
        ck = run.checkpoint(seen["step"])
        assert torch.equal(ck.inputs, torch.cat([m["x"] for m in seen["micro"]]))
        assert ck.loss == pytest.approx(
            torch.stack([m["loss"] for m in seen["micro"]]).double().mean().item(), rel=1e-7
        )
        gaps.append(abs(run.replay_loss(ck, model, loss_fn).item() - ck.loss) / ck.loss)
    assert 1e-4 < max(gaps) < 5e-2  # bf16 rounding, not another batch or step
    res = trajscope.analyze(path, sharpness=False)[run.path]
    assert res.attrs["fidelity"]["steps_over_tolerance"]


@pytest.mark.parametrize("how", ["argument", "criterion attribute"])
def test_split_and_the_loss_from_an_argument_or_the_module(tmp_path, how):
    class DictNet(Net):
        """Dict batches; the loss is L1, in a ``criterion`` attribute or known only to the caller."""

        def __init__(self, **kw):
            super().__init__(**kw)
            del self.loss_fn
            self.criterion = nn.L1Loss() if how == "criterion attribute" else None

        def training_step(self, batch, batch_idx):
            x, y = batch["features"], batch["labels"]
            loss = nn.functional.l1_loss(self(x), y)
            self.pending.append({"x": x.clone(), "y": y.clone(), "loss": loss.detach().clone()})
            return loss

    data = [{"features": x, "labels": y} for x, y in _data(torch.float64)]
    module = DictNet()
    cb = TrajscopeCallback(
        tmp_path / "run",
        loss_fn=nn.L1Loss() if how == "argument" else None,
        split=lambda b: (b["features"], b["labels"]),
        model_spec=f"{__name__}:Net",
        model_kwargs={"sizes": SIZES},
    )
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=[cb],
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(
        module,
        DataLoader(
            data,
            batch_size=B,
            collate_fn=lambda items: {k: torch.stack([it[k] for it in items]) for k in ("features", "labels")},
        ),
    )
    run = trajscope.open_run(tmp_path / "run")
    assert run.attrs["loss"]["class"] == "torch.nn.modules.loss:L1Loss"
    assert run.attrs["model"]["spec"] == f"{__name__}:Net" and run.attrs["model"]["kwargs"] == {"sizes": SIZES}
    model, loss_fn = run.model(), run.loss_fn()
    for seen in module.steps:
        ck = run.checkpoint(seen["step"])
        assert torch.equal(ck.inputs, seen["micro"][0]["x"]) and torch.equal(ck.targets, seen["micro"][0]["y"])
        assert ck.loss == pytest.approx(seen["micro"][0]["loss"].item(), rel=1e-12)
        assert run.replay_loss(ck, model, loss_fn).item() == pytest.approx(ck.loss, rel=1e-5, abs=0)


def test_a_batch_that_is_no_pair_warns_once_and_training_goes_on(tmp_path):
    class Triple(Net):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch[:2], batch_idx)

    x, y = _data(torch.float64).tensors
    module = Triple()
    with pytest.warns(RuntimeWarning, match=r"recording stopped .*not an \(inputs, targets\) pair: pass split="):
        _fit(tmp_path / "run", module, epochs=1, data=TensorDataset(x, y, torch.arange(N)), val=False)
    assert len(module.steps) == N // B  # every step trained
    assert len(trajscope.open_run(tmp_path / "run").steps) == 0


def test_an_exception_in_fit_closes_the_recorder_and_keeps_the_steps(tmp_path):
    module = Net(fail_at=3)
    cb = TrajscopeCallback(tmp_path / "run")
    with pytest.raises(RuntimeError, match="the user's training step failed"):
        _fit(tmp_path / "run", module, callback=cb)
    assert cb.recorder._closed and cb.recorder.failed is None
    run = trajscope.open_run(tmp_path / "run")
    assert list(run.steps) == [0, 1, 2]
    for seen in module.steps:
        assert torch.equal(run.checkpoint(seen["step"]).inputs, seen["micro"][0]["x"])


def test_several_optimizers_record_the_first_and_say_so(tmp_path):
    class TwoOpt(Net):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt_a, opt_b = self.optimizers()
            x, y = batch
            loss = self.loss_fn(self(x), y)
            opt_a.zero_grad()
            opt_b.zero_grad()
            self.manual_backward(loss)
            opt_a.step()
            opt_b.step()

        def configure_optimizers(self):
            return (
                torch.optim.SGD(self.net[0].parameters(), lr=0.05),
                torch.optim.Adam(self.net[2].parameters(), lr=0.01),
            )

    with pytest.warns(UserWarning, match=r"2 optimizers; only the first \(SGD\) is recorded, not Adam"):
        _fit(tmp_path / "run", TwoOpt(), epochs=1, val=False)
    run = trajscope.open_run(tmp_path / "run")
    assert run.optimizer_class == "torch.optim.sgd.SGD" and list(run.steps) == list(range(N // B))
    assert np.isfinite(run.losses).all()


def test_ddp_spawn_with_two_ranks_records_the_union_of_their_shards(tmp_path):
    """Lightning's own DDP (2 spawned gloo processes, its DistributedSampler): the callback on each rank,
    one run; the step's batch is the union of the ranks' batches, its loss their mean."""
    path = tmp_path / "run"
    module = Net()
    module.out_dir = str(tmp_path)
    trainer = L.Trainer(
        max_epochs=1,
        accumulate_grad_batches=2,
        strategy="ddp_spawn",
        devices=2,
        accelerator="cpu",
        callbacks=[TrajscopeCallback(path)],
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    # 32 samples: 4 batches of 4 per rank, two whole accumulation windows
    trainer.fit(module, DataLoader(_data(torch.float64, n=32), batch_size=B, shuffle=True))
    ranks = [torch.load(tmp_path / f"rank{k}.pt", weights_only=False) for k in range(2)]
    run = trajscope.open_run(path)
    assert run.attrs["distributed"]["world_size"] == 2 and len(ranks[0]) == len(ranks[1]) == 2
    assert list(run.steps) == [s["step"] for s in ranks[0]]
    model, loss_fn = run.model(), run.loss_fn()
    for s0, s1 in zip(*ranks):
        ck = run.checkpoint(s0["step"])
        assert torch.equal(ck.inputs, torch.cat([m["x"] for m in s0["micro"] + s1["micro"]]))
        losses = [torch.stack([m["loss"] for m in s["micro"]]).mean().item() for s in (s0, s1)]
        assert ck.loss == pytest.approx(sum(losses) / 2, rel=1e-12)
        assert run.replay_loss(ck, model, loss_fn).item() == pytest.approx(ck.loss, rel=1e-5, abs=0)
        grad = torch.func.grad(lambda p: loss_fn(torch.func.functional_call(model, p, (ck.inputs,)), ck.targets))(
            {n: v.clone() for n, v in ck.params.items()}
        )
        for n, g in grad.items():  # DDP's averaged gradient, the same on both ranks
            torch.testing.assert_close(g, s0["grad"][n], rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(g, s1["grad"][n], rtol=1e-9, atol=1e-12)


def test_a_module_without_import_spec_is_exported_and_replays(tmp_path):
    """A LightningModule defined in a script has no import spec: the Recorder exports it (the loss module
    inside it carries the recorder's hook, which the copy for export must not drag along) and the run
    replays from the exported program."""

    class ScriptNet(Net):
        pass

    module = ScriptNet()
    with pytest.warns(UserWarning, match="no import spec for the model .*ScriptNet is defined in a script"):
        _fit(tmp_path / "run", module, accumulate=2, epochs=1, val=False)
    run = trajscope.open_run(tmp_path / "run")
    assert run.attrs["model"]["spec"] is None and run.attrs["model"]["exported"] == "extra/model.pt2", run.attrs[
        "model"
    ]["export_error"]
    model, loss_fn = run.model(), run.loss_fn()
    for seen in module.steps:
        ck = run.checkpoint(seen["step"])
        assert run.replay_loss(ck, model, loss_fn).item() == pytest.approx(ck.loss, rel=1e-5, abs=0)
    res = trajscope.analyze(tmp_path / "run", sharpness=False)[run.path]
    assert res.attrs["fidelity"]["max_loss_mismatch"] < 1e-5


@pytest.mark.parametrize("same_run", [True, False])
def test_fit_from_a_checkpoint_records_at_the_checkpoints_step(tmp_path, same_run):
    """fit(ckpt_path=...): the step numbers go on from the checkpoint's (Lightning restores it after
    on_fit_start), in the same run with resume=True or in a new one."""
    path, ckpt = tmp_path / "run", tmp_path / "after-epoch-1.ckpt"
    first = Net()
    _fit(path, first, accumulate=2, epochs=1, val=False)
    n = len(first.steps)
    first.trainer.save_checkpoint(ckpt)
    second = Net()
    path2 = path if same_run else tmp_path / "run2"
    t2 = L.Trainer(
        max_epochs=2,
        accumulate_grad_batches=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[TrajscopeCallback(path2, resume=same_run)],
    )
    t2.fit(
        second,
        DataLoader(_data(torch.float64), batch_size=B, shuffle=True, generator=torch.Generator().manual_seed(5)),
        ckpt_path=ckpt,
    )
    assert [s["step"] for s in second.steps] == list(range(n, 2 * n))
    run = trajscope.open_run(path2)
    assert list(run.steps) == list(range(0 if same_run else n, 2 * n)) and not run.restarts
    for seen in (first.steps if same_run else []) + second.steps:
        ck = run.checkpoint(seen["step"])
        assert torch.equal(ck.inputs, torch.cat([m["x"] for m in seen["micro"]]))
        for name, p in seen["theta"].items():
            assert torch.equal(ck.params[name], p)


class DropNet(Net):
    """Dropout in the module's forward: its masks come from the RNG state of the forward pass, which
    Lightning runs inside ``optimizer.step(closure)``, after the callback handed the batch over."""

    def __init__(self, sizes: list[int] = SIZES, lr: float = 0.05, dtype: str = "float64", fail_at: int = -1) -> None:
        super().__init__(sizes, lr, dtype, fail_at)
        self.drop = nn.Dropout(0.4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.drop(x))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_dropout_masks_of_each_micro_batch_are_replayed(tmp_path, accumulate):
    path = tmp_path / "run"
    _fit(path, DropNet(), accumulate, epochs=1, val=False)
    run = trajscope.open_run(path)
    for s in run.steps:
        fw = run.checkpoint(int(s)).forward
        assert fw is not None and [f.size for f in fw] == [B] * accumulate and all(f.training for f in fw)
    res = trajscope.analyze(path, dtype="float64", sharpness=False)[path]
    assert res.attrs["train_mode_replay"]["replayed_checkpoints"] == len(res.steps)
    np.testing.assert_array_less(res.global_series("loss_mismatch"), 1e-5)
    assert not [w for w in res.attrs["warnings"] if "eval mode" in w or "replayed loss differs" in w]
