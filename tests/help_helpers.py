"""The check that a command's --help shows an example of that very command, for the tests of
`gpumlp` and of `gpumlp data`."""

from __future__ import annotations

import re
import shlex

import click

from gpumlp.cli import main

# one `gpumlp ...` call in an example line: up to a shell operator, `)` or a quote
INVOCATION = re.compile(r"(?<![\w/.-])gpumlp((?: +[^\s&|;)\"']+)*)")


def example_lines(help_text: str) -> list[str]:
    """The lines under each "Example:" or "Examples:" heading, up to the next blank line."""
    lines, found, inside = help_text.splitlines(), [], False
    for line in lines:
        if line.strip() in ("Example:", "Examples:"):
            inside = True
        elif inside and line.strip():
            found.append(line.strip())
        else:
            inside = False
    return found


def resolve(words: list[str]) -> tuple[list[str], click.Command, list[str]]:
    """The command path a `gpumlp WORDS` call names, its click command, and the rest."""
    path, command = [], main
    while words and isinstance(command, click.Group) and words[0] in command.commands:
        path.append(words[0])
        command = command.commands[words[0]]
        words = words[1:]
    return path, command, words


def assert_help_has_an_example(path: list[str], help_text: str) -> None:
    """`help_text` (of `gpumlp PATH --help`) has examples, the first of which calls `gpumlp
    PATH` (a subcommand of it, for a group), and every `gpumlp` call in them names a real
    command, with options that command has."""
    lines = example_lines(help_text)
    assert lines, help_text
    calls = [resolve(shlex.split(m.group(1))) for line in lines
             for m in INVOCATION.finditer(line)]
    assert calls, lines
    for called, command, rest in calls:
        assert not isinstance(command, click.Group), f"gpumlp {' '.join(called)}: not a command"
        names = {opt for p in command.params for opt in p.opts + p.secondary_opts}
        for word in rest:
            if word.startswith("-"):
                assert word.split("=")[0] in names, f"gpumlp {' '.join(called)} has no {word}"
    first = [resolve(shlex.split(m.group(1)))[0] for m in INVOCATION.finditer(lines[0])]
    assert any(called[:len(path)] == path and len(called) >= max(len(path), 1)
               for called in first), f"the first example is not gpumlp {' '.join(path)}: {lines}"
