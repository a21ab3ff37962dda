"""The label-validity suite: small recorded runs whose nodes do known things (issue #12).

    .venv/bin/python benchmarks/validity_runs.py OUTDIR [--only NAME ...] [--force]

Each generator records one run folder ``OUTDIR/<name>`` (fixed seeds, CPU, one torch thread, seconds
to a minute) with ``model_spec="benchmarks.validity_models:..."`` or ``trajscope.zoo:...`` so it
replays; every run folder gets a README.md saying how it was made and what its nodes should do.

=================  =====================================================================================
``digits_mlp``     copies of the shipped sample runs (``sample_data/*``, never modified)
``eos_regression``
``cnn_adam``
``eos_tanh``       1-100-1 tanh regression, full-batch GD at lr 0.05: sharpness reaches 2/lr = 40 and
                   sits there (edge of stability) for 20,000 steps; recorded every 250 steps, window 2
``dead_relu``      ReLU MLP, SGD + momentum: 8 first-layer units start dead (bias -8), a 2-step lr spike
                   at step 150 kills more; no weight decay (dead units stay put)
``wd_collapse``    ReLU MLP, AdamW (decoupled decay 0.5): 6 + 4 units start dead and decay to zero,
                   the live ones train
``lr_spike``       ReLU MLP regression, full-batch GD at lr 0.5 x 2/sharpness, then 16 steps at
                   1.3 x 2/sharpness (oscillation grows), then back
``transformer``    1-layer, 2-head attention model (nn.Linear q/k/v/out, GELU MLP) naming the largest of
                   8 tokens, Adam, cross-entropy
=================  =====================================================================================

``SUITE`` maps each name to ``(generator, analysis options)``: the options every analysis of that run
uses beside the label settings under test (``curvature="exact"`` for the tanh EoS run, as in the
issue's observation).
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # model_spec "benchmarks.validity_models:..." imports from the root
    sys.path.insert(0, str(ROOT))

import trajscope  # noqa: E402
from benchmarks import validity_models as vm  # noqa: E402

SPEC = "benchmarks.validity_models"


def _readme(run: Path, text: str) -> None:
    (run / "README.md").write_text(text.strip() + "\n")


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: nothing is downloaded

    d = load_digits()
    return torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target, dtype=torch.int64)


def _train(
    run: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    loss_fn: nn.Module,
    steps: int,
    batches: Callable[[int], tuple],
    *,
    every: int,
    spec: str,
    kwargs: dict,
    lr_at: Callable[[int], float] | None = None,
    probe: tuple | None = None,
    window: int = 2,
    on_step: Callable[[int], None] | None = None,
) -> None:
    with trajscope.Recorder(
        run,
        model,
        opt,
        loss_fn,
        every=every,
        window=window,
        overwrite=True,
        export=False,
        model_spec=spec,
        model_kwargs=kwargs,
        probe=probe,
        background=False,
    ) as rec:
        for t in range(steps):
            if on_step is not None:
                on_step(t)
            if lr_at is not None:
                for g in opt.param_groups:
                    g["lr"] = lr_at(t)
            x, y = batches(t)
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            rec.batch(x, y)
            opt.step()


def _sharpness(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, iters: int = 100) -> float:
    """λ_max of the full Hessian of loss_fn(model(x), y) by power iteration on Hessian-vector products."""
    params = [p for p in model.parameters()]
    loss = type(loss_fn)()(model(x), y)  # a fresh loss module: the Recorder hooks the training one
    grads = torch.autograd.grad(loss, params, create_graph=True)
    g = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=g) for p in params]
    lam = 0.0
    for _ in range(iters):
        n = math.sqrt(sum(float((u * u).sum()) for u in v))
        v = [u / n for u in v]
        hv = torch.autograd.grad(grads, params, v, retain_graph=True)
        lam = sum(float((a * b).sum()) for a, b in zip(hv, v))
        v = [h.detach() for h in hv]
    return lam


# --------------------------------------------------------------------------- (a) the sample runs
def _copy_sample(name: str) -> Callable[[Path], Path]:
    def make(out: Path) -> Path:
        src, dst = ROOT / "sample_data" / name, out / name
        if dst.exists():
            shutil.rmtree(dst)
        top = str(src)

        def skip(folder: str, entries: list[str]) -> list[str]:  # only what an analysis added at the top
            if folder != top:
                return []
            return [
                e
                for e in entries
                if e in ("analysis.zarr", ".trajscope-analysis.lock")
                or e.startswith("events.out.tfevents.")
                or e.startswith(".analysis.zarr.")
            ]

        shutil.copytree(src, dst, ignore=skip)
        return dst

    make.__name__ = name
    make.__doc__ = f"A copy of sample_data/{name} (its README says how it was made)."
    return make


# --------------------------------------------------------------------------- (b) edge of stability
EOS_LR, EOS_STEPS, EOS_EVERY = 0.05, 20000, 250


def eos_tanh(out: Path, steps: int = EOS_STEPS, every: int = EOS_EVERY, lr: float = EOS_LR) -> Path:
    """1-100-1 tanh regression of sin(3x), full-batch GD: sharpness rises to 2/lr and stays there."""
    run = out / "eos_tanh"
    torch.manual_seed(0)
    x = torch.linspace(-2, 2, 64).unsqueeze(1)
    y = torch.sin(3 * x)
    kwargs = {"sizes": [1, 100, 1], "activation": "tanh"}
    model = vm.mlp(**kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.MSELoss()
    sharp: dict[int, float] = {}

    def probe_sharpness(t: int) -> None:
        if t % (steps // 10) == 0:
            sharp[t] = _sharpness(model, loss_fn, x, y, iters=60)

    _train(
        run,
        model,
        opt,
        loss_fn,
        steps,
        lambda t: (x, y),
        every=every,
        spec=f"{SPEC}:mlp",
        kwargs=kwargs,
        on_step=probe_sharpness,
    )
    table = ", ".join(f"{t}: {s:.2f}" for t, s in sharp.items())
    _readme(
        run,
        f"""
# eos_tanh

`benchmarks.validity_models.mlp({kwargs["sizes"]}, activation="tanh")` regressing y = sin(3x) on 64
points of [-2, 2] (MSE), full-batch gradient descent, lr {lr} (2/lr = {2 / lr:g}), no weight decay, {steps}
steps recorded every {every} steps with a window of 2 (θ_t and θ_(t+1) on disk for t = 0, {every}, ...).
Sharpness (power iteration, full Hessian) at steps {table}: it reaches 2/lr within the first
~2000 steps and then sits at the edge of stability while the loss keeps falling, non-monotonically.
Analysed with the exact curvature (tanh). Expected: every node a sink (the network converges, norms
stay put); the issue's observation is that slightly negative exact curvature makes hidden nodes `source`.
""",
    )
    return run


# --------------------------------------------------------------------------- (c) dead ReLUs
def dead_relu(out: Path, steps: int = 300, every: int = 5, spike_lr: float = 0.5, spike_steps: int = 2) -> Path:
    """ReLU MLP on digits, SGD with momentum: units dead from the start and units killed by an lr spike."""
    run = out / "dead_relu"
    torch.manual_seed(1)
    x, y = _digits()
    kwargs = {"sizes": [64, 32, 16, 10], "activation": "relu"}
    model = vm.mlp(**kwargs)
    with torch.no_grad():
        model[0].bias[:8] = -8.0  # dead on all data from step 0
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    idx = [torch.randint(0, len(x), (64,), generator=g) for _ in range(steps)]
    spike = range(150, 150 + spike_steps)
    before: dict = {}

    def look(t: int) -> None:
        if t == spike.start:
            before.update(_dead_units(model, x))

    _train(
        run,
        model,
        opt,
        loss_fn,
        steps,
        lambda t: (x[idx[t]], y[idx[t]]),
        every=every,
        spec=f"{SPEC}:mlp",
        kwargs=kwargs,
        lr_at=lambda t: spike_lr if t in spike else 0.05,
        probe=(x[:256], y[:256]),
        on_step=look,
    )
    dead = _dead_units(model, x)
    _readme(
        run,
        f"""
# dead_relu

`benchmarks.validity_models.mlp({kwargs["sizes"]}, activation="relu")` on scikit-learn's digits (pixels / 16),
mini-batches of 64, SGD lr 0.05 with momentum 0.9, no weight decay, {steps} steps recorded every {every}
(window 2), probe = the first 256 digits.
- first-layer units 0-7 start with bias -8: dead on all data from step 0;
- steps {spike.start}-{spike.stop - 1} use lr {spike_lr:g} ({spike_lr / 0.05:g}x): a burst that kills more ReLUs.
Units dead on all 1797 digits just before the spike: {before}; at the end: {dead}.
Expected: plateaus (dead units, which never move again without weight decay), sources during the
spike, healthy sinks elsewhere.
""",
    )
    return run


def _dead_units(model: nn.Sequential, x: torch.Tensor) -> dict[str, list[int]]:
    dead, h = {}, x
    with torch.no_grad():
        for i, mod in enumerate(model):
            h = mod(h)
            if isinstance(mod, nn.ReLU):
                dead[str(i - 1)] = [int(j) for j in torch.nonzero((h > 0).sum(0) == 0).flatten()]
    return dead


# --------------------------------------------------------------------------- (d) weight-decay collapse
def wd_collapse(out: Path, steps: int = 600, every: int = 10) -> Path:
    """ReLU MLP, AdamW: dead units get no gradient and decay to zero, the live ones are trained."""
    run = out / "wd_collapse"
    torch.manual_seed(2)
    x, y = _digits()
    kwargs = {"sizes": [64, 32, 16, 10], "activation": "relu"}
    model = vm.mlp(**kwargs)
    with torch.no_grad():
        model[0].bias[:6] = -30.0
        model[2].bias[:4] = -30.0
    lr, wd = 1e-2, 0.5
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(2)
    idx = [torch.randint(0, len(x), (64,), generator=g) for _ in range(steps)]
    _train(
        run,
        model,
        opt,
        loss_fn,
        steps,
        lambda t: (x[idx[t]], y[idx[t]]),
        every=every,
        spec=f"{SPEC}:mlp",
        kwargs=kwargs,
        probe=(x[:256], y[:256]),
    )
    reach = math.log(0.1) / math.log(1 - lr * wd)
    _readme(
        run,
        f"""
# wd_collapse

`benchmarks.validity_models.mlp({kwargs["sizes"]}, activation="relu")` on the digits, mini-batches of 64,
AdamW lr {lr}, weight_decay {wd} (decoupled: θ ← (1 − lr·wd)θ = {1 - lr * wd:g}·θ per step on top of Adam's
step), {steps} steps recorded every {every} (window 2), probe = the first 256 digits.
- first-layer units 0-5 and second-layer units 0-3 start with bias -30: dead, no gradient, so only the
  decay acts on them: their norm falls by a factor 10 every {reach:.0f} steps;
- the live units train (and settle where the decay balances the gradient).
Units dead on all digits at the end: {_dead_units(model, x)}.
Expected: dead units plateau while they decay and become degenerate sinks once collapsed; live units
healthy sinks.
""",
    )
    return run


# --------------------------------------------------------------------------- (e) lr spike
def lr_spike(out: Path, steps: int = 400, every: int = 4, sharpness_iters: int = 100) -> Path:
    """Full-batch GD on a ReLU regression: a stable lr, a phase above 2/sharpness, then back."""
    run = out / "lr_spike"
    torch.manual_seed(3)
    x = torch.randn(256, 8)
    teacher = vm.mlp([8, 16, 1], activation="tanh")
    with torch.no_grad():
        y = teacher(x)
    kwargs = {"sizes": [8, 32, 32, 1], "activation": "relu"}
    model = vm.mlp(**kwargs)
    loss_fn = nn.MSELoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    settle, start, length = min(20, steps // 5), steps // 2, max(2, min(16, steps // 25))  # 20, 200, 16 by default
    state = {"lr": 0.01, "lr_spike": math.nan, "sharp": math.nan}

    def schedule(t: int) -> None:
        if t == settle:  # settle on a stable lr: half the threshold of the current sharpness
            state["lr"] = 0.5 * 2 / _sharpness(model, loss_fn, x, y, sharpness_iters)
        if t == start:
            state["sharp"] = _sharpness(model, loss_fn, x, y, sharpness_iters)
            state["lr_spike"] = 1.3 * 2 / state["sharp"]
        lr = state["lr_spike"] if start <= t < start + length else state["lr"]
        for gr in opt.param_groups:
            gr["lr"] = lr

    _train(
        run,
        model,
        opt,
        loss_fn,
        steps,
        lambda t: (x, y),
        every=every,
        spec=f"{SPEC}:mlp",
        kwargs=kwargs,
        on_step=schedule,
    )
    _readme(
        run,
        f"""
# lr_spike

`benchmarks.validity_models.mlp({kwargs["sizes"]}, activation="relu")` regressing a random tanh teacher on 256
Gaussian inputs (MSE), full-batch gradient descent, {steps} steps recorded every {every} (window 2).
lr 0.01 for {settle} steps, then lr = 0.5 × 2/λ_max = {state["lr"]:.4g} (λ_max measured at step {settle}); at step {start}
λ_max = {state["sharp"]:.4g}, and steps {start}-{start + length - 1} use lr {state["lr_spike"]:.4g} = 1.3 × 2/λ_max
(above the stability threshold: the top direction oscillates with growing amplitude), then back to
{state["lr"]:.4g}.
Expected: sinks before the spike, sources during it, sinks again after.
""",
    )
    return run


# --------------------------------------------------------------------------- (f) tiny transformer
def transformer(out: Path, steps: int = 400, every: int = 10) -> Path:
    """A 1-layer attention model naming the largest token of a sequence, Adam, cross-entropy."""
    run = out / "transformer"
    torch.manual_seed(4)
    kwargs = {"vocab": 16, "seq_len": 8, "d_model": 32, "n_heads": 2, "n_layers": 1, "d_ff": 64}
    model = vm.tiny_transformer(**kwargs)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, kwargs["vocab"], (64, kwargs["seq_len"]), generator=g) for _ in range(steps)]

    def batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = seqs[t]
        return s, s.amax(1)

    probe_x = torch.randint(0, kwargs["vocab"], (128, kwargs["seq_len"]), generator=g)
    _train(
        run,
        model,
        opt,
        loss_fn,
        steps,
        batch,
        every=every,
        spec=f"{SPEC}:tiny_transformer",
        kwargs=kwargs,
        probe=(probe_x, probe_x.amax(1)),
    )
    with torch.no_grad():
        acc = float((model(probe_x).argmax(1) == probe_x.amax(1)).float().mean())
    _readme(
        run,
        f"""
# transformer

`benchmarks.validity_models.tiny_transformer(**{kwargs})`: token + position embeddings, one pre-LN
block (self-attention from nn.Linear q/k/v/out projections, GELU MLP), LayerNorm, Linear readout. Task:
output the largest token of the sequence, read out at the last position (logits (B, 16)), fresh random
sequences of 8 tokens from 16 every step, batch 64, Adam lr 3e-3, {steps} steps recorded every {every}
(window 2), probe = 128 fixed sequences. Probe accuracy at the end: {acc:.3f}.
Nodes: the output units of q, k, v, out, ff1, ff2 and head (embeddings and LayerNorms are not nodes).
""",
    )
    return run


# --------------------------------------------------------------------------- the suite
#: name -> (generator, analysis options of that run beside the label settings)
SUITE: dict[str, tuple[Callable[[Path], Path], dict]] = {
    "digits_mlp": (_copy_sample("digits_mlp"), {}),
    "eos_regression": (_copy_sample("eos_regression"), {}),
    "cnn_adam": (_copy_sample("cnn_adam"), {}),
    "eos_tanh": (eos_tanh, {"curvature": "exact"}),
    "dead_relu": (dead_relu, {}),
    "wd_collapse": (wd_collapse, {}),
    "lr_spike": (lr_spike, {}),
    "transformer": (transformer, {}),
}


def is_complete(run: Path) -> bool:
    """A run folder that a generator finished (its README is written last)."""
    return (run / "trajectory.zarr").is_dir() and (run / "README.md").exists()


def make_suite(
    out: str | Path, names: list[str] | None = None, force: bool = False, quiet: bool = False
) -> dict[str, Path]:
    """Generate the runs ``names`` (all by default) under ``out``; existing complete runs are kept
    unless ``force``. Returns ``{name: run folder}``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(SUITE) if names is None else names
    unknown = [n for n in names if n not in SUITE]
    if unknown:
        raise SystemExit(f"unknown run(s) {', '.join(unknown)}; the suite has {', '.join(SUITE)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is several times faster than two here
    try:
        runs = {}
        for name in names:
            run = out / name
            if is_complete(run) and not force:
                runs[name] = run
                continue
            if run.exists():
                shutil.rmtree(run)
            t0 = time.perf_counter()
            SUITE[name][0](out)
            runs[name] = run
            if not quiet:
                print(f"wrote {run} ({time.perf_counter() - t0:.1f} s)", flush=True)
        return runs
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder to write the run folders into")
    ap.add_argument("--only", nargs="+", metavar="NAME", help=f"only these runs ({', '.join(SUITE)})")
    ap.add_argument("--force", action="store_true", help="regenerate runs that already exist")
    args = ap.parse_args(argv)
    make_suite(args.out, args.only, force=args.force)


if __name__ == "__main__":
    main()
