"""Shared builders for the results / event-file / TensorBoard-plugin tests.

``real_logdir(tmp_path_factory)`` is the logdir the plugin's contract tests run on: a small
training run recorded with :class:`trajscope.Recorder` and analysed with
:func:`trajscope.analyze` (nothing synthetic), built once per test session.

``build_logdir(tmp_path)`` writes a TensorBoard logdir of two runs, each with an
``analysis.zarr`` and event files written through the real writers
(:class:`trajscope.io.resultswriter.ResultsWriter`, :class:`trajscope.io.tbevents.EventWriter`)
from synthetic but plausible data: two layers (16 and 5 nodes, dotted module names),
12 analysed steps, every label present in every layer, one dead node (zero norm -> NaN ρ
and drift). ``tensorboard_server(logdir)`` runs a real ``tensorboard`` for end-to-end tests.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from trajscope.io.results import LABELS
from trajscope.io.resultswriter import ResultsWriter

LAYERS: dict[str, int] = {"net.0": 16, "net.2": 5}
N_STEPS = 12
STEP_STRIDE = 5
RUNS = ("alpha", "beta")
LR = 0.1
REASONS = ("contracting", "collapsed_norm", "neutral_direction", "dead", "expanding")


def _node_kinds(n: int) -> list[str]:
    """Per node: healthy / collapse / plateau / source / dead, every kind in every layer."""
    base = ["healthy", "collapse", "plateau", "source", "collapse"]
    kinds = [base[i % len(base)] for i in range(n)]
    if n >= 8:
        kinds[7] = "dead"
    return kinds


def synthetic_run(seed: int = 0, layers: Mapping[str, int] = LAYERS, n_steps: int = N_STEPS) -> dict:
    """Synthetic analysis results: {"steps": [...], "global": [dict per step], "nodes": [dict per step]}."""
    rng = np.random.default_rng(seed)
    steps = [k * STEP_STRIDE for k in range(n_steps)]
    threshold = 2.0 / LR
    glob = []
    for k in range(n_steps):
        # Progressive sharpening up to the edge of stability, then hovering around 2/lr.
        sharp = threshold * min(1.0, 0.35 + 0.1 * k) * (1 + 0.03 * np.sin(3.0 * k)) + rng.normal(0, 0.1)
        glob.append(
            {
                "loss": float(2.0 * np.exp(-0.25 * k) + 0.05 + 0.01 * rng.random()),
                "sharpness": float(sharp),
                "threshold": threshold,
                "n_hvp": float(20 + k % 3),
            }
        )
    per_step: list[dict[str, dict[str, np.ndarray]]] = [{} for _ in range(n_steps)]
    for li, (module, n) in enumerate(layers.items()):
        kinds = _node_kinds(n)
        fan_in = 8 if li == 0 else n
        onset = rng.integers(4, 9, size=n)  # collapse onset (step index)
        source_until = rng.integers(2, 6, size=n)  # a source only early in training
        norm0 = rng.uniform(0.8, 1.6, size=n)
        norm = norm0.copy()
        labels_hist: list[np.ndarray] = []
        stable = None
        for k in range(n_steps):
            lab = np.zeros(n, np.uint8)
            reason = np.zeros(n, np.uint8)
            r = rng.uniform(0.55, 0.92, size=n)
            hmax = rng.uniform(0.5, 6.0, size=n)
            rho = 1 + rng.normal(0, 0.003, size=n)
            drift = rng.uniform(0.002, 0.03, size=n) * np.exp(-0.15 * k)
            null = np.full(n, fan_in + 1 - min(fan_in + 1, 4), np.int32)
            neutral = np.zeros(n, np.int32)
            for i, kind in enumerate(kinds):
                if kind == "collapse" and k >= onset[i]:
                    lab[i], reason[i] = 1, 1
                    rho[i] = 0.72
                    hmax[i] = 0.05 * rng.random()
                elif kind == "plateau":
                    lab[i], reason[i] = 2, 2
                    r[i] = 1 + rng.normal(0, 2e-4)
                    hmax[i] = 1e-3 * rng.random()
                    neutral[i] = 1
                elif kind == "source" and k < source_until[i]:
                    lab[i], reason[i] = 3, 4
                    r[i] = rng.uniform(1.05, 1.4)
                    hmax[i] = rng.uniform(20.5, 26.0)
                    rho[i] = 1.015  # an expanding node grows
                    drift[i] *= 6
                elif kind == "dead":
                    lab[i], reason[i] = 2, 3
                    r[i], hmax[i] = 1.0, 0.0
                    neutral[i], null[i] = 0, fan_in + 1
            param = np.where(np.array(kinds) == "dead", 0.0, norm)
            with np.errstate(invalid="ignore", divide="ignore"):
                rho = np.where(param > 0, rho, np.nan)
                drift = np.where(param > 0, drift, np.nan)
            grad = np.where(param > 0, hmax * param * rng.uniform(0.05, 0.2, size=n), 0.0)
            labels_hist.append(lab)
            # Stable label: the label once it held for the last three checkpoints.
            if stable is None:
                stable = lab.copy()
            elif k >= 2:
                same = (labels_hist[-1] == labels_hist[-2]) & (labels_hist[-2] == labels_hist[-3])
                stable = np.where(same, lab, stable).astype(np.uint8)
            per_step[k][module] = {
                "hess_max": hmax.astype(np.float32),
                "hess_min": (-0.02 * hmax).astype(np.float32),
                "spectral_radius": r.astype(np.float32),
                "grad_norm": grad.astype(np.float32),
                "param_norm": param.astype(np.float32),
                "rho": rho.astype(np.float32),
                "drift": drift.astype(np.float32),
                "motion_radius": (r * rng.uniform(0.9, 1.0, size=n)).astype(np.float32),
                "loss_share": np.where(lab == 2, 1e-3, rng.uniform(0.2, 3.0, size=n)).astype(np.float32),
                "null_dims": null,
                "neutral_dims": neutral,
                "label": lab,
                "stable_label": stable.copy(),
                "reason": reason,
            }
            # ρ is the per-step ratio: the norm moves by ρ^stride to the next checkpoint.
            norm = norm * np.nan_to_num(rho.astype(np.float64), nan=1.0) ** STEP_STRIDE
    return {"steps": steps, "global": glob, "nodes": per_step, "layers": dict(layers)}


def run_attrs() -> dict:
    """Root attributes like the ones ``trajscope analyze`` writes."""
    return {
        "labels": list(LABELS),
        "reasons": list(REASONS),
        "thresholds": {"delta": 1.0 / N_STEPS, "collapse_ratio": 1e-2},
        "semantics": {"delta": "1/T", "collapse_reference": "own first norm"},
        "curvature": "ggn",
        "optimizer": {"class": "SGD", "map": "sgd", "groups": [{"lr": LR, "momentum": 0.0, "weight_decay": 0.0}]},
        "trajscope_version": "0.1.0",
        "warnings": [SYNTH_WARNING],
    }


#: a WARNING line the synthetic analyses carry, as ``trajscope analyze`` keeps its summary's
SYNTH_WARNING = (
    "WARNING: trajscope has no update map for Adadelta: the spectra, thresholds and labels use "
    "plain gradient descent with the group's lr"
)


def write_run(run_dir: Path, data: dict) -> Path:
    """Write ``data`` (from :func:`synthetic_run`) through ResultsWriter + EventWriter."""
    from trajscope.io.tbevents import EventWriter  # imports torch: only when writing

    run_dir.mkdir(parents=True, exist_ok=True)
    rw = ResultsWriter(run_dir, run_attrs(), data["layers"])
    ew = EventWriter(run_dir, list(data["layers"]))
    try:
        for step, g, nodes in zip(data["steps"], data["global"], data["nodes"]):
            rw.append(step, g, nodes)
            ew.write(step, g, nodes)
    finally:
        rw.close()
        ew.close()
    return run_dir


def build_logdir(tmp_path: Path, runs: tuple[str, ...] = RUNS) -> Path:
    """A logdir ``tmp_path/logs`` with one synthetic run folder per name in ``runs``."""
    logdir = Path(tmp_path) / "logs"
    for seed, name in enumerate(runs):
        write_run(logdir / name, synthetic_run(seed))
    return logdir


# -- a real run, recorded and analysed ---------------------------------------------------

REAL_RUN = "mlp"
REAL_SIZES = (8, 16, 12, 3)
REAL_LAYERS: dict[str, int] = {"0": 16, "2": 12, "4": 3}  # zoo.mlp: Linear, ReLU, Linear, ReLU, Linear
REAL_STEPS = 25  # training steps recorded; the last has no successor, so K = 24 are analysed
REAL_LR, REAL_LR_LATE, REAL_LATE = 0.5, 4.0, 4  # the last REAL_LATE steps far above 2/lr: sources
DEAD_UNIT = 5  # hidden unit of layer "0" with bias -50: never active
_REAL_CACHE: dict[str, Path] = {}


def record_real_run(run_dir: Path, seed: int = 0) -> Path:
    """docs/spec.md §2's loop: ``zoo.mlp([8, 16, 12, 3])`` (ReLU), SGD, cross-entropy, every step recorded.

    One first-layer unit is dead (bias -50); the last steps use a learning rate far above the
    stability threshold, so the analysis labels healthy sinks, plateaus and sources.
    """
    import torch  # only when building: the plugin tests themselves never need torch

    import trajscope
    from trajscope.zoo import mlp

    torch.manual_seed(seed)
    model = mlp(list(REAL_SIZES))
    with torch.no_grad():
        model[0].bias[DEAD_UNIT] = -50.0
    opt = torch.optim.SGD(model.parameters(), lr=REAL_LR)
    loss_fn = torch.nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed + 1)
    b = 32
    x_all = torch.randn(REAL_STEPS * b, REAL_SIZES[0], generator=g)
    y_all = (x_all @ torch.randn(REAL_SIZES[0], REAL_SIZES[-1], generator=g)).argmax(dim=1)
    with trajscope.Recorder(
        run_dir,
        model,
        opt,
        loss_fn,
        every=1,
        export=False,
        model_spec="trajscope.zoo:mlp",
        model_kwargs={"sizes": list(REAL_SIZES)},
    ) as rec:
        for t in range(REAL_STEPS):
            if t == REAL_STEPS - REAL_LATE:
                for group in opt.param_groups:
                    group["lr"] = REAL_LR_LATE
            x, y = x_all[t * b : (t + 1) * b], y_all[t * b : (t + 1) * b]
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            rec.batch(x, y)
            opt.step()
    assert rec.failed is None, rec.failed
    return run_dir


def build_real_logdir(tmp_path: Path) -> Path:
    """``tmp_path/logs/mlp``: :func:`record_real_run`, then ``trajscope.analyze`` on it."""
    import torch

    import trajscope

    logdir = Path(tmp_path) / "logs"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only contend on a shared machine
    try:
        run_dir = record_real_run(logdir / REAL_RUN)
        # the acted preset: its layer-0 map expands in the late phase, so the first layer the
        # dashboard shows holds every label but degenerate (the default labels layer 0's motion a sink)
        trajscope.analyze(run_dir, preset="acted")
    finally:
        torch.set_num_threads(threads)
    return logdir


def real_logdir(tmp_path_factory) -> Path:
    """The analysed real run's logdir, built once per test session (read it, never modify it)."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _REAL_CACHE:
        _REAL_CACHE[key] = build_real_logdir(tmp_path_factory.mktemp("real"))
    return _REAL_CACHE[key]


def read_events(run_dir: Path):
    """Every event of a run folder through TensorBoard's own EventAccumulator."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(run_dir), size_guidance=ea.STORE_EVERYTHING_SIZE_GUIDANCE)
    acc.Reload()
    return acc


def event_labels(acc, layer: str) -> tuple[list[int], np.ndarray]:
    """The ``trajscope/<layer>/labels`` tensors of an accumulator: (steps, (K, N) uint8)."""
    from tensorboard.util import tensor_util

    ev = acc.Tensors(f"trajscope/{layer}/labels")
    return [e.step for e in ev], np.stack([tensor_util.make_ndarray(e.tensor_proto) for e in ev])


# -- a real TensorBoard server -----------------------------------------------------------


def tensorboard_command() -> list[str]:
    """The ``tensorboard`` executable of this interpreter's environment."""
    exe = Path(sys.executable).with_name("tensorboard")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("tensorboard")
    return [found] if found else [sys.executable, "-m", "tensorboard.main"]


@contextlib.contextmanager
def tensorboard_server(logdir: Path, timeout: float = 60.0) -> Iterator[str]:
    """Run ``tensorboard`` on ``logdir`` on a free port; yield its base URL; always stop it."""
    cmd = tensorboard_command() + [
        "--logdir",
        str(logdir),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--load_fast=false",
        "--reload_interval=0",
        "--reload_task=blocking",
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    lines: list[str] = []
    found = threading.Event()
    url: list[str] = []

    def pump() -> None:  # read stderr continuously so the pipe never fills up
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            m = re.search(r"TensorBoard \S+ at (http://[^\s/]+:\d+)/", line)
            if m and not url:
                url.append(m.group(1))
                found.set()
        found.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        if not found.wait(timeout) or not url:
            raise RuntimeError("tensorboard did not start:\n" + "".join(lines[-30:]))
        base = url[0]
        deadline = time.monotonic() + timeout
        while True:  # the banner comes before the server answers; poll until it does
            try:
                with urllib.request.urlopen(base + "/data/plugins_listing", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("tensorboard did not answer:\n" + "".join(lines[-30:])) from None
                time.sleep(0.2)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
