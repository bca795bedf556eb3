"""`python -m gpumlp` runs the CLI."""

from .entry import main

main()
