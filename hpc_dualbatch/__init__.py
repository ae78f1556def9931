"""Hybrid dual-batch and cyclic progressive learning on MPI + Horovod."""

__version__ = "0.1.0"
