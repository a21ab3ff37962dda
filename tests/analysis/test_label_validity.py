"""The label-validity benchmark (benchmarks/label_validity.py): its outcome functions on hand-made
trajectories with known answers, and one tiny end-to-end run of the benchmark."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import label_validity as lv  # noqa: E402

LR = 0.1


def _outcome(
    traj: np.ndarray,
    grads: np.ndarray,
    t: int,
    u: int,
    lr: float = LR,
    fair: float | None = None,
    cfg: lv.OutcomeConfig = lv.OutcomeConfig(),
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Judge the nodes of a hand-made trajectory ``traj`` (S, N, p) with gradients ``grads`` (S, N, p) over
    t -> u exactly as the benchmark does (midpoints, paces over ``pace_window`` checkpoints)."""
    m = cfg.pace_window
    pos = lambda s: lv.midpoint(traj[s], traj[s + 1])  # noqa: E731
    gmid = lambda s: 0.5 * (grads[s] + grads[s + 1])  # noqa: E731  (linear gradients: exact at the midpoint)
    pace = lambda s: lv.pace(traj[s], traj[s + 1], lr)  # noqa: E731
    before = np.median(np.stack([pace(s) for s in range(max(0, t - m + 1), t + 1)]), axis=0)
    after = np.median(np.stack([pace(s) for s in range(u, u + m)]), axis=0)
    q = lv.node_quantities(pos(t), pos(u), gmid(t), gmid(u), before, after, lv._norm(pos(0)))
    if fair is None:
        fair = lv.equal_share([q["share"]])
    out, why = lv.judge(q, fair, cfg, lr)
    return out, why, q


def _gd(
    h: np.ndarray, theta0: np.ndarray, steps: int, lr: float = LR, wd: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Gradient descent on L = Σ_i ½ θ_iᵀ h_i θ_i, node by node (h: (N, p, p)): trajectory and data gradients."""
    th = [theta0.astype(np.float64)]
    gs = []
    for _ in range(steps + 1):
        g = np.einsum("nij,nj->ni", h, th[-1])
        gs.append(g)
        th.append(th[-1] - lr * (g + wd * th[-1]))
    return np.stack(th[:-1]), np.stack(gs)


def test_weight_decay_collapse_is_degenerate():
    # a dead node (no data gradient) under weight decay: θ_s = (1 − lr·wd)^s θ_0 -> 0
    wd, p = 0.5, 5
    h = np.zeros((2, p, p))
    h[1] = np.eye(p)  # a live companion node, so that the loss changes at all
    traj, grads = _gd(h, np.ones((2, p)), 200, wd=wd)
    # its norm falls by 0.95 per step: below 0.1 of the first after 45 steps
    out, why, q = _outcome(traj, grads, 60, 70)
    assert q["norm_u"][0] < 0.1 * q["first_norm"][0]
    assert out[0] == lv.DEGENERATE and lv.TRUTH_REASONS[why[0]] == "collapsed"
    # before it has collapsed it is a plateau: its motion changes no loss (it gets no gradient)
    out, why, _ = _outcome(traj, grads, 5, 15)
    assert out[0] == lv.PLATEAU and lv.TRUTH_REASONS[why[0]] == "dead"


def test_geometric_growth_is_source():
    # θ_{s+1} = 1.1 θ_s: deviations grow by 1.1 per step, 2.6x over 10 steps
    p = 4
    traj = np.stack([np.full((1, p), 1.1**s) for s in range(40)])
    grads = -traj * 0.1 / LR  # the gradient that makes this the GD step (irrelevant: growth is checked first)
    out, why, q = _outcome(traj, grads, 10, 20)
    # paces: medians over checkpoints 8-10 and 20-22, i.e. the moves at 9 and at 21
    assert q["pace_after"][0] / q["pace_before"][0] == pytest.approx(1.1**12, rel=1e-9)
    assert out[0] == lv.SOURCE and lv.TRUTH_REASONS[why[0]] == "step_growth"
    # the norm doubling alone is a source too, with the step growth test switched off
    out, why, _ = _outcome(traj, grads, 10, 20, cfg=lv.OutcomeConfig(step_growth=np.inf))
    assert out[0] == lv.SOURCE and lv.TRUTH_REASONS[why[0]] == "norm_growth"
    # NaN later on: source / nonfinite
    traj2 = traj.copy()
    traj2[21, 0, 1] = np.nan
    out, why, _ = _outcome(traj2, grads, 10, 20)
    assert out[0] == lv.SOURCE and lv.TRUTH_REASONS[why[0]] == "nonfinite"


def test_period_two_oscillation_is_averaged_out():
    # a node oscillating around a fixed point with a constant amplitude (the edge of stability): no growth,
    # its midpoint does not move
    s = np.arange(40)
    traj = (1.0 + 0.3 * (-1.0) ** s)[:, None, None] * np.ones((1, 1, 3))
    q = _outcome(traj, np.zeros_like(traj), 10, 20)[2]
    assert q["pace_after"][0] == pytest.approx(q["pace_before"][0])
    assert q["disp"][0] == pytest.approx(0.0, abs=1e-12)


def test_dead_node_has_no_loss_share():
    p = 6
    h = np.zeros((3, p, p))
    h[1] = np.diag(np.linspace(0.5, 2.0, p))
    h[2] = np.eye(p)
    traj, grads = _gd(h, np.ones((3, p)), 40)
    out, why, q = _outcome(traj, grads, 5, 10)
    assert q["share"][0] == 0.0 and q["grad_t"][0] == 0.0
    assert out[0] == lv.PLATEAU and lv.TRUTH_REASONS[why[0]] == "dead"
    # a live node that moves, but along a direction the loss does not depend on: no loss share
    drift = traj.copy()
    drift[:, 0, :] = 1.0
    drift[:, 0, 0] += 0.05 * np.arange(len(drift))  # constant velocity along a flat direction
    g = grads.copy()
    g[:, 0, :] = 0.0
    g[:, 0, 1] = 1.0  # gradient orthogonal to the motion: not dead
    out, why, q = _outcome(drift, g, 5, 10)
    assert q["disp"][0] > 0 and abs(q["share"][0]) < 1e-12
    assert out[0] == lv.PLATEAU and lv.TRUTH_REASONS[why[0]] == "no_loss_share"


def test_converging_node_is_healthy_sink():
    # GD on a well-conditioned quadratic: steps shrink by (1 − lr λ) per step, the loss falls
    p = 5
    h = np.stack([np.diag(np.linspace(1.0, 3.0, p))] * 4)
    traj, grads = _gd(h, np.random.default_rng(0).normal(size=(4, p)) + 3.0, 60)
    out, why, q = _outcome(traj, grads, 3, 8)
    assert (q["pace_after"] < q["pace_before"]).all() and (q["share"] > 0).all()
    assert (out == lv.HEALTHY).all(), [lv.TRUTH_REASONS[w] for w in why]
    # the trapezoid share is the loss change of the node's move (exact for a quadratic)
    loss = lambda th: 0.5 * np.einsum("ni,nij,nj->n", th, h, th)  # noqa: E731
    mid = lambda s: lv.midpoint(traj[s], traj[s + 1])  # noqa: E731
    np.testing.assert_allclose(q["share"], loss(mid(3)) - loss(mid(8)), rtol=1e-10)


def test_scores_and_table_from_a_confusion_matrix():
    cm = np.array([[8, 0, 2, 0], [0, 0, 0, 0], [1, 0, 3, 0], [0, 0, 4, 1]])
    sc = lv.scores(cm)
    assert sc["healthy_sink"] == {"precision": 8 / 9, "recall": 0.8, "support": 10, "predicted": 9}
    assert np.isnan(sc["degenerate_sink"]["precision"]) and sc["degenerate_sink"]["support"] == 0
    assert sc["plateau"]["precision"] == pytest.approx(3 / 9) and sc["source"]["recall"] == pytest.approx(0.2)
    table = lv.markdown_table({"r": sc}, {"r": lv.accuracy(cm)})
    assert "| r | 0.89 / 0.80 / 10 | – / – / 0 | 0.33 / 0.75 / 4 | 1.00 / 0.20 / 5 | 0.63 |" in table


def test_end_to_end_on_a_small_generated_run(tmp_path):
    import torch

    from benchmarks import validity_runs as vr

    suite = tmp_path / "suite"
    suite.mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # 12 analysed checkpoints, a short phase above 2/sharpness
        vr.lr_spike(suite, steps=48, every=4, sharpness_iters=20)
    finally:
        torch.set_num_threads(threads)
    assert vr.is_complete(suite / "lr_spike")
    out = tmp_path / "out"
    report = lv.main(
        [
            "--runs",
            "lr_spike",
            "--suite",
            str(suite),
            "--out",
            str(out),
            "--preset",
            "acted",
            "--delta",
            "default",
            "0.01",
        ]
    )
    assert set(report["settings"]) == {"acted, delta=default", "acted, delta=0.01"}
    table = report["_tables"]["acted, delta=default"].splitlines()
    assert table[0] == "| run | healthy_sink | degenerate_sink | plateau | source | accuracy |"
    cell = r"(–|\d\.\d\d) / (–|\d\.\d\d) / \d+"
    row = re.compile(rf"^\| (lr_spike|all runs) \| {cell} \| {cell} \| {cell} \| {cell} \| (–|\d\.\d\d) \|$")
    assert [bool(row.match(line)) for line in table[2:]] == [True, True], table
    sc = report["settings"]["acted, delta=default"]["scores"]["lr_spike"]
    n = sum(v["support"] for v in sc.values())
    assert n == sum(v["predicted"] for v in sc.values()) == 11 * (32 + 32 + 1)  # every scored node once
    data = json.loads((out / "label_validity.json").read_text())
    assert data["outcomes"]["lr_spike"]["checkpoints"] == 11
    # the suite run was only linked, never written to: no analysis inside it
    assert not (suite / "lr_spike" / "analysis.zarr").exists()
    # a second call reuses the cached analyses
    again = lv.main(["--runs", "lr_spike", "--suite", str(suite), "--out", str(out), "--preset", "acted"])
    assert again["settings"]["acted, delta=default"]["scores"] == report["settings"]["acted, delta=default"]["scores"]
