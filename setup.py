"""Build of the optional C kernel (everything else is in pyproject.toml).

``trajscope.linalg._smalleig`` computes the eigenvalues of many small symmetric matrices
several times faster than LAPACK one by one; where it cannot be compiled, the install still
succeeds and the analysis uses ``torch.linalg.eigvalsh`` (same results, slower)."""
import sys

from setuptools import Extension, setup

flags = [] if sys.platform == "win32" else ["-O3", "-fopenmp-simd"]
setup(ext_modules=[Extension("trajscope.linalg._smalleig", ["trajscope/linalg/_smalleig.c"],
                             extra_compile_args=flags, optional=True)])
