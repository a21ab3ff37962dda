"""GPU check of the analysis: CUDA and CPU agree on the same runs, and what each costs.

    python benchmarks/gpu_check.py [--device cuda] [--parts 123]

(``benchmarks/gpu_check.sh`` runs it on a GPU machine, after the analysis tests in
``TRAJSCOPE_TEST_DEVICE=cuda`` mode.) Three parts, each printed as a table:

1. agreement: the shipped sample runs (MLP/SGD, regression at the edge of stability, CNN/Adam)
   and recorded runs covering the other update maps (momentum + coupled decay with a bias in
   another parameter group, AdamW, exact curvature of a conv net) are analysed on ``cpu`` and
   ``cuda``, in float64 and float32 (their first 24 checkpoints). Every node metric and global series is compared: the
   largest deviation relative to the metric's scale, and the share of labels that differ.
2. eigensolvers: batched ``eigvalsh`` of node-sized float32 matrices on the GPU (cuSOLVER via
   torch) against the host (the C kernel, else LAPACK), transfer included.
3. cost: seconds per checkpoint of ``trajscope.analyze`` on each device for bench_cost's MLPs,
   a wider one, and the sample CNN (6 checkpoints each).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import trajscope
from trajscope import zoo
from trajscope.linalg import eigen

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cost import record as record_mlp  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
INT_METRICS = {"label", "reason", "stable_label", "null_dims", "neutral_dims"}


# --------------------------------------------------------------------------- runs to compare
def _train(run: Path, model: nn.Module, opt: torch.optim.Optimizer, loss_fn, data, **spec) -> None:
    with trajscope.Recorder(run, model, opt, loss_fn, export=False, overwrite=True, **spec) as rec:
        for x, y in data:
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            rec.batch(x, y)
            opt.step()


def record_two_group_sgd(run: Path) -> None:
    """SGD momentum with coupled decay on weights, none and another lr on biases."""
    sizes = [20, 48, 24, 4]
    torch.manual_seed(0)
    model = zoo.mlp(sizes)
    w = [p for n, p in model.named_parameters() if n.endswith("weight")]
    b = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = torch.optim.SGD(
        [{"params": w, "weight_decay": 1e-3}, {"params": b, "weight_decay": 0.0, "lr": 0.2}], lr=0.05, momentum=0.9
    )
    data = [(torch.randn(32, 20), torch.randint(0, 4, (32,))) for _ in range(10)]
    _train(run, model, opt, nn.CrossEntropyLoss(), data, model_spec="trajscope.zoo:mlp", model_kwargs={"sizes": sizes})


def record_adamw(run: Path) -> None:
    sizes = [30, 64, 10]
    torch.manual_seed(1)
    model = zoo.mlp(sizes, activation="tanh")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    data = [(torch.randn(96, 30), torch.randint(0, 10, (96,))) for _ in range(10)]
    _train(
        run,
        model,
        opt,
        nn.CrossEntropyLoss(),
        data,
        model_spec="trajscope.zoo:mlp",
        model_kwargs={"sizes": sizes, "activation": "tanh"},
    )


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("analysis.zarr", "events.out.tfevents.*"))
    return dst


def compare(a, b) -> list[tuple[str, float, str]]:
    """(what, deviation, kind) rows: relative deviation for floats, share differing for ints."""
    rows = []
    assert list(a.steps) == list(b.steps), (a.steps, b.steps)
    for name in a.global_names:
        x, y = a.global_series(name), b.global_series(name)
        # n_hvp counts Lanczos products: rounding may stop it a product earlier or later
        rows.append((f"global/{name}", _rel(x, y), "count" if name == "n_hvp" else "rel"))
    for layer in a.layers:
        for m in a.metrics(layer):
            x, y = a.node(layer, m), b.node(layer, m)
            if m in INT_METRICS:
                rows.append((f"{layer}/{m}", float(np.mean(x != y)) if x.size else 0.0, "share"))
            else:
                rows.append((f"{layer}/{m}", _rel(x, y), "rel"))
    return rows


def _rel(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if not np.array_equal(np.isnan(x), np.isnan(y)):
        return float("inf")
    ok = np.isfinite(x) & np.isfinite(y)
    if not np.array_equal(np.isinf(x), np.isinf(y)) or not np.array_equal(x[~ok & ~np.isnan(x)], y[~ok & ~np.isnan(y)]):
        return float("inf")
    if not ok.any():
        return 0.0
    scale = max(np.abs(x[ok]).max(), 1e-30)
    return float(np.abs(x[ok] - y[ok]).max() / scale)


def agreement(tmp: Path, device: str) -> bool:
    runs = {name: ROOT / "sample_data" / name for name in ("digits_mlp", "eos_regression", "cnn_adam")}
    for name, fn in (("two_group_sgd", record_two_group_sgd), ("adamw", record_adamw)):
        fn(tmp / "rec" / name)
        runs[name] = tmp / "rec" / name
    cases = [(n, "float64", "ggn") for n in runs] + [(n, "float32", "ggn") for n in runs]
    cases += [("two_group_sgd", "float64", "exact"), ("cnn_adam", "float64", "exact")]
    ok_all = True
    print(
        f"\n== 1. agreement: {device} against cpu (largest deviation relative to the metric's scale; "
        "labels: share of nodes x steps that differ)"
    )
    print(
        f"{'run':16} {'dtype':8} {'curv.':6} {'worst float metric':34} {'rel.dev':>9} {'labels differ':>14} {'cpu s':>6} {'dev s':>6}  verdict"
    )
    for name, dtype, curv in cases:
        res, secs = {}, {}
        for side, dev in (("ref", "cpu"), ("dev", device)):
            run = _copy(runs[name], tmp / f"{name}-{dtype}-{curv}-{side}")
            t0 = time.perf_counter()
            res[side] = trajscope.analyze(run, device=dev, dtype=dtype, curvature=curv, steps=(0, 24), progress=False)[
                run
            ]
            secs[side] = time.perf_counter() - t0
        rows = compare(res["ref"], res["dev"])
        floats = [r for r in rows if r[2] == "rel"]
        worst = max(floats, key=lambda r: r[1])
        labels = max((r[1] for r in rows if r[0].endswith("/label")), default=0.0)
        # float64: same numbers up to rounding; float32: rounding of the solves can move a
        # node across a label threshold, so a small share may differ
        tol, lab_tol = (1e-6, 0.0) if dtype == "float64" else (2e-3, 0.01)
        ok = worst[1] <= tol and labels <= lab_tol
        ok_all &= ok
        print(
            f"{name:16} {dtype:8} {curv:6} {worst[0]:34} {worst[1]:9.1e} {labels:14.2%} {secs['ref']:6.2f} "
            f"{secs['dev']:6.2f}  {'ok' if ok else 'DIFFERS'}"
        )
        if not ok:
            for what, dev_, kind in sorted(rows, key=lambda r: -r[1])[:6]:
                print(f"      {what:40} {dev_:.3e} ({kind})")
    return ok_all


# --------------------------------------------------------------------------- eigensolvers
def eigensolvers(device: str) -> None:
    print(
        f"\n== 2. batched eigvalsh of float32 node blocks: {device} (torch/cuSOLVER) vs host "
        f"({'C kernel' if eigen.kernel_available() else 'LAPACK'}, {torch.get_num_threads()} threads), ms per batch"
    )
    print(f"{'batch x n':14} {'device':>10} {'host+copy':>10} {'max |diff|/|K|':>15}")
    g = torch.Generator().manual_seed(0)
    for b, n in ((1024, 64), (1024, 128), (256, 289), (64, 512)):
        A = torch.randn(b, n, n, generator=g)
        K = (A @ A.mT / n).contiguous()
        Kd = K.to(device)
        torch.linalg.eigvalsh(Kd[:2])  # warm-up (handles, workspace)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ed = torch.linalg.eigvalsh(Kd)
        torch.cuda.synchronize()
        t_dev = time.perf_counter() - t0
        eigen.eigvalsh(K[:16])
        t0 = time.perf_counter()
        eh = eigen.eigvalsh(Kd.cpu())
        t_host = time.perf_counter() - t0
        diff = float((ed.cpu() - eh).abs().max() / K.abs().amax())
        print(f"{f'{b} x {n}':14} {t_dev * 1e3:10.1f} {t_host * 1e3:10.1f} {diff:15.1e}")


# --------------------------------------------------------------------------- cost
def _analyse_time(run: Path, **kw) -> float:
    shutil.rmtree(run / "analysis.zarr", ignore_errors=True)
    for f in run.glob("events.out.tfevents.*"):
        f.unlink()
    t0 = time.perf_counter()
    res = trajscope.analyze(run, progress=False, **kw)[run]
    return (time.perf_counter() - t0) / len(res.steps)


def cost(tmp: Path, device: str) -> None:
    print("\n== 3. seconds per checkpoint, float32 GGN (SGD+momentum, batch 128; cnn_adam: the sample run)")
    print(f"{'model':28} {'cpu':>7} {'+sharp':>7} {device:>7} {'+sharp':>7}")
    runs = []
    for sizes in ([784, 512, 512, 10], [784, 1024, 1024, 1024, 10], [3072, 2048, 2048, 2048, 10]):
        run = tmp / ("mlp-" + "x".join(map(str, sizes)))
        record_mlp(run, sizes)
        runs.append(("-".join(map(str, sizes)), run))
    runs.append(("cnn_adam (sample)", _copy(ROOT / "sample_data" / "cnn_adam", tmp / "cost-cnn")))
    _analyse_time(runs[0][1], device=device, sharpness=False, steps=(0, 2))  # CUDA context and handles
    for label, run in runs:
        t = [_analyse_time(run, device=d, sharpness=s, steps=(0, 6)) for d in ("cpu", device) for s in (False, True)]
        print(f"{label:28} {t[0]:7.3f} {t[1]:7.3f} {t[2]:7.3f} {t[3]:7.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--parts", default="123", help="which parts to run (default 123)")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no CUDA device")
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(
        f"torch {torch.__version__} on {name}; host: {torch.get_num_threads()} threads, "
        f"eigen kernel {'on' if eigen.kernel_available() else 'off'}"
    )
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "1" in args.parts:
            ok = agreement(tmp, args.device)
        if "2" in args.parts and args.device.startswith("cuda"):
            eigensolvers(args.device)
        if "3" in args.parts:
            cost(tmp, args.device)
    print("\nagreement:", "ok" if ok else "DIFFERS")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
