"""Adversarial review tests of the device handling, the commit timer and the plain-Zarr probe writer.

Device: the public analysis functions (``node_curvature`` of every block form, ``dense_blocks``,
``preconditioned_eigvals``, ``bias_group_eigvals``, ``sharpness`` with a preconditioner and a
shift, ``hvp_operator`` with numpy and tensor vectors, the eigen-solve helpers) are called
directly on a second device, and every result is compared with the CPU and with dense
``torch.func`` references. Without a GPU the second device is torch's TorchScript lazy-tensor
device (it refuses CPU tensors mixed in, as CUDA does), in a subprocess because the lazy backend
is process-global and not thread-safe. The script ``DEVICE_CHECKS`` needs no zarr, so it can run
as it is on a CUDA machine::

    PYTHONPATH=$PWD python3 -c "import ast;t=ast.parse(open('tests/test_review_device_timer_probe.py').read());exec(next(
        n.value.value for n in t.body if isinstance(n, ast.Assign) and n.targets[0].id == 'DEVICE_CHECKS'))" cuda

Recorder: the commit timer under races (a timer that fires while the training thread commits and
re-arms), many open/close cycles, close right as the timer fires, a recorder closed by atexit.

Store: probe leaves of odd dtypes, shapes and memory layouts, read back bit-exactly through
trajscope, through plain zarr and from the chunk file's own bytes; resumed runs with and without a
new probe; probe keys that are paths.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn

import trajscope
from trajscope.record import recorder as recorder_mod
from trajscope import zoo
from trajscope.io import trajectory as store
from trajscope.nodes import find_node_layers
from trajscope.record.recorder import Recorder

from helpers_analysis import F64, record, store_arrays
from helpers_recording import Ref, make_batches, make_model, train
from trajscope.curvature import node as _curv_node
from trajscope.replay.problem import Problem


def node_curvature(model, params, buffers, inputs, targets, loss_fn, *args, replay=None, **kw):
    """node_curvature on the old argument list (the cases here are written that way)."""
    return _curv_node.node_curvature(Problem(model, params, buffers, inputs, targets, loss_fn, replay), *args, **kw)


TESTS = Path(__file__).resolve().parent
LOSS = nn.MSELoss()

# --------------------------------------------------------------------------------------------
# device: direct calls of the analysis functions on a second device
# --------------------------------------------------------------------------------------------
DEVICE_CHECKS = r'''
import json, math, sys, traceback, warnings
dev = sys.argv[1] if len(sys.argv) > 1 else "lazy"
import torch
if dev == "lazy":
    import torch._lazy.ts_backend
    torch._lazy.ts_backend.init()
torch.set_num_threads(1)  # lazy tensors are not thread-safe: no eigen pool
import numpy as np
from torch import nn
from torch.func import functional_call, hessian, jacrev
from trajscope.curvature import blocks as C
from trajscope.linalg import eigen
from trajscope.nodes import find_node_layers, node_matrix
from trajscope.curvature import node as _curv_node
from trajscope.curvature import sharpness as _curv_sharpness
from trajscope.replay.problem import Problem


def node_curvature(model, params, buffers, inputs, targets, loss_fn, *args, replay=None, **kw):
    """node_curvature on the old argument list (the cases here are written that way)."""
    return _curv_node.node_curvature(Problem(model, params, buffers, inputs, targets, loss_fn, replay), *args, **kw)


def sharpness(model, params, buffers, inputs, targets, loss_fn, *, replay=None, **kw):
    """sharpness on the old argument list (the cases here are written that way)."""
    return _curv_sharpness.sharpness(Problem(model, params, buffers, inputs, targets, loss_fn, replay), **kw)


def hvp_operator(model, params, buffers, inputs, targets, loss_fn, names=None, replay=None):
    """hvp_operator on the old argument list (the cases here are written that way)."""
    return _curv_sharpness.hvp_operator(Problem(model, params, buffers, inputs, targets, loss_fn, replay), names)


warnings.simplefilter("ignore")
F64 = torch.float64
DEV = torch.device(dev)
RESULTS = {}


def check(fn):
    try:
        fn()
        RESULTS[fn.__name__] = ""
    except BaseException as e:  # noqa: BLE001 - reported to the test
        RESULTS[fn.__name__] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-4)}"
    return fn


def to(x, d):
    if isinstance(x, torch.Tensor):
        return x.to(d)
    if isinstance(x, dict):
        return {k: to(v, d) for k, v in x.items()}
    return x


def on_cpu64(t, what):
    assert isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dtype == F64, \
        f"{what}: {getattr(t, 'device', None)} {getattr(t, 'dtype', type(t))}, not CPU float64"


def close(got, want, what, rtol=1e-9):
    got, want = got.detach().cpu().to(F64), want.detach().cpu().to(F64)
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN pattern differs"
    ok = ~torch.isnan(want)
    if ok.any():
        scale = max(float(want[ok].abs().max()), 1e-300)
        err = float((got[ok] - want[ok]).abs().max()) / scale
        assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:.0e}"


def spectrum_vs_block(ev, H, what, rtol=1e-8):
    """ev (n, r) descending (p - r implicit zeros) against the spectra of dense blocks H (n, p, p)."""
    n, p = H.shape[0], H.shape[-1]
    full = torch.cat([ev.to(F64), ev.new_zeros(n, p - ev.shape[1], dtype=F64)], 1).sort(1).values
    close(full, torch.linalg.eigvalsh(H.to(F64)), what, rtol)


# ---- dense references on the CPU (torch.func over the flattened parameters) ----------------
def flat_names(params):
    return [k for k, v in params.items() if v.is_floating_point()]


def unflat(vec, params, names):
    out, o = dict(params), 0
    for k in names:
        n = params[k].numel()
        out[k] = vec[o:o + n].view_as(params[k])
        o += n
    return out


def full_hessians(model, params, buffers, x, y, loss_fn):
    """(exact Hessian, GGN) of the loss over all floating parameters, float64, CPU."""
    names = flat_names(params)
    v0 = torch.cat([params[k].reshape(-1) for k in names])
    fwd = lambda v: functional_call(model, {**unflat(v, params, names), **buffers}, (x,))
    H = hessian(lambda v: loss_fn(fwd(v), y))(v0)
    out = fwd(v0).detach()
    J = jacrev(fwd)(v0).reshape(-1, v0.numel())
    Hf = hessian(lambda o: loss_fn(o.reshape(out.shape), y))(out.reshape(-1))
    return H, J.T @ Hf @ J, names


def node_index(params, names, layer, i):
    off, o = {}, 0
    for k in names:
        off[k] = o
        o += params[k].numel()
    fan = params[layer.weight][0].numel()
    idx = [off[layer.weight] + i * fan + k for k in range(fan)]
    if layer.bias is not None:
        idx.append(off[layer.bias] + i)
    return idx


def ref_blocks(H, params, names, layer):
    out = []
    for i in range(layer.n_nodes):
        ix = torch.tensor(node_index(params, names, layer, i))
        out.append(H[ix][:, ix])
    return torch.stack(out)


# ---- models --------------------------------------------------------------------------------
class Seq(nn.Module):
    """Linear layers on (B, T, F) inputs: the GGN keeps all G_i for the first (T=5 > p=3) and
    delta for the second (T=5 <= p=5); exact curvature gives position blocks."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def conv_bn():
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(4, 4, 2, stride=2, groups=2), nn.BatchNorm2d(4), nn.Tanh(),
                      nn.Flatten(), nn.Linear(16, 3)).to(F64)
    m[1].running_mean.uniform_(-0.5, 0.5)
    m[1].running_var.uniform_(0.5, 2.0)
    return m


def conv1d_reflect():
    torch.manual_seed(4)
    return nn.Sequential(nn.Conv1d(2, 3, 3, dilation=2, padding=2, padding_mode="reflect"), nn.Tanh(),
                         nn.Flatten(), nn.Linear(15, 2)).to(F64)


def mlp(sizes=(4, 6, 3), act=nn.Tanh, dtype=F64, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(dtype)


g = torch.Generator().manual_seed(11)
CASES = {
    "mlp": (mlp(), torch.randn(5, 4, generator=g, dtype=F64), torch.tensor([0, 2, 1, 1, 0]), nn.CrossEntropyLoss()),
    "seq3d": (Seq().to(F64), torch.randn(3, 5, 2, generator=g, dtype=F64), torch.randn(3, 5, 3, generator=g, dtype=F64),
              nn.MSELoss()),
    "conv_bn": (conv_bn(), torch.randn(3, 4, 4, 4, generator=g, dtype=F64), torch.tensor([2, 0, 1]),
                nn.CrossEntropyLoss()),
    "conv1d": (conv1d_reflect(), torch.randn(3, 2, 5, generator=g, dtype=F64), torch.randn(3, 2, generator=g, dtype=F64),
               nn.MSELoss()),
}
REFS = {}


def ref(name):
    if name not in REFS:
        model, x, y, lf = CASES[name]
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = {k: v.detach() for k, v in model.named_buffers()}
        model.eval()
        H, GGN, names = full_hessians(model, params, buffers, x, y, lf)
        REFS[name] = (params, buffers, H, GGN, names)
    return REFS[name]


def run_both(name, kind, method="auto"):
    model, x, y, lf = CASES[name]
    params, buffers, H, GGN, names = ref(name)
    layers = find_node_layers(model)
    cpu = node_curvature(model.to("cpu"), params, buffers, x, y, lf, layers, kind=kind, method=method)
    got = node_curvature(model.to(DEV), to(params, DEV), to(buffers, DEV), x.to(DEV), y.to(DEV), lf, layers,
                           kind=kind, method=method)
    model.to("cpu")
    return layers, cpu, got, (H if kind == "exact" else GGN), params, names


FORMS = {}


def curvature_case(name):
    for kind in ("ggn", "exact"):
        for method in ("auto", "gram", "dense"):
            what = f"{name} {kind} {method}"
            layers, cpu, got, Href, params, names = run_both(name, kind, method)
            close(got.loss.reshape(-1), cpu.loss.reshape(-1), f"{what} loss")
            for k in cpu.grads:
                close(got.grads[k], cpu.grads[k], f"{what} grad {k}")
            for l in layers:
                ev = got.eigvals[l.name]
                on_cpu64(ev, f"{what} eigvals {l.name}")
                close(ev, cpu.eigvals[l.name], f"{what} eigvals {l.name} vs cpu")
                blocks = ref_blocks(Href, params, names, l)
                spectrum_vs_block(ev, blocks, f"{what} eigvals {l.name} vs dense reference")
                fac = got.factors[l.name]
                FORMS.setdefault(name, set()).add((l.name, kind, fac.form))
                if fac.form not in ("zero", "nan"):
                    assert fac.device.type == DEV.type, f"{what}: factor of {l.name} on {fac.device}"
                db = C.dense_blocks(fac, [0, l.n_nodes - 1])
                assert db.device.type == DEV.type, f"{what}: dense_blocks on {db.device}"
                close(db, blocks[[0, l.n_nodes - 1]], f"{what} dense_blocks {l.name}", 1e-10)
                close(C.dense_blocks(fac, slice(1, None)), blocks[1:], f"{what} dense_blocks[1:] {l.name}", 1e-10)
                close(C.dense_blocks(fac), blocks, f"{what} dense_blocks(all) {l.name}", 1e-10)


@check
def node_curvature_mlp():
    curvature_case("mlp")


@check
def node_curvature_linear_3d_input():
    curvature_case("seq3d")
    forms = FORMS["seq3d"]
    assert {("a", "ggn", "sqrt"), ("b", "ggn", "sqrt"), ("a", "exact", "block")} <= forms, forms


@check
def node_curvature_conv_groups_batchnorm():
    curvature_case("conv_bn")


@check
def node_curvature_conv1d_dilated_reflect():
    curvature_case("conv1d")


@check
def preconditioned_and_bias_group_eigvals():
    for name in ("mlp", "seq3d", "conv_bn"):
        for kind in ("ggn", "exact"):
            layers, cpu, got, Href, params, names = run_both(name, kind)
            for l in layers:
                what = f"{name} {kind} {l.name}"
                fac, fac_cpu = got.factors[l.name], cpu.factors[l.name]
                N, p = l.n_nodes, l.node_dim
                gg = torch.Generator().manual_seed(5)
                d = torch.rand(N, p, generator=gg, dtype=F64) * 2 + 0.2
                svec = torch.linspace(-0.3, 0.5, p, dtype=F64)
                H = ref_blocks(Href, params, names, l)
                for shift in (0.0, 0.25, svec):
                    sh_dev = shift.to(DEV) if isinstance(shift, torch.Tensor) else shift
                    ev = C.preconditioned_eigvals(fac, d.to(DEV), shift=sh_dev)
                    on_cpu64(ev, f"{what} preconditioned")
                    close(ev, C.preconditioned_eigvals(fac_cpu, d, shift=shift), f"{what} preconditioned vs cpu")
                    ev_cpu_d = C.preconditioned_eigvals(fac, d, shift=sh_dev)  # a CPU preconditioner
                    close(ev_cpu_d, ev, f"{what} preconditioned (CPU D)")
                    sd = d.sqrt()
                    s = shift * torch.ones(p, dtype=F64) if not isinstance(shift, torch.Tensor) else shift
                    M = sd[:, :, None] * (H + torch.diag(s)) * sd[:, None, :]
                    spectrum_vs_block(ev, M, f"{what} preconditioned vs dense reference")
                if fac.form == "diag" and l.bias is not None:
                    wd, wdb, a, sign = 0.01, 0.0, 2.0, -1.0
                    ev = C.bias_group_eigvals(fac, sign, wd, wdb, a)
                    on_cpu64(ev, f"{what} bias_group_eigvals")
                    close(ev, C.bias_group_eigvals(fac_cpu, sign, wd, wdb, a), f"{what} bias group vs cpu")
                    W = torch.full((p,), wd, dtype=F64)
                    W[-1] = wdb
                    A = torch.ones(p, dtype=F64)
                    A[-1] = a
                    sa = A.sqrt()
                    M = sa[:, None] * (sign * H + torch.diag(W)) * sa[None, :] - wd * torch.eye(p, dtype=F64)
                    spectrum_vs_block(ev, M, f"{what} bias group vs dense reference")
    # a factor with no tensors at all ("zero"), the preconditioner on the device
    l = find_node_layers(CASES["mlp"][0])[0]
    zero = C.LayerFactor(l, "zero", "ggn")
    d = torch.rand(l.n_nodes, l.node_dim, dtype=F64) + 0.5
    ev = C.preconditioned_eigvals(zero, d.to(DEV), shift=0.2)
    on_cpu64(ev, "zero factor")
    close(ev, (0.2 * d).sort(1, descending=True).values, "zero factor, shifted")


@check
def eigen_solves_on_device():
    gg = torch.Generator().manual_seed(2)
    for n_mat, m, dtype in ((9, 7, torch.float32), (3, 7, torch.float32), (5, 6, F64), (8, 40, torch.float32)):
        A = torch.randn(n_mat, m, m, generator=gg, dtype=F64)
        K = A @ A.mT - 0.5 * torch.eye(m, dtype=F64)
        K[1, 2, 3] = math.nan
        K[1, 3, 2] = math.nan
        if n_mat > 4:
            K[4] = math.inf
        want = torch.full((n_mat, m), math.nan, dtype=F64)
        ok = torch.isfinite(K).flatten(1).all(1)
        want[ok] = torch.from_numpy(np.linalg.eigvalsh(K[ok].numpy()))
        what = f"_eigvalsh {n_mat}x{m} {dtype}"
        got = C._eigvalsh(K.to(dtype).to(DEV), dtype)
        on_cpu64(got, what)
        close(got, want, what, 1e-5 if dtype == torch.float32 else 1e-12)
        Kf = K[ok].to(dtype)
        e = eigen.eigvalsh(Kf.to(DEV))
        host = dtype == torch.float32 and Kf.shape[0] >= eigen.KERNEL_MIN_BATCH and eigen.kernel_available()
        assert e.device.type == ("cpu" if host else DEV.type), (n_mat, m, dtype, e.device)  # as documented
        close(e, want[ok], f"eigen.eigvalsh {n_mat}x{m} {dtype}", 1e-5 if dtype == torch.float32 else 1e-12)


@check
def float32_blocks_on_device():
    model = mlp((20, 40, 3), nn.ReLU, dtype=torch.float32, seed=1)
    gg = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 20, generator=gg), torch.randn(8, 3, generator=gg)
    p32 = {k: v.detach() for k, v in model.named_parameters()}
    p64 = {k: v.to(F64) for k, v in p32.items()}
    m64 = mlp((20, 40, 3), nn.ReLU, dtype=F64, seed=1)
    H, GGN, names = full_hessians(m64, p64, {}, x.to(F64), y.to(F64), nn.MSELoss())
    layers = find_node_layers(model)
    calls = []
    if eigen.kernel_available():  # count the host kernel's solves of blocks built on the device
        kernel = eigen._smalleig

        class Counting:
            @staticmethod
            def eigvalsh(*args):
                calls.append(args[2])
                return kernel.eigvalsh(*args)
        eigen._smalleig = Counting
    for kind, Href in (("ggn", GGN), ("exact", H)):
        got = node_curvature(model.to(DEV), to(p32, DEV), {}, x.to(DEV), y.to(DEV), nn.MSELoss(), layers, kind=kind)
        model.to("cpu")
        for l in layers:
            ev = got.eigvals[l.name]
            on_cpu64(ev, f"float32 {kind} {l.name}")
            spectrum_vs_block(ev, ref_blocks(Href, p64, names, l), f"float32 {kind} {l.name}", 2e-5)
            d = torch.rand(l.n_nodes, l.node_dim, dtype=torch.float32) + 0.5
            evp = C.preconditioned_eigvals(got.factors[l.name], d.to(DEV))
            sd = d.to(F64).sqrt()
            M = sd[:, :, None] * ref_blocks(Href, p64, names, l) * sd[:, None, :]
            spectrum_vs_block(evp, M, f"float32 preconditioned {kind} {l.name}", 2e-5)
    if eigen.kernel_available():
        eigen._smalleig = kernel
        assert calls and sum(calls) >= 40, calls  # the 40 hidden nodes went through the host kernel


@check
def nonfinite_on_device():
    model, x, y, lf = CASES["mlp"]
    params = {k: v.detach() for k, v in model.named_parameters()}
    layers = find_node_layers(model)
    bad = dict(params)
    bad["2.weight"] = bad["2.weight"].clone()
    bad["2.weight"][1, 1] = math.nan
    for kind in ("ggn", "exact"):
        got = node_curvature(model.to(DEV), to(bad, DEV), {}, x.to(DEV), y.to(DEV), lf, layers, kind=kind)
        assert torch.isnan(got.loss.cpu()).all(), kind
        for l in layers:
            on_cpu64(got.eigvals[l.name], "NaN checkpoint")
            assert torch.isnan(got.eigvals[l.name]).all(), (kind, l.name)
            d = torch.ones(l.n_nodes, l.node_dim, dtype=F64)
            assert torch.isnan(C.preconditioned_eigvals(got.factors[l.name], d.to(DEV), shift=0.1)).all()
    model.to("cpu")
    res = sharpness(model.to(DEV), to(bad, DEV), {}, x.to(DEV), y.to(DEV), lf)
    model.to("cpu")
    assert math.isnan(res.value) and res.n_hvp == 0 and not res.converged, res
    # a non-finite sample that the loss ignores: finite loss, NaN blocks (some of them)
    x2 = x.clone()
    x2[2] = math.nan
    y2 = y.clone()
    y2[2] = -100
    for kind in ("ggn", "exact"):
        cpu = node_curvature(model, params, {}, x2, y2, lf, layers, kind=kind)
        got = node_curvature(model.to(DEV), to(params, DEV), {}, x2.to(DEV), y2.to(DEV), lf, layers, kind=kind)
        model.to("cpu")
        assert torch.isfinite(cpu.loss).all()
        close(got.loss.reshape(-1), cpu.loss.reshape(-1), f"ignored NaN sample {kind} loss")
        for l in layers:
            close(got.eigvals[l.name], cpu.eigvals[l.name], f"ignored NaN sample {kind} {l.name}")
            d = torch.ones(l.n_nodes, l.node_dim, dtype=F64) * 2
            close(C.preconditioned_eigvals(got.factors[l.name], d.to(DEV), shift=0.1),
                  C.preconditioned_eigvals(cpu.factors[l.name], d, shift=0.1), f"ignored NaN sample {kind} precond")


@check
def sharpness_and_hvp_on_device():
    for name in ("mlp", "conv1d"):  # 51 and 53 parameters (Lanczos)
        model, x, y, lf = CASES[name]
        params, buffers, H, _, names = ref(name)
        assert H.shape[0] > 32
        gg = torch.Generator().manual_seed(9)
        pre = {k: torch.rand(v.shape, generator=gg, dtype=F64) + 0.3 for k, v in params.items()}
        pre.pop(names[-1])  # a parameter without an entry counts as 1
        shift = {k: (0.05 if k.endswith("bias") else -0.02) for k in params}
        P = torch.cat([pre.get(k, torch.ones_like(params[k])).reshape(-1) for k in names]).sqrt()
        W = torch.cat([torch.full((params[k].numel(),), shift[k], dtype=F64) for k in names])
        configs = (({"precond": pre}, P[:, None] * H * P[None, :]),
                   ({"precond": to(pre, DEV), "shift": shift}, P[:, None] * (H + torch.diag(W)) * P[None, :]))
        for kw, M in configs[:(2 if name == "mlp" else 0)]:  # Lanczos on lazy: ~1.5 s a call
            what = f"sharpness {name} {sorted(kw)}"
            want = float(torch.linalg.eigvalsh(M)[-1])
            got = sharpness(model.to(DEV), to(params, DEV), to(buffers, DEV), x.to(DEV), y.to(DEV), lf, **kw)
            cpu = sharpness(model.to("cpu"), params, buffers, x, y, lf, **kw)
            assert got.converged and math.isfinite(got.value), (what, got)
            assert abs(got.value - want) <= 1e-5 * abs(want), (what, got.value, want)
            assert abs(got.value - cpu.value) <= 1e-9 * abs(want) and got.n_hvp == cpu.n_hvp, (what, got, cpu)
        # the operator: numpy in -> numpy float64 out, tensors stay on the device
        op, dim = hvp_operator(model.to(DEV), to(params, DEV), to(buffers, DEV), x.to(DEV), y.to(DEV), lf)
        v = np.random.default_rng(1).standard_normal(dim)
        hv = op(v)
        assert isinstance(hv, np.ndarray) and hv.dtype == np.float64 and hv.shape == (dim,), (type(hv), hv.dtype)
        close(torch.from_numpy(hv), H @ torch.from_numpy(v), f"hvp numpy {name}", 1e-10)
        ht = op(torch.from_numpy(v))  # a CPU tensor: moved to the parameters' device
        assert isinstance(ht, torch.Tensor) and ht.device.type == DEV.type
        close(ht, H @ torch.from_numpy(v), f"hvp tensor {name}", 1e-10)
        assert op.count == 2
        sub = [names[-1], names[0]]
        op2, dim2 = hvp_operator(model.to(DEV), to(params, DEV), to(buffers, DEV), x.to(DEV), y.to(DEV), lf, names=sub)
        ix = torch.tensor(sum((list(range(*span)) for span in [
            (sum(params[k].numel() for k in names[:names.index(s)]),
             sum(params[k].numel() for k in names[:names.index(s) + 1])) for s in sub]), []))
        u = np.random.default_rng(2).standard_normal(dim2)
        close(torch.from_numpy(op2(u)), H[ix][:, ix] @ torch.from_numpy(u), f"hvp subset {name}", 1e-10)
        model.to("cpu")
    # fewer than 32 parameters: the dense route, with a preconditioner and a shift
    torch.manual_seed(2)
    lin = nn.Linear(3, 2).to(F64)
    params = {k: v.detach() for k, v in lin.named_parameters()}
    xs, ys = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)
    H, _, names = full_hessians(lin, params, {}, xs, ys, nn.MSELoss())
    pre = {"weight": torch.rand(2, 3, dtype=F64) + 0.5}
    shift = {"bias": 0.3}
    P = torch.cat([pre["weight"].reshape(-1), torch.ones(2, dtype=F64)]).sqrt()
    W = torch.tensor([0.0] * 6 + [0.3, 0.3], dtype=F64)
    want = float(torch.linalg.eigvalsh(P[:, None] * (H + torch.diag(W)) * P[None, :])[-1])
    got = sharpness(lin.to(DEV), to(params, DEV), {}, xs.to(DEV), ys.to(DEV), nn.MSELoss(), precond=to(pre, DEV),
                    shift=shift)
    lin.to("cpu")
    assert got.n_hvp == 8 and abs(got.value - want) <= 1e-10 * abs(want), (got, want)


print("RESULTS " + json.dumps(RESULTS))
'''

DEVICE_CHECK_NAMES = ["node_curvature_mlp", "node_curvature_linear_3d_input", "node_curvature_conv_groups_batchnorm",
                      "node_curvature_conv1d_dilated_reflect", "preconditioned_and_bias_group_eigvals",
                      "eigen_solves_on_device", "float32_blocks_on_device", "nonfinite_on_device",
                      "sharpness_and_hvp_on_device"]


def _run_script(code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def device_results() -> dict[str, str]:
    done = _run_script(DEVICE_CHECKS, "lazy")
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULTS ")), None)
    assert done.returncode == 0 and line is not None, done.stderr[-4000:]
    return json.loads(line[len("RESULTS "):])


@pytest.mark.parametrize("name", DEVICE_CHECK_NAMES)
def test_analysis_functions_on_lazy_device_match_cpu_and_dense_references(device_results, name):
    assert name in device_results, sorted(device_results)
    assert device_results[name] == "", device_results[name]


# --------------------------------------------------------------------------------------------
# device: end to end, paths the other device tests do not take
# --------------------------------------------------------------------------------------------
ANALYSE_ON_LAZY = """
import json, sys
import torch, torch._lazy.ts_backend
torch._lazy.ts_backend.init()
torch.set_num_threads(1)
import trajscope
for run, opts in json.loads(sys.argv[1]):
    trajscope.analyze(run, device="lazy", progress=False, **opts)
"""


def _mlp_run(path: Path, make_opt, *, sizes=(5, 8, 3), act="tanh", probe=None, blow_up: int | None = None) -> None:
    torch.manual_seed(0)
    model = zoo.mlp(list(sizes), activation=act).to(F64)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(6, sizes[0], generator=g, dtype=F64), torch.randn(6, sizes[-1], generator=g, dtype=F64))
            for _ in range(4)]
    if blow_up is not None:  # an overflowing batch: an infinite loss, then non-finite parameters
        data[blow_up] = (data[blow_up][0] * 1e200, data[blow_up][1])
    record(path, model, make_opt(model), nn.MSELoss(), data, probe=probe,
           model_spec="trajscope.zoo:mlp", model_kwargs={"sizes": list(sizes), "activation": act})


def _groups(model, **kw):
    w = [p for n, p in model.named_parameters() if n.endswith("weight")]
    b = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": w, **kw}, {"params": b, "weight_decay": 0.0, "lr": 0.02}]


@pytest.mark.slow
def test_lazy_device_end_to_end_probe_batch_diverged_run_and_amsgrad(tmp_path):
    g = torch.Generator().manual_seed(5)
    probe = (torch.randn(7, 5, generator=g, dtype=F64), torch.randn(7, 3, generator=g, dtype=F64))
    runs = {
        "nesterov_probe": lambda p: _mlp_run(p, lambda m: torch.optim.SGD(
            m.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01), probe=probe),
        "diverged": lambda p: _mlp_run(p, lambda m: torch.optim.SGD(m.parameters(), lr=0.1), act="relu", blow_up=2),
        "adamw_amsgrad": lambda p: _mlp_run(p, lambda m: torch.optim.AdamW(
            _groups(m, weight_decay=0.1), lr=1e-2, amsgrad=True)),
    }
    cases = [("nesterov_probe", {"dtype": "float64", "batch": "probe", "curvature": "exact"}),
             ("diverged", {"dtype": "float64", "all_steps": True}),
             ("adamw_amsgrad", {"dtype": "float64"})]
    jobs = []
    for k, (name, opts) in enumerate(cases):
        src = tmp_path / "rec" / name
        if not src.exists():
            runs[name](src)
        for side in ("cpu", "lazy"):
            shutil.copytree(src, tmp_path / side / str(k))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trajscope.analyze(tmp_path / "cpu" / str(k), progress=False, **opts)
        jobs.append((str(tmp_path / "lazy" / str(k)), opts))
    done = _run_script(ANALYSE_ON_LAZY, json.dumps(jobs))
    assert done.returncode == 0, done.stderr[-4000:]
    for k, (name, opts) in enumerate(cases):
        want, got = store_arrays(tmp_path / "cpu" / str(k)), store_arrays(tmp_path / "lazy" / str(k))
        assert want.keys() == got.keys()
        for key, w in want.items():
            if w.dtype.kind in "iub":
                np.testing.assert_array_equal(got[key], w, err_msg=f"{name} {key}")
            else:
                np.testing.assert_allclose(got[key], w, rtol=1e-9, atol=1e-12, equal_nan=True, err_msg=f"{name} {key}")
        if name == "diverged":  # the paths this run is there for: an infinite loss, then non-finite parameters
            sh = want["global/sharpness"]
            assert np.isfinite(sh[:2]).all() and np.isnan(sh[2:]).all(), sh
            assert np.isinf(want["global/loss"][2]) and not np.isfinite(want["nodes/0/param_norm"][3]).any()


# --------------------------------------------------------------------------------------------
# non-finite parameters: the documented contract of node_curvature
# --------------------------------------------------------------------------------------------
def test_node_curvature_infinite_parameter_gives_nan_spectra():
    """node_curvature's docstring: "Non-finite parameters or loss give NaN spectra, never an error".
    An infinite weight feeding a saturating tanh leaves the loss finite, and the spectra come out
    finite numbers (the Hessian at a parameter vector with an infinite entry is not defined)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    params["0.weight"][1, 2] = math.inf
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 4, generator=g, dtype=F64), torch.randint(0, 3, (5,), generator=g)
    layers = find_node_layers(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = node_curvature(model, params, {}, x, y, nn.CrossEntropyLoss(), layers, kind="exact")
    for l in layers:
        assert torch.isnan(res.eigvals[l.name]).all(), (l.name, res.eigvals[l.name][:2])


# --------------------------------------------------------------------------------------------
# recorder: the inline writer's commit timer
# --------------------------------------------------------------------------------------------
def _alive_timers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if isinstance(t, threading.Timer) and t.is_alive()]


def _step(model, opt, rec, x, y) -> None:
    loss = LOSS(model(x), y)
    opt.zero_grad()
    loss.backward()
    rec.batch(x, y)
    opt.step()


class _TimerWaitsLock:
    """A Lock for which the commit timer thread queues behind ``gate`` (one order a plain Lock
    may also take: which waiter gets a released Lock first is up to the scheduler)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.gate = threading.Event()
        self.timer_waiting = threading.Event()

    def __enter__(self):
        if isinstance(threading.current_thread(), threading.Timer):
            self.timer_waiting.set()
            self.gate.wait(10)
        self._lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()


def test_timer_that_fired_while_training_committed_leaves_no_timer_after_close(tmp_path, monkeypatch):
    """Timer T1 fires and waits for the lock while the next step's pre-hook commits (cancelling
    T1, already running) and arms T2. When T1 gets the lock, training looks recent and it arms
    T3 *over* T2: T2 is no longer referenced, close() cancels and joins only T3, and T2 is still
    alive after close() returns (the daemon thread the change is meant to rule out)."""
    monkeypatch.setattr(recorder_mod, "_COMMIT_INTERVAL", 1.0)  # room for slow steps: the order is fixed
    model = make_model("tensor")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = make_batches("tensor", 3, last=None)
    rec = Recorder(tmp_path / "run", model, opt, LOSS, export=False, background=False)
    before = set(_alive_timers())
    lock = _TimerWaitsLock()
    rec._lock = lock
    try:
        _step(model, opt, rec, *data[0])     # first record: committed at once
        _step(model, opt, rec, *data[1])     # within the interval: the timer T1 is armed
        t1 = rec._timer
        assert t1 is not None
        assert lock.timer_waiting.wait(5)    # T1 fired and waits for the lock
        _step(model, opt, rec, *data[2])     # pre-hook commits and cancels T1; the record arms T2
        lock.gate.set()
        t1.join(5)
        rec.close()
        leaked = [t for t in _alive_timers() if t not in before]
        assert leaked == [], f"timer threads alive after close(): {leaked}"
        assert list(trajscope.open_run(tmp_path / "run").steps) == [0, 1, 2]
    finally:
        lock.gate.set()
        rec.close()
        for t in _alive_timers():  # let a leaked timer run out here (it does nothing after close)
            if t not in before:
                t.join(5)


def test_many_open_close_cycles_and_close_as_the_timer_fires_leave_no_timer(tmp_path):
    """close() at random moments around the timer's expiry (before, at, after), many times: no
    timer thread outlives close(), and every record is committed."""
    rnd = random.Random(0)
    before = set(_alive_timers())
    data = make_batches("tensor", 3, last=None)
    ref_model = make_model("tensor")
    ref = train(ref_model, torch.optim.SGD(ref_model.parameters(), lr=0.1), LOSS, data, ref=Ref())
    armed = 0
    for i in range(12):
        model = make_model("tensor")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        rec = Recorder(tmp_path / f"r{i}", model, opt, LOSS, export=False, background=False)
        for x, y in data:
            _step(model, opt, rec, x, y)
        armed += rec._timer is not None     # the last records wait for the timer
        time.sleep(rnd.uniform(0.0, 0.35))
        rec.close()
        assert rec._timer is None
        assert [t for t in _alive_timers() if t not in before] == [], i
        run = trajscope.open_run(tmp_path / f"r{i}")
        assert list(run.steps) == [0, 1, 2]
        for r in range(3):
            for k, v in ref.params[r].items():
                assert _raw(run.params(r)[k]) == _raw(v), (i, r, k)
    assert armed >= 6, armed


ATEXIT_CHILD = textwrap.dedent("""
    import sys, threading, torch
    from helpers_recording import make_batches, make_model, train
    import trajscope.record.recorder as R
    from trajscope.record.recorder import Recorder
    R._COMMIT_INTERVAL = 5.0  # the last records surely wait for the timer when the script ends
    model = make_model("tensor")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = (torch.arange(6.0).reshape(2, 3), {"flag": torch.tensor(True), "bf": torch.ones(2, dtype=torch.bfloat16)})
    rec = Recorder(sys.argv[1], model, opt, torch.nn.MSELoss(), export=False, background=False, probe=probe)
    train(model, opt, torch.nn.MSELoss(), make_batches("tensor", 5), rec=rec)
    print("TIMER", rec._timer is not None)
    print("THREADS", sorted(t.name for t in threading.enumerate()))
    # no close(): atexit closes the recorder
""")


def test_recorder_left_open_is_closed_by_atexit_without_zarr_threads(tmp_path):
    """A Recorder never closed: the interpreter exits cleanly (no SIGABRT) with its timer
    pending, atexit commits the last records, and the training process never started zarr's
    event-loop or pool threads (the probe is written without zarr)."""
    done = _run_script(ATEXIT_CHILD, str(tmp_path / "run"), timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])
    assert "Fatal Python error" not in done.stderr
    assert "TIMER True" in done.stdout, done.stdout
    threads = next(l for l in done.stdout.splitlines() if l.startswith("THREADS"))
    assert "zarr" not in threads and "asyncio" not in threads, threads
    run = trajscope.open_run(tmp_path / "run")
    assert list(run.steps) == [0, 1, 2, 3, 4]
    probe = run.probe
    assert torch.equal(probe[0], torch.arange(6.0).reshape(2, 3))
    assert probe[1]["flag"].dtype == torch.bool and bool(probe[1]["flag"]) and probe[1]["flag"].shape == ()
    assert probe[1]["bf"].dtype == torch.bfloat16 and torch.equal(probe[1]["bf"], torch.ones(2, dtype=torch.bfloat16))


# --------------------------------------------------------------------------------------------
# store: probe leaves of every odd kind
# --------------------------------------------------------------------------------------------
def _raw(t: torch.Tensor) -> bytes:
    """The C-order bytes of a tensor's values (views resolved)."""
    t = t.detach().resolve_conj().resolve_neg().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _odd_leaves() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    c = torch.randn(3, 2, generator=g, dtype=torch.complex64)
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-45, 3.4e38, -1.5])
    base = torch.randn(4, 6, generator=g)
    leaves = {
        "bf16": torch.cat([special, torch.randn(4, generator=g)]).to(torch.bfloat16).reshape(3, 4),
        "f16": special.half(),
        "f64_special": special.double(),
        "bool": torch.tensor([[True, False, True], [False, False, True]]),
        "c64": c,
        "c128": torch.randn(2, 2, generator=g, dtype=torch.complex128),
        "conj_view": c.conj(),
        "neg_view": torch._neg_view(torch.randn(3, generator=g)),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "i16_0d": torch.tensor(-7, dtype=torch.int16),
        "bool_0d": torch.tensor(True),
        "f32_0d": torch.tensor(-0.0),
        "i32": torch.tensor([-2**31, 2**31 - 1], dtype=torch.int32),
        "i64": torch.tensor([-2**63, 2**63 - 1]),
        "empty": torch.zeros(0),
        "empty_3d": torch.zeros(3, 0, 2, dtype=torch.float64),
        "empty_bool": torch.zeros(0, 2, dtype=torch.bool),
        "transposed": base.t(),
        "strided": base[::2, 1::3],
        "expanded": torch.randn(1, 3, generator=g).expand(4, 3),
        "offset_view": base.reshape(-1)[5:11],
        "requires_grad": torch.randn(2, 2, generator=g, requires_grad=True),
        "from_big_endian_numpy": torch.from_numpy(np.arange(6, dtype=">f8").astype("<f8")).reshape(2, 3),
        "channels_last": torch.randn(2, 3, 2, 2, generator=g).to(memory_format=torch.channels_last),
    }
    for name in ("uint16", "uint32", "uint64"):
        dt = getattr(torch, name, None)
        if dt is not None:
            leaves[name] = torch.tensor([0, 1, 7], dtype=torch.int64).to(dt)
    return leaves


@pytest.mark.parametrize("background", [False, True])
def test_odd_probe_leaves_bit_exact_through_trajscope_zarr_and_chunk_bytes(tmp_path, background):
    leaves = _odd_leaves()
    want = {k: v.detach().clone() for k, v in leaves.items()}
    probe = (leaves, [leaves["c64"], None, 3])
    model = make_model("tensor")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Recorder(tmp_path / "run", model, opt, LOSS, export=False, probe=probe, background=background) as rec:
        train(model, opt, LOSS, make_batches("tensor", 2), rec=rec)
    assert rec.failed is None, rec.failed
    got = trajscope.open_run(tmp_path / "run").probe
    assert isinstance(got, tuple) and isinstance(got[1], list) and got[1][1] is None and got[1][2] == 3
    assert torch.equal(got[1][0], want["c64"])
    spath = tmp_path / "run" / store.STORE_NAME
    walked = {name for name, node in zarr.open_group(str(spath / "probe"), mode="r").members(max_depth=None)
              if isinstance(node, zarr.Array)}
    assert walked == {f"probe.0.{k}" for k in want} | {"probe.1.0"}, sorted(walked)
    for k, w in want.items():
        t = got[0][k]
        assert t.dtype == w.dtype and tuple(t.shape) == tuple(w.shape), (k, t.dtype, t.shape)
        assert _raw(t) == _raw(w), k
        # plain zarr, and the chunk file itself (one uncompressed chunk, C order, little endian)
        arr = zarr.open_array(str(spath / "probe" / f"probe.0.{k}"), mode="r")
        np_want = np.frombuffer(_raw(w), dtype=np.uint16 if w.dtype == torch.bfloat16 else
                                (w.detach().resolve_conj().resolve_neg().contiguous().numpy().dtype)).reshape(tuple(w.shape))
        assert arr.shape == np_want.shape and arr.dtype == np_want.dtype, (k, arr.shape, arr.dtype)
        assert np.asarray(arr[...]).tobytes() == np_want.tobytes(), k
        chunk = spath / "probe" / f"probe.0.{k}" / ".".join(["c"] + ["0"] * w.dim())
        if w.numel():
            assert chunk.read_bytes() == np_want.astype(np_want.dtype.newbyteorder("<")).tobytes(), k
        else:
            assert not chunk.exists(), k


def test_resumed_run_keeps_its_probe_or_replaces_it(tmp_path):
    leaves = _odd_leaves()
    probe = {"x": leaves["bf16"], "y": leaves["conj_view"], "n": leaves["i16_0d"]}
    want = {k: v.detach().clone() for k, v in probe.items()}
    model = make_model("tensor")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = make_batches("tensor", 6, last=None)
    with Recorder(tmp_path / "run", model, opt, LOSS, export=False, probe=probe) as rec:
        train(model, opt, LOSS, data[:2], rec=rec)
    # resumed without a probe: the first one stays, bit for bit
    with Recorder(tmp_path / "run", model, opt, LOSS, export=False, resume=True) as rec:
        train(model, opt, LOSS, data[2:4], rec=rec)
    run = trajscope.open_run(tmp_path / "run")
    assert list(run.steps) == [0, 1, 2, 3]
    assert sorted(run.probe) == sorted(want)
    for k, w in want.items():
        assert run.probe[k].dtype == w.dtype and _raw(run.probe[k]) == _raw(w), k
    # resumed with a new probe: same leaf names, other dtypes and shapes (a 0-d leaf becomes empty, ...)
    new = {"x": torch.zeros(0, 5, dtype=torch.int8), "y": torch.tensor(2.5, dtype=torch.float64),
           "n": torch.arange(12, dtype=torch.int64).reshape(3, 4)}
    with Recorder(tmp_path / "run", model, opt, LOSS, export=False, resume=True, probe=new, background=False) as rec:
        train(model, opt, LOSS, data[4:], rec=rec)
    run = trajscope.open_run(tmp_path / "run")
    assert list(run.steps) == [0, 1, 2, 3, 4, 5]
    assert sorted(run.probe) == sorted(new)
    spath = tmp_path / "run" / store.STORE_NAME
    for k, w in new.items():
        assert run.probe[k].dtype == w.dtype and tuple(run.probe[k].shape) == tuple(w.shape), k
        assert _raw(run.probe[k]) == _raw(w), k
        arr = zarr.open_array(str(spath / "probe" / f"probe.{k}"), mode="r")
        assert arr.shape == tuple(w.shape) and np.asarray(arr[...]).tobytes() == _raw(w), k
        # no chunk of the old leaf is left behind (an empty leaf has none at all)
        chunks = sorted(p.name for p in (spath / "probe" / f"probe.{k}").iterdir() if p.name != "zarr.json")
        assert chunks == ([".".join(["c"] + ["0"] * w.dim())] if w.numel() else []), (k, chunks)


def test_probe_key_with_a_slash_roundtrips(tmp_path):
    probe = ({"img/left": torch.arange(4.0), "img/right": torch.arange(3, dtype=torch.int32)}, torch.ones(2, 1))
    model = make_model("tensor")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Recorder(tmp_path / "run", model, opt, LOSS, export=False, probe=probe, background=False) as rec:
        train(model, opt, LOSS, make_batches("tensor", 1), rec=rec)
    got = trajscope.open_run(tmp_path / "run").probe
    assert torch.equal(got[0]["img/left"], probe[0]["img/left"])
    assert torch.equal(got[0]["img/right"], probe[0]["img/right"]) and got[0]["img/right"].dtype == torch.int32


def test_probe_keys_cannot_write_or_delete_outside_the_run_folder(tmp_path):
    """Probe leaf names come from the user's dict keys and become paths under ``probe/``. zarr
    refused '..' segments; the plain writer joins them into a path as they are: the leaf is
    written into a folder outside the run, and a resumed run's new probe ``rmtree``s it."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("not trajscope's")
    run_dir = tmp_path / "runs" / "run"
    key = "/" + "/".join([".."] * 5) + "/victim"   # probe/probe./../../../../../victim -> tmp_path/victim
    probe = {key: torch.ones(2)}
    model = make_model("tensor")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for resume in (False, True):
            with Recorder(run_dir, model, opt, LOSS, export=False, probe=probe, background=False,
                          resume=resume) as rec:
                train(model, opt, LOSS, make_batches("tensor", 1), rec=rec)
    assert (victim / "precious.txt").exists(), "a file outside the run folder was deleted"
    assert sorted(p.name for p in victim.iterdir()) == ["precious.txt"], "files were written outside the run folder"
