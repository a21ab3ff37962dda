r"""Eigenvalues of batches of small symmetric matrices (the node blocks' spectra).

For float32 batches of order :math:`n \le 512` this uses the C kernel ``_smalleig``: Householder
tridiagonalisation and Sturm-count bisection, vectorised across 16 matrices at a time. LAPACK
(``torch.linalg.eigvalsh``) solves one matrix at a time and is latency-bound at these sizes:
for n = 64 the kernel takes ~17 µs per matrix against ~62 µs, for n = 289 (a 32-channel 3 × 3
conv filter) ~0.8 ms against ~2 ms, for n = 512 ~4.7 ms against ~7.4 ms (2-core AMD EPYC). Both are backward stable: the eigenvalues returned are
exact for :math:`K + E` with :math:`\|E\| = O(n\,\varepsilon\,\|K\|)`.

A float32 batch on a GPU goes to the same kernel on the host: cuSOLVER, through
``torch.linalg.eigvalsh``, batches only orders up to 32 and solves larger ones one matrix at a
time. On an H200 with 16 host cores (``benchmarks/gpu_check.py``), 1,024 blocks of order 64 took
819 ms there against 88 ms here, copy included; 1,891 against 377 ms at order 128; 931 against
860 ms for 64 blocks of order 512.

LAPACK is used for float64 (exactness where the analysis asks for it), for large orders, for
batches too small to fill the kernel's 16 lanes, when the kernel was not compiled (no C
compiler at install time), and when ``TRAJSCOPE_EIGENSOLVER=lapack`` is set.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

try:
    from trajscope.linalg import _smalleig
except ImportError:  # built without a C compiler: LAPACK only
    _smalleig = None

__all__ = ["eigvalsh", "kernel_available"]

# Nodes per eigen-bucket on the Gram route: nodes are sorted by their number of live samples
# and each bucket is padded to its own maximum. Buckets are whole groups of _LANES nodes, the
# eigen kernel's SIMD width (a group costs the same with fewer nodes); a bucket closes when
# the next group would raise its size above _BUCKET_SLACK times its smallest (padding costs
# ~(k_max/k)^2) or it holds _BUCKET nodes.
_BUCKET = 64
_BUCKET_SLACK = 1.05
_LANES = 16

KERNEL_MAX_N = 512  # 1.6x LAPACK here, 1.4x at 577; its scratch is 16·n² floats (17 MB) per thread
KERNEL_MIN_BATCH = 6  # fewer matrices leave most of the 16 SIMD lanes idle


def kernel_available() -> bool:
    """Whether the compiled kernel is importable and not switched off by the environment."""
    return _smalleig is not None and os.environ.get("TRAJSCOPE_EIGENSOLVER", "auto") != "lapack"


def eigvalsh(K: Tensor) -> Tensor:
    """Ascending eigenvalues ``(..., n)`` of symmetric matrices ``K`` ``(..., n, n)``, in K's dtype
    (only the lower triangle is read), on K's device, or on the CPU when the kernel solved a GPU
    batch. K must be finite: a non-finite matrix gives meaningless values on the kernel path
    (LAPACK may raise instead)."""
    n = K.shape[-1]
    b = K.numel() // (n * n) if n else 0
    if (
        K.dtype == torch.float32
        and not K.requires_grad
        and b >= KERNEL_MIN_BATCH
        and 0 < n <= KERNEL_MAX_N
        and kernel_available()
    ):
        src = K.reshape(b, n, n).cpu().contiguous()
        out = torch.empty(b, n, dtype=torch.float32)
        _smalleig.eigvalsh(src.numpy(), out.numpy(), b, n)
        return out.reshape(K.shape[:-1])
    return torch.linalg.eigvalsh(K)


def _eigvalsh(K: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Eigenvalues (float64, on the CPU) of a batch of symmetric matrices ``(n, m, m)`` on any
    device, solved in ``dtype``; NaN for any matrix with non-finite entries (never raises for
    bad data). The spectra are small (n × m) next to the matrices, and everything downstream
    of them (update maps, labels) runs on the CPU."""
    K = K.to(dtype)
    n, m = K.shape[0], K.shape[-1]
    out = torch.full((n, m), math.nan, dtype=torch.float64)
    if n == 0 or m == 0:
        return out
    if bool(torch.isfinite(K.sum())):  # cheap common case (one pass, no mask)
        ok = None
        Kok = K
    else:
        ok = torch.isfinite(K).all(dim=-1).all(dim=-1)
        if not bool(ok.any()):
            return out
        Kok = K[ok]
        ok = ok.cpu()
    try:
        ev = eigvalsh(Kok).to("cpu", torch.float64)
    except Exception:  # LAPACK non-convergence: retry one by one, NaN what still fails
        import numpy as np

        ev = torch.full((Kok.shape[0], m), math.nan, dtype=torch.float64)
        for i in range(Kok.shape[0]):
            try:
                ev[i] = torch.from_numpy(np.linalg.eigvalsh(Kok[i].cpu().numpy()).astype(np.float64))
            except Exception:
                pass
    if ok is None:
        return ev
    out[ok] = ev
    return out


def _psd_sqrt(M: Tensor) -> Tensor:
    r"""Symmetric square root :math:`U \sqrt{\max(w,0)} U^\top` of symmetric ``(..., m, m)``
    matrices, computed in float64; NaN where the input is not finite."""
    M = M.to(torch.float64)
    M = 0.5 * (M + M.mT)
    bad = ~torch.isfinite(M).flatten(-2).all(-1)
    if bool(bad.any()):
        M = torch.where(bad[..., None, None], torch.zeros((), dtype=M.dtype), M)
    w, U = torch.linalg.eigh(M)
    S = (U * w.clamp_min(0).sqrt().unsqueeze(-2)) @ U.mT
    if bool(bad.any()):
        S = torch.where(bad[..., None, None], torch.full((), math.nan, dtype=S.dtype), S)
    return S


def _finalize(ev: Tensor, r: int, p: int, eps: float) -> Tensor:
    """Pad/trim ascending eigenvalues ``(n, m)`` to ``r`` (keeping the largest |λ|), zero those
    under the rank tolerance ``max(p, r) * eps * 10 * max|λ|``, and sort descending."""
    n, m = ev.shape
    trimmed = m > r
    if trimmed:
        keep = ev.abs().nan_to_num(math.inf).topk(r, dim=1).indices
        ev = ev.gather(1, keep)
    else:
        ev = ev.flip(1)
    amax = ev.abs().amax(dim=1, keepdim=True) if r else ev.new_zeros(n, 1)
    ev = ev.masked_fill(ev.abs() <= max(p, r) * eps * 10.0 * amax, 0.0)
    if m < r:
        ev = torch.cat([ev, ev.new_zeros(n, r - m)], dim=1)
    if trimmed or bool((ev < 0).any()):  # else already descending (the PSD case)
        ev = ev.sort(dim=1, descending=True).values
    return ev


def _solve_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of the eigensolves: float64 for a float64 analysis, else float32. The blocks
    are assembled in the analysis dtype, so their entries already carry its rounding error
    (~p·eps·‖H_i‖); a float32 solve adds ~m·eps·‖H_i‖, well under the rank tolerance of
    :func:`_finalize`, at about 2/3 of the float64 LAPACK time (and 1/4 of it again with the
    kernel of :mod:`trajscope.linalg.eigen`)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _live_first(mask: Tensor) -> Tensor:
    """Per row of a boolean ``(n, B)`` mask, the column indices with the True ones first (each
    group in column order): a stable partition by cumulative counts, cheaper than a sort."""
    m = mask.to(torch.int64)
    n_live = m.sum(1, keepdim=True)
    pos = torch.where(mask, m.cumsum(1) - 1, n_live + (1 - m).cumsum(1) - 1)
    cols = torch.arange(mask.shape[1], device=mask.device).expand_as(pos)
    return torch.empty_like(pos).scatter_(1, pos, cols)


def _buckets(counts: list[int], lanes: int = _LANES) -> list[tuple[int, int]]:
    """Greedy ``[s, t)`` ranges over ascending ``counts``: groups of ``lanes`` (the last one of
    all may be short) merged while ``max <= slack * min + 1`` and the range holds ``_BUCKET``."""
    out, s, n = [], 0, len(counts)
    while s < n:
        t = min(n, s + lanes)
        lim = _BUCKET_SLACK * counts[s] + 1
        while t < n and t - s + lanes <= _BUCKET and counts[min(n, t + lanes) - 1] <= lim:
            t = min(n, t + lanes)
        out.append((s, t))
        s = t
    return out
