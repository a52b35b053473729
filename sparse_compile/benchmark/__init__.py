"""The one-layer benchmark of every form (``sparse-compile bench layer``, ``bench/``).

:mod:`.weights` makes the layer, :mod:`.layer` builds each form and times it, :mod:`.results` writes
and tabulates the results, :mod:`.cli` is the command line. The timers are :mod:`sparse_compile.timing`.
"""
from ..timing import Timing, cpu_model, num_threads, time_cpu, time_fn, time_gpu
from .cli import add_layer_arguments, config_from_args, layer_main, run_layer_args
from .layer import Form, LayerBenchConfig, Skip, build_form, relative_error, run_layer_bench, tolerance
from .results import (FORM_LABELS, FORMS, add_speedups, machine_info, markdown_table, read_results, result_paths,
                      tables, write_results)
from .weights import BenchWeights, checkpoint_layer, parse_shape, random_layer

__all__ = [
    "Timing", "time_fn", "time_cpu", "time_gpu", "num_threads", "cpu_model", "machine_info", "write_results",
    "read_results", "result_paths", "FORMS", "FORM_LABELS", "BenchWeights", "Form", "Skip", "parse_shape",
    "random_layer", "checkpoint_layer", "build_form", "LayerBenchConfig", "run_layer_bench", "add_speedups",
    "markdown_table", "tables", "add_layer_arguments", "config_from_args", "layer_main", "run_layer_args",
    "relative_error", "tolerance",
]
