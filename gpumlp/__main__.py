"""`python -m gpumlp` runs the CLI."""

from .cli import main

main()
