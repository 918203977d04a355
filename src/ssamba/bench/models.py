"""Efficiency benchmark behind ``ssamba bench models``: batch-inference time and peak memory of SSAMBA and SSAST
against the number of input tokens (the SSAMBA paper's efficiency figures, Shams et al. 2024, section 4.3).

Shape glossary
    B  batch (2)         T  input frames          F  mel bins (128)        K  patch tokens = Fg * Tg
    Fg, Tg  patch grid (16x16 patches, stride 16: Fg = 8, Tg = T // 16, so K = T / 2)
    S  special tokens (SSAMBA 1, SSAST-distilled 2)        H  attention heads

Workload (the official script's): fbank input (B, T, 128), fp32, batch 2, ``ft_avgtok`` head (mean of the patch
tokens -> LayerNorm -> Linear to 527 classes), ``model.eval()`` under ``torch.no_grad()``; each model is built with
``input_tdim=T`` so that its position embedding covers the input. The official script walks T = 1024, 1536, ...
(steps of 512 frames) with five runs per size; the default here is a coarser grid to 22.5k tokens so that a CPU run
stays within minutes (``--frames 1024:45056:512`` is the official grid).

Variants, all measured in one run:
    SSAST  "explicit" (the published ``softmax(q k^T) v``: B*H*(K+S)^2 scores, quadratic memory) and "sdpa"
           (``scaled_dot_product_attention``, fused, no score matrix)
    SSAMBA every selective-scan backend that runs on the device (CPU: "cpu" fused numba kernels and "reference"
           pure PyTorch)

Method, per (size, variant): a fresh child process (``python -m ssamba.bench.models --child``) builds the model,
runs a small warm-up forward (JIT cache loads, thread pools, lazy imports), makes the input, then
    memory  CPU: with ``MALLOC_MMAP_THRESHOLD_=65536`` (every allocation of 64 KiB or more is its own mmap and goes
            back to the OS when freed), the peak-RSS mark is reset (``/proc/self/clear_refs``) after the model and
            the input exist; the first full-size forward runs; the figure is VmHWM minus the VmRSS before it: the
            forward's own activations, workspaces and output, not the weights or the input. Where clear_refs does
            not exist, ``ru_maxrss`` minus the RSS before the forward (valid in a fresh process whose earlier
            high-water mark is below that baseline). CUDA: ``max_memory_allocated`` minus ``memory_allocated``
            before the forward.
    time    that first forward is the warm-up at size; then malloc is set as glibc sets itself in a warm process
            (mmap threshold 32 MiB, trim threshold 64 MiB: see ``_steady_state_malloc``) and up to ``repeats``
            timed forwards run within the cell's time budget, median reported (a warm-up that alone exceeds the
            budget is the single timed run, measured under the memory setting). ``runs`` says how many were timed.
    guard   before a child starts, SSAST-explicit's score matrices (2 live copies of (B, H, K+S, K+S): scaled scores
            and softmax output) are compared with the memory limit (default 80% of MemAvailable); a size that
            cannot fit is recorded as "oom" without being run. The child caps its address space at its size after
            warm-up plus the limit (``RLIMIT_AS``, CPU), so an allocation past it fails inside the child and is
            recorded as "oom"; a child killed by SIGKILL (the kernel's OOM killer, which the child invites first via
            ``oom_score_adj``) is "oom" too. After an "oom", larger sizes of that variant are recorded as "oom"
            without running; after a forward slower than ``max_forward_s`` (its CPU time on the CPU), larger sizes are
            "skipped" (time).

Statuses: "ok", "oom", "error" (the message is in ``note``), "skipped" (not run: time limit).
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import ctypes.util
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ssamba.fields import typed_fields

__all__ = [
    "DEFAULT_FRAMES",
    "quick_config",
    "BenchConfig",
    "attention_bytes",
    "format_table",
    "parse_frames",
    "parse_size",
    "plot",
    "profile_forward",
    "ratios",
    "run",
    "targets",
    "write_csv",
]

DEFAULT_MODELS = ("ssamba_tiny", "ssast_tiny")
# tokens 512 ... 22528 (K = T / 2 for 16x16 patches of 128 mel bins)
DEFAULT_FRAMES = (1024, 2048, 4096, 8192, 16384, 24576, 32768, 45056)
QUICK_FRAMES = (128, 256)
QUICK_OVERRIDES = {"depth": 2}
NUM_CLASSES = 527  # the official script's AudioSet head (label_dim 527)
# --dtype: the weights' and input's dtype; "bf16-autocast" keeps them in float32 and runs the forward under
# torch.autocast(bfloat16) (GEMMs in bf16, SSAMBA's scan and conv kernels in float32), the opt-in mixed precision
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-autocast": torch.float32}
AUTOCAST = {"bf16-autocast": torch.bfloat16}
ATTENTION_VARIANTS = ("explicit", "sdpa")
STATUSES = ("ok", "oom", "error", "skipped")
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")
# time-per-token linearity window of the target (tokens)
LINEAR_FROM, LINEAR_TO = 4000, 22000


@dataclass
class BenchConfig:
    """What one ``run`` measures. Unknown keys in ``from_dict`` are errors."""

    # registry names (ssamba.list_models()); SSAMBA and SSAST families only
    models: tuple[str, ...] = DEFAULT_MODELS
    # input lengths in frames (tokens = Fg * Tg)
    frames: tuple[int, ...] = DEFAULT_FRAMES
    batch: int = 2
    device: str = "cpu"
    dtype: str = "fp32"
    # timed forwards per cell (after the warm-up forward at size), within budget_s
    repeats: int = 5
    # seconds of timed forwards per cell before the repeats stop early (at least one timed forward)
    budget_s: float = 60.0
    # a variant whose forward took longer than this (CPU time on the CPU, wall time on CUDA) is not run at larger
    # sizes (status "skipped"); None: no limit
    max_forward_s: float | None = None
    # SSAST attention implementations to measure
    attention: tuple[str, ...] = ATTENTION_VARIANTS
    # SSAMBA scan backends; None = every backend that runs on the device
    backends: tuple[str, ...] | None = None
    # model config overrides for every model (e.g. {"depth": 2} for a quick run)
    overrides: dict[str, Any] = field(default_factory=dict)
    # bytes one forward may use; None = 80% of MemAvailable when each cell starts (CPU) / free device memory (CUDA)
    mem_limit_bytes: int | None = None
    # intra-op threads of torch and numba in each child; None = the libraries' defaults
    threads: int | None = None
    # seconds before a child is abandoned (status "error")
    child_timeout_s: float = 3600.0
    # training instead of inference: model.train(), forward + backward of the summed logits into every parameter
    # (no optimizer step: the same for both models), timed per step; samples/s = batch / time
    train: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        for name in ("batch", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        bad = [a for a in self.attention if a not in ATTENTION_VARIANTS]
        if bad:
            raise ValueError(f"unknown attention variant(s) {bad}; choose from {ATTENTION_VARIANTS}")
        if not self.models:
            raise ValueError("no models to benchmark")
        if not self.frames or min(self.frames) < 16:
            raise ValueError(f"frames must be a non-empty list of lengths >= 16, got {self.frames}")
        from ssamba.models import check_overrides

        for name in self.models:  # the overrides go to every model: each must know every key
            self.overrides = check_overrides(name, self.overrides)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BenchConfig:
        return cls(**typed_fields(cls, values, "BenchConfig"))


def quick_config(**changes: Any) -> BenchConfig:
    """A run of seconds for a test or a smoke check: 2-layer models, T = 128 and 256 frames (64 and 128 tokens),
    2 timed runs, one thread; ``changes`` replace fields."""
    values: dict[str, Any] = {"frames": QUICK_FRAMES, "overrides": dict(QUICK_OVERRIDES), "repeats": 2,
                              "budget_s": 2.0, "threads": 1, "child_timeout_s": 600.0}  # fmt: skip
    values.update(changes)
    return BenchConfig.from_dict(values)


# ------------------------------------------------------------------------------------------------- parsing


def parse_frames(text: str) -> tuple[int, ...]:
    """"1024,2048" or "1024:45056:512" (start:stop:step, stop included) -> frame counts."""
    values: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if ":" in part:
            bits = part.split(":")
            if len(bits) != 3:
                raise ValueError(f"a frame range is start:stop:step, got {part!r}")
            start, stop, step = (int(b) for b in bits)
            if step < 1:
                raise ValueError(f"frame range step must be positive, got {part!r}")
            values += list(range(start, stop + 1, step))
        else:
            values.append(int(part))
    if not values:
        raise ValueError(f"no frame counts in {text!r}")
    return tuple(values)


def parse_size(text: str) -> int:
    """"512MiB", "2GiB", "1e9" or a plain byte count -> bytes."""
    units = {"k": 1e3, "m": 1e6, "g": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30, "b": 1}
    s = text.strip().lower()
    for unit in sorted(units, key=len, reverse=True):
        if s.endswith(unit) and s[: -len(unit)].strip():
            return int(float(s[: -len(unit)]) * units[unit])
    return int(float(s))


# ------------------------------------------------------------------------------------------------- helpers


def _meminfo_bytes(field_name: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _steady_state_malloc() -> bool:
    """Give glibc's malloc back the behaviour a long-running process has (True where that worked).

    The child starts with ``MALLOC_MMAP_THRESHOLD_=65536`` so that the memory figure sees every allocation. Left in
    force, it would also put an mmap + page faults + munmap into every allocation of the timed forwards, which a
    user's process does not pay: glibc raises its (dynamic) mmap threshold to the size of each mmapped block freed,
    up to 32 MiB, and its trim threshold to twice that, so after one forward its tensors come from the reused heap.
    Setting both to those limits gives that state for the timed forwards; tensors over 32 MiB stay mmapped, as
    they would there.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 64 << 20))
    except (OSError, AttributeError):  # not glibc: MALLOC_MMAP_THRESHOLD_ did nothing either
        return False


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _load_avg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def attention_bytes(batch: int, heads: int, seq_len: int, element_bytes: int) -> int:
    """Peak bytes of the explicit attention's score matrices: two (B, H, K+S, K+S) tensors are alive at once
    (the scaled scores and the softmax output; the unscaled product is freed as the scaled one is made)."""
    return 2 * batch * heads * seq_len * seq_len * element_bytes


@dataclass(frozen=True)
class _Variant:
    model: str
    family: str
    variant: str  # SSAST: attention implementation; SSAMBA: "bimamba_v2"
    backend: str | None  # SSAMBA: scan backend; SSAST: None

    @property
    def label(self) -> str:
        return f"{self.model}[{self.backend or self.variant}]"


def _probe(name: str, overrides: dict[str, Any]):
    """(family, config) of a registered model, built at a tiny input length."""
    import ssamba

    model = ssamba.create_model(name, input_tdim=16, **overrides)
    if getattr(model, "family", None) not in ("ssamba", "ssast"):
        raise ValueError(f"bench models measures SSAMBA and SSAST spectrogram models; {name!r} is "
                         f"{type(model).__name__}")  # fmt: skip
    return model.family, model.config


def _scan_backends(device: str, wanted: tuple[str, ...] | None) -> list[str]:
    import ssamba.ops  # noqa: F401  (registers the cpu / cuda backends)
    from ssamba.ops.selective_scan import available_backends, resolve_backend

    probe = torch.zeros(1, 1, 1, device=device) if device == "cpu" or torch.cuda.is_available() else None
    found = []
    # the reference last: it is the slow, faithful twin the others are compared with
    for name in wanted or sorted(available_backends(), key=lambda n: n == "reference"):
        if probe is None:
            break
        if name == "triton" and device == "cpu" and not wanted:
            continue  # runs on CPU tensors only under Triton's interpreter (TRITON_INTERPRET=1): a test tool, slow
        try:
            resolve_backend(probe, name)
        except ValueError:
            if wanted:
                raise ValueError(f"scan backend {name!r} cannot run on {device} here; available: "
                                 f"{', '.join(available_backends())}") from None  # fmt: skip
            continue
        found.append(name)
    return found


def _variants(cfg: BenchConfig) -> tuple[list[_Variant], dict[str, Any]]:
    variants, configs = [], {}
    for name in cfg.models:
        family, model_cfg = _probe(name, cfg.overrides)
        configs[name] = model_cfg
        if family == "ssast":
            variants += [_Variant(name, family, a, None) for a in cfg.attention]
        else:
            variants += [_Variant(name, family, "bimamba_v2", b) for b in _scan_backends(cfg.device, cfg.backends)]
    return variants, configs


def _tokens(model_cfg, frames: int) -> int:
    from ssamba.nn.patch import grid_size

    c = model_cfg
    f_grid, t_grid = grid_size(c.input_fdim, frames, c.fshape, c.tshape, c.fstride, c.tstride)
    return f_grid * t_grid


# ------------------------------------------------------------------------------------------------ the child


def _is_oom(error: BaseException, capped: bool = False) -> bool:
    """Whether a cell failed for want of memory. Under our own address-space cap (``capped``), oneDNN reports a
    failed allocation for a new primitive only as "could not create a primitive"."""
    if isinstance(error, MemoryError):
        return True
    oom_type = getattr(torch, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(error, oom_type):
        return True
    text = str(error).lower()
    return any(m in text for m in _OOM_MARKERS) or (capped and "could not create a primitive" in text)


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    """One (model, variant, size) cell, run in a fresh process; returns the measured fields."""
    try:  # be the kernel OOM killer's first choice rather than another process on a shared machine
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    import numba

    import ssamba
    from ssamba.ops import use_backend

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
        numba.set_num_threads(spec["threads"])
    device, dtype = torch.device(spec["device"]), DTYPES[spec["dtype"]]
    torch.manual_seed(0)
    overrides = dict(spec["overrides"])
    if spec["family"] == "ssast":
        overrides["attn_impl"] = spec["variant"]
    model = ssamba.create_model(spec["model"], input_tdim=spec["frames"], num_classes=NUM_CLASSES, pool="avgtok",
                                **overrides)  # fmt: skip
    model = model.train(spec["train"]).to(device=device, dtype=dtype)
    frames, fdim = spec["frames"], model.config.input_fdim

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    autocast = AUTOCAST.get(spec["dtype"])

    def forward(x: torch.Tensor) -> None:
        with (torch.set_grad_enabled(spec["train"]), use_backend(spec["backend"] or "auto"),
              torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None)):
            out = model(x)
            if spec["train"]:
                out.float().sum().backward()
                model.zero_grad(set_to_none=True)
        sync()

    result: dict[str, Any] = {"threads": torch.get_num_threads()}
    try:
        forward(torch.randn(spec["batch"], min(frames, 64), fdim, device=device, dtype=dtype))  # warm-up
        x = torch.randn(spec["batch"], frames, fdim, device=device, dtype=dtype)  # (B, T, F)
        gc.collect()
        if device.type == "cpu" and spec["mem_limit_bytes"] is not None:
            vm = _status_kib("VmSize") * 1024
            resource.setrlimit(resource.RLIMIT_AS, (vm + int(spec["mem_limit_bytes"]), resource.RLIM_INFINITY))
        # -- memory, during the warm-up forward at size
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            forward(x)
            first, first_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            peak = torch.cuda.max_memory_allocated(device) - base
        elif os.path.exists("/proc/self/clear_refs"):
            base = _status_kib("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            start, start_cpu = time.perf_counter(), time.process_time()
            forward(x)
            first, first_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            peak = (_status_kib("VmHWM") - base) * 1024
        else:
            base = _status_kib("VmRSS") if os.path.exists("/proc/self/status") else 0
            start, start_cpu = time.perf_counter(), time.process_time()
            forward(x)
            first, first_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base * 1024
        # -- time: wall clock (the figure) and this process's CPU time (all its threads; less sensitive to other
        # processes on a loaded machine, which only stretch the wall clock), with malloc as in a warm process
        if device.type == "cpu":
            result["steady_malloc"] = _steady_state_malloc()
        times: list[float] = []
        cpu_times: list[float] = []
        if first > spec["budget_s"]:
            times, cpu_times = [first], [first_cpu]
        else:
            while len(times) < spec["repeats"] and (not times or sum(times) < spec["budget_s"]):
                start, start_cpu = time.perf_counter(), time.process_time()
                forward(x)
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - start_cpu)
        result.update(status="ok", time_s=statistics.median(times), times_s=times,
                      cpu_time_s=statistics.median(cpu_times), peak_mem_bytes=int(peak))  # fmt: skip
    except Exception as e:  # noqa: BLE001 - every failure of the cell is recorded, not raised
        capped = device.type == "cpu" and spec["mem_limit_bytes"] is not None
        result.update(status="oom" if _is_oom(e, capped) else "error", note=f"{type(e).__name__}: {str(e)[:300]}")
    return result


def _run_child(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    env = {**os.environ, **_MALLOC_ENV}
    try:
        proc = subprocess.run([sys.executable, "-m", "ssamba.bench.models", "--child", json.dumps(spec)],
                              env=env, capture_output=True, text=True, timeout=timeout_s)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"status": "error", "note": f"child timed out after {timeout_s:.0f} s"}
    if proc.returncode == -9:
        return {"status": "oom", "note": "child killed by SIGKILL (presumably the kernel OOM killer)"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"status": "oom" if any(m in " ".join(tail).lower() for m in _OOM_MARKERS) else "error",
                "note": f"child exit {proc.returncode}: {' | '.join(tail)[:300]}"}  # fmt: skip
    return json.loads(lines[-1])


# -------------------------------------------------------------------------------------------------- driver


def _mem_limit(cfg: BenchConfig) -> int | None:
    if cfg.mem_limit_bytes is not None:
        return int(cfg.mem_limit_bytes)
    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info()
        return int(0.9 * free)
    available = _meminfo_bytes("MemAvailable")
    return None if available is None else int(0.8 * available)


def _estimate_bytes(v: _Variant, model_cfg, tokens: int, cfg: BenchConfig) -> int | None:
    """Bytes that certainly must exist during the forward, where it is known: SSAST-explicit's score matrices."""
    if v.family == "ssast" and v.variant == "explicit":
        element = torch.tensor([], dtype=DTYPES[cfg.dtype]).element_size()
        return attention_bytes(cfg.batch, model_cfg.num_heads, tokens + model_cfg.num_cls_tokens, element)
    return None


def machine_info(device: str) -> dict[str, Any]:
    model = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    info: dict[str, Any] = {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "mem_total_bytes": _meminfo_bytes("MemTotal"),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run(cfg: BenchConfig | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure every variant at every size (see the module docstring); one JSON-ready dict with ``device``,
    ``torch``, ``rows``, ``ratios``, ``targets``, ``config``, ``machine``, ``load_avg`` and ``notes``."""
    cfg = cfg or BenchConfig()
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch.cuda.is_available() is False here")
    say = log or (lambda message: None)
    variants, configs = _variants(cfg)
    load_start = _load_avg()
    stopped: dict[_Variant, dict[str, Any]] = {}  # variant -> status/note for every larger size
    rows: list[dict[str, Any]] = []
    for frames in sorted(set(cfg.frames)):
        for v in variants:
            model_cfg = configs[v.model]
            tokens = _tokens(model_cfg, frames)
            row: dict[str, Any] = {
                "model": v.model, "variant": v.variant, "backend": v.backend, "tokens": tokens, "frames": frames,
                "batch": cfg.batch, "dtype": cfg.dtype, "time_s": None, "peak_mem_bytes": None, "status": None,
                "runs": 0, "load_avg": _load_avg(),
            }  # fmt: skip
            limit = _mem_limit(cfg)
            estimate = _estimate_bytes(v, model_cfg, tokens, cfg)
            # a predicted oom is reported even where a time limit had stopped the variant: it is the stronger reason
            if estimate is not None and limit is not None and estimate > limit:
                row.update(status="oom", note=f"not run: the score matrices alone need {estimate / 2**30:.1f} GiB, "
                                              f"over the {limit / 2**30:.1f} GiB limit")  # fmt: skip
            elif v in stopped:
                row.update(stopped[v])
            else:
                say(f"{v.label} T={frames} ({tokens} tokens): running")
                spec = {**asdict(cfg), "model": v.model, "family": v.family, "variant": v.variant,
                        "backend": v.backend, "frames": frames, "mem_limit_bytes": limit}  # fmt: skip
                spec = {k: val for k, val in spec.items() if k not in ("models", "attention", "backends")}
                measured = _run_child(spec, cfg.child_timeout_s)
                row.update(measured)
                row["runs"] = len(measured.get("times_s", []))
                say(f"{v.label} T={frames}: {row['status']}"
                    + (f", {row['time_s']:.3g} s, {row['peak_mem_bytes'] / 2**20:.0f} MiB" if row["status"] == "ok"
                       else f" ({row.get('note', '')})"))  # fmt: skip
            if v not in stopped:
                if row["status"] == "oom":
                    stopped[v] = {"status": "oom", "note": f"not run: out of memory at {tokens} tokens already"}
                elif row["status"] == "ok" and cfg.max_forward_s is not None:
                    # CPU time on the CPU (other processes stretch the wall clock, not it); wall time on CUDA
                    took = row.get("cpu_time_s") if cfg.device == "cpu" else row["time_s"]
                    if took is not None and took > cfg.max_forward_s:
                        stopped[v] = {"status": "skipped",
                                      "note": f"not run: a forward took {took:.0f} s at {tokens} tokens, over "
                                              f"max_forward_s={cfg.max_forward_s:g}"}  # fmt: skip
            rows.append(row)
    memory_method = (
        "CUDA max_memory_allocated - memory_allocated before the forward" if cfg.device == "cuda" else
        "fresh child process per cell; VmHWM - VmRSS around the first full-size forward (peak reset by "
        "/proc/self/clear_refs, MALLOC_MMAP_THRESHOLD_=65536); ru_maxrss where clear_refs is missing"
    )  # fmt: skip
    pair_ratios = ratios(rows)
    return {
        "benchmark": "SSAMBA vs SSAST batch inference",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": cfg.device,
        "torch": torch.__version__,
        "config": {**asdict(cfg), "num_classes": NUM_CLASSES, "pool": "avgtok"},
        "machine": machine_info(cfg.device),
        "memory_method": memory_method,
        "load_avg": {"start": load_start, "end": _load_avg()},
        "rows": rows,
        "ratios": pair_ratios,
        "targets": targets(rows, pair_ratios),
        "notes": [
            "tokens = patch tokens (16x16 patches); SSAMBA adds 1 cls token, SSAST-distilled 2 special tokens",
            "time_s: median of `runs` timed forwards (no grad, eval) after a warm-up forward at the same size",
            "peak_mem_bytes: " + memory_method,
            "oom rows marked 'not run' are predicted (score matrices vs the limit) or follow an oom at a smaller size",
            "load_avg (1, 5, 15 min) is recorded per row: other processes on the machine add noise",
        ],
    }


# ------------------------------------------------------------------------------------------- ratios, targets


def _pair_key(name: str) -> str:
    return name.split("_", 1)[1] if "_" in name else name


def ratios(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """SSAMBA / SSAST ratios at every size where both completed: each SSAMBA row against each SSAST row of the
    same token count and preset size (``ssamba_tiny`` with ``ssast_tiny``; every SSAST model when no size
    matches). ``speedup`` = SSAST time / SSAMBA time; ``memory_fraction`` = SSAMBA peak / SSAST peak;
    reductions in percent as the paper states them (1 - SSAMBA/SSAST)."""
    ok = [r for r in rows if r["status"] == "ok"]
    ssamba_rows = [r for r in ok if r["variant"] == "bimamba_v2"]
    ssast_rows = [r for r in ok if r["variant"] in ATTENTION_VARIANTS]
    out = []
    for a in ssamba_rows:
        same_size = [s for s in ssast_rows if _pair_key(s["model"]) == _pair_key(a["model"])]
        for s in same_size or ssast_rows:
            if s["tokens"] != a["tokens"] or s["batch"] != a["batch"] or s["dtype"] != a["dtype"]:
                continue
            mem = (a["peak_mem_bytes"] / s["peak_mem_bytes"]) if s["peak_mem_bytes"] else None
            out.append({
                "tokens": a["tokens"], "frames": a["frames"],
                "ssamba": f"{a['model']}[{a['backend']}]", "ssast": f"{s['model']}[{s['variant']}]",
                "speedup": s["time_s"] / a["time_s"],
                "cpu_speedup": (s["cpu_time_s"] / a["cpu_time_s"]) if s.get("cpu_time_s") and a.get("cpu_time_s")
                else None,
                "time_reduction_pct": 100.0 * (1.0 - a["time_s"] / s["time_s"]),
                "memory_fraction": mem,
                "memory_reduction_pct": None if mem is None else 100.0 * (1.0 - mem),
            })  # fmt: skip
    return out


def targets(rows: Sequence[dict[str, Any]], pair_ratios: Sequence[dict[str, Any]] | None = None,
            subject: str = "ssamba_tiny", baseline: str = "ssast_tiny") -> list[dict[str, Any]]:  # fmt: skip
    """Issue 7's acceptance figures, where the rows hold what they need (fp32, batch 2 is the issue's setting).

    1. At the largest size where ``baseline`` (explicit attention) completed: ``subject`` >= 5x faster and
       <= 1/20 of its peak memory (for every SSAMBA backend measured).
    2. ``subject`` completes at >= 22k tokens and its time per token stays within +-25% of the mean time per
       token over the rows from 4k to 22k tokens (inclusive; the largest measured size >= 22k counts as 22k).
    """
    pair_ratios = ratios(rows) if pair_ratios is None else pair_ratios
    out = []
    explicit = [r for r in rows if r["model"] == baseline and r["variant"] == "explicit" and r["status"] == "ok"]
    backends = sorted({r["backend"] for r in rows if r["model"] == subject and r["backend"]})
    if explicit:
        largest = max(r["tokens"] for r in explicit)
        for backend in backends:
            match = [p for p in pair_ratios if p["tokens"] == largest and p["ssamba"] == f"{subject}[{backend}]"
                     and p["ssast"] == f"{baseline}[explicit]"]  # fmt: skip
            if not match:
                out.append({"target": f"{subject}[{backend}] vs {baseline}[explicit] at {largest} tokens",
                            "value": None, "threshold": None, "met": False,
                            "note": f"{subject}[{backend}] did not complete at {largest} tokens"})  # fmt: skip
                continue
            p = match[0]
            out.append({"target": f"{subject}[{backend}] >= 5x faster than {baseline}[explicit] at its largest "
                                  f"completed size ({largest} tokens)",
                        "value": p["speedup"], "threshold": 5.0, "met": p["speedup"] >= 5.0})  # fmt: skip
            frac = p["memory_fraction"]
            out.append({"target": f"{subject}[{backend}] peak memory <= 1/20 of {baseline}[explicit] at "
                                  f"{largest} tokens",
                        "value": frac, "threshold": 1 / 20, "met": frac is not None and frac <= 1 / 20})  # fmt: skip
    for backend in backends:
        done = [r for r in rows if r["model"] == subject and r["backend"] == backend and r["status"] == "ok"]
        if not done:
            continue
        top = max(r["tokens"] for r in done)
        out.append({"target": f"{subject}[{backend}] completes at >= 22k tokens", "value": top,
                    "threshold": LINEAR_TO, "met": top >= LINEAR_TO})  # fmt: skip
        window = [r for r in done if LINEAR_FROM <= r["tokens"] <= max(LINEAR_TO, top if top >= LINEAR_TO else 0)]
        if top >= LINEAR_TO and len(window) >= 2:
            per_token = [r["time_s"] / r["tokens"] for r in window]
            mean = statistics.fmean(per_token)
            worst = max(abs(t / mean - 1.0) for t in per_token)
            target = {"target": f"{subject}[{backend}] time per token within +-25% from 4k to 22k tokens "
                                f"(largest deviation from the mean over {len(window)} sizes)",
                      "value": worst, "threshold": 0.25, "met": worst <= 0.25,
                      "per_token_s": {r["tokens"]: t for r, t in zip(window, per_token, strict=True)}}  # fmt: skip
            if all(r.get("cpu_time_s") for r in window):  # the same on CPU time, less sensitive to machine load
                cpu = [r["cpu_time_s"] / r["tokens"] for r in window]
                target["cpu_time_deviation"] = max(abs(t / statistics.fmean(cpu) - 1.0) for t in cpu)
            out.append(target)
    return out


# ---------------------------------------------------------------------------------------------- reporting


def _seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def _bytes(b: int | float | None) -> str:
    if b is None:
        return "-"
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:,.1f} MiB"


def _fraction(f: float | None) -> str:
    if f is None:
        return "-"
    return f"{f:.3g} (1/{1 / f:.1f})" if 0 < f < 1 else f"{f:.3g}"


def format_table(result: dict[str, Any]) -> str:
    """The result of :func:`run` as Markdown tables (readable in a terminal too)."""
    cfg, machine, load = result["config"], result["machine"], result["load_avg"]
    threads = {r.get("threads") for r in result["rows"] if r.get("threads")}
    lines = [
        f"SSAMBA vs SSAST {'training steps' if cfg.get('train') else 'batch inference'} on {result['device']}: "
        f"batch {cfg['batch']}, {cfg['dtype']}, ft_avgtok head ({NUM_CLASSES} classes), "
        + ("train mode, forward + backward of the summed logits (no optimizer step); "
           if cfg.get("train") else "no grad; ") + f"torch {result['torch']}; {result['date']}",
        f"{machine.get('gpu') or machine['cpu']}, {machine['logical_cpus']} logical CPUs, threads per child: "
        f"{', '.join(map(str, sorted(threads))) or '-'}; load average at start {load['start']}, end {load['end']}",
        f"model overrides: {cfg['overrides'] or 'none'}; up to {cfg['repeats']} timed runs per cell "
        f"within {cfg['budget_s']:g} s",
        f"peak memory: {result['memory_method']}",
        "",
        "| tokens | frames | model | variant | backend | time (median) | samples/s | CPU time | runs | peak memory "
        "| status | load (1 min) |",
        "|---:|---:|---|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in result["rows"]:
        status = r["status"] + (f" ({r['note']})" if r.get("note") and r["status"] != "ok" else "")
        load1 = r["load_avg"][0] if r.get("load_avg") else "-"
        lines.append(f"| {r['tokens']} | {r['frames']} | {r['model']} | {r['variant']} | {r['backend'] or '-'} "
                     f"| {_seconds(r['time_s'])} "
                     f"| {'-' if not r.get('time_s') else format(cfg['batch'] / r['time_s'], '.3g')} "
                     f"| {_seconds(r.get('cpu_time_s'))} "
                     f"| {r['runs']} | {_bytes(r['peak_mem_bytes'])} | {status} "
                     f"| {load1} |")  # fmt: skip
    if result["ratios"]:
        lines += ["", "SSAMBA / SSAST at every size both completed (speed-up = SSAST time / SSAMBA time):", "",
                  "| tokens | SSAMBA | SSAST | speed-up | time reduction | speed-up (CPU time) | memory fraction "
                  "| memory reduction |",
                  "|---:|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for p in result["ratios"]:
            frac = _fraction(p["memory_fraction"])
            red = "-" if p["memory_reduction_pct"] is None else f"{p['memory_reduction_pct']:.1f}%"
            lines.append(f"| {p['tokens']} | {p['ssamba']} | {p['ssast']} | {p['speedup']:.2f}x "
                         f"| {p['time_reduction_pct']:.1f}% "
                         f"| {'-' if p.get('cpu_speedup') is None else format(p['cpu_speedup'], '.2f') + 'x'} "
                         f"| {frac} | {red} |")  # fmt: skip
    if result["targets"]:
        lines += ["", "Targets (issue 7):"]
        for t in result["targets"]:
            value = "-" if t["value"] is None else f"{t['value']:.3g}"
            lines.append(f"- {t['target']}: {value} ({'met' if t['met'] else 'NOT met'})"
                         + (f"; on CPU time: {t['cpu_time_deviation']:.3g}" if "cpu_time_deviation" in t else "")
                         + (f"; {t['note']}" if t.get("note") else ""))  # fmt: skip
    lines += ["", *[f"Note: {n}" for n in result["notes"]]]
    return "\n".join(lines)


CSV_FIELDS = ("model", "variant", "backend", "tokens", "frames", "batch", "dtype", "time_s", "runs",
              "peak_mem_bytes", "status", "note")  # fmt: skip


def write_csv(result: dict[str, Any], path: str | Path) -> Path:
    """One line per row of :func:`run` (the fields of ``CSV_FIELDS``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in result["rows"]:
            writer.writerow({k: r.get(k) for k in CSV_FIELDS})
    return path


def plot(result: dict[str, Any], path: str | Path) -> Path:
    """Time vs tokens and peak memory vs tokens, one line per model variant (the paper's two efficiency
    figures side by side, with the CPU time between them when the rows have it); variants that ran out of
    memory end at their last completed size, marked "x".
    Needs matplotlib (``pip install 'ssamba[plot]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plotting needs matplotlib: pip install 'ssamba[plot]'") from e
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    has_cpu = any(r.get("cpu_time_s") for r in result["rows"])
    fig, axes = plt.subplots(1, 3 if has_cpu else 2, figsize=(16 if has_cpu else 11, 4.2))
    ax_t, ax_m = axes[0], axes[-1]
    ax_c = axes[1] if has_cpu else None
    lines: dict[str, list[dict[str, Any]]] = {}
    for r in result["rows"]:
        lines.setdefault(f"{r['model']} [{r['backend'] or r['variant']}]", []).append(r)
    for label, rs in lines.items():
        done = sorted((r for r in rs if r["status"] == "ok"), key=lambda r: r["tokens"])
        if not done:
            continue
        oom = any(r["status"] == "oom" for r in rs)
        name = label + (" (OOM beyond)" if oom else "")
        tokens = [r["tokens"] for r in done]
        (line,) = ax_t.plot(tokens, [r["time_s"] for r in done], marker="o", ms=3, label=name)
        ax_m.plot(tokens, [r["peak_mem_bytes"] / 2**30 for r in done], marker="o", ms=3, color=line.get_color())
        if ax_c is not None and all(r.get("cpu_time_s") for r in done):
            ax_c.plot(tokens, [r["cpu_time_s"] for r in done], marker="o", ms=3, color=line.get_color())
        if oom:
            ax_t.plot(tokens[-1], done[-1]["time_s"], "x", ms=9, color=line.get_color())
            ax_m.plot(tokens[-1], done[-1]["peak_mem_bytes"] / 2**30, "x", ms=9, color=line.get_color())
    ax_t.set(xlabel="input tokens", ylabel="batch inference time (s)", title="Inference time")
    ax_m.set(xlabel="input tokens", ylabel="peak memory (GiB)", title="Peak memory of the forward")
    if ax_c is not None:
        ax_c.set(xlabel="input tokens", ylabel="CPU time of the process (s)",
                 title="CPU time (insensitive to other processes' load)")  # fmt: skip
    for ax in axes:
        ax.grid(alpha=0.3)
    ax_t.legend(fontsize=8)
    cfg = result["config"]
    fig.suptitle(f"{result['device']}, batch {cfg['batch']}, {cfg['dtype']}, {result['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- profiling

_PROFILE_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("projections (in/x/dt/out_proj, head)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear",
                                              "mkldnn::_linear_pointwise")),
    ("causal conv1d", ("convolution", "ssamba::causal_conv1d")),
    ("norms", ("layer_norm",)),
    ("flips / gathers", ("aten::flip", "aten::gather", "aten::index")),
    ("copies / layout (contiguous, to, fill)", ("aten::copy_", "aten::clone", "aten::fill_", "aten::zero_",
                                                 "aten::_to_copy", "aten::cat")),  # fmt: skip
    ("elementwise (silu, add, div, exp, ...)", ("aten::silu", "aten::add", "aten::div", "aten::mul", "aten::exp",
                                                "aten::neg", "aten::softplus", "aten::sum", "aten::mean",
                                                "ssamba::gate")),  # fmt: skip
)
SCAN_RANGE = "ssamba::selective_scan"
SCAN_KERNEL = "selective scan: kernel (numba) and Python"
SCAN_GLUE = "selective scan: backend glue ops (casts, layouts)"


def profile_forward(model: str = "ssamba_tiny", frames: int = 8192, batch: int = 2, backend: str = "cpu",
                    overrides: dict[str, Any] | None = None, threads: int | None = None,
                    train: bool = False) -> dict[str, Any]:  # fmt: skip
    """Where one SSAMBA forward (``train``: forward + backward of the summed logits, in train mode) spends its
    time, from ``torch.profiler`` (in this process). The scan's backward (the autograd node of the numba kernel)
    counts as the scan kernel.

    Every aten op's self time is attributed to the selective scan's glue when it runs inside a ``selective_scan``
    call (the record_function range ``ssamba::selective_scan``), else to a category by op name; the range's own
    time (outside every op inside it) is the numba kernel and the backend's Python. ``unprofiled`` is wall time
    outside every op (Python)."""
    import ssamba
    from ssamba.ops import use_backend

    if threads:
        import numba

        torch.set_num_threads(threads)
        numba.set_num_threads(threads)  # numba's kernels have a pool of their own (a second OpenMP runtime)
    torch.manual_seed(0)
    net = ssamba.create_model(model, input_tdim=frames, num_classes=NUM_CLASSES, **(overrides or {})).train(train)
    x = torch.randn(batch, frames, net.config.input_fdim)

    def step() -> None:
        out = net(x)
        if train:
            out.sum().backward()
            net.zero_grad(set_to_none=True)

    with torch.set_grad_enabled(train), use_backend(backend):
        step()  # warm-up at size
        start = time.perf_counter()
        step()
        plain = time.perf_counter() - start
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            step()
            wall = time.perf_counter() - start
    seconds: dict[str, float] = {SCAN_KERNEL: 0.0, SCAN_GLUE: 0.0}
    seconds.update({name: 0.0 for name, _ in _PROFILE_CATEGORIES})
    seconds["other ops"] = 0.0
    calls: dict[str, int] = dict.fromkeys(seconds, 0)
    for event in prof.events():
        parent, in_scan = event, False
        while parent is not None:
            if parent.name == SCAN_RANGE:
                in_scan = True
                break
            parent = parent.cpu_parent
        if event.name == SCAN_RANGE or "_SelectiveScanFn" in event.name:
            # the kernels run in the range's own time (no grad) or in the autograd nodes' (forward and backward)
            category = SCAN_KERNEL
        elif in_scan:
            category = SCAN_GLUE
        else:
            category = next((name for name, keys in _PROFILE_CATEGORIES if any(k in event.name for k in keys)),
                            "other ops")  # fmt: skip
        seconds[category] += event.self_cpu_time_total / 1e6
        # a scan call is one range (forward) or one backward node; the node's other events are parts of them
        calls[category] += category != SCAN_KERNEL or event.name in (SCAN_RANGE, "_SelectiveScanFnBackward")
    seconds["unprofiled (Python between ops)"] = max(0.0, wall - sum(seconds.values()))
    calls["unprofiled (Python between ops)"] = 0
    return {"model": model, "frames": frames, "tokens": _tokens(net.config, frames), "batch": batch, "train": train,
            "backend": backend, "threads": torch.get_num_threads(), "wall_s": wall, "unprofiled_wall_s": plain,
            "breakdown": [{"part": k, "seconds": s, "share": s / wall, "calls": calls[k]} for k, s in
                          seconds.items()], "load_avg": _load_avg()}  # fmt: skip


def format_profile(result: dict[str, Any]) -> str:
    lines = [
        f"{result['model']} {'forward + backward' if result.get('train') else 'forward'}, {result['tokens']} tokens "
        f"(T={result['frames']}), batch {result['batch']}, "
        f"scan backend {result['backend']}, {result['threads']} threads: {result['wall_s']:.3g} s under the "
        f"profiler ({result['unprofiled_wall_s']:.3g} s without); load average {result['load_avg']}",
        "",
        "| part | time | share | ops |",
        "|---|---:|---:|---:|",
    ]
    for b in result["breakdown"]:
        lines.append(f"| {b['part']} | {_seconds(b['seconds'])} | {100 * b['share']:.1f}% | {b['calls']} |")
    return "\n".join(lines)


if __name__ == "__main__":  # the measuring child process started by run(); not a user interface
    parser = argparse.ArgumentParser(prog="python -m ssamba.bench.models", description="child of `ssamba bench "
                                     "models` (use that command)")  # fmt: skip
    parser.add_argument("--child", required=True, help="JSON cell spec")
    child_spec = json.loads(parser.parse_args().child)
    print(json.dumps(_child(child_spec)))
