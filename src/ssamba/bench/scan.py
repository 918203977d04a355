"""Selective-scan benchmark behind ``ssamba bench scan [--quick] [--json]``: :func:`run` measures, :func:`format_table`
prints.

Shape glossary
    B  batch (2)     D  channels (768)     L  sequence length (512, 2048, 8192; quick: 512, 2048)     N  state (16)

Workload: one Mamba-1 layer's scan in float32 on CPU: ``delta_softplus=True`` with ``delta_bias``, ``D`` and the
gate ``z``; B/C (B, N, L); A = -(1..N) per channel (the S4D-real initialisation); delta_bias = softplus^-1 of steps
log-spaced in [1e-3, 1e-1] (mamba_ssm's dt initialisation), delta ~ 0.5 N(0, 1).

Methods, all measured in one run:
    backend:<name>       every :func:`ssamba.ops.selective_scan` backend that runs on CPU float32 here (``cpu``: the
                         fused numba kernels; ``reference``: pure PyTorch, precomputed decays + unbind loop)
    baseline:torch_loop  a plain sequential PyTorch loop (exp and update per step, slices by unbind)
    baseline:per_step    the official reference pattern (``mamba_ssm``'s ``selective_scan_ref``, also the slow path of
                         HF transformers): precomputed (B, D, L, N) tensors indexed at step i inside the loop. Each
                         such index makes autograd build a full-size zero gradient in the backward, which is
                         O(L^2), so it runs at L = 512 only.

Figures, per method and length:
    forward      one call under ``torch.no_grad()`` (inference)
    fwd+bwd      one call with autograd recording, then ``backward`` of a fixed random output gradient into all eight
                 inputs (u, delta, A, B, C, D, z, delta_bias)
    times are medians of 3 to 7 timed calls after an untimed warm-up call (within a few seconds' budget); a method
    whose warm-up call alone exceeds the budget is timed by that single call (``runs`` says which)
    updates/s    B*D*L*N state updates per second
    peak extra   measured in a fresh child process per method and length, with ``MALLOC_MMAP_THRESHOLD_=65536`` so
                 that every allocation of 64 KiB or more is its own mmap and is returned to the OS when freed:
                 after a small warm-up call and the inputs, the kernel's peak-RSS mark is reset
                 (``/proc/self/clear_refs``), the call runs, and the figure is VmHWM minus the VmRSS before it.
                 It counts everything the process touched (torch tensors, numba's buffers, autograd's saved
                 tensors, the input gradients), unlike tracemalloc (blind to torch) or torch's allocator profiler
                 (blind to numba). Linux only; None elsewhere.

``--device cuda`` (:func:`run_cuda`): the same workload on the GPU, for the backends that run there
(``backend:cuda``, ``mamba_ssm``'s kernel, when it is importable; ``backend:triton``; ``backend:reference``), no
baselines. Times come from CUDA events around each call (median of 3 to 7 after a warm-up call, which also takes
Triton's compilation), peak extra memory from ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``, less what was allocated before the call; the figures are about ``backend:triton``.
"""

from __future__ import annotations

import datetime
import functools
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import llvmlite.binding
import numba
import torch
import torch.nn.functional as F
from torch import Tensor

import ssamba.ops.scan_cpu  # noqa: F401  (registers the "cpu" backend)
from ssamba.ops.selective_scan import available_backends, resolve_backend, selective_scan

__all__ = ["format_table", "make_inputs", "per_step_reference_pattern", "run", "torch_sequential_loop"]

BATCH, CHANNELS, STATE = 2, 768, 16
LENGTHS = (512, 2048, 8192)
QUICK_LENGTHS = (512, 2048)
PER_STEP_MAX_LENGTH = 512  # the per-step baseline's backward is O(L^2): ~40 s at 512 already
SUBJECT = "backend:cpu"  # the method the speed-ups and targets are about
CUDA_SUBJECT = "backend:triton"  # the same for --device cuda
MIN_RUNS, MAX_RUNS = 3, 7
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
_INPUT_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

ScanMethod = Callable[..., Tensor]  # (u, delta, A, B, C, D, z, delta_bias, delta_softplus) -> out (B, D, L)


def make_inputs(length: int, seed: int = 0, batch: int = BATCH, channels: int = CHANNELS,
                state: int = STATE) -> dict[str, Tensor]:  # fmt: skip
    """The workload's float32 inputs (leaves requiring grad), deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g)

    dt = torch.exp(torch.linspace(torch.log(torch.tensor(1e-3)), torch.log(torch.tensor(1e-1)), channels))
    tensors = {
        "u": randn(batch, channels, length),  # (B, D, L)
        "delta": randn(batch, channels, length) * 0.5,  # (B, D, L)
        "A": -torch.arange(1, state + 1, dtype=torch.float32).repeat(channels, 1),  # (D, N)
        "B": randn(batch, state, length),  # (B, N, L)
        "C": randn(batch, state, length),  # (B, N, L)
        "D": torch.ones(channels),  # (D,)
        "z": randn(batch, channels, length),  # (B, D, L)
        "delta_bias": dt + torch.log(-torch.expm1(-dt)),  # (D,) softplus^-1(dt)
    }
    return {k: v.requires_grad_() for k, v in tensors.items()}


def per_step_reference_pattern(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Baseline: the official reference's loop (``mamba_ssm.ops.selective_scan_interface.selective_scan_ref`` for
    real A and B/C (B, N, L)): decays and inputs precomputed as (B, D, L, N), step i read by indexing them."""
    delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    delta_a = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))  # (B, D, L, N)
    delta_b_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)  # (B, D, L, N)
    x = u.new_zeros(u.shape[0], A.shape[0], A.shape[1])  # (B, D, N)
    ys = []
    for i in range(u.shape[2]):
        x = delta_a[:, :, i] * x + delta_b_u[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i]))  # (B, D)
    y = torch.stack(ys, dim=2) + u * D[:, None]  # (B, D, L)
    return y * F.silu(z)


def torch_sequential_loop(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Baseline: a plain sequential PyTorch scan, exp of the step's dt * A and one state update per step; time
    slices come from ``unbind``, whose backward is one stack (O(L))."""
    dt = delta + delta_bias[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    h = u.new_zeros(u.shape[0], A.shape[0], A.shape[1])  # (B, D, N)
    ys = []
    for dt_t, u_t, b_t, c_t in zip(dt.unbind(-1), u.unbind(-1), B.unbind(-1), C.unbind(-1), strict=True):
        h = torch.exp(dt_t[..., None] * A) * h + (dt_t * u_t)[..., None] * b_t[:, None]  # (B, D, N)
        ys.append(torch.einsum("bdn,bn->bd", h, c_t))  # (B, D)
    y = torch.stack(ys, dim=-1) + u * D[:, None]  # (B, D, L)
    return y * F.silu(z)


def _backend_method(name: str, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend=name)


def methods(device: str = "cpu") -> dict[str, ScanMethod]:
    """Every backend that can run on a float32 tensor on ``device`` here, then (CPU only) the two baselines."""
    probe = torch.zeros(1, 1, 1, device=device)
    found: dict[str, ScanMethod] = {}
    for name in available_backends():
        if name == "triton" and device == "cpu":
            continue  # runs on CPU tensors only under Triton's interpreter (TRITON_INTERPRET=1): a test tool, slow
        try:
            resolve_backend(probe, name)
        except ValueError:
            continue
        found[f"backend:{name}"] = functools.partial(_backend_method, name)
    if device != "cpu":
        return found
    found["baseline:torch_loop"] = torch_sequential_loop
    found["baseline:per_step"] = per_step_reference_pattern
    return found


def _calls(method: ScanMethod, inputs: dict[str, Tensor], grad_out: Tensor) -> tuple[Callable, Callable]:
    """(forward, forward_backward) closures over fixed inputs."""
    leaves = [inputs[k] for k in _INPUT_NAMES]

    def forward() -> None:
        with torch.no_grad():
            method(*leaves, True)

    def forward_backward() -> None:
        for t in leaves:
            t.grad = None  # as optimizer.zero_grad(set_to_none=True): each call allocates its gradients
        method(*leaves, True).backward(grad_out)

    return forward, forward_backward


def _median_time(fn: Callable[[], None], budget_s: float) -> tuple[float, int]:
    """(median seconds, number of timed calls); see the module docstring."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    if first > budget_s:
        return first, 1
    samples: list[float] = []
    while len(samples) < MIN_RUNS or (len(samples) < MAX_RUNS and sum(samples) < budget_s):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), len(samples)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_extra_mib(fn: Callable[[], None]) -> float:
    gc.collect()
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    fn()
    return (_status_kib("VmHWM") - base) / 1024


def _memory_child(method_name: str, length: int) -> dict[str, float]:
    """Runs in the child process: peak extra MiB of one forward and one forward+backward."""
    method = methods()[method_name]
    for fn in _calls(method, make_inputs(8, seed=1), torch.randn(BATCH, CHANNELS, 8)):
        fn()  # JIT cache load, thread pools, lazy imports: kept out of the figures
    forward, forward_backward = _calls(method, make_inputs(length), torch.randn(BATCH, CHANNELS, length))
    return {"forward_mib": _peak_extra_mib(forward), "forward_backward_mib": _peak_extra_mib(forward_backward)}


def _measure_memory(method_name: str, length: int) -> dict[str, float] | None:
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    proc = subprocess.run(
        [sys.executable, "-m", "ssamba.bench.scan", "--memory-child", method_name, str(length)],
        env={**os.environ, **_MALLOC_ENV}, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_info() -> dict[str, object]:
    model = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    return {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "numba_threads": numba.get_num_threads(),
        # the CPU the numba kernels are compiled for: NUMBA_CPU_NAME (e.g. haswell, generic) or this host's
        "numba_target": numba.config.CPU_NAME or f"host ({llvmlite.binding.get_host_cpu_name()})",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numba": numba.__version__,
        "platform": platform.platform(),
    }


def _row(method: str, length: int, forward: tuple[float, int], forward_backward: tuple[float, int],
         memory_mib: tuple[float, float] | None) -> dict:
    """One table row (the CPU and the CUDA runs share it): (median seconds, timed calls) of each pass, and the peak
    extra MiB of each or None."""
    updates = BATCH * CHANNELS * length * STATE
    return {
        "method": method, "length": length,
        "forward_s": forward[0], "forward_runs": forward[1],
        "forward_backward_s": forward_backward[0], "forward_backward_runs": forward_backward[1],
        "forward_updates_per_s": updates / forward[0], "forward_backward_updates_per_s": updates / forward_backward[0],
        "forward_peak_extra_mib": None if memory_mib is None else memory_mib[0],
        "forward_backward_peak_extra_mib": None if memory_mib is None else memory_mib[1],
    }  # fmt: skip


def run(quick: bool = False, lengths: tuple[int, ...] | None = None, measure_memory: bool = True,
        log: Callable[[str], None] | None = None) -> dict:  # fmt: skip
    """Measure every method at every length (see the module docstring) and return one JSON-ready dict:
    ``config``, ``machine``, ``rows`` (one per method and length), ``speedups`` (of backend:cpu over each other
    method), ``targets`` (the issue's acceptance figures, with ``met``) and ``notes``."""
    lengths = lengths or (QUICK_LENGTHS if quick else LENGTHS)
    budget_s = 2.0 if quick else 4.0
    say = log or (lambda message: None)
    # Compile first: numba builds (or loads from its cache) each kernel at its first call, which would
    # otherwise be timed as the warm-up call of the first length (seconds in a fresh cache, e.g. a new
    # NUMBA_CPU_NAME target).
    say("compiling / loading the kernels")
    small, small_grad = make_inputs(8), torch.randn(BATCH, CHANNELS, 8)
    for method in methods().values():
        for call in _calls(method, small, small_grad):
            call()
    del small, small_grad
    rows = []
    for length in lengths:
        inputs = make_inputs(length)
        grad_out = torch.randn(BATCH, CHANNELS, length, generator=torch.Generator().manual_seed(1))
        for name, method in methods().items():
            if name == "baseline:per_step" and length > PER_STEP_MAX_LENGTH:
                continue
            forward, forward_backward = _calls(method, inputs, grad_out)
            say(f"L={length} {name}: timing")
            fwd_s, fwd_runs = _median_time(forward, budget_s)
            fb_s, fb_runs = _median_time(forward_backward, budget_s)
            for t in inputs.values():
                t.grad = None
            memory = None
            if measure_memory:
                say(f"L={length} {name}: peak memory (child process)")
                memory = _measure_memory(name, length)
            rows.append(_row(name, length, (fwd_s, fwd_runs), (fb_s, fb_runs),
                             None if memory is None else (memory["forward_mib"], memory["forward_backward_mib"])))
        del inputs, grad_out
        gc.collect()
    return {
        "benchmark": "selective scan (CPU)",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "config": {
            "batch": BATCH, "channels": CHANNELS, "state": STATE, "lengths": list(lengths), "dtype": "float32",
            "options": "delta_softplus=True, delta_bias, D, z; B/C (B, N, L)", "quick": quick,
        },  # fmt: skip
        "machine": machine_info(),
        "rows": rows,
        "speedups": _speedups(rows),
        "targets": _targets(rows),
        "notes": [
            f"baseline:per_step runs at L <= {PER_STEP_MAX_LENGTH} only: its backward is O(L^2)",
            "forward: under torch.no_grad(); fwd+bwd: gradients of all eight inputs",
            "peak extra memory: VmHWM - VmRSS in a fresh child process per method and length (see module docstring)"
            if measure_memory else "peak memory not measured",
        ],
    }


def _cuda_median_time(fn: Callable[[], None], budget_s: float) -> tuple[float, int]:
    """(median seconds, number of timed calls) by CUDA events, after one untimed warm-up call."""
    fn()  # warm-up: Triton compiles its kernels for these arguments, the allocator caches its blocks
    torch.cuda.synchronize()
    samples: list[float] = []
    while len(samples) < MIN_RUNS or (len(samples) < MAX_RUNS and sum(samples) < budget_s):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return statistics.median(samples), len(samples)


def _cuda_peak_extra_mib(fn: Callable[[], None]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run_cuda(quick: bool = False, lengths: tuple[int, ...] | None = None,
             log: Callable[[str], None] | None = None) -> dict:  # fmt: skip
    """The workload on the current CUDA device (see the module docstring); the same JSON-ready layout as
    :func:`run`, with ``config.device = "cuda"``, the GPU in ``machine.gpu`` and issue 18's targets."""
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda needs a CUDA device: torch.cuda.is_available() is False here")
    import ssamba.ops  # noqa: F401  (registers the triton and cuda backends)

    lengths = lengths or (QUICK_LENGTHS if quick else LENGTHS)
    budget_s = 2.0 if quick else 4.0
    say = log or (lambda message: None)
    found = methods("cuda")
    rows = []
    for length in lengths:
        inputs = {k: v.detach().cuda().requires_grad_() for k, v in make_inputs(length).items()}
        grad_out = torch.randn(BATCH, CHANNELS, length, generator=torch.Generator().manual_seed(1)).cuda()
        for name, method in found.items():
            forward, forward_backward = _calls(method, inputs, grad_out)
            say(f"L={length} {name}: timing (CUDA events)")
            fwd_s, fwd_runs = _cuda_median_time(forward, budget_s)
            fb_s, fb_runs = _cuda_median_time(forward_backward, budget_s)
            for t in inputs.values():
                t.grad = None
            fwd_mib, fb_mib = _cuda_peak_extra_mib(forward), _cuda_peak_extra_mib(forward_backward)
            for t in inputs.values():
                t.grad = None
            rows.append(_row(name, length, (fwd_s, fwd_runs), (fb_s, fb_runs), (fwd_mib, fb_mib)))
        del inputs, grad_out
        torch.cuda.empty_cache()
    machine = machine_info()
    machine["gpu"] = torch.cuda.get_device_name()
    machine["cuda"] = torch.version.cuda
    return {
        "benchmark": "selective scan (CUDA)",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "config": {
            "batch": BATCH, "channels": CHANNELS, "state": STATE, "lengths": list(lengths), "dtype": "float32",
            "options": "delta_softplus=True, delta_bias, D, z; B/C (B, N, L)", "quick": quick, "device": "cuda",
        },  # fmt: skip
        "machine": machine,
        "rows": rows,
        "subject": CUDA_SUBJECT,
        "speedups": _speedups(rows, CUDA_SUBJECT),
        "targets": _cuda_targets(rows),
        "targets_issue": 18,
        "notes": [
            "forward: under torch.no_grad(); fwd+bwd: gradients of all eight inputs",
            "times: CUDA events, median after a warm-up call; peak extra: torch.cuda.max_memory_allocated minus "
            "the memory allocated before the call",
            "backend:cuda (mamba_ssm) is listed only where mamba_ssm is importable",
        ],
    }


def _cuda_targets(rows: list[dict]) -> list[dict]:
    """Issue 18's acceptance figures for the triton backend, where this run measured what they need."""
    by = {(r["method"], r["length"]): r for r in rows}
    targets = []
    subject = by.get((CUDA_SUBJECT, 2048))
    if subject and ("backend:reference", 2048) in by:
        value = by[("backend:reference", 2048)]["forward_backward_s"] / subject["forward_backward_s"]
        targets.append({"target": "triton fwd+bwd at L=2048 >= 20x faster than the reference backend",
                        "value": value, "threshold": 20.0, "met": value >= 20.0})  # fmt: skip
    if subject and ("backend:cuda", 2048) in by:
        value = subject["forward_backward_s"] / by[("backend:cuda", 2048)]["forward_backward_s"]
        targets.append({"target": "triton fwd+bwd at L=2048 within 2x of mamba_ssm (time ratio <= 2)",
                        "value": value, "threshold": 2.0, "met": value <= 2.0})  # fmt: skip
    return targets


def _speedups(rows: list[dict], subject_name: str = SUBJECT) -> list[dict]:
    """Time of each other method divided by the subject's, per length."""
    subject = {r["length"]: r for r in rows if r["method"] == subject_name}
    return [
        {"length": r["length"], "method": r["method"],
         "forward": r["forward_s"] / subject[r["length"]]["forward_s"],
         "forward_backward": r["forward_backward_s"] / subject[r["length"]]["forward_backward_s"]}
        for r in rows if r["method"] != subject_name and r["length"] in subject
    ]  # fmt: skip


def _targets(rows: list[dict]) -> list[dict]:
    """Issue 4's acceptance figures, where this run measured what they need."""
    by = {(r["method"], r["length"]): r for r in rows}
    targets = []
    pure_torch = [r for r in rows if r["length"] == 2048 and r["method"] not in (SUBJECT, "baseline:per_step")]
    if (SUBJECT, 2048) in by and pure_torch:
        best = min(pure_torch, key=lambda r: r["forward_backward_s"])
        value = best["forward_backward_s"] / by[(SUBJECT, 2048)]["forward_backward_s"]
        name = f"fwd+bwd at L=2048 >= 4x faster than the best pure-PyTorch method ({best['method']})"
        targets.append({"target": name, "value": value, "threshold": 4.0, "met": value >= 4.0})
    if (SUBJECT, 512) in by and ("baseline:per_step", 512) in by:
        value = by[("baseline:per_step", 512)]["forward_backward_s"] / by[(SUBJECT, 512)]["forward_backward_s"]
        targets.append({"target": "fwd+bwd at L=512 >= 100x faster than the official per-step pattern",
                        "value": value, "threshold": 100.0, "met": value >= 100.0})  # fmt: skip
    if (SUBJECT, 2048) in by:
        value = by[(SUBJECT, 2048)]["forward_updates_per_s"]
        targets.append({"target": "forward >= 1e9 state updates/s at L=2048", "value": value, "threshold": 1e9,
                        "met": value >= 1e9})  # fmt: skip
    return targets


def _seconds(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def _mib(m: float | None) -> str:
    return "n/a" if m is None else f"{m:,.0f} MiB"


def format_table(result: dict) -> str:
    """The result of :func:`run` as Markdown tables (readable in a terminal too)."""
    cfg, machine = result["config"], result["machine"]
    lines = [
        f"Selective scan ({machine.get('gpu', 'CUDA') if cfg.get('device') == 'cuda' else 'CPU'}), B={cfg['batch']} "
        f"D={cfg['channels']} N={cfg['state']} {cfg['dtype']}, {cfg['options']}",
        f"{machine['cpu']}, {machine['logical_cpus']} logical CPUs; threads: torch {machine['torch_threads']}, "
        f"numba {machine['numba_threads']}; numba target {machine.get('numba_target', 'n/a')}; "
        f"torch {machine['torch']}, numba {machine['numba']}; {result['date']}",
        "",
        "| L | method | forward | fwd+bwd | forward updates/s | fwd+bwd updates/s | peak extra, forward "
        "| peak extra, fwd+bwd | runs (fwd, fwd+bwd) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['length']} | {r['method']} | {_seconds(r['forward_s'])} | {_seconds(r['forward_backward_s'])} "
            f"| {r['forward_updates_per_s']:.3g} | {r['forward_backward_updates_per_s']:.3g} "
            f"| {_mib(r['forward_peak_extra_mib'])} | {_mib(r['forward_backward_peak_extra_mib'])} "
            f"| {r['forward_runs']}, {r['forward_backward_runs']} |"
        )
    if result["speedups"]:
        lines += ["", f"Speed-up of {result.get('subject', SUBJECT)} (the other method's time / its time):", "",
                  "| L | over | forward | fwd+bwd |", "|---:|---|---:|---:|"]  # fmt: skip
        lines += [f"| {s['length']} | {s['method']} | {s['forward']:.1f}x | {s['forward_backward']:.1f}x |"
                  for s in result["speedups"]]  # fmt: skip
    if result["targets"]:
        lines += ["", f"Targets (issue {result.get('targets_issue', 4)}):"]
        lines += [f"- {t['target']}: {t['value']:.3g} ({'met' if t['met'] else 'NOT met'})" for t in result["targets"]]
    lines += ["", *[f"Note: {n}" for n in result["notes"]]]
    return "\n".join(lines)


if __name__ == "__main__":  # the memory-measuring child process started by run(); not a user interface
    if len(sys.argv) != 4 or sys.argv[1] != "--memory-child":
        sys.exit("usage: python -m ssamba.bench.scan --memory-child METHOD LENGTH (started by run(); use `ssamba "
                 "bench scan`)")  # fmt: skip
    print(json.dumps(_memory_child(sys.argv[2], int(sys.argv[3]))))
