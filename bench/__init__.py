"""Benchmark scripts (repository only): run from the repository root as ``python -m bench.<name>``.

The measuring code lives in the installed module :mod:`sparse_compile.benchmark`; these scripts
choose what to run and where the results go (``bench/out/`` by default, git-ignored).
"""
