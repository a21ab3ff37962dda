"""DistributedDataParallel with 2 gloo processes on the CPU (SPEC 2, issue 11): one run folder; rank 0
alone records parameters, state and hyperparameters; every rank records its own batch shard and
loss; the step's batch is the union of the shards in rank order, its loss the mean of the ranks'
losses, and the replayed gradient of the union is DDP's averaged gradient. A rank whose recorder
fails never stalls the others: its later steps are damaged steps, named."""

from __future__ import annotations

import os
import re
import socket
import time
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import trajscope
from tests.helpers.analysis import make_mlp, mlp_spec, node_rows
from trajscope.cli.main import main
from trajscope.io.layout import STORE_NAME, find_runs, shard_store_name

SIZES = (3, 5, 2)
WORLD = 2
STEPS = 5
F64 = torch.float64


class DropMLP(nn.Module):
    """The MLP behind a dropout layer: each rank draws its own masks from its own generator."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.3)
        self.net = make_mlp(SIZES)

    def forward(self, x):
        return self.net(self.drop(x))


def _worker(rank: int, port: int, path: str, out: str, fail_at: int | None, dropout: bool = False) -> None:
    """One DDP rank: a real DistributedSampler shard per rank, SPEC 2's loop, everything the step used
    saved to ``out/rank<k>.pt`` as the reference. Rank 1 breaks its recorder at step ``fail_at``."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(rank)  # the ranks' dropout masks differ
        model = DropMLP().double() if dropout else make_mlp(SIZES)
        spec = {"model_spec": f"{__name__}:DropMLP"} if dropout else mlp_spec(SIZES)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        loss_fn = nn.MSELoss()
        g = torch.Generator().manual_seed(3)
        data = TensorDataset(
            torch.randn(STEPS * 4 * WORLD, SIZES[0], generator=g, dtype=F64),
            torch.randn(STEPS * 4 * WORLD, SIZES[-1], generator=g, dtype=F64),
        )
        sampler = DistributedSampler(data, num_replicas=WORLD, rank=rank, shuffle=True, seed=0)
        seen, times = [], []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rec = trajscope.Recorder(path, ddp, opt, loss_fn, export=False, **spec)
            for t, (x, y) in enumerate(DataLoader(data, batch_size=4, sampler=sampler)):
                start = time.perf_counter()
                theta = {n: p.detach().clone() for n, p in model.named_parameters()}
                loss = loss_fn(ddp(x), y)
                opt.zero_grad()
                loss.backward()  # DDP all-reduces: every rank now holds the averaged gradient
                # a real failure inside the recorder (an element it cannot record): it must warn and stop
                rec.batch(x, object() if (rank, t) == (1, fail_at) else y)
                seen.append(
                    {
                        "x": x,
                        "y": y,
                        "loss": loss.item(),
                        "theta": theta,
                        "grad": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
                    }
                )
                opt.step()
                times.append(time.perf_counter() - start)
            rec.close()
        torch.save(
            {
                "steps": seen,
                "failed": rec.failed,
                "times": times,
                "warnings": [str(w.message) for w in caught],
                "n_recorded": rec.n_recorded,
            },
            os.path.join(out, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(
    tmp_path, fail_at: int | None = None, timeout: float = 240.0, dropout: bool = False
) -> tuple[list[dict], str]:
    path, out = str(tmp_path / "run"), str(tmp_path)
    ctx = mp.start_processes(
        _worker, args=(_free_port(), path, out, fail_at, dropout), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the DDP ranks did not finish within {timeout} s")
    return [torch.load(os.path.join(out, f"rank{k}.pt"), weights_only=False) for k in range(WORLD)], path


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("ddp"))


def test_only_rank0_writes_parameters_state_and_hparams(ddp_run):
    ranks, path = ddp_run
    assert [r["failed"] for r in ranks] == [None, None] and [r["n_recorded"] for r in ranks] == [STEPS, STEPS]
    main, shard = os.path.join(path, STORE_NAME), os.path.join(path, shard_store_name(1))
    assert sorted(os.listdir(path)) == sorted([STORE_NAME, shard_store_name(1)])  # one run folder
    assert {"params", "state", "hparams", "batch", "records"} <= set(os.listdir(main))
    assert not {"params", "buffers", "state", "hparams"} & set(os.listdir(shard))
    assert {"batch", "records"} <= set(os.listdir(shard))
    run = trajscope.open_run(path)
    assert run.attrs["distributed"] == {"world_size": 2, "shards": [shard_store_name(1)]}
    assert run.attrs["model"]["wrapped_by"] == ["DistributedDataParallel"]
    assert sorted(run.param_shapes) == ["0.bias", "0.weight", "2.bias", "2.weight"]  # no "module." prefix
    assert find_runs([os.path.dirname(path)]) == [run.path]  # the shard is no run


def test_step_batch_is_the_union_of_the_shards_and_replay_is_ddp(ddp_run):
    ranks, path = ddp_run
    run = trajscope.open_run(path)
    model, loss_fn = run.model(), run.loss_fn()
    assert list(run.steps) == list(range(STEPS))
    for t in range(STEPS):
        ck = run.checkpoint(t)
        shards = [r["steps"][t] for r in ranks]
        assert not torch.equal(shards[0]["x"], shards[1]["x"])  # different shards
        assert torch.equal(ck.inputs, torch.cat([s["x"] for s in shards]))  # union, rank order
        assert torch.equal(ck.targets, torch.cat([s["y"] for s in shards]))
        for n, p in shards[0]["theta"].items():
            assert torch.equal(ck.params[n], p) and torch.equal(shards[1]["theta"][n], p)
        mean = (shards[0]["loss"] + shards[1]["loss"]) / 2
        assert ck.loss == pytest.approx(mean, rel=1e-12)
        assert run.replay_loss(ck, model, loss_fn).item() == pytest.approx(ck.loss, rel=1e-5, abs=0)
        # the gradient of the union batch, replayed, is the gradient DDP averaged and the step used
        grad = torch.func.grad(lambda p: loss_fn(torch.func.functional_call(model, p, (ck.inputs,)), ck.targets))(
            {n: v.clone() for n, v in ck.params.items()}
        )
        for n, g in grad.items():
            torch.testing.assert_close(g, shards[0]["grad"][n], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(g, shards[1]["grad"][n], rtol=1e-10, atol=1e-12)


def test_node_blocks_are_the_hessian_of_the_union_batch(ddp_run):
    ranks, path = ddp_run
    res = trajscope.analyze(path, curvature="exact", dtype="float64", sharpness=False)[trajscope.open_run(path).path]
    run = trajscope.open_run(path)
    model, loss_fn = run.model(), run.loss_fn()
    assert list(res.steps) == list(range(STEPS - 1))
    for k, step in enumerate(res.steps[:2]):
        ck = run.checkpoint(step)
        for layer, i in (("0", 1), ("2", 0)):
            theta = node_rows(ck.params, layer)[i]

            def loss_of(v, layer=layer, i=i):
                w, b = f"{layer}.weight", f"{layer}.bias"
                params = {
                    **ck.params,
                    w: ck.params[w].index_put((torch.tensor([i]),), v[:-1][None]),
                    b: ck.params[b].index_put((torch.tensor([i]),), v[-1:]),
                }
                return loss_fn(torch.func.functional_call(model, params, (ck.inputs,)), ck.targets)

            eig = torch.linalg.eigvalsh(torch.func.hessian(loss_of)(theta))
            assert res.node(layer, "hess_max", k)[i] == pytest.approx(eig[-1].item(), rel=1e-6, abs=1e-10)
            assert res.node(layer, "hess_min", k)[i] == pytest.approx(eig[0].item(), rel=1e-6, abs=1e-10)
    assert res.attrs["fidelity"]["max_loss_mismatch"] < 1e-10


def test_a_failed_recorder_on_rank1_never_stalls_rank0(tmp_path):
    fail_at = 2
    ranks, path = _train(tmp_path, fail_at=fail_at, timeout=240.0)
    r0, r1 = ranks
    # rank 1's recorder warned once and stopped; both ranks trained every step, rank 0 recorded every step
    assert r1["failed"] is not None and "cannot record a batch element of type object" in r1["failed"]
    assert sum("recording stopped" in w for w in r1["warnings"]) == 1
    assert r0["failed"] is None and r0["n_recorded"] == STEPS and len(r0["times"]) == len(r1["times"]) == STEPS
    assert not any("recording stopped" in w for w in r0["warnings"])
    assert max(r0["times"]) < 10.0  # no step of rank 0 waited on rank 1's recorder
    run = trajscope.open_run(path)
    assert list(run.steps) == list(range(STEPS))
    losses = run.losses
    assert np.all(np.isfinite(losses[:fail_at])) and np.all(np.isnan(losses[fail_at:]))
    ck = run.checkpoint(1)
    assert torch.equal(ck.inputs, torch.cat([r0["steps"][1]["x"], r1["steps"][1]["x"]]))
    with pytest.raises(
        trajscope.errors.DamagedRecordError,
        match=rf"step {fail_at} of {shard_store_name(1)} .*"
        r"rank 1's batch shard is missing",
    ):
        run.checkpoint(fail_at)
    with pytest.warns(UserWarning, match=r"rank 1's batch shard is missing"):
        res = trajscope.analyze(path, sharpness=False)[run.path]
    damaged = res.global_series("damaged")
    assert np.all(np.isnan(damaged[:fail_at])) and np.all(damaged[fail_at:] == 1)
    assert np.all(np.isfinite(res.global_series("loss")[:fail_at]))


def test_info_and_verify_cover_the_shards(ddp_run, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # rich's table, one line per row
    ranks, path = ddp_run
    assert main(["info", path]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "2 ranks: rank 0 recorded parameters and state" in out and "every shard present" in out
    assert re.search(
        r"batch \(last\) *│ inputs \[8, 3\] float64, targets \[8, 2\] float64", out
    )  # the union of two shards of 4
    assert main(["verify", path]) == 0
    capsys.readouterr()


def test_info_names_the_steps_a_stopped_rank_lacks_and_verify_a_lost_shard_store(tmp_path, capsys, monkeypatch):
    import shutil

    monkeypatch.setenv("COLUMNS", "400")
    _, path = _train(tmp_path, fail_at=3)
    assert main(["info", path]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "rank 1 lacks 2 step(s) (3, 4: damaged steps, not analysed)" in out
    shutil.rmtree(os.path.join(path, shard_store_name(1)))
    assert main(["verify", path]) != 0
    err = capsys.readouterr().err
    assert (
        len(err.strip().splitlines()) == 1
        and f"{shard_store_name(1)} is damaged (rank 1's batch shards cannot be read" in err
    )
    assert "rank 1 recorded nothing, there is no trajectory.rank1.zarr: create the Recorder on every rank" in err


def test_distributed_true_without_a_process_group_is_one_line(tmp_path):
    model = make_mlp(SIZES)
    with pytest.raises(ValueError, match=r"^distributed=True needs an initialised torch.distributed process group"):
        trajscope.Recorder(tmp_path / "run", model, torch.optim.SGD(model.parameters(), lr=0.1), distributed=True)
    assert not (tmp_path / "run").exists()


def test_dropout_masks_of_every_rank_are_replayed(tmp_path):
    """Each rank's forward state is read with its shard: the union batch replays with every rank's masks."""
    ranks, path = _train(tmp_path, dropout=True)
    run = trajscope.open_run(path)
    for t, s in enumerate(run.steps):
        fw = run.checkpoint(int(s)).forward
        assert [f.size for f in fw] == [4] * WORLD
        assert run.checkpoint(int(s)).loss == pytest.approx(np.mean([r["steps"][t]["loss"] for r in ranks]), rel=1e-12)
    (res,) = trajscope.analyze(path, dtype="float64", sharpness=False).values()
    assert res.attrs["train_mode_replay"]["replayed_checkpoints"] == len(res.steps)
    np.testing.assert_array_less(res.global_series("loss_mismatch"), 1e-5)
