"""Smoke test of an installed trajscope wheel's C kernel, without torch (wheel CI and build_wheels.sh).

Imports ``trajscope.linalg._smalleig`` from the installed package (run it outside the source
tree) and solves two 2 x 2 symmetric matrices whose eigenvalues are known: diag(2, 1) -> (1, 2)
and [[2, 1], [1, 2]] -> (1, 3).
"""

from __future__ import annotations

import array
import sys

import trajscope
from trajscope.linalg import _smalleig


def main() -> int:
    src = array.array("f", [2.0, 0.0, 0.0, 1.0, 2.0, 1.0, 1.0, 2.0])
    out = array.array("f", [0.0] * 4)
    _smalleig.eigvalsh(src, out, 2, 2)
    expected = [1.0, 2.0, 1.0, 3.0]
    if any(abs(a - b) > 1e-5 for a, b in zip(out, expected)):
        print(f"kernel gave {list(out)}, expected {expected}", file=sys.stderr)
        return 1
    print(f"trajscope {trajscope.__version__}: kernel {_smalleig.__file__} ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
