"""Helpers for the tests of the commands that use a trained model (predict, report, export)."""

from __future__ import annotations

import sys

import click
from click.testing import CliRunner, Result

from gpumlp.backend import CPU
from gpumlp.config import Config, build_config
from gpumlp.train import train


def invoke(command: click.Command, *args) -> Result:
    """Run one command in-process; only a clean exit may end it, never a traceback."""
    result = CliRunner().invoke(command, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"{result.exception!r} escaped: {result.output}"
    assert "Traceback" not in result.output
    return result


def config_with(**keys) -> Config:
    """The default config with `keys` set; a double underscore stands for the dot (data__limit)."""
    return build_config(None, [f"{key.replace('__', '.')}={value}" for key, value in keys.items()])


def train_model(mnist, out_dir=None, **keys):
    """Train `config_with(**keys)` on the CPU; the RunResult."""
    return train(config_with(**keys), CPU, mnist, out_dir=out_dir)


def without_module(monkeypatch, name: str) -> None:
    """Make `import name` fail, as on a machine where the package is not installed."""
    monkeypatch.setitem(sys.modules, name, None)


def assert_missing_extra(result: Result, extra: str) -> None:
    """One error line that says how to install the extra from the checkout, exit code 1."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert f"pip install -e '.[{extra}]' in the gpumlp folder" in lines[0]
    assert "gpumlp[" not in lines[0]  # gpumlp is not on a package index
