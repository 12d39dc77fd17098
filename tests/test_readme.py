"""Every concrete `curate ...` command in the README parses with the command line as it is (flags,
choices, subcommands), and every `make` target it names exists: the README cannot drift from the CLI."""

from __future__ import annotations

import re
import shlex

import pytest

from curate.cli import build_parser
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def commands() -> list[str]:
    """Lines in code blocks that start a curate command, without the synopsis (`[--flag ...]`, `a|b`)."""
    out = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", README, flags=re.S) + re.findall(r"(?m)^    (curate .*)$", README):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("curate ") and "[" not in line and "|" not in line and "..." not in line:
                out.append(line)
    return out


@pytest.mark.parametrize("command", commands())
def test_readme_command_parses(command):
    build_parser().parse_args(shlex.split(command)[1:])   # SystemExit(2) on an unknown flag or choice


def test_readme_names_only_make_targets_that_exist():
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"(?m)^([a-z][a-z-]*):", makefile))
    named = set(re.findall(r"`make ([a-z-]+)`", README)) | set(re.findall(r"(?m)^make ([a-z-]+)", README))
    assert named and named <= targets, named - targets


def test_there_are_commands_to_check():
    assert len(commands()) >= 10
