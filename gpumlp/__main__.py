"""`python -m gpumlp` runs the CLI."""

from .entry import run

run()
