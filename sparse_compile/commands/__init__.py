"""Subcommands of the ``sparse-compile`` CLI, one module each (see ``sparse_compile.cli``)."""
