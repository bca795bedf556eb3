"""gpumlp: the seed's MLP on MNIST, hand-written backpropagation on NumPy or CuPy."""

__version__ = "0.1.0"
