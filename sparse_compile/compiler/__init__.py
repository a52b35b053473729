"""The compiler behind :func:`sparse_compile.optimize`: plan -> propagate -> choose -> rewrite -> verify -> report.

(The package is named ``compiler``, not ``optimize``: a subpackage ``sparse_compile.optimize`` would
replace the public function ``sparse_compile.optimize`` as soon as it is imported.)
"""
from .api import optimize  # noqa: E402
from .config import MODES, OptimizeConfig  # noqa: E402
from .forms import FORMS, FormHandler, register_form  # noqa: E402
from .plan import LayerPlan  # noqa: E402
from .report import LayerReport, OptimizeReport  # noqa: E402
from .verify import relative_error  # noqa: E402

__all__ = ["optimize", "OptimizeConfig", "MODES", "FORMS", "FormHandler", "register_form", "LayerPlan", "OptimizeReport",
           "LayerReport", "relative_error"]
