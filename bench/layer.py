"""One sparse layer in every form (dense, ablated-dense, structured-only, condensed, CSR, 2:4, DeepSparse).

    python -m bench.layer                                   # full CPU default (long: see --help)
    python -m bench.layer --layers 768x3072 --sparsities 0.9 --batches 1 8 --threads 1 2
    python -m bench.layer --device cuda                     # GPU: batches 1/256/2048, fp32 + bf16
    python -m bench.layer --checkpoint vit.safetensors --layer encoder.layers.11.mlp.3

Same options as ``sparse-compile bench layer``; the logic is in :mod:`sparse_compile.benchmark`.
Writes ``bench/out/layer-<device>-<date>.json`` and ``.csv``; plot with ``python -m bench.plot``.
"""
import sys

from sparse_compile.benchmark import layer_main

if __name__ == "__main__":
    sys.exit(layer_main())
