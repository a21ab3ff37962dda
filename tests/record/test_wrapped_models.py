"""Wrapped models (torch.compile's OptimizedModule, DistributedDataParallel, DataParallel) are
recorded under the bare model's parameter names, so a run replays with the model's own factory and
the replayed loss equals the recorded one."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

import trajscope
from tests.helpers.analysis import batches, make_mlp, mlp_spec
from tests.helpers.references import ref_exact
from trajscope.io.specs import unwrap_model
from trajscope.nodes import find_node_layers

SIZES = (3, 5, 2)


def _train(path, wrapped: nn.Module, bare: nn.Module, steps: int = 4) -> None:
    opt = torch.optim.SGD(bare.parameters(), lr=0.1)
    loss_fn = nn.MSELoss()
    with trajscope.Recorder(path, wrapped, opt, loss_fn, export=False, **mlp_spec(SIZES)) as rec:
        for x, y in batches(steps, SIZES[0], SIZES[-1]):
            loss = loss_fn(wrapped(x), y)
            opt.zero_grad()
            loss.backward()
            rec.batch(x, y)
            opt.step()
    assert rec.failed is None, rec.failed


def _check_replay(path, wrapper: str) -> None:
    run = trajscope.open_run(path)
    assert sorted(run.param_shapes) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert run.attrs["model"]["wrapped_by"] == [wrapper]
    assert [d["name"] for d in run.attrs["model"]["node_layers"]] == ["0", "2"]
    model, loss_fn = run.model(), run.loss_fn()
    for step in run.steps:
        ck = run.checkpoint(int(step))
        assert run.replay_loss(ck, model, loss_fn).item() == pytest.approx(ck.loss, rel=1e-5, abs=0)
    res = trajscope.analyze(path, sharpness=False, curvature="exact", dtype="float64")[path]
    assert len(res.steps) == len(run.steps) - 1
    # node blocks of the bare model's loss on the step's batch (torch.func.hessian, float64)
    k = 1
    ck = run.checkpoint(int(res.steps[k]))
    params = {n: v.double() for n, v in ck.params.items()}
    x, y = ck.batch
    bare = make_mlp(SIZES)
    layers = {l.name: l for l in find_node_layers(bare)}
    for layer, node in (("0", 0), ("0", 4), ("2", 1)):
        H = ref_exact(bare, params, x.double(), y.double(), nn.MSELoss(), layers[layer], node)
        ev = torch.linalg.eigvalsh(H)
        assert res.node(layer, "hess_max")[k, node] == pytest.approx(float(ev[-1]), rel=1e-6, abs=1e-12)
        assert res.node(layer, "hess_min")[k, node] == pytest.approx(
            float(ev[0]), rel=1e-6, abs=1e-9 * float(ev.abs().max())
        )


def test_torch_compile(tmp_path):
    bare = make_mlp(SIZES)
    compiled = torch.compile(bare, backend="eager")  # a real OptimizedModule, without a C++ build
    assert next(iter(dict(compiled.named_parameters()))).startswith("_orig_mod.")
    _train(tmp_path / "run", compiled, bare)
    _check_replay(tmp_path / "run", "OptimizedModule")


def test_data_parallel(tmp_path):
    bare = make_mlp(SIZES)
    _train(tmp_path / "run", nn.DataParallel(bare), bare)
    _check_replay(tmp_path / "run", "DataParallel")


@pytest.fixture
def gloo_world():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_distributed_data_parallel_names(tmp_path, gloo_world):
    bare = make_mlp(SIZES)
    ddp = nn.parallel.DistributedDataParallel(bare)
    _train(tmp_path / "run", ddp, bare)
    _check_replay(tmp_path / "run", "DistributedDataParallel")


def test_nested_wrappers_unwrap_outermost_first():
    bare = make_mlp(SIZES)
    inner, wrappers = unwrap_model(torch.compile(nn.DataParallel(bare), backend="eager"))
    assert inner is bare and wrappers == ["OptimizedModule", "DataParallel"]
    assert unwrap_model(bare) == (bare, [])
