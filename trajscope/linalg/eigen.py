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

import os

import torch
from torch import Tensor

try:
    from trajscope.linalg import _smalleig
except ImportError:  # built without a C compiler: LAPACK only
    _smalleig = None

__all__ = ["eigvalsh", "kernel_available"]

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
    if (K.dtype == torch.float32 and not K.requires_grad and b >= KERNEL_MIN_BATCH
            and 0 < n <= KERNEL_MAX_N and kernel_available()):
        src = K.reshape(b, n, n).cpu().contiguous()
        out = torch.empty(b, n, dtype=torch.float32)
        _smalleig.eigvalsh(src.numpy(), out.numpy(), b, n)
        return out.reshape(K.shape[:-1])
    return torch.linalg.eigvalsh(K)
