"""Regenerate the shipped example checkpoint ``sparse_compile/examples/mlp_digits_srigl90.safetensors``.

    python -m sparse_compile.models.make_example

Trains the digits MLP (64-300-100-10) with SRigL at 90% sparsity using the ``digits_mlp`` recipe
(seed 0, one CPU thread) and writes the state dict, masks included (``*.weight_mask``), with the
recipe and test accuracy in the safetensors metadata, plus a JSON sidecar holding the trainer's report.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def make_example(out: Path, seed: int = 0, epochs=None, progress: bool = True) -> dict:
    """Train and write the example; return the training report."""
    from safetensors.torch import save_file

    from sparse_compile.checkpoint import EXAMPLE
    from sparse_compile.train.loop import train
    from sparse_compile.models.recipes import get_recipe

    recipe = get_recipe("digits_mlp").replace(method="srigl", sparsity=0.9)
    if epochs is not None:
        recipe = recipe.replace(epochs=epochs)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-reproducible on a given CPU, and fastest for this tiny model
    try:
        res = train(recipe, device="cpu", seed=seed, progress=progress, log=lambda *a, **k: None)
    finally:
        torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in res["model"].state_dict().items()}
    meta = {"model": "mlp", "recipe": recipe.name, "method": "srigl",
            "sparsity": f"{res['report']['sparsifier']['sparsity']:.6f}",
            "test_accuracy": f"{res['test_accuracy']:.6f}", "seed": str(seed), "epochs": str(recipe.epochs),
            "torch": torch.__version__, "command": "python -m sparse_compile.models.make_example"}
    save_file(sd, str(out / EXAMPLE), metadata=meta)
    (out / EXAMPLE).chmod(0o644)  # package data: readable by everyone
    report = {"metadata": meta, "recipe": recipe.to_dict(), "history": res["history"],
              "sparsifier": res["report"]["sparsifier"], "inspect": res["report"]["inspect"]}
    (out / EXAMPLE.replace(".safetensors", ".json")).write_text(json.dumps(report, indent=1))
    return report


def main(argv=None) -> int:
    """Command-line entry point."""
    from sparse_compile.checkpoint import example_path

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=example_path().parent, help="folder (default: the package's examples/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    rep = make_example(args.out, seed=args.seed, progress=not args.no_progress)
    m = rep["metadata"]
    print(f"wrote {args.out}: test accuracy {float(m['test_accuracy']):.4f}, sparsity {float(m['sparsity']):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
