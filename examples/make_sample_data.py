"""Regenerate the shipped sample runs in sample_data/ (fixed seeds, CPU, about a minute).

    python examples/make_sample_data.py [OUT_DIR] [--short]

* ``digits_mlp``: a ReLU MLP on scikit-learn's bundled 8×8 digits, SGD. Some hidden units start
  dead (strongly negative bias), the second hidden layer has strong weight decay, and the learning
  rate is raised far above the stability threshold for a short phase: together they show healthy
  sinks, plateaus (dead ReLUs), degenerate sinks (weight decay collapsing dead nodes) and sources.
* ``eos_regression``: full-batch gradient descent on a tanh MLP regression; sharpness rises to the
  2/α threshold and hovers there (edge of stability) while the nodes stay sinks.
* ``cnn_adam``: a small CNN on the digits trained with Adam, recorded every 5 steps (window 2).

Each run folder gets a README.md saying how it was made.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

import trajscope
from trajscope import zoo

ROOT = Path(__file__).resolve().parent.parent


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits  # ships with scikit-learn: nothing is downloaded

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    return x, torch.tensor(d.target, dtype=torch.int64)


def _readme(run: Path, text: str) -> None:
    (run / "README.md").write_text(text.strip() + "\n")


DIGITS_SIZES = [64, 32, 16, 10]
LR, WD, SPIKE_LR, SPIKE_STEPS = 0.5, 0.05, 3.0, 10


def digits_mlp(out: Path, steps: int = 300) -> Path:
    """ReLU MLP on digits with dead units, a weight-decay group and a too-large-lr phase."""
    run = out / "digits_mlp"
    torch.manual_seed(0)
    x, y = digits()
    model = zoo.mlp(DIGITS_SIZES)
    with torch.no_grad():
        model[0].bias[:6] = -30.0  # six first-layer ReLUs dead on all data -> plateaus
        model[2].bias[:4] = -30.0  # four second-layer units dead -> weight decay collapses them
    groups = [
        {"params": list(model[0].parameters()), "weight_decay": 0.0},
        {"params": list(model[2].parameters()) + list(model[4].parameters()), "weight_decay": WD},
    ]
    opt = torch.optim.SGD(groups, lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    spike = range(steps - SPIKE_STEPS, steps)  # a last phase far above the stability threshold -> sources
    with trajscope.Recorder(
        run,
        model,
        opt,
        loss_fn,
        every=5,
        window=2,
        overwrite=True,
        export=False,
        model_spec="trajscope.zoo:mlp",
        model_kwargs={"sizes": DIGITS_SIZES},
        probe=(x[:128], y[:128]),
    ) as rec:
        for t in range(steps):
            for group in opt.param_groups:
                group["lr"] = SPIKE_LR if t in spike else LR
            idx = torch.randint(0, len(x), (64,), generator=g)
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            rec.batch(x[idx], y[idx])
            opt.step()
    _readme(
        run,
        f"""
# digits_mlp

Made by `python examples/make_sample_data.py` (seed 0): `trajscope.zoo.mlp({DIGITS_SIZES})` (ReLU) on
scikit-learn's digits (pixels / 16), mini-batches of 64, SGD lr {LR}, {steps} steps recorded every 5 steps with a window of 2
(so θ_{{t+1}} is on disk for every analysed step t = 0, 5, 10, ...).
- first-layer units 0-5 and second-layer units 0-3 start with bias -30: dead on all data;
- the second hidden layer and the output layer form a parameter group with weight decay {WD}
  (the first layer has none);
- the last steps {spike.start}-{spike.stop - 1} use lr {SPIKE_LR}, far above the stability threshold.
Expected labels (default preset): plateaus (the dead first-layer units, reason dead; and a few
live units that fire on few samples and whose motion carries under 1/100 of an equal share of the
loss decrease, reason flat_motion), healthy sinks (most live units of every layer), plateaus and
then degenerate sinks (the dead second-layer units: weight decay alone shrinks them until they
collapse), sources (lr phase: the output layer and second layer at step 290).
""",
    )
    return run


EOS_SIZES = [4, 32, 32, 1]


def eos_regression(out: Path, steps: int = 1000, lr: float = 0.2, wd: float = 0.007) -> Path:
    """Full-batch GD on a tanh MLP regression: progressive sharpening up to 2/lr (edge of stability)."""
    run = out / "eos_regression"
    torch.manual_seed(0)
    x = torch.randn(128, EOS_SIZES[0])
    teacher = zoo.mlp([EOS_SIZES[0], 16, 1], activation="tanh")
    with torch.no_grad():
        y = teacher(x) * 3.0
    model = zoo.mlp(EOS_SIZES, activation="tanh")
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd)
    loss_fn = nn.MSELoss()
    with trajscope.Recorder(
        run,
        model,
        opt,
        loss_fn,
        every=10,
        window=2,
        overwrite=True,
        export=False,
        model_spec="trajscope.zoo:mlp",
        model_kwargs={"sizes": EOS_SIZES, "activation": "tanh"},
    ) as rec:
        for t in range(steps):
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            rec.batch(x, y)
            opt.step()
    _readme(
        run,
        f"""
# eos_regression

Made by `python examples/make_sample_data.py` (seed 0): `trajscope.zoo.mlp({EOS_SIZES}, activation="tanh")`
regressing a random tanh teacher (targets × 3) on 128 Gaussian inputs, full-batch gradient descent
(SGD, lr {lr}, so 2/lr = {2 / lr:g}; weight decay {wd}, so every direction of every node is acted on),
{steps} steps recorded every 10 steps with a window of 2.
Sharpness rises until it reaches 2/lr and then hovers there (the edge of stability), while every
node block stays below it (each node's λ_max ≤ sharpness): the nodes stay sinks (a few percent,
whose motion is weight decay's alone and carries under 1/100 of an equal share of the loss
decrease, are flat-motion plateaus).
""",
    )
    return run


def cnn_adam(out: Path, steps: int = 150) -> Path:
    run = out / "cnn_adam"
    torch.manual_seed(0)
    x, y = digits()
    x = x.reshape(-1, 1, 8, 8)
    kwargs = {"in_channels": 1, "size": 8, "channels": [4, 8], "classes": 10}
    model = zoo.cnn(**kwargs)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(2)
    with trajscope.Recorder(
        run,
        model,
        opt,
        loss_fn,
        every=5,
        overwrite=True,
        export=False,
        model_spec="trajscope.zoo:cnn",
        model_kwargs=kwargs,
    ) as rec:
        for t in range(steps):
            idx = torch.randint(0, len(x), (32,), generator=g)
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            rec.batch(x[idx], y[idx])
            opt.step()
    _readme(
        run,
        f"""
# cnn_adam

Made by `python examples/make_sample_data.py` (seed 0): `trajscope.zoo.cnn(**{kwargs})` on the digits
as 1×8×8 images, Adam lr 3e-3, mini-batches of 32, {steps} steps recorded every 5 steps (window 2).
Shows conv nodes (output channels) and Adam's preconditioned update map and sharpness.
""",
    )
    return run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default=str(ROOT / "sample_data"))
    ap.add_argument("--short", action="store_true", help="few steps (for tests)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for make in (digits_mlp, eos_regression, cnn_adam):
        kwargs = {"steps": 30} if args.short else {}
        print(f"wrote {make(out, **kwargs)}")


if __name__ == "__main__":
    main()
