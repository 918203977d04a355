"""Matrix-product benchmark behind ``ssamba bench gemm``: torch's own float32 product (MKL in torch's x86 wheels)
against the fast path's (:func:`ssamba.ops.gemm_cpu.mm`, oneDNN) on the projections of SSAMBA-tiny's mixer and
SSAST-tiny's blocks, at a given token count, so that the choice of library can be checked on any CPU.

Each product is timed in this process, on float32 operands laid out as the fused mixer has them; the figure is
the median of ``repeats`` calls after a warm-up.
"""

from __future__ import annotations

import datetime
import time

import torch

from ssamba.ops.gemm_cpu import ONEDNN, mm

__all__ = ["format_table", "run"]

# (model, product, output rows, depth, columns) for T tokens: SSAMBA-tiny d_model 192, d_inner 384, x_proj 44 outputs
# (dt_rank 12 + 2 x 16 states); SSAST-tiny embed 192, MLP 768.
_SHAPES = (
    ("ssamba_tiny", "in_proj", 768, 192, "T"),
    ("ssamba_tiny", "x_proj", 44, 384, "T"),
    ("ssamba_tiny", "out_proj", "T", 384, 192),
    ("ssast_tiny", "qkv", "T", 192, 576),
    ("ssast_tiny", "attn proj", "T", 192, 192),
    ("ssast_tiny", "fc1", "T", 192, 768),
    ("ssast_tiny", "fc2", "T", 768, 192),
)


def _median_s(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def run(tokens: int = 1024, threads: int | None = None, repeats: int = 20) -> dict:
    """Time every product both ways; returns {"config", "machine", "rows", "date"}."""
    from ssamba.bench.scan import machine_info

    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        rows = [_time_product(model, name, m, k, n, tokens, repeats) for model, name, m, k, n in _SHAPES]
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)  # the caller's setting, as it was
    return {"config": {"tokens": tokens, "threads": threads, "repeats": repeats, "onednn": ONEDNN},
            "machine": machine_info(), "rows": rows, "date": datetime.datetime.now().isoformat(timespec="seconds")}


def _time_product(model: str, name: str, m: int | str, k: int, n: int | str, tokens: int, repeats: int) -> dict:
    m, n = (tokens if m == "T" else m), (tokens if n == "T" else n)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    flop = 2.0 * m * k * n
    torch_s = _median_s(lambda: torch.mm(a, b), repeats)
    fast_s = _median_s(lambda: mm(a, b), repeats)
    return {"model": model, "product": name, "shape": [m, k, n], "torch_mm_s": torch_s, "fast_path_s": fast_s,
            "torch_mm_gflops": flop / torch_s / 1e9, "fast_path_gflops": flop / fast_s / 1e9,
            "speedup": torch_s / fast_s}


def format_table(result: dict) -> str:
    m, cfg = result["machine"], result["config"]
    fast = "oneDNN" if cfg["onednn"] else "torch.mm (no oneDNN in this torch)"
    lines = [f"float32 products at {cfg['tokens']} tokens, threads: {cfg['threads']}, median of {cfg['repeats']} "
             f"calls; fast path: {fast}; {m['cpu']}; torch {m['torch']}; {result['date']}", "",
             "| model | product | M x K x N | torch.mm | fast path | torch.mm | fast path | speedup |",
             "|---|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in result["rows"]:
        mm_, k, n = r["shape"]
        lines.append(f"| {r['model']} | {r['product']} | {mm_} x {k} x {n} | {r['torch_mm_s'] * 1e6:.0f} us "
                     f"| {r['fast_path_s'] * 1e6:.0f} us | {r['torch_mm_gflops']:.0f} GFLOP/s "
                     f"| {r['fast_path_gflops']:.0f} GFLOP/s | {r['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"
