"""Condensed matmul kernels (Triton on GPU, C++ on CPU), registered as torch.ops.sparse_compile.*."""
