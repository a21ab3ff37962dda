"""Node labels (docs/spec.md §7): closed-form cases, the seed preset, hysteresis, non-finite input."""

from __future__ import annotations

import math

import pytest
import torch

from trajscope.dynamics.labels import (
    LABELS,
    REASONS,
    LabelConfig,
    classify,
    collapse_reference_norm,
    resolve_delta,
    stable_labels,
)
from trajscope.dynamics.motion import motion_from_eigs
from trajscope.dynamics.optimizers import UpdateRule, update_rule
from trajscope.dynamics.updatemap import node_update_spectra
from trajscope.errors import TrajscopeError

F64 = torch.float64
L = {name: i for i, name in enumerate(LABELS)}
R = {name: i for i, name in enumerate(REASONS)}


def linreg_eigs(n_in: int = 3, batch: int = 20, seed: int = 0) -> torch.Tensor:
    """Eigenvalues (1, r) of the node block of a 1-output linear regression (MSE), via torch.func.hessian."""
    g = torch.Generator().manual_seed(seed)
    xa = torch.cat([torch.randn(batch, n_in, generator=g, dtype=F64), torch.ones(batch, 1, dtype=F64)], 1)
    y = torch.randn(batch, generator=g, dtype=F64)
    h = torch.func.hessian(lambda th: torch.mean((xa @ th - y) ** 2))(torch.zeros(n_in + 1, dtype=F64))
    ev = torch.linalg.eigvalsh(h).flip(0)
    return ev[ev > 1e-9 * ev[0]][None, :]


def run_classify(
    spectra,
    config=LabelConfig(preset="acted"),
    delta=1e-3,
    param_norm=None,
    ref=None,
    grad=None,
    hess_min=None,
    loss=1.0,
):
    n = spectra.radius.shape[0]
    one = torch.ones(n)
    return classify(
        spectra,
        one if param_norm is None else param_norm,
        one if ref is None else ref,
        one if grad is None else grad,
        one if hess_min is None else hess_min,
        loss,
        config,
        delta,
    )


@pytest.mark.parametrize(
    "factor,label,reason",
    [
        (1.0, "healthy_sink", "contracting"),
        (2.0, "plateau", "neutral_direction"),  # αλmax = 2: μ = −1 on the unit circle
        (2.2, "source", "expanding"),
    ],
)
def test_linear_regression_below_at_above_two_over_lambda_max(factor, label, reason):
    eig = linreg_eigs()
    lam_max, lam_min = float(eig[0, 0]), float(eig[0, -1])
    lr = factor / lam_max
    config = LabelConfig(preset="acted")
    delta = resolve_delta(config, total_steps=1000)
    assert delta == 1e-3 and lr * lam_min > delta  # the smallest direction contracts visibly
    sp = node_update_spectra(eig, eig.shape[1], update_rule("SGD", {"lr": lr}, None))
    lab, why, neutral = run_classify(sp, config, delta)
    assert (LABELS[int(lab[0])], REASONS[int(why[0])]) == (label, reason)
    assert lab.dtype == torch.uint8 and why.dtype == torch.uint8 and neutral.dtype == torch.int32
    assert int(neutral[0]) == (1 if label == "plateau" else 0)


def test_dead_node_is_plateau_with_all_directions_null():
    p = 4
    eig = torch.zeros(2, 0, dtype=F64)  # zero curvature on the data: r = 0
    for rule in [
        UpdateRule("sgd", 0.1),
        UpdateRule("sgd_momentum", 0.1, momentum=0.9, has_buffer=True),
        UpdateRule("adam", 0.01, has_buffer=True, step=10),
    ]:
        sp = node_update_spectra(eig, p, rule)
        assert sp.null_dims.tolist() == [p, p]
        lab, why, neutral = run_classify(sp, grad=torch.tensor([0.0, 0.5]))
        assert lab.tolist() == [L["plateau"]] * 2
        assert why.tolist() == [R["dead"], R["drifting"]]  # zero gradient vs. moving on a flat piece
        assert neutral.tolist() == [0, 0]


def test_weight_decay_collapsed_node_is_degenerate_sink():
    """A dead node under SGD + wd: θ shrinks by (1 − α·wd) per step until it collapses."""
    lr, wd, steps = 0.1, 0.5, 50
    w = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=F64).requires_grad_(True)
    w.data[2] *= 1e3  # a node far from collapse compared with the layer median
    opt = torch.optim.SGD([w], lr=lr, weight_decay=wd)
    first = w.detach().norm(dim=1)
    for _ in range(steps):
        w.grad = torch.zeros_like(w)
        opt.step()
    rule = update_rule("SGD", opt.param_groups[0], opt.state[w])
    sp = node_update_spectra(torch.zeros(3, 0, dtype=F64), 4, rule)
    assert sp.null_dims.tolist() == [0, 0, 0]  # wd acts on every direction: μ = 1 − α·wd
    assert torch.allclose(sp.mu_abs, torch.full((3, 4), 1 - lr * wd, dtype=F64))
    config = LabelConfig(preset="acted")
    delta = resolve_delta(config, steps)
    now = w.detach().norm(dim=1)
    lab, why, _ = run_classify(
        sp, config, delta, param_norm=now, ref=collapse_reference_norm(config, now, first), grad=torch.zeros(3)
    )
    assert lab.tolist() == [L["degenerate_sink"]] * 3 and why.tolist() == [R["collapsed"]] * 3
    # relative to the layer median, only nodes far below the median collapse
    med = LabelConfig(preset="acted", collapse_reference="layer_median")
    lab, _, _ = run_classify(sp, med, delta, param_norm=now, ref=collapse_reference_norm(med, now), grad=torch.zeros(3))
    assert lab[2] == L["healthy_sink"]
    # the seed preset calls the same node a plateau: H has zero eigenvalues (σ_min = 0)
    seed = LabelConfig(preset="seed")
    lab, why, _ = run_classify(
        sp, seed, resolve_delta(seed, steps), param_norm=now, grad=torch.zeros(3), hess_min=torch.zeros(3), loss=0.0
    )
    assert lab.tolist() == [L["plateau"]] * 3 and why.tolist() == [R["seed_zero_curvature"]] * 3


@pytest.mark.parametrize("wd", [0.0, 0.3])
def test_null_directions_are_plateau_under_seed_but_not_under_acted(wd):
    """B < p: H_i has p − r zero eigenvalues. Acted preset ignores what the step cannot act on."""
    eig = linreg_eigs(n_in=5, batch=4)
    assert eig.shape[1] == 4  # p = 6: two exact zeros
    lr = 1.0 / float(eig[0, 0])
    sp = node_update_spectra(eig, 6, update_rule("SGD", {"lr": lr, "weight_decay": wd}, None))
    assert int(sp.null_dims[0]) == (2 if wd == 0 else 0) and int(sp.zero_eig_dims[0]) == 2
    acted = LabelConfig(preset="acted")
    lab, why, _ = run_classify(sp, acted, 1e-3, hess_min=torch.zeros(1))
    assert (int(lab[0]), int(why[0])) == (L["healthy_sink"], R["contracting"])
    seed = LabelConfig(preset="seed")
    lab, why, _ = run_classify(sp, seed, resolve_delta(seed, 1000), hess_min=torch.full((1,), 0.5))
    assert int(lab[0]) == L["plateau"]
    # without wd the null directions have μ = 1 (in the seed's band) -- the seed reports its curvature test first
    assert int(why[0]) == R["seed_zero_curvature"]


def test_seed_preset_literal_rules():
    rule = UpdateRule("sgd", 1.0)
    # |μ| = 1 − λ for λ < 1: rows: strict sink; sink with tiny norm; |μ| ∈ [0.99, 1.01]; |μ| > 1.01
    eig = torch.tensor([[0.5, 0.2], [0.5, 0.2], [0.5, 0.005], [2.02, 0.5], [0.5, 0.2]], dtype=F64)
    sp = node_update_spectra(eig, 2, rule)
    seed = LabelConfig(preset="seed")
    assert resolve_delta(seed, 10**6) == 0.01
    pn = torch.tensor([1.0, 5e-5, 1.0, 1.0, 1.0])
    grad = torch.tensor([1.0, 1.0, 1.0, 1.0, 1e-7])
    lab, why, neutral = run_classify(sp, seed, 0.01, param_norm=pn, grad=grad, hess_min=eig[:, -1].float(), loss=0.5)
    assert [LABELS[i] for i in lab.tolist()] == ["healthy_sink", "degenerate_sink", "plateau", "source", "plateau"]
    assert [REASONS[i] for i in why.tolist()] == [
        "contracting",
        "collapsed",
        "seed_unit_eigenvalue",
        "expanding",
        "seed_flat_gradient",
    ]
    assert neutral.tolist() == [0, 0, 1, 0, 0]
    # flat gradient only counts while the loss is not minimal (loss > eps_loss)
    lab, _, _ = run_classify(sp, seed, 0.01, param_norm=pn, grad=grad, hess_min=eig[:, -1].float(), loss=0.0)
    assert int(lab[4]) == L["healthy_sink"]
    # |μ| = 1.005: seed says "≈1" (plateau), the acted preset with δ = 1e-3 says source
    sp = node_update_spectra(torch.tensor([[2.005, 0.5]], dtype=F64), 2, rule)
    assert int(run_classify(sp, seed, 0.01)[0][0]) == L["plateau"]
    assert int(run_classify(sp, seed, 0.01)[1][0]) == R["seed_unit_eigenvalue"]
    assert int(run_classify(sp, LabelConfig(preset="acted"), 1e-3)[0][0]) == L["source"]


def test_delta_resolution_and_config_validation():
    assert resolve_delta(LabelConfig(preset="acted"), 10_000) == 1e-4
    assert resolve_delta(LabelConfig(preset="acted"), 10) == 0.01  # never looser than the seed's band
    assert resolve_delta(LabelConfig(preset="acted", delta=0.05), 10_000) == 0.05
    for bad in [dict(preset="x"), dict(collapse_reference="mean"), dict(delta=-1.0), dict(stable_window=0)]:
        with pytest.raises(TrajscopeError):
            LabelConfig(**bad)


def test_stable_labels_hysteresis():
    # node 0: 0 0 2 2 2 0 2   node 1: 3 3 3 3 3 3 3   node 2: 1 2 1 2 1 2 1
    seq = torch.tensor([[0, 3, 1], [0, 3, 2], [2, 3, 1], [2, 3, 2], [2, 3, 1], [0, 3, 2], [2, 3, 1]], dtype=torch.uint8)
    expect = [[0, 3, 1], [0, 3, 1], [0, 3, 1], [0, 3, 1], [2, 3, 1], [2, 3, 1], [2, 3, 1]]
    stable = None
    for t in range(len(seq)):
        stable = stable_labels(seq[:t] if t else None, stable, seq[t], window=3)
        assert stable.dtype == torch.uint8
        assert stable.tolist() == expect[t], t
    assert stable_labels(seq[:3], torch.zeros(3, dtype=torch.uint8), seq[3], window=1).tolist() == seq[3].tolist()


def test_nonfinite_inputs_do_not_crash():
    eig = torch.tensor([[1.0, 0.5], [math.nan, 0.5], [math.inf, 0.5], [1.0, 0.5], [1.0, 0.5]], dtype=F64)
    sp = node_update_spectra(eig, 3, UpdateRule("sgd_momentum", 0.5, momentum=0.9, has_buffer=True))
    pn = torch.tensor([1.0, 1.0, 1.0, math.nan, 1.0])
    grad = torch.tensor([1.0, 1.0, 1.0, 1.0, math.nan])
    for config in [LabelConfig(preset="acted"), LabelConfig(preset="seed")]:
        lab, why, neutral = run_classify(
            sp,
            config,
            resolve_delta(config, 100),
            param_norm=pn,
            grad=grad,
            hess_min=torch.tensor([0.5, math.nan, 0.5, 0.5, 0.5]),
            loss=math.nan,
        )
        assert lab.shape == (5,) and neutral.shape == (5,)
        assert lab[1] == L["source"] and why[1] == R["nonfinite"]
        assert lab[2] == L["source"] and why[2] == R["nonfinite"]  # infinite curvature: |μ| = inf
        assert lab[3] == L["source"] and why[3] == R["nonfinite"]
        assert lab[0] != L["source"]
    lab, why, _ = run_classify(sp, LabelConfig(preset="acted"), 0.01, loss=None)
    assert lab.shape == (5,)


# ----------------------------------------------------------------------------- excited preset
def excited(eig, u, lr=1.0, share=None, grad=None, delta=1e-3, param_norm=None, ref=None):
    """Label one node with an explicit block H = V diag(eig) Vᵀ (V = I) and motion u: λ_u = uᵀHu/uᵀu by hand."""
    eig = torch.as_tensor(eig, dtype=F64)[None, :]
    u = torch.as_tensor(u, dtype=F64)
    rule = update_rule("SGD", {"lr": lr}, None)
    sp = node_update_spectra(eig, eig.shape[1], rule)
    lam_u = (eig[0, : u.numel()] * u * u).sum() / (u * u).sum()
    motion = (*motion_from_eigs(lam_u.reshape(1), rule), torch.tensor([1.0 if share is None else share], dtype=F64))
    one = torch.ones(1, dtype=F64)
    return classify(
        sp,
        one if param_norm is None else torch.tensor([param_norm], dtype=F64),
        one if ref is None else torch.tensor([ref], dtype=F64),
        one if grad is None else torch.tensor([grad], dtype=F64),
        eig[:, -1],
        1.0,
        LabelConfig(),
        delta,
        motion=motion,
        hess_max=eig[:, 0],
    )


def names(out):
    lab, why, _ = out
    return LABELS[int(lab[0])], REASONS[int(why[0])]


def test_motion_from_eigs_are_the_map_roots_of_the_motion_curvature():
    lam = torch.tensor([0.0, 0.5, 2.0, 2.4, -0.1, math.nan], dtype=F64)
    radius, neutral = motion_from_eigs(lam, update_rule("SGD", {"lr": 1.0}, None))
    mu = 1 - lam[:5]
    assert torch.allclose(radius[:5], mu.abs()) and torch.allclose(neutral[:5], (mu - 1).abs())
    assert math.isnan(radius[5]) and math.isnan(neutral[5])
    # heavy ball: roots of z² − (1 + β − αλ) z + β
    beta, a = 0.9, 0.05
    radius, neutral = motion_from_eigs(
        torch.tensor([a], dtype=F64), update_rule("SGD", {"lr": 1.0, "momentum": beta}, {"momentum_buffer": 1})
    )
    roots = torch.linalg.eigvals(torch.tensor([[1 + beta - a, -beta], [1.0, 0.0]], dtype=F64))
    assert float(radius[0]) == pytest.approx(float(roots.abs().max()), rel=1e-12)
    assert float(neutral[0]) == pytest.approx(float((roots - 1).abs().min()), rel=1e-12)


def test_excited_ignores_directions_the_motion_does_not_carry():
    """The digits case: a live unit with tiny eigenvalues from low-variance pixels, moving along its
    strongly curved direction, is a healthy sink (acted: plateau)."""
    eig = [0.5, 1e-7]
    assert names(excited(eig, [1.0, 0.0])) == ("healthy_sink", "contracting")
    sp = node_update_spectra(torch.tensor([eig], dtype=F64), 2, update_rule("SGD", {"lr": 1.0}, None))
    assert names(run_classify(sp, LabelConfig(preset="acted"), 1e-3)) == ("plateau", "neutral_direction")
    # moving along the flat direction with no share of the loss decrease: a plateau; with a share: not
    assert names(excited(eig, [0.0, 1.0], share=1e-3)) == ("plateau", "flat_motion")
    assert names(excited(eig, [0.0, 1.0], share=0.5)) == ("healthy_sink", "contracting")


def test_excited_negative_curvature_is_a_source_only_when_the_motion_feels_it():
    """The edge-of-stability case: λ_min = −0.09 at lr 0.05 gives |μ| = 1.0045 > 1 + δ."""
    eig, lr, delta = [30.0, -0.09], 0.05, 0.004
    sp = node_update_spectra(torch.tensor([eig], dtype=F64), 2, update_rule("SGD", {"lr": lr}, None))
    assert names(run_classify(sp, LabelConfig(preset="acted"), delta)) == ("source", "expanding")
    assert names(excited(eig, [1.0, 0.01], lr=lr, delta=delta)) == ("healthy_sink", "contracting")
    assert names(excited(eig, [0.0, 1.0], lr=lr, delta=delta)) == ("source", "expanding")
    # the period-2 oscillation at 2/η (μ_u = −1) is a sink, not a plateau and not a source
    assert names(excited([40.0, 1.0], [1.0, 0.0], lr=lr, delta=delta)) == ("healthy_sink", "contracting")
    assert names(excited([44.0, 1.0], [1.0, 0.0], lr=lr, delta=delta)) == ("source", "expanding")


def test_excited_dead_and_collapsed_nodes():
    # no curvature and no gradient: dead, even when weight decay contracts it (acted: healthy sink)
    assert names(excited([0.0, 0.0], [1.0, 1.0], grad=0.0)) == ("plateau", "dead")
    # collapsed: degenerate sink before any plateau reason
    assert names(excited([0.0, 0.0], [1.0, 1.0], grad=0.0, param_norm=0.05, ref=1.0)) == (
        "degenerate_sink",
        "collapsed",
    )
    # a node with no motion and a gradient-free, curved block sits at its fixed point: a sink
    out = classify(
        node_update_spectra(torch.tensor([[0.5]], dtype=F64), 1, update_rule("SGD", {"lr": 1.0}, None)),
        torch.ones(1),
        torch.ones(1),
        torch.zeros(1),
        torch.tensor([0.5]),
        1.0,
        LabelConfig(),
        1e-3,
        motion=(torch.tensor([math.nan]), torch.tensor([math.nan]), torch.tensor([0.0])),
        hess_max=torch.tensor([0.5]),
    )
    assert names(out) == ("healthy_sink", "contracting")


def test_excited_delta_comes_from_the_horizon():
    cfg = LabelConfig()
    assert cfg.preset == "excited"
    assert resolve_delta(cfg, 20_000, horizon=250) == pytest.approx(0.004)
    assert resolve_delta(cfg, 20_000, horizon=10) == 0.01  # capped at the seed's band
    assert resolve_delta(cfg, 20_000) == pytest.approx(1 / 20_000)  # no horizon known: the run
    assert resolve_delta(LabelConfig(preset="acted"), 20_000, horizon=250) == pytest.approx(1 / 20_000)
    with pytest.raises(TrajscopeError):
        LabelConfig(share_min=-1)
