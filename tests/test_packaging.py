"""The built artefacts, run for real: the .deb unpacked, the zipapp as a file.

Each artefact is built once per session by ``packaging/build`` into a
temporary directory, then run with the system's Python, outside any virtual
environment and with nothing of the checkout on its path, against a Redis
the fixtures started.  The job it runs is the fixture program, so what it
records shows that the artefact ran it under a lease, and a second run shows
the lease held.  Both artefacts claim to hold no compiled code (the .deb is
``Architecture: all``, the zipapp is for any CPython from 3.11 on): the tests
look inside them for extension modules and run them with every other CPython
3.11 or later that the machine has as well.  These tests build packages and
are marked ``slow``.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from servers import RedisServer

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "packaging" / "build"
JOB = str(Path(__file__).with_name("job.py"))
SYSTEM_PYTHON = "/usr/bin/python3"

pytestmark = pytest.mark.slow


def build(kind: str, directory: Path) -> Path:
    """Run ``packaging/build KIND``; its last line is the artefact's path."""
    env = {
        **os.environ,
        "DIST_DIR": str(directory / "dist"),
        "BUILD_DIR": str(directory / "build"),
        "PYTHON": sys.executable,
    }
    done = subprocess.run(
        [str(BUILD), kind], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    artefact = Path(done.stdout.strip().splitlines()[-1])
    assert artefact.is_file()
    assert artefact.parent == directory / "dist"
    return artefact


def system_env(tmp_path: Path, server: RedisServer) -> dict[str, str]:
    """An environment as cron gives one: no virtual environment, no checkout."""
    return {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(tmp_path / "home"),
        "LANG": "C.UTF-8",
        "CRONGUARD_REDIS": server.url,
        "CRONGUARD_CONFIG": os.devnull,
        # shiv unpacks the zipapp's dependencies here on first run.
        "SHIV_ROOT": str(tmp_path / "shiv"),
    }


def system_python_version() -> tuple[int, int] | None:
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return None
    done = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import sys; print(*sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    )
    major, minor = done.stdout.split()
    return int(major), int(minor)


def other_cpythons() -> list[str]:
    """Every CPython 3.11 or later here but the system's, by real path.

    Looked for as ``python3.N`` on PATH and among pyenv's versions.  A
    ``python3.N`` may be a version manager's shim that needs this process's
    environment, so each is asked for its own executable, which runs as it is.
    """
    candidates = [shutil.which(f"python3.{minor}") for minor in range(11, 20)]
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates += [str(path) for path in pyenv.glob("versions/*/bin/python3")]
    system = os.path.realpath(SYSTEM_PYTHON)
    found: set[str] = set()
    for candidate in filter(None, candidates):
        done = subprocess.run(
            [
                candidate,
                "-c",
                "import sys; print(sys.implementation.name, "
                "*sys.version_info[:2], sys.executable)",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if done.returncode != 0:
            continue
        implementation, major, minor, executable = done.stdout.split(maxsplit=3)
        real = os.path.realpath(executable.strip())
        if implementation == "cpython" and (int(major), int(minor)) >= (3, 11):
            found.add(real)
    found.discard(system)
    return sorted(found)


@pytest.fixture(scope="session")
def other_pythons() -> list[str]:
    pythons = other_cpythons()
    if not pythons:
        pytest.skip("no CPython 3.11 or later here besides the system's")
    return pythons


def assert_each_python_runs_one_job(
    pythons: list[str],
    command_for: Callable[[str], list[str]],
    env: dict[str, str],
    key: str,
    tmp_path: Path,
) -> None:
    """assert_runs_one_job for each Python, with a key and directory apiece."""
    for number, python in enumerate(pythons):
        scratch = tmp_path / str(number)
        scratch.mkdir()
        assert_runs_one_job(command_for(python), env, f"{key}-{number}", scratch)


# Extension modules: what would tie an artefact to one platform and Python.
COMPILED = re.compile(r"\.(so|pyd|dylib)$|\.so\.")


def assert_runs_one_job(
    command: list[str], env: dict[str, str], key: str, tmp_path: Path
) -> None:
    """The artefact runs the job under a lease; a second try finds it held."""
    record = tmp_path / "record"
    job = ["--key", key, "--ttl", "1m", "--", SYSTEM_PYTHON, JOB, "record", str(record)]
    first = subprocess.run(
        [*command, *job], env=env, capture_output=True, text=True, timeout=60,
        cwd=tmp_path,
    )
    assert first.returncode == 0, first.stderr
    assert first.stdout == first.stderr == ""
    lines = record.read_text().splitlines()
    assert len(lines) == 1
    assert lines[0].split()[2] == "1"  # the first fencing token of the key

    second = subprocess.run(
        [*command, "-v", *job], env=env, capture_output=True, text=True, timeout=60,
        cwd=tmp_path,
    )
    assert second.returncode == 0, second.stderr
    assert len(record.read_text().splitlines()) == 1, "ran twice under one lease"
    assert "skip" in second.stderr.lower()


@pytest.fixture(scope="session")
def zipapp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    system = system_python_version()
    if system is None:
        pytest.skip(f"no system Python at {SYSTEM_PYTHON} to run the zipapp with")
    # Built with this Python, run with the system's and any other here: the
    # zipapp holds no compiled code, so whichever CPython built it is no matter.
    return build("zipapp", tmp_path_factory.mktemp("zipapp"))


@pytest.fixture(scope="session")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built .deb."""
    missing = [
        tool
        for tool in ("dpkg-buildpackage", "dh", "dh_python3", "dpkg-deb")
        if shutil.which(tool) is None
    ]
    if missing:
        pytest.skip(
            f"the Debian tooling is absent ({', '.join(missing)}); "
            "run: packaging/deps deb"
        )
    if system_python_version() is None:
        pytest.skip(f"no system Python at {SYSTEM_PYTHON}; run: packaging/deps deb")
    return build("deb", tmp_path_factory.mktemp("deb"))


@pytest.fixture(scope="session")
def deb_tree(deb: Path) -> Path:
    """The built .deb, unpacked with dpkg-deb -x; the tree holds usr/."""
    tree = deb.parent.parent / "root"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
    return tree


def test_system_python_has_no_cronguard_of_its_own() -> None:
    # Otherwise the artefact tests below could pass on code found elsewhere.
    if system_python_version() is None:
        pytest.skip(f"no system Python at {SYSTEM_PYTHON}")
    done = subprocess.run(
        [SYSTEM_PYTHON, "-I", "-c", "import cronguard"],
        capture_output=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode != 0


def test_zipapp_runs_a_job_with_the_system_python(
    zipapp: Path, private_redis: RedisServer, key: str, tmp_path: Path
) -> None:
    env = system_env(tmp_path, private_redis)
    assert_runs_one_job([SYSTEM_PYTHON, str(zipapp)], env, key, tmp_path)


def test_zipapp_runs_as_an_executable(
    zipapp: Path, private_redis: RedisServer, tmp_path: Path
) -> None:
    # The shebang finds python3 on PATH, as cron's PATH has it.
    done = subprocess.run(
        [str(zipapp), "--version"],
        env=system_env(tmp_path, private_redis),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("cronguard ")


def test_deb_installs_the_command_man_page_and_completions(deb_tree: Path) -> None:
    usr = deb_tree / "usr"
    assert os.access(usr / "bin" / "cronguard", os.X_OK)
    shipped = gzip.decompress((usr / "share/man/man1/cronguard.1.gz").read_bytes())
    assert shipped == (ROOT / "man" / "cronguard.1").read_bytes()
    private = usr / "lib" / "cronguard"
    for package in ("cronguard", "redis", "typer"):
        assert (private / package / "__init__.py").is_file(), package
    assert (usr / "share/bash-completion/completions/cronguard").is_file()
    # zsh reads #compdef from the very first line of the file.
    zsh = (usr / "share/zsh/vendor-completions/_cronguard").read_text()
    assert zsh.startswith("#compdef cronguard\n")
    assert (usr / "share/fish/vendor_completions.d/cronguard.fish").is_file()


def test_deb_command_runs_a_job_with_the_system_python(
    deb_tree: Path, private_redis: RedisServer, key: str, tmp_path: Path
) -> None:
    env = system_env(tmp_path, private_redis)
    # The launcher's shebang is /usr/bin/python3; it finds its private
    # directory beside its own bin/, here inside the unpacked tree.
    assert_runs_one_job([str(deb_tree / "usr/bin/cronguard")], env, key, tmp_path)


def test_deb_bash_completion_file_completes(deb_tree: Path, tmp_path: Path) -> None:
    bin_dir = deb_tree / "usr" / "bin"
    completion = deb_tree / "usr/share/bash-completion/completions/cronguard"
    script = (
        f'source "{completion}"\n'
        "COMP_WORDS=(cronguard --redis-t)\n"
        "COMP_CWORD=1\n"
        "_cronguard_completion cronguard\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    done = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", script],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["--redis-timeout"]


def test_zipapp_holds_no_compiled_code(zipapp: Path) -> None:
    with zipfile.ZipFile(zipapp) as archive:
        names = archive.namelist()
    assert not [name for name in names if COMPILED.search(name)]
    assert not [name for name in names if "pydantic" in name]
    # The dependencies are really in it, not fetched at run time.
    assert any(name.endswith("site-packages/redis/__init__.py") for name in names)


def test_zipapp_runs_a_job_with_every_other_cpython(
    zipapp: Path,
    other_pythons: list[str],
    private_redis: RedisServer,
    key: str,
    tmp_path: Path,
) -> None:
    env = system_env(tmp_path, private_redis)
    assert_each_python_runs_one_job(
        other_pythons, lambda python: [python, str(zipapp)], env, key, tmp_path
    )


def test_deb_is_for_every_architecture_and_python3(deb: Path) -> None:
    assert deb.name.endswith("_all.deb")
    fields = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Architecture", "Depends"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "Architecture: all\n" in fields
    depends = fields.split("Depends:", 1)[1]
    assert "python3 (>= 3.11)" in depends
    assert "<<" not in depends, "an upper bound on python3 would need a reason"


def test_deb_holds_no_compiled_code(deb_tree: Path) -> None:
    files = [path for path in deb_tree.rglob("*") if path.is_file()]
    assert not [path for path in files if COMPILED.search(path.name)]
    assert not list((deb_tree / "usr/lib/cronguard").glob("pydantic*"))


def test_deb_command_runs_a_job_with_every_other_cpython(
    deb_tree: Path,
    other_pythons: list[str],
    private_redis: RedisServer,
    key: str,
    tmp_path: Path,
) -> None:
    # The launcher, run by another interpreter than its shebang's: the private
    # directory serves any python3 the package's Depends allows.
    env = system_env(tmp_path, private_redis)
    launcher = str(deb_tree / "usr/bin/cronguard")
    assert_each_python_runs_one_job(
        other_pythons, lambda python: [python, "-I", launcher], env, key, tmp_path
    )
