"""Shell completion, driven through the protocol each shell's script speaks.

typer's completion scripts call the command back with ``_CRONGUARD_COMPLETE``
set (``complete_bash``, ``complete_zsh``, ``complete_fish``) and the words
typed so far in ``COMP_WORDS``/``COMP_CWORD`` (bash) or
``_TYPER_COMPLETE_ARGS`` (zsh, fish).  These tests speak that protocol to the
installed command, and for bash also source the real script into a real bash
and call its completion function, as pressing TAB does.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def _complete(binary: str, **variables: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRONGUARD_")}
    return subprocess.run(
        [binary],
        env={**env, **variables},
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def bash_words(binary: str, line: str) -> list[str]:
    """What bash completion offers for ``line`` (the last word is completed)."""
    words = line.split(" ")
    done = _complete(
        binary,
        _CRONGUARD_COMPLETE="complete_bash",
        COMP_WORDS=line,
        COMP_CWORD=str(len(words) - 1),
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done.stdout.split()


def test_first_word_offers_run_options(cronguard_bin: str) -> None:
    # run is implied, so "cronguard --k" is completing a run option.
    offered = bash_words(cronguard_bin, "cronguard --k")
    assert set(offered) == {"--key", "--kill-after"}


def test_first_word_offers_subcommands_and_group_options(cronguard_bin: str) -> None:
    assert "run" in bash_words(cronguard_bin, "cronguard ")
    offered = bash_words(cronguard_bin, "cronguard --")
    assert {"--version", "--help", "--ttl", "--redis"} <= set(offered)
    assert len(offered) == len(set(offered)), "an option is offered twice"


def test_later_words_complete_run_options(cronguard_bin: str) -> None:
    offered = bash_words(cronguard_bin, "cronguard --ttl 5s --re")
    assert set(offered) == {"--release", "--redis", "--redis-timeout",
                            "--redis-password-file"}
    assert set(bash_words(cronguard_bin, "cronguard run --no-")) == {"--no-renew"}


def test_words_after_double_dash_belong_to_the_command(cronguard_bin: str) -> None:
    # "--k" here is the job's own argument, not a cronguard option.
    assert bash_words(cronguard_bin, "cronguard --key x -- ls --k") == []


def test_zsh_protocol(cronguard_bin: str) -> None:
    done = _complete(
        cronguard_bin,
        _CRONGUARD_COMPLETE="complete_zsh",
        _TYPER_COMPLETE_ARGS="cronguard --ke",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("_arguments ")
    assert '"--key":' in done.stdout


def test_fish_protocol(cronguard_bin: str) -> None:
    done = _complete(
        cronguard_bin,
        _CRONGUARD_COMPLETE="complete_fish",
        _TYPER_COMPLETE_FISH_ACTION="get-args",
        _TYPER_COMPLETE_ARGS="cronguard --ttl 1m --kil",
    )
    assert done.returncode == 0, done.stderr
    assert [line.split("\t")[0] for line in done.stdout.splitlines()] == [
        "--kill-after"
    ]
    # fish asks first whether there are arguments to offer (exit 0) or it
    # should fall back to file names (exit 1).
    asks = {
        "_CRONGUARD_COMPLETE": "complete_fish",
        "_TYPER_COMPLETE_FISH_ACTION": "is-args",
    }
    assert _complete(cronguard_bin, **asks,
                     _TYPER_COMPLETE_ARGS="cronguard --ke").returncode == 0
    assert _complete(cronguard_bin, **asks,
                     _TYPER_COMPLETE_ARGS="cronguard -- ls ").returncode == 1


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_show_completion_prints_the_script(cronguard_bin: str, shell: str) -> None:
    done = _complete(cronguard_bin, _CRONGUARD_COMPLETE=f"source_{shell}")
    assert done.returncode == 0, done.stderr
    assert "_CRONGUARD_COMPLETE=complete_" + shell in done.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_real_bash_completes_through_the_sourced_script(cronguard_bin: str) -> None:
    script = (
        'eval "$(_CRONGUARD_COMPLETE=source_bash "$CG")"\n'
        "COMP_WORDS=(cronguard --release --ti)\n"
        "COMP_CWORD=2\n"
        '_cronguard_completion "$CG"\n'
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    done = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", script],
        env={"PATH": os.environ["PATH"], "CG": cronguard_bin},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["--timeout"]
