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
    from ssamba.data import dataset_stats, read_manifest

    stats = dataset_stats(read_manifest(args.manifest), target_length=args.target_length,
                          skip_bad=args.skip_bad, progress=not args.json)
    if args.json:
        print(json.dumps(stats, indent=1))
    else:
        print(f"mean {stats['mean']:.7f}  std {stats['std']:.7f}  ({stats['files']} files, {stats['frames']} frames"
              + (f", {len(stats['skipped'])} bad files skipped" if stats["skipped"] else "") + ")")
        print(f"use: --set data.mean={stats['mean']:.7f} --set data.std={stats['std']:.7f}")
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
    from ssamba.bench.scan import format_table, run

    result = run(quick=args.quick, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0


def _demo(args) -> int:
    from ssamba.demo import run_demo

    report = run_demo(args.out, seed=args.seed, scale=args.scale, conformance=args.conformance)
    print(f"report: {report}")
    return 0


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
    if result["interrupted"]:
        print(f"stopped by {result['interrupted']} at step {result['step']}; checkpoint saved, continue with --resume")
        return 130 if result["interrupted"] == "SIGINT" else 143
    if result["final"]:
        print(f"pretrained model (encoder + MSPM heads): {result['final']}")
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
    scan.set_defaults(func=_bench_scan)

    pre = commands.add_parser("pretrain", help="masked spectrogram patch pretraining (resumable; DDP under torchrun)")
    pre.add_argument("--model", required=True, help="registry name, e.g. ssamba_tiny or ssast_tiny")
    pre.add_argument("--train", type=Path, required=True, help="training manifest (labels unused)")
    pre.add_argument("--valid", type=Path, default=None, help="validation manifest (masked accuracy, MSE)")
    pre.add_argument("--out", type=Path, required=True, help="run folder: config.json, checkpoints/, metrics.jsonl")
    pre.add_argument("--steps", type=int, default=None, help="optimizer steps (train.steps)")
    pre.add_argument("--batch-size", type=int, default=None, help="global batch per step (train.batch_size)")
    pre.add_argument("--config", type=Path, default=None, help="TOML (or a run's config.json) with config sections")
    pre.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override one config key, e.g. --set optim.lr=3e-4 --set model.overrides.depth=4")
    pre.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    from ssamba.audio import AudioError
    from ssamba.data.manifest import ManifestError
    from ssamba.data.synth import SynthError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (AudioError, ManifestError, SynthError, FileNotFoundError) as e:
        # Bad input or a missing system tool: one clear line naming the culprit, no traceback.
        print(f"ssamba: error: {e}", file=sys.stderr)
        return 2

if __name__ == "__main__":
    sys.exit(main())
