"""Condensed matmul kernels (Triton on GPU, C++ on CPU), registered as torch.ops.sparse_compile.*.

Importing this package registers ``torch.ops.sparse_compile.condensed_linear`` and
``condensed_conv2d`` (cheaply: nothing is compiled and triton is not imported until first use).
"""
from . import cpu, ops
from .ops import condensed_conv2d, condensed_linear
from .reference import condensed_conv2d_ref, condensed_linear_ref

__all__ = ["condensed_linear", "condensed_conv2d", "condensed_linear_ref", "condensed_conv2d_ref"]
