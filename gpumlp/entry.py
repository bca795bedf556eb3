"""The `gpumlp` console script: the CLI imported inside a guard, so that Ctrl-C while Python
loads NumPy, click and the rest ends as it does later, with `interrupted` and exit 130, not a
traceback (`gpumlp.cli` installs its own handling once it is loaded)."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from .cli import main as cli
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    cli()
