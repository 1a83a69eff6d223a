"""Write docs/cli.md: every `nativeq` command's help, generated from the click definitions.

    .venv/bin/python scripts/gen_cli_docs.py          # rewrite docs/cli.md
    .venv/bin/python scripts/gen_cli_docs.py --check  # exit 1 if docs/cli.md is stale (the test suite runs this)
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from nativeq.cli import main

OUT = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def _help(command: click.Command, path: list[str]) -> str:
    context = click.Context(command, info_name=" ".join(path), terminal_width=100, max_content_width=100,
                            help_option_names=["-h", "--help"])
    return command.get_help(context)


def render() -> str:
    lines = ["# `nativeq` command reference", "",
             "Generated from the CLI by `scripts/gen_cli_docs.py`; `nativeq COMMAND --help` prints the same.", ""]

    def walk(command: click.Command, path: list[str]) -> None:
        lines.extend([f"## `{' '.join(path)}`", "", "```", _help(command, path).rstrip(), "```", ""])
        if isinstance(command, click.Group):
            for name in sorted(command.list_commands(click.Context(command))):
                walk(command.get_command(click.Context(command), name), [*path, name])

    walk(main, ["nativeq"])
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python scripts/gen_cli_docs.py", file=sys.stderr)
            sys.exit(1)
    else:
        OUT.write_text(text)
