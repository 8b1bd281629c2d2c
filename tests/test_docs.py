"""The docs cannot rot: every example in README.md and docs/*.md runs or at least parses.

- Every ```python block runs in a fresh namespace, with the working directory an empty temporary
  directory and ``HOME`` a temporary one (so ``~`` paths and caches stay out of the user's home).
- Every ``lowrank-jax`` command line in a ```bash block parses: ``train`` and ``prepare`` lines
  resolve and validate their config and overrides with ``lowrank-jax config`` (nothing is trained
  or written), ``launch`` lines check the command they launch, other verbs answer ``--help``.
- A ```yaml block preceded by ``<!-- file: NAME -->`` is written to NAME in that directory first,
  so the commands can name it.
- A block preceded by ``<!-- not run: reason -->`` is skipped; the skipped blocks are listed.
- Relative links point at files that exist, ``#anchors`` at headings that exist, and the
  ``python SCRIPT.py`` lines of ```bash blocks at scripts that exist.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from lowrank_jax.train.cli import main as cli_main  # the console script `lowrank-jax`

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
MARK = re.compile(r"^<!--\s*(not run|file):\s*(.*?)\s*-->$")
# The files the examples name that the docs do not write themselves: a corpus for `data.paths=~/corpus/...`.
HOME_FILES = {"corpus/notes/readme.txt": "A small text corpus for the data.paths example.\n"}
LAUNCH_OPTIONS_WITH_VALUE = {"--local-processes", "--devices-per-process", "--port", "--grace"}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    mark: tuple[str, str] | None  # ("not run", reason) or ("file", name) from the line before the fence

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def read_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, each with the HTML comment on the line before it, if any."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"{path.name}:{i + 1}: unclosed code fence"
        before = MARK.match(lines[i - 1].strip()) if i else None
        mark = (before.group(1), before.group(2)) if before else None
        blocks.append(Block(path, i + 1, m.group(1), "\n".join(lines[i + 1 : end]) + "\n", mark))
        i = end + 1
    return blocks


ALL_BLOCKS = [b for p in DOCS for b in read_blocks(p)]
PYTHON = [b for b in ALL_BLOCKS if b.lang == "python"]
BASH = [b for b in ALL_BLOCKS if b.lang == "bash"]
FILES = [b for b in ALL_BLOCKS if b.mark and b.mark[0] == "file"]
NOT_RUN = [b for b in ALL_BLOCKS if b.mark and b.mark[0] == "not run"]


@pytest.fixture
def sandbox(tmp_path, monkeypatch) -> Path:
    """An empty working directory holding the docs' named files, with ``HOME`` in a temporary directory too."""
    home = tmp_path / "home"
    for name, text in HOME_FILES.items():
        (home / name).parent.mkdir(parents=True, exist_ok=True)
        (home / name).write_text(text)
    monkeypatch.setenv("HOME", str(home))
    work = tmp_path / "work"
    work.mkdir()
    for b in FILES:
        (work / b.mark[1]).write_text(b.code)
    monkeypatch.chdir(work)
    return work


def test_the_docs_have_examples():
    assert (ROOT / "docs").is_dir()
    assert len(PYTHON) >= 8 and len(BASH) >= 10, (len(PYTHON), len(BASH))
    for b in NOT_RUN:
        assert b.mark[1], f"{b.where}: say why the block is not run"
    print(f"{len(PYTHON)} python, {len(BASH)} bash, {len(FILES)} file blocks; not run: {[b.where for b in NOT_RUN]}")


@pytest.mark.parametrize("block", [b for b in PYTHON if b not in NOT_RUN], ids=lambda b: b.where)
def test_python_block_runs(block, sandbox):
    code = compile(block.code, block.where, "exec")
    exec(code, {"__name__": "__docs__"})  # a fresh namespace per block


# -- command lines ---------------------------------------------------------------------------------


def logical_lines(script: str) -> list[str]:
    """Shell lines with backslash continuations and multi-line quotes joined."""
    out, pending, joined = [], "", False
    for line in script.splitlines():
        pending = pending + line if joined or not pending else f"{pending}\n{line}"
        joined = pending.endswith("\\")  # a continuation, also inside double quotes as in the shell
        if joined:
            pending = pending[:-1]
            continue
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command goes on
            continue
        out.append(pending)
        pending = ""
    assert not pending, f"unterminated shell line: {pending!r}"
    return out


def lowrank_jax_commands(script: str) -> list[list[str]]:
    """The argument lists of every ``lowrank-jax`` invocation in a shell script (also inside quoted strings)."""
    found = []
    for line in logical_lines(script):
        words = shlex.split(line, comments=True)
        simple, current = [], []
        for w in words:
            if w in ("&&", "||", ";", "|"):
                simple.append(current)
                current = []
            else:
                current.append(w)
        simple.append(current)
        for cmd in simple:
            for k, w in enumerate(cmd):
                if w == "lowrank-jax" or w.endswith("/bin/lowrank-jax"):
                    found.append(cmd[k + 1 :])
                    break
                if "lowrank-jax " in w:  # a quoted script, e.g. ssh --command="..."
                    found += lowrank_jax_commands(w)
    return found


def cli(argv: list[str]) -> tuple[int, str, str]:
    """Run the ``lowrank-jax`` entry point in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = cli_main(argv)
        except SystemExit as e:  # argparse: --help and usage errors
            status = e.code if isinstance(e.code, int) else 1
    return status, out.getvalue(), err.getvalue()


def check_command(argv: list[str], where: str) -> str:
    """Check one ``lowrank-jax`` argument list without training; return what was checked."""
    assert argv, f"{where}: `lowrank-jax` without a verb"
    verb, rest = argv[0], argv[1:]
    if verb == "launch":
        k = 0
        while k < len(rest) and rest[k].startswith("-"):
            k += 2 if rest[k] in LAUNCH_OPTIONS_WITH_VALUE and "=" not in rest[k] else 1
        status, _, err = cli(["launch", "--help"])
        assert status == 0, f"{where}: lowrank-jax launch --help: {err}"
        return check_command(rest[k:], where)
    if verb in ("train", "prepare"):
        status, out, err = cli(["config", *rest])
        assert status == 0, f"{where}: lowrank-jax {shlex.join(argv)}: {err.strip()}"
        assert out.lstrip().startswith("{"), out
        return f"config {shlex.join(rest)}"
    status, _, err = cli([verb, "--help"])
    assert status == 0, f"{where}: lowrank-jax {verb} --help: {err.strip()}"
    return f"{verb} --help"


def test_lowrank_jax_commands_parse(sandbox):
    checked = []
    for b in BASH:
        if b in NOT_RUN:
            continue
        for argv in lowrank_jax_commands(b.code):
            checked.append(check_command(argv, b.where))
    assert len(checked) >= 20, checked
    written = {p.name for p in sandbox.iterdir()} - {b.mark[1] for b in FILES}
    assert not written, f"checking the commands wrote {written}"
    print(f"{len(checked)} lowrank-jax command lines checked")


def test_scripts_named_in_commands_exist():
    scripts = set()
    for b in BASH:
        for line in logical_lines(b.code):
            words = shlex.split(line, comments=True)
            scripts |= {w for prev, w in zip(words, words[1:], strict=False) if prev == "python" and w.endswith(".py")}
    assert scripts, "no `python SCRIPT.py` line found"
    for script in sorted(scripts):
        assert (ROOT / script).is_file(), f"the docs run {script}, which does not exist"


def test_command_extraction():
    script = (
        "lowrank-jax train tiny steps=3   # a comment\n"
        "pip install x && lowrank-jax config tiny \\\n  model.layers=2\n"
        '#SBATCH --nodes=2\nssh host --command="\n  cd ~/lowrank-jax && .venv/bin/lowrank-jax train llama_1b \\\n'
        '    mesh=1,-1,1"\n'
    )
    assert lowrank_jax_commands(script) == [
        ["train", "tiny", "steps=3"],
        ["config", "tiny", "model.layers=2"],
        ["train", "llama_1b", "mesh=1,-1,1"],
    ]


def test_a_bad_override_fails_the_check(sandbox):
    with pytest.raises(AssertionError, match="model.no_such_field"):
        check_command(["train", "tiny", "model.no_such_field=1"], "here")


# -- the two commands for a fresh machine -----------------------------------------------------------

FRESH_MACHINE = [
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && lowrank-jax train tiny",
    "python3 -m venv .venv && . .venv/bin/activate && pip install -q -e '.[test]' && pytest -q",
]


def test_readme_has_the_two_commands_verbatim():
    readme = [b.code.strip() for b in read_blocks(ROOT / "README.md") if b.lang == "bash"]
    for command in FRESH_MACHINE:
        assert command in readme, command
    ci = ROOT / ".ci" / "run"
    if ci.is_file():
        assert FRESH_MACHINE[1] in ci.read_text()


# -- links -----------------------------------------------------------------------------------------

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)  # no headings inside code
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        assert dest.exists(), f"{path.name}: broken link {target}"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{path.name}: no heading for #{anchor} in {dest.name}"


def test_slug():
    assert slug("BitNet b1.58") == "bitnet-b158"
    assert slug("APOLLO and APOLLO-Mini") == "apollo-and-apollo-mini"
    assert slug("ReLoRA, LoRA and low-rank") == "relora-lora-and-low-rank"
    assert slug("`llama_7b` memory") == "llama_7b-memory"
