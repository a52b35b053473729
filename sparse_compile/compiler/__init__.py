"""The compiler behind :func:`sparse_compile.optimize`: plan -> propagate -> choose -> rewrite -> verify -> report.

(The package is named ``compiler``, not ``optimize``: a subpackage ``sparse_compile.optimize`` would
replace the public function ``sparse_compile.optimize`` as soon as it is imported.)
"""
