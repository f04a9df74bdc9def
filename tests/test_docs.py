"""The documentation is tested like code: it must match the command it describes.

- Every option of every command (read from the click tree typer builds) has
  an entry in man/cronguard.1, and every option the man page names exists.
  An option's entry is a ``.TP`` item whose tag names it.
- The man page passes ``mandoc -Tlint`` without a message.
- Every shell example in README.md runs, against a Redis of the test's own,
  with the installed ``cronguard`` first on PATH.  Blocks fenced as ``sh`` are
  run as one bash script that must succeed.  Blocks fenced as ``console`` are
  a session: each ``$ `` line is a command (``> `` lines continue it) that must
  exit 0, and the lines after it are its expected output (stdout and stderr);
  ``...`` stands for any text within a line, and a line of only ``...`` for
  any number of lines.  Blocks with any other info string (``crontab``,
  ``text``, ``toml``, or ``sh no-run`` for commands that must not run here,
  such as ``pip install``) are not run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest
import typer
from servers import RedisServer

from cronguard.cli import click
from cronguard.cli_admin import app

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "man" / "cronguard.1"
README = ROOT / "README.md"

_FONT = re.compile(r"\\f(\(..|\[[^]]*\]|.)")
_LONG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
_ANY = re.compile(r"(?<![\w-])-(?:-[a-z][a-z0-9-]*|[a-zA-Z])(?![\w-])")


# The command line


def commands() -> Iterator[tuple[str, click.Command]]:
    """Every command of the tree, with its path: ``cronguard``, ``cronguard run``."""
    root = typer.main.get_command(app)
    todo: list[tuple[str, click.Command]] = [("cronguard", root)]
    while todo:
        path, command = todo.pop()
        yield path, command
        # A group has subcommands; typer's click and click itself both say so.
        subcommands = getattr(command, "commands", {})
        todo += [(f"{path} {name}", sub) for name, sub in subcommands.items()]


def command_params(command: click.Command) -> list[click.Parameter]:
    """The command's parameters, with the --help option click adds of itself."""
    context = click.Context(command, **command.context_settings)
    return list(command.get_params(context))


def cli_options() -> dict[str, str]:
    """Each option spelling (``--ttl``, ``-k``) and a command that has it."""
    found = {}
    for path, command in commands():
        for param in command_params(command):
            if param.param_type_name == "option":
                for name in [*param.opts, *param.secondary_opts]:
                    found.setdefault(name, path)
    return found


def test_every_option_has_help_text() -> None:
    missing = [
        f"{path} {param.opts[0]}"
        for path, command in commands()
        for param in command_params(command)
        if param.param_type_name == "option" and not (param.help or "").strip()
    ]
    assert not missing, f"options without --help text: {missing}"


# The man page


def man_text() -> str:
    """The man page's source with escapes undone: ``\\-`` is ``-``, no fonts."""
    text = MAN.read_text()
    return _FONT.sub("", text).replace("\\-", "-").replace("\\ ", " ")


def man_entries() -> set[str]:
    """The options that have an entry: named in the tag line of a ``.TP`` item."""
    lines = man_text().splitlines()
    return {
        option
        for before, tag in pairwise(lines)
        if before.strip() == ".TP"
        for option in _ANY.findall(tag)
    }


def test_every_cli_option_has_a_man_page_entry() -> None:
    entries = man_entries()
    missing = {
        name: path for name, path in cli_options().items() if name not in entries
    }
    assert not missing, (
        f"options without an entry (.TP item) in {MAN.name}: {missing}"
    )


def test_every_option_the_man_page_names_exists() -> None:
    known = cli_options()
    named = set(_LONG.findall(man_text())) | man_entries()
    unknown = sorted(name for name in named if name not in known)
    assert not unknown, f"{MAN.name} names options the command lacks: {unknown}"


@pytest.mark.skipif(
    shutil.which("mandoc") is None,
    reason="mandoc is not installed; run: packaging/deps docs",
)
def test_man_page_passes_mandoc_lint() -> None:
    done = subprocess.run(
        ["mandoc", "-Tlint", str(MAN)], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


# README.md's examples


@dataclass
class Block:
    info: str
    line: int  # of the opening fence, counted from 1
    text: str


def readme_blocks() -> list[Block]:
    blocks, lines = [], README.read_text().splitlines()
    number = 0
    while number < len(lines):
        opening = re.match(r"^(`{3,}|~{3,})\s*(.*)$", lines[number])
        if not opening:
            number += 1
            continue
        fence, info = opening.groups()
        body: list[str] = []
        end = number + 1
        while end < len(lines) and not lines[end].startswith(fence):
            body.append(lines[end])
            end += 1
        blocks.append(Block(info.strip(), number + 1, "\n".join(body) + "\n"))
        number = end + 1
    return blocks


def runnable_blocks() -> list[Block]:
    return [block for block in readme_blocks() if block.info in ("sh", "console")]


def console_session(text: str) -> list[tuple[str, list[str]]]:
    """A console block as (command, expected output lines) pairs."""
    session: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("$ "):
            session.append((line[2:], []))
        elif line.startswith("> ") and session and not session[-1][1]:
            session[-1] = (session[-1][0] + "\n" + line[2:], [])
        elif session:
            session[-1][1].append(line)
        elif line.strip():
            raise AssertionError(f"console block starts with output: {line!r}")
    return session


def output_matches(expected: list[str], actual: list[str]) -> bool:
    """Line-by-line match where ``...`` is any text, and a ``...`` line any lines."""
    pattern = "".join(
        r"(?:.*\n)*?" if line.strip() == "..."
        else ".*".join(map(re.escape, line.rstrip().split("..."))) + r"\n"
        for line in expected
    )
    text = "".join(line.rstrip() + "\n" for line in actual)
    return re.fullmatch(pattern, text) is not None


@pytest.fixture(scope="module")
def readme_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One server for the README, whose examples run in order, as read."""
    with RedisServer(tmp_path_factory.mktemp("readme-redis")) as server:
        yield server


@pytest.fixture
def shell_env(
    readme_redis: RedisServer, cronguard_bin: str, tmp_path: Path
) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CRONGUARD_") and k != "REDIS_URL"
    }
    return {
        **clean,
        "PATH": f"{Path(cronguard_bin).parent}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(home),
        "CRONGUARD_REDIS": readme_redis.url,
        "CRONGUARD_CONFIG": os.devnull,
    }


def test_readme_has_examples_to_run() -> None:
    assert runnable_blocks(), "README.md has no sh or console block"


@pytest.mark.parametrize(
    "block", runnable_blocks(), ids=lambda block: f"README.md:{block.line}"
)
def test_readme_example_runs(
    block: Block, shell_env: dict[str, str], tmp_path: Path
) -> None:
    def run(script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "--norc", "--noprofile", "-euo", "pipefail", "-c", script],
            env=shell_env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )

    where = f"README.md:{block.line}"
    if block.info == "sh":
        done = run(block.text)
        assert done.returncode == 0, f"{where} failed:\n{done.stdout}{done.stderr}"
        return

    for command, expected in console_session(block.text):
        done = run(command)
        shown = (done.stdout + done.stderr).splitlines()
        assert done.returncode == 0, (
            f"{where}: $ {command}\nexited {done.returncode}:\n" + "\n".join(shown)
        )
        assert output_matches(expected, shown), (
            f"{where}: $ {command}\nexpected:\n" + "\n".join(expected)
            + "\ngot:\n" + "\n".join(shown)
        )


@pytest.mark.parametrize(
    ("expected", "actual", "matches"),
    [
        (["a", "b"], ["a", "b"], True),
        (["a"], ["a", "b"], False),
        (["cronguard: ...held by ..."], ["cronguard: lease held by h:1"], True),
        (["first", "...", "last"], ["first", "x", "y", "last"], True),
        (["first", "...", "last"], ["first", "last"], True),
        ([], ["unexpected"], False),
    ],
)
def test_output_matching(expected: list[str], actual: list[str], matches: bool) -> None:
    assert output_matches(expected, actual) is matches
