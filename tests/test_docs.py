"""Every code block in docs/ runs: one test per page, so a new page is picked up by itself.

Rules, for whoever writes a page:

- ```` ```python ```` blocks of a page run in order, in one namespace, in a fresh temporary
  working directory (relative paths such as ``runs/m`` land there).
- ```` ```console ```` blocks: each ``$ async-ckpt ARGS`` line runs ``async_ckpt.cli.main(ARGS)``
  in that directory (what ``python -m async_ckpt.cli ARGS`` runs). The lines up to the next ``$``
  are its expected stdout and stderr, compared after masking numbers and hex hashes and squeezing
  spaces; ``...`` on a line of its own matches any lines, inside a line any text. No lines: not
  compared. ``$ echo $?`` followed by a number checks the previous exit code; otherwise it must be 0.
- ```` ```bash ```` / ```` ```sh ```` blocks: lines that start with ``async-ckpt`` run the same
  way and must exit 0. Other commands (``rm``, ``torchrun``, ``pip``) in any shell block are
  not run: do file changes that later blocks rely on in a python block.
- ``<!-- skip-test: reason -->`` on the line before a fence skips that block. Keep it for
  snippets that need several processes (torchrun) or packages we do not depend on.
- A fence inside an HTML comment (``<!--`` ... ``-->``) is not rendered but still runs: use it
  for set-up a page needs (a toy model, a dataset) without showing it.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from async_ckpt.cli import main as cli_main

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
_FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})\s*([^\s`]*)")
_SKIP = re.compile(r"^\s*<!--\s*skip-test:\s*(.+?)\s*-->\s*$")
_SHELL_SYNTAX = re.compile(r"[|&;<>`]|\$\(")


@dataclass
class Block:
    lang: str
    code: str
    line: int  # line number of the block's first line of code (1-based)
    skip: str | None


def parse_blocks(text: str) -> list[Block]:
    """Fenced code blocks of a Markdown text, with the skip reason written above each."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, lang = len(match.group(1)), match.group(2), match.group(3).lower()
        previous = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        skip = _SKIP.match(previous)
        end = i + 1
        while end < len(lines) and not (lines[end].strip().startswith(fence) and not lines[end].strip().strip(fence[0])):
            end += 1
        body = [line[indent:] if not line[:indent].strip() else line for line in lines[i + 1 : end]]
        blocks.append(Block(lang, "\n".join(body) + "\n", i + 2, skip.group(1) if skip else None))
        i = end + 1
    return blocks


def normalize(line: str) -> str:
    """Mask what changes from run to run: hex hashes and tokens, numbers, runs of spaces."""
    line = re.sub(r"\b(?=[0-9a-f]*\d)[0-9a-f]{8,}\b", "H", line)
    line = re.sub(r"\d+(\.\d+)?", "N", line)
    return re.sub(r"\s+", " ", line).strip()


def matches(expected: list[str], actual: list[str]) -> bool:
    """``expected`` (normalised, with ``...`` wildcards) against ``actual`` (normalised)."""
    parts = []
    for line in expected:
        if line == "...":
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            parts.append(".*".join(re.escape(piece.strip()) for piece in line.split("...")) + r"\n")
    return re.fullmatch("".join(parts), "".join(a + "\n" for a in actual)) is not None


def run_cli(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = cli_main(argv)
        except SystemExit as exc:  # argparse: --help, usage errors
            code = exc.code if isinstance(exc.code, int) else 0
    return code, out.getvalue()


def _command(line: str, where: str) -> list[str]:
    if _SHELL_SYNTAX.search(line.split(" #")[0]):
        raise AssertionError(f"{where}: cannot run {line!r} (pipes, redirections and && are not supported): "
                             "split it, or mark the block <!-- skip-test: reason -->")
    return shlex.split(line, comments=True)[1:]


def run_console(block: Block, page: str) -> None:
    """Run the ``$ async-ckpt`` lines of a console block and compare their output."""
    commands: list[tuple[str, int, list[str]]] = []  # (command line, its line number, output lines)
    for offset, line in enumerate(block.code.splitlines()):
        if line.startswith("$ "):
            commands.append((line[2:].strip(), block.line + offset, []))
        elif commands:
            commands[-1][2].append(line)
    last = 0
    for command, number, output in commands:
        here = f"{page}:{number}"
        if command == "echo $?":
            assert output and output[0].strip() == str(last), f"{here}: exit code {last}, the page says {output[:1]}"
            last = 0
            continue
        if not command.startswith("async-ckpt"):
            continue
        last, text = run_cli(_command(command, here))
        if not command_expects_failure(commands, command, number):
            assert last == 0, f"{here}: `{command}` exited {last}:\n{text}"
        expected = [normalize(x) for x in output if x.strip()]
        actual = [normalize(x) for x in text.splitlines() if x.strip()]
        if expected and not matches(expected, actual):
            raise AssertionError(f"{here}: output of `{command}` differs from the page.\n--- page\n" + "\n".join(output)
                                 + "\n--- actual\n" + text)


def command_expects_failure(commands: list[tuple[str, int, list[str]]], command: str, number: int) -> bool:
    """Whether the page checks this command's exit code with ``$ echo $?`` right after it."""
    index = next(i for i, c in enumerate(commands) if c[1] == number)
    return index + 1 < len(commands) and commands[index + 1][0] == "echo $?"


def run_shell(block: Block, page: str) -> None:
    for offset, line in enumerate(block.code.splitlines()):
        if line.strip().startswith("async-ckpt"):
            here = f"{page}:{block.line + offset}"
            code, text = run_cli(_command(line.strip(), here))
            assert code == 0, f"{here}: `{line.strip()}` exited {code}:\n{text}"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_code_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    name = str(page.relative_to(DOCS.parent))
    for block in parse_blocks(page.read_text()):
        if block.skip:
            continue
        if block.lang in ("python", "py"):
            exec(compile("\n" * (block.line - 1) + block.code, str(page), "exec"), namespace)  # noqa: S102
        elif block.lang == "console":
            run_console(block, name)
        elif block.lang in ("bash", "sh", "shell"):
            run_shell(block, name)


def test_pages_exist() -> None:
    names = {p.name for p in PAGES}
    assert {"index.md", "quickstart.md", "user-guide.md", "format.md", "design.md", "cli.md", "migration.md"} <= names


# ----------------------------------------------------------------------------- the runner itself


def test_parse_blocks_and_skip_markers() -> None:
    text = "intro\n<!-- skip-test: needs torchrun -->\n```python\nboom()\n```\n\n```python\nx = 1\n```\n  ```console\n  $ async-ckpt list .\n  ```\n"
    blocks = parse_blocks(text)
    assert [(b.lang, b.line, b.skip) for b in blocks] == [("python", 4, "needs torchrun"), ("python", 8, None), ("console", 11, None)]
    assert blocks[2].code == "$ async-ckpt list .\n"


def test_output_matching() -> None:
    actual = [normalize(x) for x in ["name  step  state", "checkpoint-20  20  committed  20.1 KiB  3s", "checkpoint-10  10  committed"]]
    assert matches([normalize("name step state"), normalize("checkpoint-20 20 committed 1.5 KiB 17s"), "..."], actual)
    assert matches([normalize("name ... state"), "..."], actual)
    assert not matches([normalize("name step state"), normalize("checkpoint-20 20 damaged")], actual)
    assert normalize("xxh3 f5056ed24e1e3a1e in .checkpoint-40.staging-1a2b3c4d5e6f-0") == "xxhN H in .checkpoint-N.staging-H-N"
