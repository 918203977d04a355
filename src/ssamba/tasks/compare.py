"""The downstream comparison table (``ssamba finetune-compare``): for each task of the demo corpus (keyword
spotting, speaker identification, sound classes) and each encoder (e.g. SSAMBA-tiny, SSAST-tiny), the
pretrained encoder vs the same architecture from random initialisation, as a linear probe (frozen, weighted
sum of layers) and fully fine-tuned, all under one small, stated budget.

Every cell is one ``finetune`` run in ``OUT/<task>/<model>-<init>-<mode>/``; a cell whose metrics.json
exists is reused, so an interrupted comparison continues where it stopped. The table is rewritten after
every cell (``OUT/compare.md``, ``OUT/compare.json``).

Budget (``CompareBudget``), identical for every cell: fine-tuning = ``finetune_steps`` Adam steps of
``batch_size`` clips at the encoder's pretraining patch stride, no augmentation and no warm-up (a budget
this small is spent better on plain steps than on the recipes' 30-epoch schedules); probe = ``probe_epochs``
epochs over the cached frozen features. Selection on valid, report on test.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ssamba.models.io import InitSource, resolve_init
from ssamba.tasks.finetune import finetune
from ssamba.tasks.metrics import markdown_table
from ssamba.tasks.recipes import task_recipe

__all__ = ["DEMO_TASKS", "CompareBudget", "compare"]

# task -> (recipe, manifest stem in the demo corpus)
DEMO_TASKS = {"kws": ("kws", "kws"), "sid": ("sid", "speaker"), "sounds": ("sounds", "sounds")}


@dataclass
class CompareBudget:
    finetune_steps: int = 8
    probe_epochs: int = 30
    probe_pool: str = "mean"  # task.probe_pool of the probe cells
    batch_size: int = 16
    # fine-tuning lr and head multiplier (Adam, as the official run.py); probe lr (only a Linear + L weights)
    finetune_lr: float = 3e-4
    head_lr: float = 10.0
    probe_lr: float = 5e-3
    # frames per clip by task (1 s keywords fit 96 = the demo pretraining length; sounds run 1-5 s)
    target_length: dict = field(default_factory=lambda: {"kws": 96, "sid": 96, "sounds": 128})
    seed: int = 0


def _cell_config(task: str, model: str, init: str, mode: str, manifests: Path, budget: CompareBudget,
                 scratch_overrides: dict):  # fmt: skip
    recipe, stem = DEMO_TASKS[task]
    cfg = task_recipe(recipe, model)
    d = cfg.data
    d.train, d.valid, d.test = (str(manifests / f"{stem}_{s}.json") for s in ("train", "valid", "test"))
    d.labels = str(manifests / f"{stem}_labels.csv")
    d.target_length = budget.target_length.get(task, 128)
    d.mean = d.std = None  # the pretraining run's normalisation (scratch cells use the same values)
    cfg.model.init = init
    cfg.model.fstride = cfg.model.tstride = 0
    cfg.model.overrides = {} if init != "none" else dict(scratch_overrides)
    cfg.task.mode = mode
    cfg.task.loss = "ce"  # one loss for every single-label cell
    a = cfg.augment
    a.freqm, a.timem, a.mixup, a.noise = 0, 0, 0.0, False
    o = cfg.optim
    o.name, o.weight_decay, o.warmup_steps, o.lr_decay, o.wa_start = "adam", 5e-7, 0, 1.0, 0
    t = cfg.train
    t.batch_size, t.seed = budget.batch_size, budget.seed
    if mode == "probe":
        o.lr, o.head_lr = budget.probe_lr, 1.0
        cfg.task.probe_pool = budget.probe_pool
        t.steps, t.epochs = 0, budget.probe_epochs
    else:
        o.lr, o.head_lr = budget.finetune_lr, budget.head_lr
        t.steps = budget.finetune_steps
    cfg.log.eval_every = 0 if mode == "probe" else budget.finetune_steps
    cfg.log.ckpt_every = 10_000
    cfg.log.progress = False
    cfg.log.tensorboard = False
    cfg.validate()
    return cfg


def _scratch_overrides(init_path: str) -> tuple[dict, InitSource]:
    """The pretrained encoder's architecture, so the scratch cell differs only in its initialisation."""
    src = resolve_init(init_path)
    if src.kind == "none":
        raise ValueError("the comparison needs pretrained encoders (--init MODEL=RUN), not none")
    drop = {"input_tdim", "num_classes", "fstride", "tstride", "pool"}
    if src.kind == "checkpoint":  # a pretraining checkpoint step: the run's model overrides give the architecture
        return {k: v for k, v in src.pretrain["model"]["overrides"].items() if k not in drop}, src
    config = json.loads((src.path / "config.json").read_text())["config"]
    return {k: v for k, v in config.items() if k not in drop}, src


def compare(manifests: str | os.PathLike, out: str | os.PathLike, inits: dict[str, str],
            tasks=("kws", "sid", "sounds"), modes=("probe", "finetune"), budget: CompareBudget | None = None,
            log=print, run_missing: bool = True) -> list[dict]:  # fmt: skip
    """Run every (task, model, pretrained|scratch, mode) cell; returns the rows of the table.

    manifests: the demo corpus's manifests folder; inits: {model name: pretraining run or folder};
    run_missing=False only tabulates the cells already finished (with this configuration)."""
    budget = budget or CompareBudget()
    manifests, out = Path(manifests), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        if task not in DEMO_TASKS:
            raise ValueError(f"unknown comparison task {task!r}; known: {', '.join(DEMO_TASKS)}")
    archs = {model: _scratch_overrides(path) for model, path in inits.items()}
    rows: list[dict] = []
    started = time.perf_counter()
    # probes first: they are cheap and carry most of the signal under a tiny budget
    cells = [(mode, task, model, which) for mode in modes for task in tasks for model in inits
             for which in ("pretrained", "scratch")]  # fmt: skip
    for mode, task, model, which in cells:
        arch, src = archs[model]
        init = str(inits[model]) if which == "pretrained" else "none"
        run = out / task / f"{model}-{which}-{mode}"
        cfg = _cell_config(task, model, init, mode, manifests, budget, arch)
        if which == "scratch" and src.norm is not None:  # same input normalisation as the pretrained cell
            cfg.data.mean, cfg.data.std = src.norm
        same = (run / "config.json").exists() and json.loads((run / "config.json").read_text()) == json.loads(
            json.dumps(cfg.to_dict()))  # a finished cell is reused only when its configuration is this one
        if same and (run / "metrics.json").exists():
            result = json.loads((run / "metrics.json").read_text())
        elif not run_missing:
            continue
        else:
            tick = time.perf_counter()
            log(f"[{time.perf_counter() - started:6.0f} s] {task} {model} {which} {mode} ...")
            if run.exists():  # an interrupted cell: start it again
                import shutil

                shutil.rmtree(run)
            result = finetune(cfg, run, log=lambda m: None)
            result["wall_seconds"] = round(time.perf_counter() - tick, 1)
            (run / "metrics.json").write_text(json.dumps(result, indent=1) + "\n")
        rows.append({"task": task, "model": model, "init": which, "mode": mode, "metric": result["metric"],
                     "valid": result["valid"], "test": result["test"], "steps": result["steps"],
                     "seconds": result.get("wall_seconds")})  # fmt: skip
        _write(out, rows, budget, inits)
    log(f"comparison done in {time.perf_counter() - started:.0f} s: {out / 'compare.md'}")
    return rows


def pivot(rows: list[dict]) -> list[dict]:
    """One line per (task, model, mode): pretrained vs scratch test metric and the difference."""
    table: dict[tuple, dict] = {}
    for r in rows:
        key = (r["task"], r["model"], r["mode"])
        line = table.setdefault(key, {"task": r["task"], "model": r["model"], "mode": r["mode"], "metric": r["metric"]})
        line[r["init"]] = r["test"]
        line[f"{r['init']} valid"] = r["valid"]
    for line in table.values():
        if isinstance(line.get("pretrained"), float) and isinstance(line.get("scratch"), float):
            line["pretrained - scratch"] = line["pretrained"] - line["scratch"]
    return sorted(table.values(), key=lambda r: (r["task"], r["model"], r["mode"]))


def format_table(rows: list[dict], budget: CompareBudget, inits: dict) -> str:
    lines = ["Test accuracy (selection on valid). Budget per cell: fine-tune = "
             f"{budget.finetune_steps} steps x {budget.batch_size} clips (Adam lr {budget.finetune_lr}, head x"
             f"{budget.head_lr:g}, no augmentation); probe = {budget.probe_epochs} epochs on cached frozen "
             f"features ({budget.probe_pool} pooling, lr {budget.probe_lr}); frames per clip "
             f"{budget.target_length}; seed {budget.seed}.",
             "Pretrained encoders: " + ", ".join(f"{m} = `{p}`" for m, p in inits.items()) + "; scratch = the same "
             "architecture, random initialisation.", ""]  # fmt: skip
    columns = ["task", "model", "mode", "pretrained", "scratch", "pretrained - scratch"]
    lines.append(markdown_table(pivot(rows), columns))
    seconds = sum(r["seconds"] or 0 for r in rows)
    lines.append(f"\n{len(rows)} runs, {seconds:.0f} s of wall-clock in total.\n")
    return "\n".join(lines)


def _write(out: Path, rows: list[dict], budget: CompareBudget, inits: dict) -> None:
    (out / "compare.md").write_text(format_table(rows, budget, inits))
    doc = {"budget": asdict(budget), "inits": {k: str(v) for k, v in inits.items()}, "rows": rows}
    (out / "compare.json").write_text(json.dumps(doc, indent=1) + "\n")
