"""Node kinematics (docs/spec.md §6): closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from trajscope.dynamics.kinematics import node_kinematics


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_weight_decay_collapse_with_zero_gradient(dtype):
    """Plain SGD with a zero gradient: θ' = (1 − α·wd)θ, so ρ = 1 − α·wd and no drift."""
    lr, wd, k = 0.1, 0.5, 4
    w = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=dtype).requires_grad_(True)
    opt = torch.optim.SGD([w], lr=lr, weight_decay=wd)
    theta0 = w.detach().clone()
    snaps = [theta0]
    for _ in range(k):
        w.grad = torch.zeros_like(w)
        opt.step()
        snaps.append(w.detach().clone())
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    one = node_kinematics(snaps[0], snaps[1])
    assert one["rho"].dtype == torch.float32 and one["rho"].shape == (5,)
    assert torch.allclose(one["rho"].double(), torch.full((5,), 1 - lr * wd, dtype=torch.float64), atol=tol)
    assert torch.allclose(one["drift"], torch.zeros(5), atol=1e-6)
    assert torch.allclose(one["param_norm"].double(), theta0.double().norm(dim=1), rtol=1e-6)
    multi = node_kinematics(snaps[0], snaps[k], k=k)  # per-step geometric mean over k steps
    assert torch.allclose(
        multi["rho"].double(), torch.full((5,), 1 - lr * wd, dtype=torch.float64), atol=max(tol, 1e-7)
    )


def test_drift_of_a_rotation():
    """Rotating by φ in a plane: drift = 2·sin(φ/2) (chord), ρ = 1; a sign flip drifts by 2."""
    phis = torch.tensor([0.0, 1e-4, 0.3, math.pi / 2, 2.0, math.pi], dtype=torch.float64)
    theta = torch.zeros(len(phis), 4, dtype=torch.float64)
    theta[:, 0] = 3.0
    nxt = torch.zeros_like(theta)
    nxt[:, 0] = 3.0 * torch.cos(phis)
    nxt[:, 2] = 3.0 * torch.sin(phis)
    out = node_kinematics(theta, nxt)
    assert torch.allclose(out["drift"].double(), 2 * torch.sin(phis / 2), rtol=1e-6, atol=1e-7)
    assert torch.allclose(out["rho"], torch.ones(len(phis)))
    # small drifts are not lost to cancellation
    assert float(out["drift"][1]) == pytest.approx(1e-4, rel=1e-5)


def test_zero_norm_and_nonfinite_give_nan_not_a_crash():
    theta = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [math.nan, 1.0], [math.inf, 0.0]])
    nxt = torch.tensor([[1.0, 0.0], [0.0, 0.0], [2.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    out = node_kinematics(theta, nxt)
    assert math.isnan(out["rho"][0]) and math.isnan(out["drift"][0])  # ‖θ_t‖ = 0
    assert float(out["rho"][1]) == 0.0 and math.isnan(out["drift"][1])  # exact collapse
    assert float(out["rho"][2]) == 2.0 and float(out["drift"][2]) == 0.0
    assert math.isnan(out["param_norm"][3]) and math.isnan(out["rho"][3])
    assert math.isinf(out["param_norm"][4])
    none = node_kinematics(theta, None)
    assert torch.isnan(none["rho"]).all() and torch.isnan(none["drift"]).all()
    assert float(none["param_norm"][1]) == 1.0
    with pytest.raises(ValueError):
        node_kinematics(theta, nxt, k=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inputs_are_not_modified(dtype):
    """The directions are formed in place in private copies: float64 inputs (no copy by .to)
    and 1-D views must come back untouched."""
    g = torch.Generator().manual_seed(2)
    theta = torch.randn(6, 5, generator=g, dtype=dtype)
    nxt = theta + 0.01 * torch.randn(6, 5, generator=g, dtype=dtype)
    before = theta.clone(), nxt.clone()
    out = node_kinematics(theta, nxt)
    assert torch.equal(theta, before[0]) and torch.equal(nxt, before[1])
    u0, u1 = (
        theta.double() / theta.double().norm(dim=1, keepdim=True),
        nxt.double() / nxt.double().norm(dim=1, keepdim=True),
    )
    assert torch.allclose(out["drift"].double(), (u1 - u0).norm(dim=1), rtol=1e-6)
    row = theta[2]
    node_kinematics(row, row * 2)
    assert torch.equal(theta, before[0])
