"""Data flows one way (docs/architecture.md): no module imports a subpackage of a later stage.

Stages, earliest first: the shared bottom (errors, trust, zoo) < the formats (io, modelloss) <
what replay and the maths need (nodes, replay, linalg) < recording and curvature < dynamics <
analysis < the user-facing tops (cli, integrations) < the package root.
"""

from __future__ import annotations

import ast
from pathlib import Path

import trajscope

PACKAGE = Path(trajscope.__file__).parent
STAGE = {
    "errors": 0,
    "trust": 0,
    "zoo": 0,
    "io": 1,
    "modelloss": 1,
    "results": 1,
    "nodes": 2,
    "replay": 2,
    "linalg": 2,
    "record": 3,
    "curvature": 3,
    "dynamics": 4,
    "analysis": 5,
    "cli": 6,
    "integrations": 6,
}
# (importing module, imported module): the exceptions, each with its reason
ALLOWED = {
    # the recorder names a transformers model by the integration's spec (a lazy import, only for HF models)
    ("trajscope/record/describe.py", "trajscope.integrations"),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("trajscope."):
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("trajscope.")]
    return out


def test_no_module_imports_a_later_stage():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).as_posix()
        stage = path.relative_to(PACKAGE).with_suffix("").parts[0]
        if stage not in STAGE:  # __init__ / __main__: the package root may import anything
            continue
        for line, module in _imports(path):
            target = module.split(".")[1]
            if (
                target != stage
                and STAGE.get(target, 99) > STAGE[stage]
                and (rel, ".".join(module.split(".")[:2])) not in ALLOWED
            ):
                bad.append(f"{rel}:{line} ({stage}) imports {module}")
    assert not bad, "imports against the flow:\n" + "\n".join(bad)


def test_every_subpackage_has_a_stage():
    subpackages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("__")}
    assert subpackages | modules <= set(STAGE), (subpackages | modules) - set(STAGE)
