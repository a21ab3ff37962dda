"""Packaging: one version for both packages, the license in their metadata, the plugin's
dependency on trajscope, and ``python -m trajscope --version``.

The metadata checks ask setuptools for the wheel metadata (``prepare_metadata_for_build_wheel``,
no compiling, about a second) of a copy of each project, so they test the pyproject.toml files
as they are now, not whatever was installed earlier. Building the wheels themselves is
scripts/build_wheels.sh's job (``make dist``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from email.parser import Parser
from importlib.metadata import version
from pathlib import Path

import pytest

import trajscope
import trajscope_tensorboard

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "plugins"

setuptools = pytest.importorskip("setuptools")


def _wheel_metadata(project: Path, files: list[str], tmp_path: Path) -> tuple:
    """The METADATA of ``project``'s wheel (parsed) and its dist-info folder."""
    src, out = tmp_path / "src", tmp_path / "out"
    out.mkdir(parents=True)
    src.mkdir()
    for name in files:
        if (project / name).is_dir():
            shutil.copytree(project / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy2(project / name, src / name)
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} predates license-files (77)")
    code = "import sys; from setuptools import build_meta as b; print(b.prepare_metadata_for_build_wheel(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist_info = out / proc.stdout.strip().splitlines()[-1]
    return Parser().parsestr((dist_info / "METADATA").read_text()), dist_info


@pytest.fixture(scope="module")
def core_metadata(tmp_path_factory):
    files = ["pyproject.toml", "setup.py", "README.md", "LICENSE", "trajscope"]
    return _wheel_metadata(ROOT, files, tmp_path_factory.mktemp("core"))


@pytest.fixture(scope="module")
def plugin_metadata(tmp_path_factory):
    files = ["pyproject.toml", "README.md", "LICENSE", "trajscope_tensorboard"]
    return _wheel_metadata(PLUGIN, files, tmp_path_factory.mktemp("plugin"))


def test_one_version_for_both_packages(core_metadata, plugin_metadata):
    v = trajscope.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)?", v), v
    assert trajscope_tensorboard.__version__ == v
    assert core_metadata[0]["Version"] == plugin_metadata[0]["Version"] == v
    # what is installed (make install) was built from the same version
    assert version("trajscope") == version("trajscope-tensorboard") == v
    # no second, static version to forget when bumping
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    for pyproject in (ROOT / "pyproject.toml", PLUGIN / "pyproject.toml"):
        project = tomllib.loads(pyproject.read_text())["project"]
        assert "version" not in project and "version" in project["dynamic"], pyproject


def test_version_is_read_without_importing_torch():
    code = "import sys, trajscope; print(trajscope.__version__, 'torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == [trajscope.__version__, "False"]


def test_license_shipped_in_both_wheels(core_metadata, plugin_metadata):
    assert (PLUGIN / "LICENSE").read_text() == (ROOT / "LICENSE").read_text()
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    for meta, dist_info in (core_metadata, plugin_metadata):
        assert meta["License-Expression"] == "MIT", meta["Name"]
        assert meta.get_all("License-File") == ["LICENSE"], meta["Name"]
        assert (dist_info / "licenses" / "LICENSE").read_text() == (ROOT / "LICENSE").read_text()


def test_plugin_requires_trajscope_of_its_version(plugin_metadata):
    meta = plugin_metadata[0]
    requires = meta.get_all("Requires-Dist")
    assert f"trajscope=={trajscope.__version__}" in requires, requires
    assert meta["Description-Content-Type"] == "text/markdown"
    assert "TensorBoard" in meta.get_payload()  # the long description is plugins/README.md


def test_core_metadata_for_an_index(core_metadata):
    meta = core_metadata[0]
    classifiers = meta.get_all("Classifier")
    assert "Intended Audience :: Science/Research" in classifiers
    assert "Topic :: Scientific/Engineering :: Artificial Intelligence" in classifiers
    assert any(c.startswith("Development Status ::") for c in classifiers)
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    assert {"Homepage", "Documentation", "Issues"} <= set(urls)


def test_python_m_trajscope_version():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "trajscope", "--version"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"trajscope {trajscope.__version__}"
