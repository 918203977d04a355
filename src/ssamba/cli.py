"""The `ssamba` command line: a thin layer over the library (each command calls one library function)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import ssamba


def _data_synth(args) -> int:
    from ssamba.data.synth import synthesize

    summary = synthesize(args.out, seed=args.seed, scale=args.scale, jobs=args.jobs, progress=not args.quiet)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"demo corpus written to {args.out} in {summary['seconds']:.1f} s; manifests in "
              f"{Path(args.out) / 'manifests'}")
        for task, splits in summary["counts"].items():
            print(f"  {task:10s} " + "  ".join(f"{split} {n}" for split, n in splits.items()))
    return 0


def _data_stats(args) -> int:
    from ssamba.data import check_splits, dataset_stats, read_manifest

    # every file's header first (ssamba.data.check): a bad one stops here in seconds, before any is decoded
    check_splits({"manifest": args.manifest}, skip_bad=args.skip_bad, log=None, hint="pass --skip-bad")
    stats = dataset_stats(read_manifest(args.manifest), target_length=args.target_length,
                          skip_bad=args.skip_bad, progress=not args.json)
    if args.json:
        print(json.dumps(stats, indent=1))
    else:
        print(f"mean {stats['mean']:.7f}  std {stats['std']:.7f}  ({stats['files']} files, {stats['frames']} frames"
              + (f", {len(stats['skipped'])} bad files skipped" if stats["skipped"] else "") + ")")
        print(f"use: --set data.mean={stats['mean']:.7f} --set data.std={stats['std']:.7f}")
    return 0


def _data_prepare(args) -> int:
    from ssamba.data.prepare import prepare

    options = {key: value for key in ("version", "classes", "subsets", "seed")
               if (value := getattr(args, key)) is not None}
    summary = prepare(args.name, args.root, args.out, **options)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k not in ("missing", "skipped")}, indent=1))
        return 0
    print(f"{args.name}: {summary['classes']} classes; manifests, labels.csv and prepare.json in {args.out}")
    print(f"  {'split':14s} {'files':>8s} {'classes':>8s} {'missing':>8s}")
    for split, row in summary["splits"].items():
        print(f"  {split:14s} {row['files']:8d} {row['classes']:8d} {row['missing']:8d}")
    if summary["skipped_count"]:
        reasons = "; ".join(f"{n} {reason}" for reason, n in summary["skipped_reasons"].items())
        print(f"  left out: {reasons}")
    return 0


def _conformance(args) -> int:
    from ssamba.convert import conformance_cli

    return conformance_cli(args.folder, backend=args.backend)


def _convert(args) -> int:
    from ssamba.convert import convert_checkpoint

    out = convert_checkpoint(args.checkpoint, args.family, args.config, args.out)
    print(f"converted {args.checkpoint} -> {out} (safetensors + config.json)")
    return 0


def _bench_scan(args) -> int:
    import torch

    from ssamba.bench.scan import format_table, run, run_cuda

    log = lambda m: print(m, file=sys.stderr, flush=True)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("ssamba bench scan: error: --device cuda needs a CUDA device (torch.cuda.is_available() is False "
                  "here); nothing was measured", file=sys.stderr)  # fmt: skip
            return 2
        result = run_cuda(quick=args.quick, log=log)
    else:
        result = run(quick=args.quick, log=log)
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0


def _bench_embed(args) -> int:
    from ssamba.bench.embed import format_table, run

    try:
        seconds = tuple(float(x) for x in args.seconds.split(",") if x.strip())
    except ValueError:
        print(f"ssamba bench embed: error: --seconds wants numbers like 10,300, got {args.seconds!r}", file=sys.stderr)
        return 2
    result = run(args.model, seconds, threads=args.threads, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0


def _bench_gemm(args) -> int:
    from ssamba.bench.gemm import format_table, run

    if args.tokens < 1 or args.repeats < 1 or (args.threads is not None and args.threads < 1):
        print("ssamba bench gemm: error: --tokens, --repeats and --threads must be positive", file=sys.stderr)
        return 2
    result = run(args.tokens, threads=args.threads, repeats=args.repeats)
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0


def _bench_models(args) -> int:
    from ssamba.bench import models as bench
    from ssamba.fields import parse_text

    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        overrides = {}
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"--set {item}: expected KEY=VALUE (a model config key)")
            overrides[key.strip()] = parse_text(value)  # typed per model by BenchConfig (check_overrides)
        changes = {"batch": args.batch, "device": args.device, "dtype": args.dtype, "train": args.train}
        for key, value in (("repeats", args.repeats), ("budget_s", args.budget), ("threads", args.threads),
                           ("max_forward_s", args.max_forward_s)):
            if value is not None:
                changes[key] = value
        if args.models:
            changes["models"] = tuple(m.strip() for m in args.models.split(",") if m.strip())
        if args.attention:
            changes["attention"] = tuple(a.strip() for a in args.attention.split(",") if a.strip())
        if args.backends:
            changes["backends"] = tuple(b.strip() for b in args.backends.split(",") if b.strip())
        if args.tokens and args.frames:
            raise ValueError("give --tokens or --frames, not both")
        if args.frames:
            changes["frames"] = bench.parse_frames(args.frames)
        if args.tokens:
            # 16x16 patches over 128 mel bins: 8 patch rows, so K tokens = 8 * (T // 16) and T = 2K
            tokens = bench.parse_frames(args.tokens)
            bad = [k for k in tokens if k % 8]
            if bad:
                raise ValueError(f"--tokens must be multiples of 8 (8 patch rows of 16x16 patches), got {bad}")
            changes["frames"] = tuple(2 * k for k in tokens)
        if args.mem_limit:
            changes["mem_limit_bytes"] = bench.parse_size(args.mem_limit)
        if args.quick:
            changes["overrides"] = {**bench.QUICK_OVERRIDES, **overrides}
            cfg = bench.quick_config(**changes)
        else:
            changes["overrides"] = overrides
            cfg = bench.BenchConfig.from_dict(changes)
    except ValueError as e:
        print(f"ssamba bench models: error: {e}", file=sys.stderr)
        return 2
    if args.profile:
        report = bench.profile_forward(cfg.models[0], frames=cfg.frames[-1], batch=cfg.batch,
                                       backend=(cfg.backends or ("cpu",))[0], overrides=cfg.overrides,
                                       threads=cfg.threads, train=cfg.train)
        print(json.dumps(report, indent=1) if args.json else bench.format_profile(report))
        return 0
    try:
        result = bench.run(cfg, log=log)
    except ValueError as e:
        print(f"ssamba bench models: error: {e}", file=sys.stderr)
        return 2
    if args.csv:
        log(f"csv: {bench.write_csv(result, args.csv)}")
    if args.plot:
        try:
            log(f"plot: {bench.plot(result, args.plot)}")
        except ImportError as e:
            print(f"ssamba bench models: no plot written: {e}", file=sys.stderr)
    print(json.dumps(result, indent=1) if args.json else bench.format_table(result))
    return 0


def _demo(args) -> int:
    from ssamba.demo import run_demo

    report = run_demo(args.out, seed=args.seed, scale=args.scale, conformance=args.conformance,
                      budget_minutes=args.budget_minutes)
    print(f"report: {report}")
    return 0


def _stopped(result: dict) -> int:
    """A training run stopped by SIGINT / SIGTERM (the engine saved a checkpoint): say so, exit 130 / 143."""
    print(f"stopped by {result['interrupted']} at step {result['step']}; checkpoint saved, continue with --resume")
    return 130 if result["interrupted"] == "SIGINT" else 143


def _run_options(parser, example: str) -> None:
    """The flags every training command shares (the one config system; the engine's resume)."""
    parser.add_argument("--config", type=Path, default=None, help="TOML or YAML file (or a run's config.json)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override one config key, e.g. {example}")
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")


def _pretrain(args) -> int:
    from ssamba.train.config import apply_overrides, load_config, recipe
    from ssamba.train.loop import pretrain

    cfg = recipe(args.model)
    try:
        if args.config is not None:
            cfg.update(load_config(args.config), source=str(args.config))
        apply_overrides(cfg, args.set)
        cfg.model.name = args.model
        cfg.data.train = str(args.train)
        if args.valid is not None:
            cfg.data.valid = str(args.valid)
        if args.steps is not None:
            cfg.train.steps = args.steps
        if args.batch_size is not None:
            cfg.train.batch_size = args.batch_size
        cfg.validate()
    except ValueError as e:  # a bad config key or value: one line naming it
        print(f"ssamba pretrain: error: {e}", file=sys.stderr)
        return 2
    result = pretrain(cfg, args.out, resume=args.resume)
    if result.get("interrupted"):
        return _stopped(result)
    if result["final"]:
        print(f"pretrained model (encoder + MSPM heads): {result['final']}")
    return 0


def _hubert_labels(args) -> int:
    from ssamba.pretrain.kmeans import make_labels

    refs = dict(pair.split("=", 1) for pair in args.ref_labels)
    meta = make_labels(args.train, args.apply or [], args.out, k=args.k, model_dir=args.model, layer=args.layer,
                       max_fit_frames=args.max_frames, seed=args.seed, ref_labels=refs, progress=not args.json)
    if args.json:
        print(json.dumps(meta, indent=1))
        return 0
    print(f"k-means K={meta['k']} on {meta['source']} features at {meta['label_rate']:g} Hz, fitted on "
          f"{meta['fit_frames']} frames of {args.train}; labels in {args.out}")
    for stem, e in meta["splits"].items():
        extra = "".join(f"  {k} {e[k]:.3f}" for k in ("cluster_purity", "ref_purity", "pnmi") if k in e)
        print(f"  {stem:24s} {e['utterances']} utts  {e['frames']} frames  {e['clusters_used']} clusters used  "
              f"inertia {e['inertia']:.2f}{extra}")
    return 0


def _hubert_config(cls, args):
    from ssamba.train.config import apply_overrides, load_config

    cfg = cls()
    if args.config is not None:
        cfg.update(load_config(args.config), source=str(args.config))
    cfg.model.encoder = args.encoder or cfg.model.encoder
    cfg.model.size = args.size or cfg.model.size
    cfg.data.train, cfg.data.valid = str(args.train), str(args.valid or "")
    if args.steps is not None:
        cfg.train.steps = args.steps
    if args.batch_size is not None:
        cfg.train.batch_size = args.batch_size
    apply_overrides(cfg, args.set)
    return cfg


def _hubert_run(args) -> int:
    from ssamba.tasks.ctc import CTCConfig, finetune_ctc
    from ssamba.tasks.reconstruct import ReconstructConfig, reconstruct
    from ssamba.train.hubert import HuBERTPretrainConfig, pretrain_hubert

    try:
        if args.hubert_command == "pretrain":
            cfg = _hubert_config(HuBERTPretrainConfig, args)
            cfg.data.labels = str(args.labels)
        else:
            cfg = _hubert_config(CTCConfig if args.hubert_command == "finetune" else ReconstructConfig, args)
            cfg.finetune.init = str(args.init)
            cfg.test = str(args.test or "")
            if args.layer is not None:
                cfg.head.layer = args.layer
            if args.hubert_command == "finetune" and args.conformer_layers is not None:
                cfg.head.conformer_layers = args.conformer_layers
            if args.hubert_command == "reconstruct" and args.noise_snr_db is not None:
                cfg.recon.noise_snr_db = args.noise_snr_db
        cfg.validate()
    except ValueError as e:
        print(f"ssamba hubert {args.hubert_command}: error: {e}", file=sys.stderr)
        return 2
    fn = {"pretrain": pretrain_hubert, "finetune": finetune_ctc, "reconstruct": reconstruct}[args.hubert_command]
    result = fn(cfg, args.out, resume=args.resume)
    if result.get("interrupted"):
        return _stopped(result)
    if args.hubert_command == "pretrain":
        print(f"pretrained model: {result.get('final')}  last validation: {json.dumps(result['valid'])}")
    else:
        keys = ("task", "valid", "valid_wer", "test", "test_wer", "test_examples")
        print(json.dumps({k: result[k] for k in keys if k in result}, indent=1))
    return 0


def _finetune(args) -> int:
    from ssamba.tasks.finetune import finetune
    from ssamba.tasks.recipes import task_recipe
    from ssamba.train.config import apply_overrides, load_config

    try:
        cfg = task_recipe(args.task, args.model)
        if args.config is not None:
            cfg.update(load_config(args.config), source=str(args.config))
        apply_overrides(cfg, args.set)
        cfg.model.name, cfg.model.init = args.model, args.init
        d = cfg.data
        d.train, d.valid, d.labels = str(args.train), str(args.valid), str(args.labels)
        if args.test is not None:
            d.test = str(args.test)
        if args.linear_probe:
            cfg.task.mode = "probe"
        if args.epochs is not None:
            cfg.train.epochs, cfg.train.steps = args.epochs, 0
        if args.steps is not None:
            cfg.train.steps = args.steps
        if args.batch_size is not None:
            cfg.train.batch_size = args.batch_size
        cfg.validate()
        result = finetune(cfg, args.out, resume=args.resume)
    except ValueError as e:  # a bad config key or value: one line naming it
        print(f"ssamba finetune: error: {e}", file=sys.stderr)
        return 2
    if result.get("interrupted"):
        return _stopped(result)
    if "task" not in result:  # a torchrun process other than rank 0: rank 0 reports
        return 0
    test = "n/a" if result["test"] is None else f"{result['test']:.4f}"
    print(f"{result['task']} {result['mode']}: valid {result['metric']} {result['valid']:.4f}, test {test}; "
          f"{Path(args.out) / 'metrics.json'}")
    return 0


def _evaluate(args) -> int:
    from ssamba.tasks.finetune import evaluate

    try:
        result = evaluate(args.ckpt, args.test, args.labels, batch_size=args.batch_size, skip_bad=args.skip_bad)
    except ValueError as e:
        print(f"ssamba evaluate: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        from ssamba.tasks.metrics import markdown_table

        keys = [k for k in ("acc", "mAP", "auc", "d_prime") if k in result]
        print(markdown_table([{"items": result["items"], **result}], ["items", *keys]), end="")
    return 0


def _finetune_compare(args) -> int:
    from ssamba.tasks.compare import CompareBudget, compare

    inits = {}
    for pair in args.init:
        name, sep, path = pair.partition("=")
        if not sep:
            print(f"ssamba finetune-compare: error: --init expects MODEL=RUN, got {pair!r}", file=sys.stderr)
            return 2
        inits[name] = path
    budget = CompareBudget(finetune_steps=args.finetune_steps, probe_epochs=args.probe_epochs,
                           probe_pool=args.probe_pool, batch_size=args.batch_size, seed=args.seed)  # fmt: skip
    try:
        compare(args.manifests, args.out, inits, tasks=args.tasks, modes=args.modes, budget=budget,
                run_missing=not args.table_only)
    except ValueError as e:
        print(f"ssamba finetune-compare: error: {e}", file=sys.stderr)
        return 2
    print((Path(args.out) / "compare.md").read_text(), end="")
    return 0


def _embed(args) -> int:
    from ssamba.tasks.embed import embed

    try:
        summary = embed(args.model, args.inputs, args.out, pool=args.pool, fmt=args.format,
                        batch_size=args.batch_size, skip_bad=args.skip_bad, hop_frames=args.hop_frames,
                        progress=not args.quiet)  # fmt: skip
    except ValueError as e:
        print(f"ssamba embed: error: {e}", file=sys.stderr)
        return 2
    windowed = summary["windowed"]
    print(f"{len(summary['files'])} clips x {summary['layers']} layers x {summary['width']} -> {args.out} (+ .json)"
          + (f"; {windowed} longer than the model's input, embedded in windows of {summary['window_frames']} "
             f"frames every {summary['hop_frames']}" if windowed else ""))
    return 0


class _PanelAction(argparse.Action):
    """--panel TITLE / --model LABEL=SPEC / --ckpt SPEC, kept in command-line order (a panel owns the models
    after it)."""

    def __call__(self, parser, namespace, values, option_string=None):
        entries = getattr(namespace, "mi_entries", None) or []
        entries.append((self.dest, values))
        namespace.mi_entries = entries


def _analyze_mi(args) -> int:
    import torch

    from ssamba.analysis.layerwise import AnalysisConfig, ModelSpec, Panel, analyze, format_table
    from ssamba.data import LabelSet

    if args.threads:
        torch.set_num_threads(args.threads)  # small MLPs: extra threads only contend on a shared CPU
        try:  # numba's scan threads keep competing with torch after SSAMBA's forward (measured 8x slower MINE)
            import numba

            numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
        except ImportError:
            pass
    panels: list[Panel] = []
    for kind, value in getattr(args, "mi_entries", None) or []:
        if kind == "panel":
            panels.append(Panel(value))
            continue
        if kind == "model":
            label, sep, spec = value.partition("=")
            if not sep or not label or not spec:
                print(f"ssamba analyze mi: error: --model needs LABEL=SPEC, got {value!r}", file=sys.stderr)
                return 2
        else:
            label, spec = Path(value.removeprefix("random:")).name + (" (random)" if value.startswith("random:")
                                                                      else ""), value
        if not panels:
            panels.append(Panel("models"))
        panels[-1].models.append(ModelSpec(label, spec))
    try:
        seeds = tuple(int(s) for s in args.seeds.split(","))
        cfg = AnalysisConfig(seeds=seeds, dims=args.dims, x=args.x, group=args.group, max_items=args.max_items,
                             max_frames=args.max_frames, hidden=args.hidden, steps=args.steps, lr=args.lr,
                             ema=None if args.no_ema else args.ema, held_out=args.held_out, k=args.k,
                             cca=args.cca, mean=args.mean,
                             std=args.std)
        labels = LabelSet.from_csv(args.labels) if args.labels else None
        result = analyze(panels, args.data, labels=labels, cfg=cfg, out=args.out,
                         log=lambda m: print(m, file=sys.stderr, flush=True))
    except ValueError as e:
        print(f"ssamba analyze mi: error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    print(f"\nwrote {Path(args.out) / 'mi.json'}" + (f" and {result['png']}" if "png" in result else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssamba", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ssamba {ssamba.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="build the offline demo corpus and run every available stage; "
                                            "writes report.md")
    demo.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder (reused when rerun)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--scale", default="small", choices=["small", "medium"])
    demo.add_argument("--budget-minutes", type=float, default=20,
                      help="CPU time the stages are sized for (default 20, for 2 cores); under 10 the models shrink")
    demo.add_argument("--conformance", type=Path, default=None,
                      help="official-code fixture folder (default: shared/conformance beside the checkout)")
    demo.set_defaults(func=_demo)

    conformance = commands.add_parser(
        "conformance", help="replay an official-code fixture folder; exit 0 only when every output is in tolerance")
    conformance.add_argument("folder", type=Path, help="fixture folder (config.json, inputs.pt, outputs.pt, ...)")
    conformance.add_argument("--backend", default="reference",
                             help="selective-scan backend to replay with (default: reference, the faithful path)")
    conformance.set_defaults(func=_conformance)

    convert = commands.add_parser("convert", help="import an official SSAMBA/SSAST .pth checkpoint")
    convert.add_argument("checkpoint", type=Path, help="official state dict (.pth; loaded with weights_only=True)")
    convert.add_argument("--family", required=True, choices=["ssamba", "ssast"])
    convert.add_argument("--config", type=Path, required=True,
                         help="JSON file with the official constructor arguments (label_dim, fshape, ...)")
    convert.add_argument("--out", type=Path, required=True, help="output folder (safetensors + config.json)")
    convert.set_defaults(func=_convert)

    bench = commands.add_parser("bench", help="benchmarks that print tables")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True, metavar="COMMAND")
    scan = bench_commands.add_parser("scan", help="selective-scan backends vs baselines: time, peak memory")
    scan.add_argument("--quick", action="store_true", help="L = 512 and 2048 only")
    scan.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    scan.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                      help="cuda: the backends that run on the GPU (triton, reference, and mamba_ssm's cuda when "
                           "installed), timed with CUDA events, peak memory by torch.cuda.max_memory_allocated")
    scan.set_defaults(func=_bench_scan)
    be = bench_commands.add_parser("embed", help="ssamba embed on long recordings: x real time, peak memory")
    be.add_argument("--model", default="ssamba_tiny", help="registry name (random init; default ssamba_tiny)")
    be.add_argument("--seconds", default="10,300", help="recording durations, comma-separated (default 10,300)")
    be.add_argument("--threads", type=int, default=None, help="torch threads in the child (default: all)")
    be.add_argument("--json", action="store_true")
    be.set_defaults(func=_bench_embed)
    bg = bench_commands.add_parser("gemm", help="float32 matrix products: torch.mm (MKL) vs the fast path's oneDNN")
    bg.add_argument("--tokens", type=int, default=1024, help="tokens (batch x length) per product (default 1024)")
    bg.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    bg.add_argument("--repeats", type=int, default=20, help="timed calls per product (default 20)")
    bg.add_argument("--json", action="store_true")
    bg.set_defaults(func=_bench_gemm)
    bm = bench_commands.add_parser(
        "models", help="SSAMBA vs SSAST batch-inference time and peak memory against the token count")
    bm.add_argument("--models", default=None, help="comma-separated registry names (default: ssamba_tiny,ssast_tiny)")
    bm.add_argument("--tokens", default=None, help="patch-token counts, e.g. 4096,8192 or 512:22528:256")
    bm.add_argument("--frames", default=None,
                    help="input frames, e.g. 1024,2048 or 1024:45056:512 (the official grid); default 1024..45056")
    bm.add_argument("--batch", type=int, default=2)
    bm.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    bm.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "bf16-autocast"],
                    help="bf16: weights and activations in bf16; bf16-autocast: float32 weights, bf16 GEMMs")
    bm.add_argument("--repeats", type=int, default=None, help="timed forwards per size (default 5)")
    bm.add_argument("--budget", type=float, default=None,
                    help="seconds of timed forwards per size before the repeats stop early (default 60)")
    bm.add_argument("--max-forward-s", type=float, default=None,
                    help="skip larger sizes of a variant once one forward took longer than this")
    bm.add_argument("--attention", default=None, help="SSAST attention variants (default: explicit,sdpa)")
    bm.add_argument("--backends", default=None, help="SSAMBA scan backends (default: every one the device runs)")
    bm.add_argument("--threads", type=int, default=None, help="torch/numba threads per measurement (default: all)")
    bm.add_argument("--mem-limit", default=None,
                    help="memory one forward may use, e.g. 8GiB (default: 80%% of MemAvailable); more is 'oom'")
    bm.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="model config override for every model, e.g. --set depth=4")
    bm.add_argument("--csv", type=Path, default=None, help="write the rows as CSV")
    bm.add_argument("--plot", type=Path, default=None, help="write time/memory vs tokens as PNG (needs matplotlib)")
    bm.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    bm.add_argument("--quick", action="store_true",
                    help="seconds: 2-layer models, 64 and 128 tokens, 2 runs, 1 thread (options still apply)")
    bm.add_argument("--profile", action="store_true",
                    help="instead: where one forward of the first model at the largest size spends its time")
    bm.add_argument("--train", action="store_true",
                    help="training steps (train mode, forward + backward) instead of inference; with --profile too")
    bm.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    bm.set_defaults(func=_bench_models)

    pre = commands.add_parser("pretrain", help="masked spectrogram patch pretraining (resumable; DDP under torchrun)")
    pre.add_argument("--model", required=True, help="registry name, e.g. ssamba_tiny or ssast_tiny")
    pre.add_argument("--train", type=Path, required=True, help="training manifest (labels unused)")
    pre.add_argument("--valid", type=Path, default=None, help="validation manifest (masked accuracy, MSE)")
    pre.add_argument("--out", type=Path, required=True, help="run folder: config.json, checkpoints/, metrics.jsonl")
    pre.add_argument("--steps", type=int, default=None, help="optimizer steps (train.steps)")
    pre.add_argument("--batch-size", type=int, default=None, help="global batch per step (train.batch_size)")
    _run_options(pre, "--set optim.lr=3e-4 --set model.overrides.depth=4")
    pre.set_defaults(func=_pretrain)

    data = commands.add_parser("data", help="datasets: the demo corpus, normalisation statistics")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    synth = data_commands.add_parser("synth", help="generate the offline demo corpus with manifests")
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--scale", default="small", choices=["small", "medium"])
    synth.add_argument("--jobs", type=int, default=None, help="worker processes (default: all cores)")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    synth.add_argument("--json", action="store_true", help="print the summary as JSON")
    synth.set_defaults(func=_data_synth)
    stats = data_commands.add_parser("stats", help="fbank mean/std of a dataset, for normalisation")
    stats.add_argument("manifest", type=Path, help="SSAST .json, .jsonl or a folder per class")
    stats.add_argument("--target-length", type=int, default=None,
                       help="pad/cut each clip to this many frames first, as the official loader does")
    stats.add_argument("--skip-bad", action="store_true", help="skip (and count) unusable files")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(func=_data_stats)
    from ssamba.data.prepare import PREPARERS

    prep = data_commands.add_parser("prepare", help="manifests + labels.csv of a corpus from its standard layout")
    prep.add_argument("name", choices=list(PREPARERS), help="corpus")
    prep.add_argument("root", type=Path, help="the corpus folder, as distributed")
    prep.add_argument("--out", type=Path, required=True, help="folder for <split>.json, labels.csv, prepare.json")
    prep.add_argument("--version", type=int, default=None, choices=[1, 2], help="speechcommands: v0.01 or v0.02 "
                      "(default 2)")
    prep.add_argument("--classes", type=int, default=None, choices=[35, 12],
                      help="speechcommands: every word (default) or SUPERB's 12 with _unknown_ and _silence_")
    prep.add_argument("--subsets", default=None,
                      help="librispeech: comma-separated (default train-clean-100,dev-clean,test-clean)")
    prep.add_argument("--seed", type=int, default=None, help="speechcommands 12-class: _silence_ cut offsets (0)")
    prep.add_argument("--json", action="store_true", help="print the summary as JSON")
    prep.set_defaults(func=_data_prepare)
    hub = commands.add_parser("hubert", help="Mamba-HuBERT: k-means targets, masked prediction pretraining, "
                                             "CTC fine-tuning, reconstruction probe")
    hub_commands = hub.add_subparsers(dest="hubert_command", required=True, metavar="COMMAND")
    lab = hub_commands.add_parser("labels", help="fit mini-batch k-means once on the training frames, label "
                                                 "train and every --apply manifest with it")
    lab.add_argument("--train", type=Path, required=True, help="manifest the k-means model is fitted on")
    lab.add_argument("--apply", type=Path, action="append", help="further manifests labelled with the same model")
    lab.add_argument("--out", type=Path, required=True, help="label folder: labels.json, kmeans.safetensors, *.km")
    lab.add_argument("--k", type=int, default=100, help="clusters (HuBERT: 100 iteration 1, 500 iteration 2)")
    lab.add_argument("--model", default=None, help="iteration 2: a pretrained HuBERT folder; default MFCC features")
    lab.add_argument("--layer", type=int, default=None, help="iteration 2: 1-based layer whose features are clustered")
    lab.add_argument("--max-frames", type=int, default=200000, help="frames sampled to fit k-means")
    lab.add_argument("--seed", type=int, default=0)
    lab.add_argument("--ref-labels", action="append", default=[], metavar="STEM=FILE.km",
                     help="frame-aligned reference classes of a manifest (same format): purity / PNMI report")
    lab.add_argument("--json", action="store_true")
    lab.set_defaults(func=_hubert_labels)
    for name, text in (("pretrain", "HuBERT masked prediction pretraining (resumable; DDP under torchrun)"),
                       ("finetune", "CTC fine-tuning over characters: CER / WER"),
                       ("reconstruct", "fbank reconstruction / denoising probe of one layer: MSE, R^2")):
        sub = hub_commands.add_parser(name, help=text)
        sub.add_argument("--train", type=Path, required=True)
        sub.add_argument("--valid", type=Path, default=None)
        sub.add_argument("--out", type=Path, required=True, help="run folder: config.json, checkpoints/, metrics")
        sub.add_argument("--encoder", default=None, choices=["transformer", "extbimamba", "innbimamba", "conbimamba"])
        sub.add_argument("--size", default=None, help="preset: base, small (default), tiny")
        sub.add_argument("--steps", type=int, default=None)
        sub.add_argument("--batch-size", type=int, default=None)
        _run_options(sub, "--set optim.lr=1e-3 --set model.overrides.depth=2")
        if name == "pretrain":
            sub.add_argument("--labels", type=Path, required=True, help="label folder from `ssamba hubert labels`")
        else:
            sub.add_argument("--init", default="none", help="pretrained HuBERT folder (RUN/final) or none")
            sub.add_argument("--test", type=Path, default=None)
            sub.add_argument("--layer", type=int, default=None, help="1-based encoder layer (default: last, normed)")
        if name == "finetune":
            sub.add_argument("--conformer-layers", type=int, default=None, help="Conformer downstream blocks")
        if name == "reconstruct":
            sub.add_argument("--noise-snr-db", type=float, default=None, help="denoising: white noise at this SNR")
        sub.set_defaults(func=_hubert_run)

    ft = commands.add_parser("finetune", help="fine-tune or linear-probe an encoder on a downstream task "
                                              "(official recipes as presets; resumable)")
    ft.add_argument("--model", required=True, help="registry name, e.g. ssamba_tiny or ssast_tiny")
    ft.add_argument("--init", default="none",
                    help="pretraining run (RUN/final), save_pretrained folder, checkpoint step folder, or none")
    ft.add_argument("--task", required=True, choices=["kws", "kws12", "sid", "sounds", "audioset", "esc", "er"],
                    help="recipe preset (see ssamba.tasks.recipes)")
    ft.add_argument("--train", type=Path, required=True)
    ft.add_argument("--valid", type=Path, required=True, help="selects the best checkpoint")
    ft.add_argument("--test", type=Path, default=None)
    ft.add_argument("--labels", type=Path, required=True, help="class_labels_indices.csv (index,mid,display_name)")
    ft.add_argument("--out", type=Path, required=True, help="run folder: metrics.json, best/, checkpoints/, ...")
    ft.add_argument("--linear-probe", action="store_true",
                    help="frozen encoder, learnable weighted sum of layers + linear (task.mode=probe)")
    ft.add_argument("--epochs", type=int, default=None)
    ft.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    ft.add_argument("--batch-size", type=int, default=None)
    _run_options(ft, "--set optim.lr=1e-4 --set augment.mixup=0")
    ft.set_defaults(func=_finetune)

    ev = commands.add_parser("evaluate", help="score a fine-tuned model (RUN2 or RUN2/best) on a manifest")
    ev.add_argument("--ckpt", type=Path, required=True)
    ev.add_argument("--test", type=Path, required=True)
    ev.add_argument("--labels", type=Path, default=None, help="must match the run's labels (checked)")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--skip-bad", action="store_true", help="skip (and count) unusable files")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=_evaluate)

    fc = commands.add_parser("finetune-compare", help="pretrained vs scratch, probe vs fine-tune, on the demo "
                                                      "corpus tasks, under one small budget; prints the table")
    fc.add_argument("--manifests", type=Path, required=True, help="the demo corpus's manifests folder")
    fc.add_argument("--init", action="append", required=True, metavar="MODEL=RUN",
                    help="e.g. --init ssamba_tiny=runs/pt_ssamba --init ssast_tiny=runs/pt_ssast")
    fc.add_argument("--out", type=Path, required=True, help="folder of the runs and compare.md (reused when rerun)")
    fc.add_argument("--tasks", nargs="+", default=["kws", "sid", "sounds"], choices=["kws", "sid", "sounds"])
    fc.add_argument("--modes", nargs="+", default=["probe", "finetune"], choices=["probe", "finetune"])
    fc.add_argument("--finetune-steps", type=int, default=8)
    fc.add_argument("--probe-epochs", type=int, default=30)
    fc.add_argument("--probe-pool", default="mean", choices=["mean", "row_stats"],
                    help="the probes' pooling: mean of the patch tokens, or mean and std per frequency row")
    fc.add_argument("--batch-size", type=int, default=16)
    fc.add_argument("--seed", type=int, default=0)
    fc.add_argument("--table-only", action="store_true", help="tabulate the finished cells, run nothing")
    fc.set_defaults(func=_finetune_compare)

    em = commands.add_parser("embed", help="per-layer representations of audio files (.npy / .safetensors)")
    em.add_argument("inputs", nargs="+", help="a manifest, or audio files")
    em.add_argument("--model", required=True, help="save_pretrained folder, pretraining run, or fine-tuning run")
    em.add_argument("--out", type=Path, required=True, help="output file (suffix set by --format) + OUT.json")
    em.add_argument("--pool", default="mean", choices=["mean", "frames", "none"],
                    help="mean over each clip's patch tokens (N, L+1, C); frames: one vector per time column "
                         "with its time in seconds; none: all tokens per clip (clips within the model's input)")
    em.add_argument("--format", default="npy", choices=["npy", "safetensors"])
    em.add_argument("--hop-frames", type=int, default=None,
                    help="recordings longer than the model's input run in windows of its input_tdim frames "
                         "every this many frames (default half a window; a multiple of the patch stride)")
    em.add_argument("--batch-size", type=int, default=16)
    em.add_argument("--quiet", action="store_true", help="no progress bar for long recordings")
    em.add_argument("--skip-bad", action="store_true", help="skip (and count) unusable files")
    em.set_defaults(func=_embed)

    an = commands.add_parser("analyze", help="layer-wise analysis of representations")
    an_commands = an.add_subparsers(dest="analyze_command", required=True, metavar="COMMAND")
    mi = an_commands.add_parser(
        "mi", help="MI per layer: MINE I(X; T_l) over seeds, k-means I(T_l; Y)/H(Y), CCA; JSON + PNG",
        description="Models are --ckpt SPEC or --model LABEL=SPEC (SPEC: a save_pretrained folder, a run folder "
                    "with best/ or final/, or random:SPEC for the same architecture untrained); --panel TITLE "
                    "starts a panel holding the models that follow it.")
    mi.add_argument("--panel", action=_PanelAction, metavar="TITLE", help="start a new panel of the figure")
    mi.add_argument("--model", action=_PanelAction, metavar="LABEL=SPEC", help="a model with its legend label")
    mi.add_argument("--ckpt", action=_PanelAction, metavar="SPEC", help="a model labelled by its folder name")
    mi.add_argument("--data", type=Path, action="append", required=True,
                    help="manifest(s) whose clips give the frames (repeat to pool several)")
    mi.add_argument("--labels", type=Path, default=None,
                    help="class CSV of the manifest's labels: adds I(T_l; Y)/H(Y) with frame = clip label")
    mi.add_argument("--out", type=Path, required=True, help="output folder: mi.json, mi.png")
    mi.add_argument("--x", default="input",
                    help="X: input (raw patches / MFCC), cnn (waveform models' CNN output) or layer:K")
    mi.add_argument("--group", default="concat", choices=["concat", "mean", "patch"],
                    help="patch models: a frame = a time column of patches concatenated / averaged, or one patch")
    mi.add_argument("--seeds", default="0,1,2", help="comma-separated MINE / k-means seeds")
    mi.add_argument("--dims", type=int, default=16, help="PCA components of X and of each layer (0 = all)")
    mi.add_argument("--max-items", type=int, default=None, help="use at most this many clips")
    mi.add_argument("--max-frames", type=int, default=6000, help="subsample to at most this many frames")
    mi.add_argument("--hidden", type=int, default=64, help="statistics-network width")
    mi.add_argument("--steps", type=int, default=1000, help="MINE optimiser steps per estimate")
    mi.add_argument("--lr", type=float, default=1e-3)
    mi.add_argument("--ema", type=float, default=0.01, help="moving-average rate of the bias-corrected gradient")
    mi.add_argument("--no-ema", action="store_true", help="plain (biased) DV gradient")
    mi.add_argument("--held-out", type=float, default=0.3,
                    help="fraction of clips whose frames evaluate the bound / the cluster counts")
    mi.add_argument("--k", type=int, default=32, help="k-means clusters of the discrete estimator")
    mi.add_argument("--cca", action="store_true", help="also linear CCA of X and each layer")
    mi.add_argument("--mean", type=float, default=-4.2677393, help="fbank normalisation mean (as in training)")
    mi.add_argument("--std", type=float, default=4.5689974, help="fbank normalisation std (as in training)")
    mi.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    mi.set_defaults(func=_analyze_mi)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ssamba.audio import AudioError
    from ssamba.data.manifest import ManifestError
    from ssamba.data.synth import SynthError
    from ssamba.train.guard import NonFiniteLossError

    args = build_parser().parse_args(argv)
    finished = False
    try:
        code = args.func(args)
        finished = True
        return code
    except (AudioError, ManifestError, SynthError, FileNotFoundError, NonFiniteLossError) as e:
        # Bad input, a missing system tool, or a diverged run (the last good checkpoint is kept): one clear line
        # naming the culprit, no traceback.
        print(f"ssamba: error: {e}", file=sys.stderr)
        return 2
    finally:
        _close_process_group(in_step=finished)


def _close_process_group(in_step: bool) -> None:
    """Under torchrun, shut the process group down before the interpreter exits. A rank that finished normally
    first waits for the others (``in_step``), so no rank tears down while a peer still works (rank 0 writing
    the final model); after an error there is no barrier, which could wait forever for a rank that died.
    The rare "terminate called without an active exception" abort at exit was not about this order: gloo's
    worker thread released a collective's Python-made tensor (which takes the GIL) after the interpreter had
    begun finalizing; ``Dist``'s collectives now return only once gloo has let go of their tensors (see
    ``ssamba.train.distributed._collective``). The barrier's own tensor is made in C++ and needs no GIL, and
    ``destroy_process_group()`` does not stop gloo's threads, so that wait is what makes the exit safe."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if in_step:
            dist.barrier()
        dist.destroy_process_group()

if __name__ == "__main__":
    sys.exit(main())
