"""`ssamba demo`: the main job on the embedded default data, written up in ``OUT/report.md``.

The demo runs a list of stages over the generated offline corpus. Each stage returns a markdown section
(tables, embedded PNGs, the command that reproduces its numbers). A stage that fails is reported with its
error and the others still run; a finished stage is reused when the demo is rerun with the same ``--out``
(its record lives in ``OUT/stages.json``). Stages that train run the same ``ssamba`` commands the report
prints, sized by ``--budget-minutes`` (``Plan``).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import ssamba
from ssamba import features

STATS_FILE = "feature_stats.json"

# Stages of the full demo that are not run yet; listed in the report until they are.
# Said at the end of every report, so that a demo-sized number is not read as a paper-sized one.
LIMITS = ("Every number above was produced by this run, on this machine, within the demo's budget: pretraining "
          "and fine-tuning for minutes on a CPU, against the papers' days on GPUs. They show that each part works "
          "end to end and the direction of effects at this scale, not the published accuracies. The GPU paths "
          "(the `cuda` scan backend, NCCL, bf16) are not exercised by a CPU-only demo.")


@dataclass(frozen=True)
class Plan:
    """How much of each stage the demo runs: everything scales with ``--budget-minutes`` (the default 20 is
    sized for a 2-core CPU). Budgets under 10 minutes shrink the models (said in the report), so that a test
    can run every stage end to end in a couple of minutes."""

    budget_minutes: float
    # create_model overrides for both families ({} = the published tiny presets)
    model_overrides: dict
    pretrain_steps: int
    hubert_steps: int
    ctc_steps: int
    finetune_steps: int = 20
    probe_epochs: int = 30
    hubert_k: int = 100
    hubert_batch: int = 8
    # input frames of the efficiency benchmark (8 tokens per 16 frames)
    bench_frames: tuple = (1024, 2048, 4096)
    # MINE seeds and optimiser steps per estimate
    mi_seeds: int = 2
    mi_steps: int = 500
    batch_size: int = 16
    # frames per clip: the demo's keywords and sounds are 1 s, i.e. 96 frames = 6 patch columns
    target_length: int = 96

    @property
    def shrunk(self) -> bool:
        return bool(self.model_overrides)


def make_plan(budget_minutes: float) -> Plan:
    if budget_minutes <= 0:
        raise ValueError(f"--budget-minutes must be positive, got {budget_minutes}")
    b = budget_minutes
    if b < 10:  # test-sized: narrow, shallow models, a handful of steps
        return Plan(b, {"embed_dim": 48, "depth": 2}, pretrain_steps=max(4, round(b * 8)), finetune_steps=2,
                    probe_epochs=2, hubert_steps=2, ctc_steps=2, hubert_k=8, hubert_batch=2, bench_frames=(128, 256),
                    mi_seeds=1, mi_steps=30, batch_size=8)
    # 20 minutes: measured 12.6 min on an idle 2-core CPU (4.8 pretraining, 3.6 downstream, 1.2 benchmark,
    # 0.7 HuBERT, 2 MI; benchmarks/RESULTS.md), leaving room for slower or busier machines
    return Plan(b, {}, pretrain_steps=round(b * 5), finetune_steps=round(b * 0.8), hubert_steps=round(b * 2),
                ctc_steps=round(b * 3))


@dataclass
class Context:
    out: Path
    seed: int
    scale: str
    conformance: Path | None
    plan: Plan = field(default_factory=lambda: make_plan(20))

    @property
    def corpus(self) -> Path:
        return self.out / "corpus"


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    run: Callable[[Context], str]  # returns the report section (markdown)
    products: tuple[str, ...] = ()  # files (relative to --out) a reused result depends on


def _corpus_stage(ctx: Context) -> str:
    from ssamba.data.synth import synthesize

    summary = synthesize(ctx.corpus, seed=ctx.seed, scale=ctx.scale, progress=True)
    rows = ["| task | train | valid | test | classes |", "|---|---|---|---|---|"]
    for task, splits in summary["counts"].items():
        classes = summary.get("classes", {}).get(task, "")
        rows.append(f"| {task} | {splits.get('train', 0)} | {splits.get('valid', 0)} | {splits.get('test', 0)} "
                    f"| {classes} |")
    return (f"Generated in {summary['seconds']:.1f} s (seed {ctx.seed}, scale `{ctx.scale}`), 16 kHz mono WAV.\n\n"
            + "\n".join(rows)
            + f"\n\nReproduce: `ssamba data synth --out {ctx.corpus} --seed {ctx.seed} --scale {ctx.scale}`\n")


def _features_stage(ctx: Context) -> str:
    from ssamba.data import dataset_stats, read_manifest

    manifests = ctx.corpus / "manifests"
    rows = ["| training set | files | frames | fbank mean | fbank std |", "|---|---|---|---|---|"]
    saved = {}
    for task in ("kws", "speaker", "sounds"):
        path = manifests / f"{task}_train.json"
        stats = dataset_stats(read_manifest(path))
        saved[task] = {"mean": stats["mean"], "std": stats["std"]}
        rows.append(f"| {task} | {stats['files']} | {stats['frames']} | {stats['mean']:.4f} | {stats['std']:.4f} |")
    (ctx.out / STATS_FILE).write_text(json.dumps(saved, indent=1) + "\n")
    section = ("Kaldi-compatible 128-bin log-mel fbank (official SSAST/SSAMBA arguments) over each training set; "
               "these statistics normalise the inputs as `(x - mean) / (2 std)`.\n\n" + "\n".join(rows)
               + f"\n\nReproduce: `ssamba data stats {manifests / 'kws_train.json'}`\n")
    png = _plot_examples(ctx)
    if png:
        section += f"\n![log-mel fbank of demo clips]({png.relative_to(ctx.out).as_posix()})\n"
    return section


def _stats(ctx: Context, task: str) -> tuple[float, float]:
    """The fbank mean/std of a task's training set (written by the features stage)."""
    stats = json.loads((ctx.out / STATS_FILE).read_text())[task]
    return stats["mean"], stats["std"]


def _plot_examples(ctx: Context) -> Path | None:
    """One keyword and one sound clip as log-mel images (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from ssamba.data import read_manifest

    manifests = ctx.corpus / "manifests"
    picks = [(task, read_manifest(manifests / f"{task}_train.json")[0]) for task in ("kws", "sounds")]
    fig, axes = plt.subplots(1, len(picks), figsize=(10, 3.2))
    for ax, (task, ex) in zip(axes, picks, strict=True):
        fb = features.official_fbank(torch.from_numpy(ssamba.load_audio(ex.path)))
        ax.imshow(fb.T.numpy(), origin="lower", aspect="auto", cmap="magma")
        ax.set_title(f"{task}: {', '.join(ex.labels)}")
        ax.set_xlabel("frame (10 ms)")
        ax.set_ylabel("mel bin")
    fig.tight_layout()
    path = ctx.out / "fbank_examples.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _parity_stage(ctx: Context) -> str:
    if ctx.conformance is None or not (ctx.conformance / "fbank" / "fbank.pt").exists():
        return ("Skipped: no official-code fixture folder found (pass `--conformance DIR`, the folder holding "
                "`fbank/`).\n")
    ref = torch.load(ctx.conformance / "fbank" / "fbank.pt", weights_only=True)
    raw = features.official_fbank(ref["waveform"])
    err = (raw - ref["fbank_raw"]).abs()
    identical = bool(torch.equal(raw, ref["fbank_raw"]))
    return ("ssamba's fbank against the official SSAST/SSAMBA data loader's output "
            f"(`{ctx.conformance / 'fbank'}`):\n\n| output | max abs error | mean abs error | bit-identical |\n"
            f"|---|---|---|---|\n| fbank (298 × 128) | {err.max().item():.3g} | {err.mean().item():.3g} | "
            f"{'yes' if identical else 'no'} |\n\nReproduce: `./scripts/test.sh tests/test_features.py`\n")


def _model_parity_stage(ctx: Context) -> str:
    from ssamba.convert import replay

    folders = [ctx.conformance / name for name in ("ssamba_a", "ssast_a")] if ctx.conformance else []
    folders = [f for f in folders if (f / "config.json").exists()]
    if not folders:
        return "Skipped: no official model fixtures found (pass `--conformance DIR`).\n"
    rows = ["| fixture | outputs replayed | within 1e-5 | largest max abs error |", "|---|---|---|---|"]
    for folder in folders:
        results = replay(folder)
        worst = max(r.max_abs_err for r in results)
        rows.append(f"| `{folder.name}` | {len(results)} | {sum(r.ok for r in results)} | {worst:.3g} |")
    return ("Official SSAMBA/SSAST weights imported through `ssamba convert`'s importer and replayed against the "
            "official code's outputs (pretraining losses with the recorded masks, fine-tuning logits, converted "
            "position embeddings, per-layer traces):\n\n" + "\n".join(rows)
            + f"\n\nReproduce: `ssamba conformance {folders[0]}`\n")


PRETRAIN_MODELS = ("ssamba_tiny", "ssast_tiny")


def _pretrain_manifest(ctx: Context) -> Path:
    """Unlabelled pretraining audio: the keyword and sound training clips together (labels dropped)."""
    from ssamba.data.manifest import Example, read_manifest, write_manifest

    manifests = ctx.corpus / "manifests"
    examples = [Example(path=ex.path) for task in ("kws", "sounds")
                for ex in read_manifest(manifests / f"{task}_train.json")]
    path = ctx.out / "pretrain" / "unlabelled_train.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(path, examples)
    return path


def _pretrain_config(ctx: Context, model: str):
    """The demo's pretraining recipe: the official objective and masking, with a learning rate raised for a
    run of a few hundred steps (5e-4, 50 warm-up steps) instead of the official 1e-4 over 1000."""
    from ssamba.train.config import apply_overrides, recipe

    p = ctx.plan
    mean, std = _stats(ctx, "kws")
    cfg = recipe(model)
    apply_overrides(cfg, [f"data.target_length={p.target_length}", "optim.lr=5e-4", "optim.warmup_steps=50",
                          "optim.warmup_every=1", f"train.batch_size={p.batch_size}", f"train.steps={p.pretrain_steps}",
                          f"train.seed={ctx.seed}", f"data.mean={mean}", f"data.std={std}",
                          f"log.eval_every={max(1, p.pretrain_steps // 4)}",
                          f"log.ckpt_every={max(1, p.pretrain_steps // 4)}",
                          "log.tensorboard=true"])  # fmt: skip
    cfg.model.overrides = dict(p.model_overrides)
    cfg.data.train = str(_pretrain_manifest(ctx))
    cfg.data.valid = str(ctx.corpus / "manifests" / "kws_valid.json")
    return cfg


def _pretrain_command(ctx: Context, model: str, cfg) -> str:
    sets = [f"data.target_length={cfg.data.target_length}", f"data.mean={cfg.data.mean:.4f}",
            f"data.std={cfg.data.std:.4f}", "optim.lr=5e-4", "optim.warmup_steps=50", "optim.warmup_every=1"]
    sets += [f"model.overrides.{k}={v}" for k, v in cfg.model.overrides.items()]
    return (f"ssamba pretrain --model {model} --train {cfg.data.train} --valid {cfg.data.valid} "
            f"--out {ctx.out / 'pretrain' / model} --steps {cfg.train.steps} --batch-size {cfg.train.batch_size} "
            + " ".join(f"--set {kv}" for kv in sets))


def _pretrain_stage(ctx: Context) -> str:
    from ssamba.train.checkpoint import latest_checkpoint
    from ssamba.train.loop import pretrain

    rows = ["| model | steps | valid masked acc (chance) step 0 → end | valid MSE 0 → end | valid InfoNCE 0 → end "
            "| train samples/s (median) | minutes |", "|---|---|---|---|---|---|---|"]
    curves, commands = {}, []
    for model in PRETRAIN_MODELS:
        cfg = _pretrain_config(ctx, model)
        run = ctx.out / "pretrain" / model
        timing = run / "demo_minutes.json"
        if not (run / "final" / "config.json").exists():  # an interrupted demo continues the run
            start = time.perf_counter()
            pretrain(cfg, run, resume=latest_checkpoint(run / "checkpoints") is not None)
            timing.write_text(json.dumps((time.perf_counter() - start) / 60))
        minutes = json.loads(timing.read_text()) if timing.exists() else float("nan")
        entries = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        valid = [e for e in entries if e.get("split") == "valid"]
        speed = sorted(e["samples_per_s"] for e in entries if "samples_per_s" in e)
        first, last = valid[0], valid[-1]
        rows.append(f"| {model} | {cfg.train.steps} | {first['acc']:.3f} → **{last['acc']:.3f}** "
                    f"({last['chance']:.3f}; "
                    f"{last['acc'] / last['chance']:.1f}× chance) | {first['mse']:.3f} → {last['mse']:.3f} | "
                    f"{first['nce']:.2f} → {last['nce']:.2f} | {speed[len(speed) // 2]:.1f} | {minutes:.1f} |")
        curves[model] = valid
        commands.append(_pretrain_command(ctx, model, cfg))
    depth = ("the published tiny presets (SSAMBA-tiny: 24 bidirectional Mamba layers; SSAST-tiny: 12 DeiT blocks)"
             if not ctx.plan.shrunk else f"models shrunk to fit the budget ({ctx.plan.model_overrides})")
    section = (f"Masked spectrogram patch modelling (InfoNCE + 10 × MSE, official two-pass step and cluster masking) "
               f"of {depth} on the keyword and sound training clips ({ctx.plan.target_length} frames), validated on "
               "the keyword validation clips with a fixed mask seed. A demo-sized run: a raised learning rate and a "
               "few hundred steps, far from the official 1e-4 over hundreds of thousands of steps.\n\n"
               + "\n".join(rows) + "\n\nReproduce:\n\n" + "".join(f"    {c}\n" for c in commands)
               + f"\nCurves: `tensorboard --logdir {ctx.out / 'pretrain'}`\n")
    png = _plot_curves(ctx, curves)
    if png:
        section += f"\n![validation curves]({png.relative_to(ctx.out).as_posix()})\n"
    return section


def _plot_curves(ctx: Context, curves: dict[str, list[dict]]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for model, valid in curves.items():
        steps = [e["step"] for e in valid]
        axes[0].plot(steps, [e["acc"] for e in valid], marker="o", label=model)
        axes[1].plot(steps, [e["mse"] for e in valid], marker="o", label=model)
    chance = next(iter(curves.values()))[-1]["chance"]
    axes[0].axhline(chance, color="grey", linestyle=":", label="chance")
    axes[0].set(xlabel="step", ylabel="valid masked-patch accuracy", title="discriminative (InfoNCE)")
    axes[1].set(xlabel="step", ylabel="valid MSE", title="generative (reconstruction)")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    path = ctx.out / "pretrain_curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _format(argv: list[str]) -> str:
    return "ssamba " + " ".join(shlex.quote(a) for a in argv)


def _cli(argv: list[str], needed: bool = True) -> str:
    """Run one ``ssamba`` command in this process unless its result exists (``needed`` False); returns the
    command line (the report's "reproduce" line is exactly what ran)."""
    from ssamba.cli import main

    command = _format(argv)
    if not needed:
        return command
    print(f"[demo] $ {command}", file=sys.stderr, flush=True)
    code = main(argv)
    if code != 0:
        raise RuntimeError(f"`{command}` exited with status {code}")
    return command


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _finetune_stage(ctx: Context) -> str:
    """Pretrained vs from scratch, linear probe vs fine-tune, on keywords, speakers and sounds (one budget)."""
    p = ctx.plan
    argv = ["finetune-compare", "--manifests", str(ctx.corpus / "manifests"), "--out", str(ctx.out / "finetune"),
            "--finetune-steps", str(p.finetune_steps), "--probe-epochs", str(p.probe_epochs),
            "--batch-size", str(p.batch_size), "--seed", str(ctx.seed)]  # fmt: skip
    for model in PRETRAIN_MODELS:
        argv += ["--init", f"{model}={ctx.out / 'pretrain' / model}"]
    command = _cli(argv)  # its progress lines stay on the console; the table is its compare.md
    table = (ctx.out / "finetune" / "compare.md").read_text().strip()
    return ("Each encoder pretrained above against the same architecture from random weights, as a frozen "
            "linear probe over a learnable weighted sum of all layers and fully fine-tuned, selected on valid and "
            "scored on test (accuracy; chance: keywords 1/35, speakers 1/16, sounds 1/12 on the small corpus). "
            "Per-cell runs (metrics.json, confusion.png, best/) are under `finetune/<task>/`.\n\n"
            + table + f"\n\nReproduce: `{command}`\n")


def _bench_stage(ctx: Context) -> str:
    """SSAMBA-tiny vs SSAST-tiny (published explicit attention and fused SDPA) batch inference at a few input
    lengths, each size in a fresh child process (the issue-7 benchmark, shortened)."""
    frames = ",".join(str(f) for f in ctx.plan.bench_frames)
    argv = ["bench", "models", "--frames", frames, "--backends", "cpu", "--threads", "1", "--repeats", "3",
            "--budget", "5", "--csv", str(ctx.out / "bench_models.csv"), "--plot", str(ctx.out / "bench_models.png")]
    if ctx.plan.shrunk:
        argv.append("--quick")
    table, command = _captured(argv)
    section = (table + f"\n\nReproduce: `{command}` (the full curve, 1024 frames upward in "
               "steps of 512 as the paper: `ssamba bench models --frames 1024:45056:512`)\n")
    if (ctx.out / "bench_models.png").exists():
        section += "\n![time and memory vs tokens](bench_models.png)\n"
    return section


def _captured(argv: list[str]) -> tuple[str, str]:
    """(what the command printed, the command)."""
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        command = _cli(argv)
    return printed.getvalue().strip(), command


def _mi_stage(ctx: Context) -> str:
    """Layer-wise I(X; T_l) (MINE) and I(T_l; Y)/H(Y) of the pretrained encoders, beside the same
    architectures untrained, the encoders fine-tuned for keyword spotting and Mamba-HuBERT's two CTC models when
    those stages produced them."""
    p, m = ctx.plan, ctx.corpus / "manifests"
    argv = ["analyze", "mi", "--data", str(m / "kws_valid.json"), "--labels", str(m / "kws_labels.csv"),
            "--out", str(ctx.out / "mi"), "--seeds", ",".join(str(s) for s in range(p.mi_seeds)),
            "--steps", str(p.mi_steps)]  # fmt: skip
    for model in PRETRAIN_MODELS:
        run = ctx.out / "pretrain" / model
        argv += ["--panel", model, "--model", f"pretrained={run}", "--model", f"untrained=random:{run}"]
        tuned = ctx.out / "finetune" / "kws" / f"{model}-pretrained-finetune"
        if (tuned / "metrics.json").exists():
            argv += ["--model", f"fine-tuned KWS={tuned}"]
    # Mamba-HuBERT fine-tuned with CTC alone vs through the Conformer (its curve continues over the Conformer
    # blocks), when the HuBERT stage produced them: X is then the clip's MFCCs at the model's frame rate
    ctc = {name: ctx.out / "hubert" / folder for name, folder in (("CTC alone", "ctc_pretrained"),
                                                                  ("CTC + Conformer", "ctc_conformer"))}
    if all((run / "metrics.json").exists() for run in ctc.values()):
        argv += ["--panel", "Mamba-HuBERT"]
        for name, run in ctc.items():
            argv += ["--model", f"{name}={run}"]
    table, command = _captured(argv)
    section = ("MINE estimate of I(X; T_l) between the input patches of a time column (160 ms) and layer l's "
               "tokens of that column, after PCA to 16 dimensions, mean ± std over seeds; and the clustering "
               "estimate I(T_l; Y)/H(Y) with the clip's keyword as Y (for Mamba-HuBERT, X is the MFCC+Δ+ΔΔ of "
               "each 20 ms frame and T_l that frame's features). The question (Zhang et al., 2025): does the "
               "curve fall and rise again (a V: the model reconstructs) or fall monotonically?\n\n"
               + table.split("\nwrote ")[0] + f"\n\nReproduce: `{command}`\n")
    if (ctx.out / "mi" / "mi.png").exists():
        section += "\n![layer-wise mutual information](mi/mi.png)\n"
    return section


def _hubert_stage(ctx: Context) -> str:
    """Iteration-1 Mamba-HuBERT and Transformer-HuBERT on the sentences, then CTC from the Mamba one (alone and
    through 2 Conformer blocks) and from scratch: the same budget for each."""
    p, m, out = ctx.plan, ctx.corpus / "manifests", ctx.out / "hubert"
    size = "tiny" if p.shrunk else "small"
    data = ["--train", str(m / "sentences_train.json"), "--valid", str(m / "sentences_valid.json")]
    quiet = ["--set", "log.progress=false"]
    commands = [_cli(["hubert", "labels", "--train", str(m / "sentences_train.json"),
                      "--apply", str(m / "sentences_valid.json"), "--apply", str(m / "sentences_test.json"),
                      "--out", str(out / "labels"), "--k", str(p.hubert_k)],
                     needed=not (out / "labels" / "labels.json").exists())]  # fmt: skip
    rows = ["| encoder | steps | valid masked acc step 0 → end | always the commonest cluster | chance 1/K |",
            "|---|---|---|---|---|"]
    # the Mamba mixers at d_state 4, expand 1: the scan costs ~4x less on a CPU, at a small HuBERT's width
    encoders = {"extbimamba": ["--set", "model.overrides.d_state=4", "--set", "model.overrides.expand=1"],
                "transformer": []}
    for encoder, extra in encoders.items():
        run = out / f"pt_{encoder}"
        needed = not (run / "final" / "config.json").exists()
        if needed:
            shutil.rmtree(run, ignore_errors=True)
        commands.append(_cli(["hubert", "pretrain", "--encoder", encoder, "--size", size, *extra, *data,
                              "--labels", str(out / "labels"), "--out", str(run), "--steps", str(p.hubert_steps),
                              "--batch-size", str(p.hubert_batch), "--set", "data.max_samples=24000",
                              "--set", "optim.lr=1e-3",
                              "--set", "optim.warmup_steps=10",
                              "--set", f"log.eval_every={max(1, p.hubert_steps // 2)}", *quiet],
                             needed))  # fmt: skip
        valid = [e for e in _jsonl(run / "metrics.jsonl") if e.get("split") == "valid"]
        rows.append(f"| {encoder} | {p.hubert_steps} | {valid[0]['acc_m']:.3f} → **{valid[-1]['acc_m']:.3f}** | "
                    f"{valid[-1]['prior_acc_m']:.3f} | {valid[-1]['chance']:.3f} |")
    ctc_rows = ["| CTC from | steps | test CER | test WER |", "|---|---|---|---|"]
    pretrained = str(out / "pt_extbimamba" / "final")
    # (name, run folder, init, extra arguments); the Conformer run is the MI stage's "with a decoder" model
    ctc_runs = (("Mamba-HuBERT (pretrained above)", "ctc_pretrained", pretrained, []),
                ("Mamba-HuBERT + 2 Conformer blocks", "ctc_conformer", pretrained, ["--conformer-layers", "2"]),
                ("the same architecture from scratch", "ctc_scratch", "none", []))
    for name, folder, init, extra in ctc_runs:
        run = out / folder
        needed = not (run / "metrics.json").exists()
        if needed:
            shutil.rmtree(run, ignore_errors=True)
        arch = [] if init != "none" else ["--encoder", "extbimamba", "--size", size, *encoders["extbimamba"]]
        commands.append(_cli(["hubert", "finetune", "--init", init, *arch, *extra, *data,
                              "--test", str(m / "sentences_test.json"), "--out", str(run),
                              "--steps", str(p.ctc_steps), "--batch-size", str(max(1, p.hubert_batch // 2)),
                              "--set", "finetune.mask_prob=0",
                              "--set", "head.dropout=0", "--set", f"log.eval_every={max(1, p.ctc_steps // 2)}",
                              *quiet], needed))  # fmt: skip
        result = json.loads((run / "metrics.json").read_text())
        ctc_rows.append(f"| {name} | {result['steps']} | {result['test']:.3f} | {result['test_wer']:.3f} |")
    return (f"HuBERT iteration 1 on the {size} preset: k-means (K = {p.hubert_k}) of 39-d MFCC+Δ+ΔΔ fitted on the "
            "training sentences and applied to every split, masked prediction of those clusters, then CTC over "
            "characters from the last layer, alone or through a small Conformer. A CPU demo budget: the published "
            "numbers need hundreds of thousands of steps; read the accuracy against always guessing the commonest "
            "cluster.\n\n"
            + "\n".join(rows) + "\n\n" + "\n".join(ctc_rows) + "\n\nReproduce:\n\n"
            + "".join(f"    {c}\n" for c in commands))


STAGES = [
    Stage("corpus", "Offline demo corpus", _corpus_stage,
          products=tuple(f"corpus/manifests/{task}_{split}.json" for task in ("kws", "speaker", "sounds")
                         for split in ("train", "valid", "test"))),
    Stage("features", "Features", _features_stage, products=(STATS_FILE,)),
    Stage("parity", "Feature parity with the official code", _parity_stage),
    Stage("model_parity", "Model parity with the official code", _model_parity_stage),
    Stage("pretrain", "Self-supervised pretraining", _pretrain_stage,
          products=tuple(f"pretrain/{m}/final/config.json" for m in PRETRAIN_MODELS)),
    Stage("finetune", "Fine-tuning and linear probes", _finetune_stage, products=("finetune/compare.json",)),
    Stage("bench", "Efficiency: SSAMBA vs SSAST inference", _bench_stage, products=("bench_models.csv",)),
    Stage("hubert", "Mamba-HuBERT", _hubert_stage,
          products=("hubert/pt_extbimamba/final/config.json", "hubert/ctc_pretrained/metrics.json",
                    "hubert/ctc_conformer/metrics.json")),
    Stage("mi", "Layer-wise mutual information", _mi_stage, products=("mi/mi.json",)),
]


def _default_conformance() -> Path | None:
    here = Path(__file__).resolve()
    for candidate in (here.parents[3] / "shared" / "conformance", Path.cwd().parent / "shared" / "conformance"):
        if candidate.is_dir():
            return candidate
    return None


def _machine() -> str:
    return (f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
            f"Python {platform.python_version()}, torch {torch.__version__}, ssamba {ssamba.__version__}")


def run_demo(out: str | os.PathLike = "demo-out", *, seed: int = 0, scale: str = "small",
             conformance: str | os.PathLike | None = None, budget_minutes: float = 20) -> Path:
    """Run every stage (reusing those finished with the same settings); return the report's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = make_plan(budget_minutes)
    ctx = Context(out, seed, scale, Path(conformance) if conformance else _default_conformance(), plan)
    record_path = out / "stages.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    settings = {"seed": seed, "scale": scale, "budget_minutes": budget_minutes}
    for stage in STAGES:
        previous = record.get(stage.name)
        if (previous and previous["status"] == "done" and previous["settings"] == settings
                and all((out / p).exists() for p in stage.products)):
            print(f"[demo] {stage.title}: reused from {record_path}")
            continue
        print(f"[demo] {stage.title} ...")
        start = time.perf_counter()
        try:
            entry = {"status": "done", "section": stage.run(ctx)}
        except Exception as e:  # a failed stage is reported, the others still run
            entry = {"status": "failed", "section": f"**Failed:** `{type(e).__name__}: {e}`\n\n```\n"
                                                    f"{traceback.format_exc(limit=6)}```\n"}
            print(f"[demo] {stage.title} failed: {type(e).__name__}: {e}")
        entry.update(settings=settings, seconds=round(time.perf_counter() - start, 1))
        record[stage.name] = entry
        record_path.write_text(json.dumps(record, indent=1))
    report = out / "report.md"
    report.write_text(_report(record, ctx))
    return report


def _report(record: dict, ctx: Context) -> str:
    lines = ["# ssamba demo report", "", f"Machine: {_machine()}.", "",
             f"Command: `ssamba demo --out {ctx.out} --seed {ctx.seed} --scale {ctx.scale} "
             f"--budget-minutes {ctx.plan.budget_minutes:g}`", ""]
    lines += ["| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {s.title} | {record[s.name]['status']} | {record[s.name]['seconds']} |" for s in STAGES]
    for stage in STAGES:
        lines += ["", f"## {stage.title}", "", record[stage.name]["section"].rstrip()]
    lines += ["", "## What these numbers are", "", LIMITS]
    return "\n".join(lines) + "\n"
