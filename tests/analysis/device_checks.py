"""Direct calls of the public analysis functions on a second device, compared with the CPU and with
dense ``torch.func`` references (run by tests/analysis/test_device.py in a subprocess: the lazy
backend is process-global and not thread-safe). It needs no zarr, so it runs as it is on a CUDA
machine::

    PYTHONPATH=$PWD python3 tests/analysis/device_checks.py cuda

Prints one line ``RESULTS {name: error or ""}``.
"""

import json
import math
import sys
import traceback
import warnings

dev = sys.argv[1] if len(sys.argv) > 1 else "lazy"
import torch

if dev == "lazy":
    import torch._lazy.ts_backend

    torch._lazy.ts_backend.init()
torch.set_num_threads(1)  # lazy tensors are not thread-safe: no eigen pool
import numpy as np
from torch import nn
from torch.func import functional_call, hessian, jacrev

from tests.helpers.calls import hvp_operator, node_curvature, sharpness
from trajscope.curvature.blocks import dense_blocks
from trajscope.curvature.factors import LayerFactor
from trajscope.curvature.spectra import bias_group_eigvals, preconditioned_eigvals
from trajscope.linalg import eigen
from trajscope.nodes import find_node_layers

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
    assert isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dtype == F64, (
        f"{what}: {getattr(t, 'device', None)} {getattr(t, 'dtype', type(t))}, not CPU float64"
    )


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
        out[k] = vec[o : o + n].view_as(params[k])
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
    m = nn.Sequential(
        nn.Conv2d(4, 4, 2, stride=2, groups=2), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(), nn.Linear(16, 3)
    ).to(F64)
    m[1].running_mean.uniform_(-0.5, 0.5)
    m[1].running_var.uniform_(0.5, 2.0)
    return m


def conv1d_reflect():
    torch.manual_seed(4)
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, dilation=2, padding=2, padding_mode="reflect"), nn.Tanh(), nn.Flatten(), nn.Linear(15, 2)
    ).to(F64)


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
    "seq3d": (
        Seq().to(F64),
        torch.randn(3, 5, 2, generator=g, dtype=F64),
        torch.randn(3, 5, 3, generator=g, dtype=F64),
        nn.MSELoss(),
    ),
    "conv_bn": (
        conv_bn(),
        torch.randn(3, 4, 4, 4, generator=g, dtype=F64),
        torch.tensor([2, 0, 1]),
        nn.CrossEntropyLoss(),
    ),
    "conv1d": (
        conv1d_reflect(),
        torch.randn(3, 2, 5, generator=g, dtype=F64),
        torch.randn(3, 2, generator=g, dtype=F64),
        nn.MSELoss(),
    ),
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
    got = node_curvature(
        model.to(DEV), to(params, DEV), to(buffers, DEV), x.to(DEV), y.to(DEV), lf, layers, kind=kind, method=method
    )
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
                db = dense_blocks(fac, [0, l.n_nodes - 1])
                assert db.device.type == DEV.type, f"{what}: dense_blocks on {db.device}"
                close(db, blocks[[0, l.n_nodes - 1]], f"{what} dense_blocks {l.name}", 1e-10)
                close(dense_blocks(fac, slice(1, None)), blocks[1:], f"{what} dense_blocks[1:] {l.name}", 1e-10)
                close(dense_blocks(fac), blocks, f"{what} dense_blocks(all) {l.name}", 1e-10)


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
                    ev = preconditioned_eigvals(fac, d.to(DEV), shift=sh_dev)
                    on_cpu64(ev, f"{what} preconditioned")
                    close(ev, preconditioned_eigvals(fac_cpu, d, shift=shift), f"{what} preconditioned vs cpu")
                    ev_cpu_d = preconditioned_eigvals(fac, d, shift=sh_dev)  # a CPU preconditioner
                    close(ev_cpu_d, ev, f"{what} preconditioned (CPU D)")
                    sd = d.sqrt()
                    s = shift * torch.ones(p, dtype=F64) if not isinstance(shift, torch.Tensor) else shift
                    M = sd[:, :, None] * (H + torch.diag(s)) * sd[:, None, :]
                    spectrum_vs_block(ev, M, f"{what} preconditioned vs dense reference")
                if fac.form == "diag" and l.bias is not None:
                    wd, wdb, a, sign = 0.01, 0.0, 2.0, -1.0
                    ev = bias_group_eigvals(fac, sign, wd, wdb, a)
                    on_cpu64(ev, f"{what} bias_group_eigvals")
                    close(ev, bias_group_eigvals(fac_cpu, sign, wd, wdb, a), f"{what} bias group vs cpu")
                    W = torch.full((p,), wd, dtype=F64)
                    W[-1] = wdb
                    A = torch.ones(p, dtype=F64)
                    A[-1] = a
                    sa = A.sqrt()
                    M = sa[:, None] * (sign * H + torch.diag(W)) * sa[None, :] - wd * torch.eye(p, dtype=F64)
                    spectrum_vs_block(ev, M, f"{what} bias group vs dense reference")
    # a factor with no tensors at all ("zero"), the preconditioner on the device
    l = find_node_layers(CASES["mlp"][0])[0]
    zero = LayerFactor(l, "zero", "ggn")
    d = torch.rand(l.n_nodes, l.node_dim, dtype=F64) + 0.5
    ev = preconditioned_eigvals(zero, d.to(DEV), shift=0.2)
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
        got = eigen._eigvalsh(K.to(dtype).to(DEV), dtype)
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
            evp = preconditioned_eigvals(got.factors[l.name], d.to(DEV))
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
            assert torch.isnan(preconditioned_eigvals(got.factors[l.name], d.to(DEV), shift=0.1)).all()
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
            close(
                preconditioned_eigvals(got.factors[l.name], d.to(DEV), shift=0.1),
                preconditioned_eigvals(cpu.factors[l.name], d, shift=0.1),
                f"ignored NaN sample {kind} precond",
            )


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
        configs = (
            ({"precond": pre}, P[:, None] * H * P[None, :]),
            ({"precond": to(pre, DEV), "shift": shift}, P[:, None] * (H + torch.diag(W)) * P[None, :]),
        )
        for kw, M in configs[: (2 if name == "mlp" else 0)]:  # Lanczos on lazy: ~1.5 s a call
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
        ix = torch.tensor(
            sum(
                (
                    list(range(*span))
                    for span in [
                        (
                            sum(params[k].numel() for k in names[: names.index(s)]),
                            sum(params[k].numel() for k in names[: names.index(s) + 1]),
                        )
                        for s in sub
                    ]
                ),
                [],
            )
        )
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
    got = sharpness(
        lin.to(DEV), to(params, DEV), {}, xs.to(DEV), ys.to(DEV), nn.MSELoss(), precond=to(pre, DEV), shift=shift
    )
    lin.to("cpu")
    assert got.n_hvp == 8 and abs(got.value - want) <= 1e-10 * abs(want), (got, want)


print("RESULTS " + json.dumps(RESULTS))
