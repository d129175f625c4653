"""Every command in the READMEs, the deployment guide and docs/, exactly as printed, is checked.

Shell blocks (```bash) are split into simple commands. Each command goes through the parser
of the program it runs, without running it:

* ``flwr run``: ``--run-config`` through Flower's own parser and its check against
  ``[tool.flwr.app.config]``, then through this app's Hydra composition and validation;
* the rest of the ``flwr`` CLI, ``flower-superlink`` and ``flower-supernode``: Flower's click
  and argparse parsers (unknown options, missing arguments and bad values fail);
* ``python -m MODULE``: the module's ``build_parser()``;
* ``make``, ``pytest``, ``bash``, ``docker compose -f``: the target, the test paths, the
  script (``bash -n``), the compose file.

A program the test does not know fails it, so a new kind of command gets a check too.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import itertools
import re
import shlex
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import typer
from flwr.cli.app import app as flwr_cli
from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

from deploy.compose import host_command, load_services
from lowprec_fl.task.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))
DOCUMENTS = ["README.md", "deploy/README.md", "examples/mnist_lowprec/README.md", *DOCS]
SHELL_BLOCK = re.compile(r"```(?:bash|sh|shell|console)\n(.*?)```", re.S)
#: Programs whose commands are plain shell work: nothing of this project to check.
SHELL_PROGRAMS = {
    "cd", "mkdir", "export", "source", "cat", "cp", "rm", "ls", "chown", "git", "for", "done",
    "kill", "tail", "echo", "openssl", "scp", "ssh", "lscpu", "curl",
}  # fmt: skip
#: Words that run the command after them: ``do flwr ...`` in a loop, ``sudo chown ...``.
PREFIXES = {"do", "then", "else", "sudo", "time", "exec"}


def _commands(text: str) -> Iterator[list[str]]:
    """Simple commands of a shell block: continuation lines joined, heredoc bodies skipped,
    comments dropped, split at ``&&``, ``||``, ``;`` and ``|``."""
    lines, heredoc_end = [], None
    for line in text.replace("\\\n", " ").splitlines():
        if heredoc_end is not None:
            heredoc_end = None if line.strip() == heredoc_end else heredoc_end
            continue
        if match := re.search(r"<<-?\s*'?(\w+)'?", line):
            heredoc_end = match.group(1)
            line = line[: match.start()]
        lines.append(line)
    for line in lines:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        command: list[str] = []
        for token in lexer:
            if token in (";", "&&", "||", "|", "&"):
                if command:
                    yield command
                command = []
            else:
                command.append(token)
        if command:
            yield command


#: Configuration files whose comments show ``flwr run`` commands.
COMMENTED = ["pyproject.toml", *sorted(p.relative_to(ROOT).as_posix()
             for p in (ROOT / "conf").rglob("*.yaml"))]  # fmt: skip


def documented_commands() -> list[tuple[str, list[str]]]:
    """(document, command) for every command of every shell block, and every ``flwr run``
    command that a comment of pyproject.toml or conf/ shows (not inline mentions)."""
    found = []
    for name in DOCUMENTS:
        for block in SHELL_BLOCK.findall((ROOT / name).read_text()):
            found += [(name, command) for command in _commands(block)]
    for name in COMMENTED:
        for line in (ROOT / name).read_text().splitlines():
            shown = re.search(r"(?:^|: )(flwr run .*)$", line.partition("#")[2].strip())
            if shown:  # a command on a comment line of its own, or after "e.g.: "
                found += [(name, c) for c in _commands(shown.group(1))]
    return found


def _strip_environment(command: list[str]) -> list[str]:
    """``VAR=value prog``, ``do prog``, ``sudo prog``, ``.venv/bin/prog`` -> ``prog``."""
    while command and (re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", command[0]) or command[0] in PREFIXES):
        command = command[1:]
    if command:
        command = [command[0].removeprefix(".venv/bin/"), *command[1:]]
    return command


def _placeholders(args: list[str]) -> list[str]:
    """``<run-id>``-style placeholders as a value the parsers accept."""
    return ["1" if re.fullmatch(r"<[\w-]+>", a) else a for a in args]


def _check_run_config(text: str, app: Path = ROOT) -> None:
    """Flower's parsing and its check against the app's declared keys; this app's own run
    config also through its Hydra composition and validation."""
    declared = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    overrides = parse_config_args([text])
    fused = fuse_dicts(flatten_dict(declared.get("config", {})), overrides)  # undeclared keys
    if app == ROOT:
        load_config(fused)


def _check_flwr(args: list[str]) -> None:
    if args[:1] == ["run"]:
        options = dict(itertools.pairwise(args))
        app = (ROOT / args[1]).resolve()
        assert (app / "pyproject.toml").is_file(), f"flwr run {args[1]}: no such app folder"
        if "--run-config" in options:
            _check_run_config(options["--run-config"], app)
        if "--federation-config" in options:
            parse_config_args([options["--federation-config"]])
    command: click.Command = typer.main.get_command(flwr_cli)
    rest = _placeholders(args)
    while isinstance(command, click.Group) and rest and rest[0] in command.commands:
        command = command.commands[rest.pop(0)]
    assert not isinstance(command, click.Group), f"no such flwr command: flwr {' '.join(args)}"
    with command.make_context("flwr", rest):
        pass


def _check_argparse(parser: argparse.ArgumentParser, args: list[str]) -> None:
    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            parser.parse_args(_placeholders(args))
        except SystemExit as exit_:
            raise AssertionError(f"rejected: {err.getvalue().strip()}") from exit_


def _check_python(args: list[str]) -> None:
    assert args[0] == "-m", f"document `python -m MODULE`, not {args}"
    module = importlib.import_module(args[1])
    assert hasattr(module, "build_parser"), f"{args[1]} has no build_parser() to check against"
    _check_argparse(module.build_parser(), args[2:])


def _check_make(args: list[str]) -> None:
    makefile = (ROOT / "Makefile").read_text()
    for target in args:
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"no make target {target}"


def _check_pytest(args: list[str]) -> None:
    for arg in args:
        if not arg.startswith("-") and ("/" in arg or arg.endswith(".py")):
            assert (ROOT / arg.split("::")[0]).exists(), f"no test file {arg}"


def _check_bash(args: list[str]) -> None:
    script = ROOT / args[0]
    assert script.is_file(), f"no script {args[0]}"
    subprocess.run(["bash", "-n", str(script)], check=True)  # it parses


def _check_docker(args: list[str]) -> None:
    """``docker compose -f FILE``: every service's command line resolves, its paths mounted."""
    if args[:1] == ["compose"] and "-f" in args:
        services = load_services(ROOT / args[args.index("-f") + 1])
        for name, service in services.items():
            sources = {v.split(":")[0]: Path("/host") / v.split(":")[0] for v in service["volumes"]}
            host_command(name, sources, {}, services)


def check(command: list[str]) -> None:
    """Raise ``AssertionError`` unless the command's program accepts it."""
    program, *args = _strip_environment(command)
    if program in SHELL_PROGRAMS:
        return
    checks = {
        "flwr": _check_flwr,
        "flower-superlink": lambda a: _check_argparse(_parse_args_run_superlink(), a),
        "flower-supernode": lambda a: _check_argparse(_parse_args_run_supernode(), a),
        "python": _check_python,
        "python3": _check_python,
        "make": _check_make,
        "pytest": _check_pytest,
        "docker": _check_docker,
        "bash": _check_bash,
        "ruff": lambda a: None,
        "pip": lambda a: None,
    }
    assert program in checks, f"no check for the program {program!r}: add one"
    checks[program](args)


COMMANDS = documented_commands()


def test_the_documents_have_commands():
    names = {name for name, _ in COMMANDS}
    assert {"README.md", "deploy/README.md", "pyproject.toml", "conf/config.yaml"} <= names
    assert any(c[:2] == ["flwr", "run"] for _, c in COMMANDS)


@pytest.mark.parametrize(
    ("document", "command"), COMMANDS, ids=[f"{d}:{' '.join(c)[:60]}" for d, c in COMMANDS]
)
def test_a_documented_command_is_accepted(document: str, command: list[str]) -> None:
    check(command)


@pytest.mark.parametrize(
    "command",
    [
        'flwr run . --run-config "quantization=bfp4"',  # bare word: not TOML
        'flwr run . --run-config "federation.num_round=3"',  # not declared
        "flwr run . --run-config \"overrides='federation.num_round=3'\"",  # no such Hydra key
        "flwr run . --run-config \"quantization='bfp5'\"",  # no such preset
        "flower-supernode --superlink x:1 --no-such-flag",
        "flwr supernode register",  # missing the key
        "for i in 0 1; do flwr supernode regster k.pub; done",  # in a loop: still checked
        "sudo make no-such-target",
        "python -m deploy.preflight --no-such-flag",
        "make no-such-target",
        "unknown-program --flag",
    ],
)
def test_a_wrong_command_is_caught(command: str) -> None:
    with pytest.raises((AssertionError, ValueError, click.ClickException)):
        for parsed in _commands(command):
            check(parsed)


def test_the_readme_table_is_the_archived_sweep_summary():
    readme = (ROOT / "README.md").read_text()
    table = re.search(r"<!-- sweep table: (\S+) -->\n(.*?)\n<!-- /sweep table -->", readme, re.S)
    assert table, "the README's results table lost its markers"
    summary = (ROOT / table.group(1)).read_text().strip()
    assert table.group(2) == summary, "README.md's table differs from " + table.group(1)
    finished = sum(int(row.split("|")[8]) for row in summary.splitlines()[2:])
    assert f"In progress: {finished} of 96 runs finished" in readme or finished == 96


def test_the_readme_lists_exactly_the_declared_run_config_keys():
    readme = (ROOT / "README.md").read_text()
    listed = re.search(r"The keys `pyproject.toml`\s+declares: (.*?)\. ", readme, re.S)
    assert listed, "the README no longer lists the run-config keys"
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert set(re.findall(r"`([\w.-]+)`", listed.group(1))) == set(flatten_dict(declared["config"]))
