"""
The built wheel, installed in a fresh virtualenv, carries the schemas and the twistd
plugins.
"""

import os
import shutil
import subprocess
import sys

import pytest

from hero_compute.explorer.ui_assets import VENDORED
from hero_compute.rpc.schema import load_schema

from .support import ROOT

#: Building and installing a wheel takes a while: ``make test FAST=1`` skips it locally;
#: CI always runs it.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv with the wheel built from this tree installed in it."""
    work = tmp_path_factory.mktemp("pkg")
    # Build from a copy, with no PYTHONPATH: an in-tree build leaves an egg-info that a
    # pip run on PYTHONPATH would take for an installed copy.
    source = work / "src"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".*cache"
        ),
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--outdir",
            str(work / "dist"),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
        env=env,
    )
    wheel = next((work / "dist").glob("hero_compute-*.whl"))
    venv = work / "venv"
    # Fresh and empty: no pip of its own (ensurepip takes seconds); ours installs into it
    # (--python), the wheel and its dependencies, without byte-compiling them all (the
    # most of the install's time; Python compiles what it imports).
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)],
        check=True,
        timeout=120,
        env=env,
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")]
        + ["install", "-q", "--no-compile", str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
        env=env,
    )
    return venv


def run(venv, *args, cwd="/"):
    """Run a command of the venv, away from the source tree."""
    env = {"PATH": f"{venv}/bin:/usr/bin:/bin", "HOME": str(venv)}
    return subprocess.run(
        [*args], capture_output=True, text=True, timeout=60, cwd=cwd, env=env
    )


def test_twistd_knows_both_commands(installed):
    """twistd explorer --help and twistd node --help work from the installed wheel."""
    for command in ("explorer", "node"):
        done = run(installed, f"{installed}/bin/twistd", command, "--help")
        assert done.returncode == 0, done.stderr
        assert "--socket" in done.stdout and "--tcp" in done.stdout
    assert (
        "--explorer" in run(installed, f"{installed}/bin/twistd", "node", "--help").stdout
    )


def test_wheel_carries_schemas_and_cli(installed):
    """The installed package loads both schemas and has the hero-compute command."""
    done = run(
        installed,
        f"{installed}/bin/python",
        "-c",
        "from hero_compute.rpc.schema import load_schema as l;"
        "print(len(l('explorer').methods), len(l('node').methods))",
    )
    assert done.returncode == 0, done.stderr
    expected = [str(len(load_schema(n).methods)) for n in ("explorer", "node")]
    assert done.stdout.split() == expected
    assert run(installed, f"{installed}/bin/hero-compute", "--help").returncode == 0


def test_wheel_carries_the_dashboard(installed):
    """The installed package carries the dashboard's files, xterm.js and its licence too."""
    done = run(
        installed,
        f"{installed}/bin/python",
        "-c",
        "from hero_compute.explorer.dashboard import load_static;"
        "print(sorted(n for n, b in load_static().items() if b))",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(
        sorted(["app.js", "console.js", "index.html", "style.css", *VENDORED])
    )
