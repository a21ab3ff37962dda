#!/bin/bash
# The GPU check, run on a machine with CUDA from the repository root (logs under $OUT):
#   1. the end-to-end analysis tests with every analysis on CUDA (TRAJSCOPE_TEST_DEVICE=cuda;
#      their references stay on the CPU), 2. benchmarks/gpu_check.py (CPU/CUDA agreement,
#      eigensolvers, cost). Wheels under .whl/ (e.g. zarr, absent from a bare GPU image) are
#      installed first; the eigen kernel is built in place when a compiler is there.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi -L
python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1 || echo "eigen kernel not built: the host uses LAPACK"
TRAJSCOPE_TEST_DEVICE=cuda timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider \
  tests/analysis/test_pipeline.py tests/dynamics/test_param_groups.py tests/dynamics/test_updatemap.py tests/docs/test_samples.py \
  >"$OUT/pytest_cuda.log" 2>&1
echo "pytest (analyses on cuda): exit $?"; tail -n 30 "$OUT/pytest_cuda.log"
timeout "${CHECK_TIMEOUT:-300}" python3 benchmarks/gpu_check.py "$@" 2>&1 | tee "$OUT/gpu_check.log"
