"""Shared bits of the examples: a tiny backbone for quick runs."""

TINY_BACKBONE = {"depths": (1, 1, 1, 1), "dims": (16, 32, 64, 128), "kernel_sizes": ((3,), (13,), (13,), (13,))}
