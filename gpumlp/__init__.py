"""gpumlp: an MLP on MNIST with hand-written backpropagation (the derivation in
docs/derivation.md), on NumPy or CuPy."""

__version__ = "0.1.0"
