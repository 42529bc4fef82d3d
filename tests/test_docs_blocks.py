"""Every code block of README.md and docs/*.md runs as printed, or is marked as not runnable.

The pages are read when the tests are collected, so the test follows the README as it is. Each
page runs top to bottom in a fresh temporary folder, as a user would run it in one shell and
one Python session: its python blocks share one namespace, its shell blocks run in that folder,
and what one block makes (a run folder, a variable) the next block sees. The convention:

* **Which fences run.** ``python`` blocks run (``exec``); ``bash``, ``sh`` and ``shell`` blocks
  run as commands (below); any other tag (``text``, ``toml``, ...) is not code. An untagged
  fence fails: tag it (``text`` for pseudo-code, output or diagrams), so that no code block is
  left out by accident.
* **Markers** are HTML comment lines (invisible on a code host) directly above the opening
  fence, without a blank line between:

  - ``<!-- not run: REASON -->``: the block is not run; REASON must not be empty;
  - ``<!-- test args: ARGS -->``: shell blocks: ARGS are appended to every ``python -m
    pyro_kpp.X`` command of the block, after ``DEFAULT_ARGS`` (argparse: the last occurrence
    of an option wins, so ARGS can override a default); ``<!-- test args svi: ARGS -->``
    appends them to that CLI's commands only;
  - ``<!-- test replace: OLD => NEW -->``: OLD is replaced by NEW in the block before it runs
    (several lines allowed; OLD must occur in the block, so a marker cannot go stale).

  Any other spelling of a marker fails, so a typo never skips a block silently.
* **Shell blocks.** Lines ending in ``\\`` are joined; blank lines and ``#`` comments are
  skipped; ``&&`` chains run left to right. A command is ``[VAR=value ...] python -m
  pyro_kpp.<cli> ARGS`` (``python3`` too) or ``export VAR=value``; anything else (``pip``,
  ``git``, ``pytest``, ``torchrun``, pipes, ``a|b`` alternatives, ...) fails with a request for
  a ``not run`` marker. Each command runs with the test-size arguments of ``DEFAULT_ARGS``
  appended (a resumed ``svi`` trains 2 steps past its run's last record) and must exit with 0.
* **Data and runs.** ``/path/to/data`` is replaced by the data root the tests use. A run folder
  ``runs/NAME`` (a name without a dot) that a block reads, be it a python string, a CLI's
  argument or ``--resume``'s, and that no earlier block of the page made, is a copy of the
  ``tiny_run`` fixture (K++ trained 3 steps at the tiny test sizes) put there before the block
  runs; ``svi --run-dir runs/NAME`` makes its own. So, as for a user, a page that reads
  ``runs/NAME`` before it trains into ``runs/NAME`` fails: the folder already holds a run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PYTHON, SHELL = {"python"}, {"bash", "sh", "shell"}
#: Test sizes appended to each CLI's command line; None: the command needs a ``test args`` marker.
DEFAULT_ARGS = {
    "svi": ["--max-steps", "2", "--eval-episodes", "2", "--no-progress"],
    "evaluate": ["--samples", "2", "--episodes", "2", "--no-progress"],
    "generation": ["-n", "4", "--steps", "2"],
    "denoise": ["--episodes", "1", "--steps", "2"],
    "plot": [],
    "bench": None,
}
#: Steps a resumed run trains past its last record.
RESUME_STEPS = 2
DATA_PLACEHOLDER = "/path/to/data"
FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)\s*$")
MARKER = re.compile(r"^<!--\s*(not run|test args(?: [\w-]+)?|test replace)\s*:\s*(.*?)\s*-->$")
LOOKS_LIKE_MARKER = re.compile(r"^<!--\s*(not[\s_-]*run|test\b)", re.I)
RUN_PATH = re.compile(r"(?<![\w./-])runs/[\w+-]+(?![\w.+-])")
SHELL_SYNTAX = re.compile(r"[|;<>`$]")


@dataclasses.dataclass
class Block:
    page: Path
    line: int                     # of the opening fence, 1-based
    lang: str
    code: str
    markers: list[tuple[str, str]]
    problem: str | None = None    # a convention the page breaks

    @property
    def where(self) -> str:
        page = self.page.relative_to(REPO) if self.page.is_relative_to(REPO) else self.page
        return f"{page}:{self.line}"

    def marker(self, kind: str) -> list[str]:
        return [value for k, value in self.markers if k == kind]


def read_blocks(page: Path) -> list[Block]:
    """The fenced blocks of ``page`` with the markers directly above each."""
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence.group(1)), len(lines))
        markers, problem, j = [], None, i - 1
        while j >= 0 and lines[j].startswith("<!--"):
            found = MARKER.match(lines[j].strip())
            if found and (found.group(2) or found.group(1).startswith("test args")):
                markers.insert(0, (found.group(1), found.group(2)))
            elif found or LOOKS_LIKE_MARKER.match(lines[j]):
                problem = (f"marker {lines[j].strip()!r}: expected <!-- not run: REASON -->, <!-- test args: ARGS --> "
                           f"or <!-- test replace: OLD => NEW --> (REASON and OLD not empty)")
            j -= 1
        block = Block(page, i + 1, fence.group(2).lower(), "\n".join(lines[i + 1:end]), markers, problem)
        if not block.lang and not block.problem:
            block.problem = "untagged fence: tag it (```python, ```bash, or ```text for what is not code)"
        blocks.append(block)
        i = end + 1
    return blocks


def runnable(block: Block) -> bool:
    return bool(block.problem) or (block.lang in PYTHON | SHELL and not block.marker("not run"))


BLOCKS = [b for page in PAGES for b in read_blocks(page) if runnable(b)]


@dataclasses.dataclass
class Session:
    """One page's working folder, python namespace and shell variables."""
    cwd: Path
    namespace: dict
    env: dict


_SESSIONS: dict[Path, Session] = {}


def session(page: Path, tmp_path_factory) -> Session:
    if page not in _SESSIONS:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        _SESSIONS[page] = Session(tmp_path_factory.mktemp(page.stem), {"__name__": "__main__"}, env)
    return _SESSIONS[page]


def prepared_code(block: Block) -> str:
    """The block's text after its ``test replace`` markers and the data placeholder."""
    code = block.code
    for pair in block.marker("test replace"):
        old, sep, new = pair.partition("=>")
        assert sep and old.strip(), f"{block.where}: test replace {pair!r}: expected OLD => NEW"
        assert old.strip() in code, f"{block.where}: test replace: {old.strip()!r} does not occur in the block"
        code = code.replace(old.strip(), new.strip())
    return code.replace(DATA_PLACEHOLDER, os.environ.get("PYRO_KPP_DATA", DATA_PLACEHOLDER))


def provide_runs(paths: list[str], cwd: Path, tiny_run: Path) -> None:
    """A copy of the tiny run at each ``runs/NAME`` that no earlier block made."""
    for path in dict.fromkeys(paths):
        if not (cwd / path).exists():
            shutil.copytree(tiny_run, cwd / path, ignore=shutil.ignore_patterns(".lock"))


def commands(block: Block, code: str) -> list[list[str]]:
    """The block's commands as argument lists (``&&`` chains split, continuations joined)."""
    joined = re.sub(r"\\\n", " ", code)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        for part in line.split(" && "):
            words = shlex.split(part, comments=True)
            bad = [w for w in words if SHELL_SYNTAX.search(w)]
            assert not bad, (f"{block.where}: {part!r} uses shell syntax the test does not run ({bad[0]!r}); write "
                             f"one literal command, or mark the block <!-- not run: REASON -->")
            out.append(words)
    return out


def run_command(block: Block, words: list[str], s: Session, tiny_run: Path) -> None:
    if words[0] == "export":
        s.env.update(w.split("=", 1) for w in words[1:])
        return
    env = dict(s.env)
    while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    if words[:2] not in (["python", "-m"], ["python3", "-m"]) or len(words) < 3 or \
            not words[2].startswith("pyro_kpp."):
        pytest.fail(f"{block.where}: {shlex.join(words)!r} is not a `python -m pyro_kpp.<cli>` command, which is all "
                    f"the test runs; mark the block <!-- not run: REASON -->", pytrace=False)
    cli, args = words[2].removeprefix("pyro_kpp."), words[3:]
    defaults = DEFAULT_ARGS.get(cli)
    extra = [w for kind in ("test args", f"test args {cli}") for value in block.marker(kind) for w in shlex.split(value)]
    if defaults is None and not extra:
        pytest.fail(f"{block.where}: pyro_kpp.{cli} has no test-size arguments: give them with "
                    f"<!-- test args: ARGS --> or mark the block <!-- not run: REASON -->", pytrace=False)
    defaults = list(defaults or [])
    if cli == "svi":
        if "--resume" in args:
            resumed = args[args.index("--resume") + 1]
            provide_runs([resumed], s.cwd, tiny_run)
            last = json.loads((s.cwd / resumed / "metrics.jsonl").read_text().splitlines()[-1])
            defaults[defaults.index("--max-steps") + 1] = str(last["step"] + RESUME_STEPS)
    else:
        provide_runs(RUN_PATH.findall(" ".join(args)), s.cwd, tiny_run)
    argv = [sys.executable, "-m", f"pyro_kpp.{cli}", *args, *defaults, *extra]
    done = subprocess.run(argv, cwd=s.cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (f"{block.where}: `{shlex.join(words)}` exited with {done.returncode}:\n"
                                  f"{done.stderr[-3000:]}")


@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_block_runs_as_printed(block, tiny_run, tmp_path_factory, monkeypatch):
    """In page order: a page's blocks share its session (the parametrization keeps that order)."""
    assert not block.problem, f"{block.where}: {block.problem}"
    s = session(block.page, tmp_path_factory)
    code = prepared_code(block)
    if block.lang in PYTHON:
        provide_runs(RUN_PATH.findall(code), s.cwd, tiny_run)
        monkeypatch.chdir(s.cwd)
        exec(compile(code, block.where, "exec"), s.namespace)   # a raising block fails the test
        return
    for words in commands(block, code):
        run_command(block, words, s, tiny_run)


def test_markers_are_read(tmp_path):
    """The convention on a page of its own: what runs, what is skipped, what is refused."""
    page = tmp_path / "page.md"
    page.write_text("\n".join([
        "<!-- not run: needs a GPU -->", "```bash", "torchrun x", "```", "",
        "<!-- test args: --max-steps 1 -->", "<!-- test args svi: --seed 1 -->", "<!-- test replace: 100 => 2 -->",
        "```bash",
        "python -m pyro_kpp.svi --epochs 100", "```", "",
        "```", "plain", "```", "",
        "<!-- not run -->", "```python", "x = 1", "```", "",
        "```text", "M = f(x)", "```",
    ]))
    blocks = read_blocks(page)
    assert [b.lang for b in blocks] == ["bash", "bash", "", "python", "text"]
    assert [runnable(b) for b in blocks] == [False, True, True, True, False]
    assert blocks[1].marker("test args") == ["--max-steps 1"] and blocks[1].marker("test args svi") == ["--seed 1"]
    assert prepared_code(blocks[1]).endswith("--epochs 2")
    assert "untagged" in blocks[2].problem and "marker" in blocks[3].problem
    assert commands(blocks[1], "a \\\n  b && c  # note") == [["a", "b"], ["c"]]
    with pytest.raises(AssertionError, match="not run"):
        commands(blocks[1], "python -m pyro_kpp.generation RUN random|perturbed")
