"""From accuracy to deployed speed: optimize (mode "auto", CPU) the SRigL models trained by
``bench/accuracy.py`` and time them against the dense model of the same recipe.

    .venv/bin/python -m bench.accuracy_deploy                     # every saved model, batch 1 and 128
    .venv/bin/python -m bench.accuracy_deploy --dataset mnist --batch 1 --repeats 50

For each data set and each saved ``<dataset>_srigl_abl_<sparsity>_seed<k>.pt`` (and the dense
``<dataset>_dense_seed<k>.pt``) under ``bench/out/accuracy/models/``: test accuracy before and after
``sparse_compile.optimize`` (they must agree: the forms are exact), the forms chosen per layer,
the bytes of the sparse layers before / after and of the saved file (``sparse_compile.save``), and
the interleaved median latency of the trained dense model, the SRigL model as trained (dense kernels
over masked weights) and the optimized SRigL model, with ratios to the dense model measured in the
same run. Writes ``deploy.md`` and ``deploy.json`` next to the accuracy results.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from bench.accuracy import OUT, RECIPES


def _model(dataset: str, path: Path) -> torch.nn.Module:
    from sparse_compile.train.loop import build_model, resolve_recipe

    model = build_model(resolve_recipe(RECIPES[dataset]))
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


@torch.no_grad()
def _accuracy(model, x, y, batch=1000) -> float:
    return sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch)) / len(x)


def _file_bytes(model) -> int:
    import sparse_compile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.safetensors"
        sparse_compile.save(model, p)
        return p.stat().st_size


def deploy(dataset: str, out: Path, batches, repeats: int) -> list[dict]:
    """One record per saved SRigL model of ``dataset``: accuracy, forms, bytes, latency vs dense."""
    import sparse_compile
    from sparse_compile.autotune import interleaved_times
    from sparse_compile.train.data import build_datasets

    models = out / "models"
    dense_files = sorted(models.glob(f"{dataset}_dense_seed*.pt"))
    sparse_files = sorted(models.glob(f"{dataset}_srigl_abl_*_seed*.pt"))
    if not dense_files or not sparse_files:
        print(f"{dataset}: no saved dense and SRigL models in {models}: run bench/accuracy.py first", file=sys.stderr)
        return []
    _, te = build_datasets(dataset)
    x_te, y_te = te.tensors
    dense = _model(dataset, dense_files[0])
    dense_acc = _accuracy(dense, x_te, y_te)
    dense_bytes = _file_bytes(dense)
    recs = []
    for f in sparse_files:
        sparsity = float(re.search(r"_srigl_abl_([0-9.]+)_seed", f.name).group(1))
        trained = _model(dataset, f)
        rec = dict(dataset=dataset, model=f.name, sparsity=sparsity, dense_model=dense_files[0].name,
                   dense_accuracy=dense_acc, accuracy=_accuracy(trained, x_te, y_te), dense_file_bytes=dense_bytes,
                   accuracy_optimized={}, forms={}, layer_bytes_before=None, layer_bytes_after={}, file_bytes={},
                   latency_us={}, ratio_to_dense={})
        for b in batches:  # "auto" picks each layer's form for the shapes it is given: one model per batch size
            xb = x_te[:b].contiguous()
            opt = sparse_compile.optimize(trained, example_inputs=xb, mode="auto", device="cpu")
            rep = opt.sparse_compile_report
            rec["accuracy_optimized"][b] = _accuracy(opt, x_te, y_te)
            rec["forms"][b] = rep.forms()
            rec["layer_bytes_before"] = rep.bytes_before
            rec["layer_bytes_after"][b] = rep.bytes_after
            rec["file_bytes"][b] = _file_bytes(opt)
            fns = {"dense": lambda: dense(xb), "srigl_trained": lambda: trained(xb), "srigl_optimized": lambda: opt(xb)}
            times = interleaved_times(fns, "cpu", repeats)
            med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
            rec["latency_us"][b] = med
            rec["ratio_to_dense"][b] = {k: med["dense"] / v for k, v in med.items() if k != "dense"}
        recs.append(rec)
        print(f"{dataset} {sparsity:g}: acc {100 * rec['accuracy']:.2f}% -> {rec['accuracy_optimized']}, "
              f"forms {rec['forms']}, speed-up vs dense {rec['ratio_to_dense']}", file=sys.stderr, flush=True)
    return recs


def markdown(recs: list[dict]) -> str:
    """The deployment table: one row per model and batch size."""
    if not recs:
        return "no models to deploy\n"
    lines = ["| data set | model | batch | test acc. (%): trained → optimized (dense) | sparse-layer bytes: dense → "
             "optimized | file bytes: dense → optimized | forms (auto) | latency µs: dense / as trained / optimized | "
             "speed-up over dense: as trained, optimized |", "|---" * 9 + "|"]
    for r in recs:
        for b, lat in r["latency_us"].items():
            rat = r["ratio_to_dense"][b]
            forms = ", ".join(f"{k}: {v}" for k, v in r["forms"][b].items())
            lines.append(
                f"| {r['dataset']} | SRigL {100 * r['sparsity']:g}% ({r['model'].rsplit('_', 1)[1][:-3]}) | {b} | "
                f"{100 * r['accuracy']:.2f} → {100 * r['accuracy_optimized'][b]:.2f} ({100 * r['dense_accuracy']:.2f}) | "
                f"{r['layer_bytes_before']:,} → {r['layer_bytes_after'][b]:,} | {r['dense_file_bytes']:,} → "
                f"{r['file_bytes'][b]:,} | {forms} | {lat['dense']:.0f} / {lat['srigl_trained']:.0f} / "
                f"{lat['srigl_optimized']:.0f} | {rat['srigl_trained']:.2f}x, {rat['srigl_optimized']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """Optimize and time every saved model; write deploy.md / deploy.json."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    p.add_argument("--batch", nargs="+", type=int, default=[1, 128])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    recs = [r for ds in a.dataset for r in deploy(ds, a.out, a.batch, a.repeats)]
    (a.out / "deploy.json").write_text(json.dumps(recs, indent=1))
    md = markdown(recs)
    (a.out / "deploy.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
