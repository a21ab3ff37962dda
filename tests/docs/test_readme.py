"""Every README code block a user would paste runs: Python blocks in order, then the shell commands."""

from __future__ import annotations

import re
import runpy
import shlex
from pathlib import Path

from trajscope.cli.main import main as cli

README = Path(__file__).resolve().parents[2] / "README.md"
# Commands that set up the repo or start a server are exercised elsewhere (CI runs `make test`;
# tests/plugin/test_plugin_server.py starts tensorboard).
NOT_HERE = ("make ", "tensorboard ")


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_blocks_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    python = _blocks("python")
    assert len(python) >= 2
    namespace: dict = {}
    for i, code in enumerate(python):  # each block a file, run with the names the blocks before it defined
        block = tmp_path / f"readme_block_{i}.py"
        block.write_text(code)
        namespace = runpy.run_path(str(block), init_globals=namespace)
    commands = [line.split("#")[0].strip() for block in _blocks("bash") for line in block.splitlines()]
    commands = [c for c in commands if c and not c.startswith(NOT_HERE)]
    assert commands, "the README shows trajscope commands"
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "trajscope", command
        assert cli(argv[1:]) == 0, command
    out = capsys.readouterr().out
    assert "tensorboard --logdir" in out
