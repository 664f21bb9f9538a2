"""Every code block of README.md and docs/*.md runs here.

* ``python`` blocks of one page run in order, as one program, in a temporary directory.
  A block preceded by ``<!-- run: N processes -->`` is a script run as N processes of JAX's
  distributed runtime on 127.0.0.1 (``COORDINATOR``, ``NUM_PROCESSES``, ``PROCESS_ID`` and
  ``CKPT_DIR`` in the environment, two CPU devices each).
* ``bash`` blocks are commands: ``make T`` needs a target ``T`` in the Makefile, ``pip
  install`` only extras that pyproject.toml declares, ``python -m M`` runs ``M --help``, and a
  pytest command names test files that exist. Anything else fails, so no block goes unchecked.
* ``text`` blocks are output or layout, not code.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import free_port, run_together

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(
    r"(?:<!-- run: (?P<processes>\d+) processes -->\n)?^```(?P<lang>[\w-]*)\n(?P<code>.*?)^```",
    re.S | re.M,
)


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int
    processes: int = 1


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    found = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start("code")) + 1
        processes = int(m.group("processes") or 1)
        found.append(Block(m.group("lang"), m.group("code"), line, processes))
    return found


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_every_block_has_a_known_language() -> None:
    for page in PAGES:
        for block in blocks(page):
            assert block.lang in {"python", "bash", "text"}, f"{page_id(page)}:{block.line}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_python_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__main__"}
    for block in blocks(page):
        if block.lang != "python" or block.processes > 1:
            continue
        where = f"{page_id(page)}:{block.line}"
        exec(compile(block.code, where, "exec"), namespace)


MULTI = [
    pytest.param(page, block, id=f"{page_id(page)}:{block.line}")
    for page in PAGES
    for block in blocks(page)
    if block.lang == "python" and block.processes > 1
]


@pytest.mark.parametrize(("page", "block"), MULTI)
def test_multi_process_blocks_run(page: Path, block: Block, tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(block.code)
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "COORDINATOR": f"127.0.0.1:{free_port()}",
        "NUM_PROCESSES": str(block.processes),
        "CKPT_DIR": str(tmp_path / "ckpt"),
    }
    commands = [
        ([sys.executable, str(script)], {**env, "PROCESS_ID": str(i)})
        for i in range(block.processes)
    ]
    run_together(commands, cwd=tmp_path, timeout=240)


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([\w.-]+):", text, re.M))


def declared_extras() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+)\s*=", section, re.M))


def check_command(words: list[str]) -> None:
    """Raises AssertionError unless the command is one this test knows how to verify."""
    if words[0] == "make":
        assert set(words[1:]) <= makefile_targets(), words
    elif words[:2] == ["pip", "install"]:
        targets = [w for w in words[2:] if not w.startswith("-")]
        assert targets, f"pip install of what? {words}"
        for target in targets:  # this project, with declared extras only
            m = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", target)
            assert m, f"pip install {target}: only this project (.) is checked"
            assert set(filter(None, (m.group(1) or "").split(","))) <= declared_extras(), target
    elif words[0].endswith("pytest") or words[1:3] == ["-m", "pytest"]:
        paths = [w.split("::")[0] for w in words if w.startswith("tests/")]
        assert paths and all((ROOT / p).exists() for p in paths), words
    elif words[0] in {"python", ".venv/bin/python"} and words[1] == "-m":
        proc = subprocess.run(
            [sys.executable, "-m", words[2], "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
    else:
        raise AssertionError(f"a docs command this test cannot check: {shlex.join(words)}")


def commands(code: str) -> list[list[str]]:
    """One word list per command; ``\\`` continues a line, ``#`` starts a comment, and
    environment assignments in front (``CMAPSS_DIR=... python``) are dropped."""
    joined = code.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        while words and re.fullmatch(r"\w+=\S*", words[0]):
            words = words[1:]
        if words:
            out.append(words)
    return out


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_bash_blocks_name_real_commands(page: Path) -> None:
    for block in blocks(page):
        if block.lang == "bash":
            for words in commands(block.code):
                check_command(words)
