"""The training loop behind ``sparse-compile train`` and the demo: a model of the zoo trained from a
recipe with SRigL (or RigL / static / dense).

Several processes (GPUs with NCCL, or CPU processes with gloo) run it through torchrun and
DistributedDataParallel; each process reads its own shard of the training set, the sparsifier keeps
the masks identical on every rank (checked at the end: ``ranks_consistent`` in report.json).
The output folder holds ``checkpoint.pt`` (written after every epoch, what ``resume`` reads),
``model.safetensors`` (final weights with their ``*.weight_mask`` buffers: ``sparse-compile inspect``
/ ``optimize`` read it) and ``report.json`` (recipe, per-epoch history, the sparsifier's report, the
inspect table). :func:`train` is the loop; the ``build_*`` helpers are its building blocks.
"""
from __future__ import annotations

import contextlib
import inspect as pyinspect
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

METHOD_CLASSES = {"srigl": "SRigL", "rigl": "RigL", "static": "StaticSparse"}


# ------------------------------------------------------------------------------------------ building blocks

def resolve_recipe(name, *, sparsity=None, epochs=None, method=None, batch_size=None, overrides=()):
    """The named recipe (or a :class:`Recipe` given as is) with the command-line overrides applied."""
    from sparse_compile.models.recipes import Recipe, get_recipe

    r = name if isinstance(name, Recipe) else get_recipe(name)
    r = r.override(overrides)
    changes = {k: v for k, v in dict(sparsity=sparsity, epochs=epochs, method=method, batch_size=batch_size).items()
               if v is not None}
    return r.replace(**changes) if changes else r


def _builder_args(model: str):
    from sparse_compile.models import model_spec

    return pyinspect.signature(model_spec(model).builder).parameters


def build_model(recipe, **model_kwargs) -> nn.Module:
    """The recipe's model, with ``image_size`` passed to builders that take it.

    ``model_kwargs`` go to the model's builder as well (e.g. ``hidden=(1024, 1024)`` for ``mlp``).
    """
    from sparse_compile.models import create_model

    kw = dict(model_kwargs)
    if recipe.image_size is not None and "image_size" in _builder_args(recipe.model):
        kw["image_size"] = recipe.image_size
    bad = sorted(set(kw) - set(_builder_args(recipe.model)))
    if bad:
        raise ValueError(f"model {recipe.model!r} takes no argument {', '.join(map(repr, bad))} "
                         f"(it takes: {', '.join(p for p in _builder_args(recipe.model) if p != 'num_classes')})")
    return create_model(recipe.model, num_classes=recipe.num_classes, **kw)


def build_optimizer(recipe, params) -> torch.optim.Optimizer:
    """SGD / AdamW / Adam / RMSProp with the recipe's coefficients."""
    r = recipe
    if r.optimizer == "sgd":
        return torch.optim.SGD(params, lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay, nesterov=r.nesterov)
    if r.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=r.lr, betas=tuple(r.betas), eps=r.eps, weight_decay=r.weight_decay)
    if r.optimizer == "adam":
        return torch.optim.Adam(params, lr=r.lr, betas=tuple(r.betas), eps=r.eps, weight_decay=r.weight_decay)
    return torch.optim.RMSprop(params, lr=r.lr, alpha=r.rmsprop_alpha, eps=r.eps, momentum=r.momentum,
                               weight_decay=r.weight_decay)


def lr_factor(recipe, steps_per_epoch: int, total_steps: int):
    """Multiplier of ``recipe.lr`` as a function of the optimizer step (for ``LambdaLR``).

    Linear warm-up from ``warmup_lr`` over ``warmup_epochs``, then the schedule: constant; multistep
    (x ``lr_gamma`` at each milestone epoch); step (x ``lr_gamma`` every ``lr_step_epochs``); cosine
    (to 0 at ``total_steps``, counted after the warm-up).
    """
    r = recipe
    warm = int(round(r.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warm:
            return (r.warmup_lr + (r.lr - r.warmup_lr) * step / warm) / r.lr
        epoch = step / steps_per_epoch
        if r.lr_schedule == "multistep":
            return r.lr_gamma ** sum(epoch >= m for m in r.lr_milestones)
        if r.lr_schedule == "step":
            return r.lr_gamma ** math.floor(epoch / r.lr_step_epochs)
        if r.lr_schedule == "cosine":
            span = max(1, total_steps - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / span)))
        return 1.0

    return factor


def build_sparsifier(recipe, model: nn.Module, optimizer, total_steps: int):
    """The recipe's sparsifier on ``model`` (None for ``method="dense"``)."""
    if recipe.method == "dense":
        return None
    import sparse_compile

    cls = getattr(sparse_compile, METHOD_CLASSES[recipe.method])
    kw = dict(sparsity=recipe.sparsity, total_steps=total_steps, distribution=recipe.distribution,
              dense_qkv=recipe.dense_qkv, delta_t=recipe.delta_t, alpha=recipe.alpha, t_end=recipe.t_end,
              grad_accumulation=recipe.grad_accumulation, gamma_sal=recipe.gamma_sal)
    return cls(model, optimizer, **kw)


#: Below this many parameters a model trains fastest on one CPU thread: its matmuls are too small
#: to split, and on a shared machine extra threads mostly wait (the digits MLP, 50k parameters, on
#: 2 cores: 74.5 s with torch's default threads, 7.2 s with one).
SMALL_MODEL_PARAMS = 1_000_000


def default_threads(model: nn.Module, device) -> Optional[int]:
    """Torch threads for training ``model`` on ``device``: 1 for a small model on the CPU, else None
    (torch's default: one per core)."""
    n = sum(p.numel() for p in model.parameters())
    return 1 if torch.device(device).type == "cpu" and n < SMALL_MODEL_PARAMS else None


def default_workers(dataset: str) -> int:
    """Data-loader worker processes: none for the in-memory sets, else one per spare core, at most 4.

    A worker is a whole process; more workers than spare cores slow the training process down.
    """
    if dataset in ("digits", "mnist", "fashion-mnist"):  # in-memory tensors: a worker only adds IPC
        return 0
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def _check_threads(threads) -> int:
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    return threads


def masks_sparsity(sparsifier) -> Optional[float]:
    """Fraction of zeros over the sparsifier's masks (its managed layers), or None without one."""
    if sparsifier is None:
        return None
    total = live = 0
    for m in sparsifier.masks.values():
        total += m.numel()
        live += int(m.sum())
    return 1.0 - live / total if total else 0.0


def _dist():
    """(rank, world_size, local_rank), from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _resolve_device(device: str, local_rank: int, world: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine")
        if world > 1 and dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


@torch.no_grad()
def evaluate(model: nn.Module, dataset, device, batch_size: int, rank: int = 0, world: int = 1,
             workers: int = 0) -> tuple[float, float]:
    """(accuracy, mean loss) over ``dataset``; under DDP each rank takes every ``world``-th example and
    the counts are summed, so the result is exact."""
    from torch.utils.data import DataLoader, Subset

    part = dataset if world == 1 else Subset(dataset, range(rank, len(dataset), world))
    was_training = model.training
    model.eval()
    stats = torch.zeros(3, dtype=torch.float64, device=device)  # correct, loss sum, count
    for x, y in DataLoader(part, batch_size=batch_size, num_workers=workers):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        stats += torch.stack([(out.argmax(1) == y).sum().double(), F.cross_entropy(out, y, reduction="sum").double(),
                              torch.tensor(float(len(y)), dtype=torch.float64, device=device)])
    if world > 1:
        torch.distributed.all_reduce(stats)
    model.train(was_training)
    n = max(1.0, float(stats[2]))
    return float(stats[0]) / n, float(stats[1]) / n


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _fingerprint(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (masks included) in state-dict order, to compare ranks."""
    import hashlib

    h = hashlib.sha256()
    for k, t in model.state_dict().items():
        h.update(k.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ the loop

def train(recipe, *, data=None, out=None, device: str = "auto", resume: bool = False, seed: int = 0,
          workers: Optional[int] = None, threads: Optional[int] = None, progress: bool = True, datasets=None,
          stop_after: Optional[int] = None, log=print, sparsifier_factory=None,
          model_kwargs: Optional[dict] = None) -> dict:
    """Train ``recipe`` and return ``{"model", "sparsifier", "history", "test_accuracy", "report"}``.

    ``datasets`` (a ``(train, test)`` pair) bypasses loading from ``data``. With ``out``, a checkpoint
    is written after each epoch and the final model and report at the end; ``resume`` continues from
    ``out/checkpoint.pt``; ``stop_after`` ends this invocation after that many more epochs (for
    time-limited jobs: resume later, the result is bit-identical to an uninterrupted run on CPU).
    ``sparsifier_factory(recipe, model, optimizer, total_steps)`` replaces :func:`build_sparsifier`
    (a method the recipe cannot name, e.g. in ``bench/accuracy.py``). ``model_kwargs`` go to the
    model's builder (e.g. ``{"hidden": [1024, 1024]}`` for the ``mlp`` of ``digits_mlp``); they are
    recorded in the report and in ``model.safetensors``'s metadata (``model_args``, JSON).
    ``threads`` (torch's intra-op threads during the run) and ``workers`` (data-loader processes)
    default to :func:`default_threads` and :func:`default_workers`. Runs under torchrun (DDP) when
    ``WORLD_SIZE`` > 1.
    """
    prev_threads = torch.get_num_threads()
    try:
        return _train(recipe, data=data, out=out, device=device, resume=resume, seed=seed, workers=workers,
                      threads=threads, progress=progress, datasets=datasets, stop_after=stop_after, log=log,
                      sparsifier_factory=sparsifier_factory, model_kwargs=dict(model_kwargs or {}))
    finally:
        torch.set_num_threads(prev_threads)


def _train(recipe, *, data, out, device, resume, seed, workers, threads, progress, datasets, stop_after,
           log, sparsifier_factory, model_kwargs) -> dict:
    """:func:`train` proper (torch's thread count restored by the caller)."""
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
    from tqdm.auto import tqdm

    from sparse_compile.train.data import batch_transform, build_datasets
    from sparse_compile.analysis.inspect import inspect

    rank, world, local_rank = _dist()
    dev = _resolve_device(device, local_rank, world)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    main = rank == 0
    if not main:
        say = lambda *a, **k: None  # noqa: E731
    elif log is print:
        say = tqdm.write  # prints above the progress bar instead of through it
    else:
        say = log

    out = Path(out) if out is not None else None
    ckpt_path = out / "checkpoint.pt" if out is not None else None
    state = None
    if resume:
        if ckpt_path is None or not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        saved = state["recipe"]
        diff = {k: (saved.get(k), v) for k, v in recipe.to_dict().items() if saved.get(k) != v}
        if diff:
            raise ValueError("--resume: the recipe differs from the checkpoint's in "
                             + ", ".join(f"{k} (saved {a!r}, now {b!r})" for k, (a, b) in diff.items())
                             + "; resume with the same arguments or train into another --out")
        if state["seed"] != seed:
            raise ValueError(f"--resume: the checkpoint was trained with --seed {state['seed']}, not {seed}")
        if state.get("model_args", {}) != model_kwargs:
            raise ValueError(f"--resume: the checkpoint's model was built with model arguments "
                             f"{state.get('model_args', {})}, not {model_kwargs}")
    elif ckpt_path is not None and ckpt_path.exists():
        raise ValueError(f"{ckpt_path} exists: pass --resume to continue that run or choose another --out")

    torch.manual_seed(seed)
    if datasets is None:
        datasets = build_datasets(recipe.dataset, data, augment=recipe.augment, image_size=recipe.image_size,
                                  random_erasing=recipe.random_erasing, seed=seed)
    train_ds, test_ds = datasets
    if workers is None:
        workers = default_workers(recipe.dataset)
    drop_last = len(train_ds) >= recipe.batch_size * world
    sampler = (DistributedSampler(train_ds, world, rank, shuffle=True, seed=seed, drop_last=drop_last)
               if world > 1 else None)
    n_local = len(sampler) if sampler is not None else len(train_ds)
    n_batches = n_local // recipe.batch_size if drop_last else math.ceil(n_local / recipe.batch_size)
    if n_batches < recipe.accumulate:
        raise ValueError(f"the training set gives {n_batches} batch(es) of {recipe.batch_size} per process, fewer than "
                         f"accumulate={recipe.accumulate} micro-batches per optimizer step; lower --batch-size")
    steps_per_epoch = n_batches // recipe.accumulate
    total_steps = recipe.epochs * steps_per_epoch
    if recipe.max_steps is not None:
        total_steps = min(total_steps, recipe.max_steps)
    mix = batch_transform(recipe.mixup_alpha, recipe.cutmix_alpha, recipe.num_classes)

    model = build_model(recipe, **model_kwargs).to(dev)
    if threads is None:
        threads = default_threads(model, dev)
    if threads is not None:
        torch.set_num_threads(_check_threads(threads))
    if dev.type == "cpu":
        say(f"{torch.get_num_threads()} CPU thread(s), {workers} data-loader worker(s) per process "
            "(--threads, --workers)")
    optimizer = build_optimizer(recipe, model.parameters())
    sparsifier = (sparsifier_factory or build_sparsifier)(recipe, model, optimizer, total_steps)
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(recipe, steps_per_epoch, total_steps))

    start_epoch, step, history = 0, 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if sparsifier is not None:
            sparsifier.load_state_dict(state["sparsifier"])
        start_epoch, step, history = state["epoch"], state["step"], list(state["history"])
        torch.set_rng_state(state["rng"])
        say(f"resumed {ckpt_path} after epoch {start_epoch} (step {step})")
    if out is not None and main:
        out.mkdir(parents=True, exist_ok=True)

    sp_now = masks_sparsity(sparsifier)
    t0 = time.perf_counter()
    last_epoch = recipe.epochs if stop_after is None else min(recipe.epochs, start_epoch + stop_after)
    bar = tqdm(total=total_steps, initial=step, disable=not (main and progress), dynamic_ncols=True,
               file=sys.stderr, unit="step")
    post: dict = {}
    for epoch in range(start_epoch, last_epoch):
        if step >= total_steps:
            break
        if sampler is not None:
            sampler.set_epoch(epoch)
            loader = DataLoader(train_ds, recipe.batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                                pin_memory=dev.type == "cuda")
        else:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)  # data order is a function of (seed, epoch)
            loader = DataLoader(train_ds, recipe.batch_size, sampler=RandomSampler(train_ds, generator=gen),
                                num_workers=workers, drop_last=drop_last, pin_memory=dev.type == "cuda")
        net.train()
        epoch_steps = min(steps_per_epoch, total_steps - step)
        bar.set_description(f"{recipe.method} epoch {epoch + 1}/{recipe.epochs}", refresh=False)
        loss_sum = correct = seen = 0.0
        micro = done = 0
        for x, y in loader:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            if mix is not None:
                x, y = mix(x, y)
            micro += 1
            last = micro == recipe.accumulate
            ctx = net.no_sync() if (world > 1 and not last) else contextlib.nullcontext()
            with ctx:
                logits = net(x)
                loss = F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing)
                (loss / recipe.accumulate).backward()
            hard = y.argmax(1) if y.dim() == 2 else y
            loss_sum += float(loss.detach()) * len(x)
            correct += float((logits.argmax(1) == hard).sum())
            seen += len(x)
            if not last:
                continue
            micro = 0
            if recipe.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            optimizer.step()
            if sparsifier is not None:
                sparsifier.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            done += 1
            if sparsifier is not None and (step % recipe.delta_t == 0 or step == 1):
                sp_now = masks_sparsity(sparsifier)
            bar.update(1)
            if step % 5 == 0 or done == epoch_steps:
                post.update(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
                if sp_now is not None:
                    post["sparsity"] = f"{sp_now:.3f}"
                bar.set_postfix(post, refresh=False)
            if done >= epoch_steps:  # leftover micro-batches (< accumulate) are never computed
                break
        test_acc, test_loss = evaluate(model, test_ds, dev, max(256, recipe.batch_size), rank, world, workers)
        history.append(dict(epoch=epoch + 1, step=step, train_loss=loss_sum / max(seen, 1),
                            train_accuracy=correct / max(seen, 1), test_loss=test_loss, test_accuracy=test_acc,
                            sparsity=masks_sparsity(sparsifier), lr=scheduler.get_last_lr()[0]))
        post["test_acc"] = f"{test_acc:.3f}"
        bar.set_postfix(post)
        say(f"epoch {epoch + 1}: train loss {loss_sum / max(seen, 1):.4f}, test accuracy {test_acc:.4f}"
            + (f", sparsity {history[-1]['sparsity']:.4f}" if sparsifier is not None else ""))
        if out is not None and main:
            _atomic_save(dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                              scheduler=scheduler.state_dict(),
                              sparsifier=sparsifier.state_dict() if sparsifier is not None else None,
                              epoch=epoch + 1, step=step, history=history, recipe=recipe.to_dict(), seed=seed,
                              model_args=model_kwargs,
                              rng=torch.get_rng_state()), ckpt_path)
    bar.close()
    wall = time.perf_counter() - t0

    consistent = None
    if world > 1:
        prints = [None] * world
        torch.distributed.all_gather_object(prints, _fingerprint(model))
        consistent = len(set(prints)) == 1
        if not consistent:
            say("warning: parameters or masks differ between ranks")

    test_acc = history[-1]["test_accuracy"] if history else evaluate(model, test_ds, dev, 256, rank, world)[0]
    sp_report = _report_dict(sparsifier.report()) if sparsifier is not None else None
    table = inspect(model)
    report = dict(recipe=recipe.to_dict(), method=recipe.method, seed=seed, steps=step, epochs_done=len(history),
                  model_args=model_kwargs, test_accuracy=test_acc, history=history, sparsifier=sp_report, inspect=table.to_dict(),
                  train_seconds=wall, threads=torch.get_num_threads(), workers=workers, world_size=world, ranks_consistent=consistent, device=str(dev),
                  torch=torch.__version__)
    if out is not None and main:
        from safetensors.torch import save_file

        sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        # What `sparse-compile optimize` needs to rebuild the model without --model / --image-size.
        meta = {"recipe": recipe.name, "model": recipe.model, "method": recipe.method,
                "num_classes": str(recipe.num_classes)}
        if model_kwargs:
            meta["model_args"] = json.dumps(model_kwargs)
        if recipe.image_size is not None and "image_size" in _builder_args(recipe.model):
            meta["image_size"] = str(recipe.image_size)
        save_file(sd, str(out / "model.safetensors"), metadata=meta)
        (out / "report.json").write_text(json.dumps(report, indent=2))
    return dict(model=model, sparsifier=sparsifier, history=history, test_accuracy=test_acc, report=report,
                inspect=table)


def _report_dict(rep):
    """A sparsifier's report as JSON-ready data."""
    return rep.to_dict()
