"""Dense float64 references for per-node curvature: ``torch.func.hessian`` of the loss restricted
to one node's parameters θ_i (exact), J_iᵀ (∂²L/∂f²) J_i from ``torch.func.jacrev`` (GGN), the
spectrum and dense-block checks against them, and the small models the curvature tests share.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from trajscope.curvature.blocks import dense_blocks
from trajscope.nodes import node_matrix

DT = torch.float64
RTOL = 1e-9  # relative to the largest |eigenvalue| of the block


# ----------------------------------------------------------------------------- references
def _with_node(params, layer, i, th):
    """params with row i of the layer's node matrix replaced by th."""
    p = dict(params)
    W = p[layer.weight]
    n = W[0].numel()
    rows = W.reshape(W.shape[0], -1)
    p[layer.weight] = torch.cat([rows[:i], th[:n][None], rows[i + 1 :]]).reshape(W.shape)
    if layer.bias is not None:
        b = p[layer.bias]
        p[layer.bias] = torch.cat([b[:i], th[n:], b[i + 1 :]])
    return p


def _call(model, p, x):
    if isinstance(x, tuple):
        return functional_call(model, p, x)
    if isinstance(x, dict):
        return functional_call(model, p, (), x)
    return functional_call(model, p, (x,))


def ref_exact(model, params, x, y, loss_fn, layer, i):
    th0 = node_matrix(params, layer)[i]
    return hessian(lambda th: loss_fn(_call(model, _with_node(params, layer, i, th), x), y))(th0)


def ref_ggn(model, params, x, y, loss_fn, layer, i):
    th0 = node_matrix(params, layer)[i]
    out = _call(model, params, x)
    J = jacrev(lambda th: _call(model, _with_node(params, layer, i, th), x))(th0)  # (*out, p)
    J = J.reshape(-1, th0.numel())
    Hf = hessian(lambda o: loss_fn(o.reshape(out.shape), y))(out.reshape(-1).detach())
    return J.T @ Hf @ J


def spectrum_close(ev_ours, H_ref, p, tol=RTOL):
    """ours (r,) descending vs the full spectrum of the reference block (p - r zeros beyond r)."""
    ev = torch.linalg.eigvalsh(H_ref)
    scale = float(ev.abs().max()) + 1e-300
    r = ev_ours.numel()
    assert ev_ours.dtype == torch.float64
    assert torch.all(ev_ours[:-1] >= ev_ours[1:]), "not sorted descending"
    full = torch.cat([ev_ours, ev_ours.new_zeros(p - r)]).sort().values
    err = float((full - ev).abs().max()) / scale
    assert err < tol, f"spectrum error {err:.2e}"


def check_layer(res, model, params, x, y, loss_fn, layer, ref, nodes=None, tol=RTOL):
    fac = res.factors[layer.name]
    D = dense_blocks(fac)
    assert D.shape == (layer.n_nodes, layer.node_dim, layer.node_dim)
    for i in range(layer.n_nodes) if nodes is None else nodes:
        H = ref(model, params, x, y, loss_fn, layer, i)
        scale = float(H.abs().max()) + 1e-300
        assert float((D[i] - H).abs().max()) / scale < tol * 10, f"{layer.name}[{i}] dense block"
        spectrum_close(res.eigvals[layer.name][i], H, layer.node_dim, tol)


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# ----------------------------------------------------------------------------- models
def mlp(act, seed=0):
    torch.manual_seed(seed)
    # layer 1 and 2: p > B (Gram route); layer 3: p <= B (dense route)
    return nn.Sequential(nn.Linear(8, 6), act(), nn.Linear(6, 3), act(), nn.Linear(3, 3)).to(DT)


def mlp_data(loss, B=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 8, generator=g, dtype=DT)
    if loss == "ce":
        return x, torch.randint(0, 3, (B,), generator=g), nn.CrossEntropyLoss()
    return x, torch.randn(B, 3, generator=g, dtype=DT), nn.MSELoss()


class SeqMLP(nn.Module):
    """(B, T, F) -> Linear over the last dim -> act -> mean over T -> Linear."""

    def __init__(self, act):
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.act = act()
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = self.act(self.inp(x))
        return self.out((h * h.flip(1)).mean(1) + h.mean(1))  # mixes positions nonlinearly


# ----------------------------------------------------------------------------- Conv
def small_cnn(act, bias, seed=0):
    torch.manual_seed(seed)
    # conv 1: T = 16 positions > p (GGN keeps all G_i); conv 2: T = 4 < p (GGN keeps delta)
    m = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1, bias=bias),
        act(),
        nn.Conv2d(3, 2, 2, stride=2, bias=bias),
        act(),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, 3),
    ).to(DT)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(3, 1, 4, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (3,), generator=g)
    return m, x, y, nn.CrossEntropyLoss()
