import os
from pathlib import Path

import pytest
import torch

# Triton's interpreter for the triton scan backend (tests/test_scan_triton.py) on machines without a CUDA device:
# Triton reads TRITON_INTERPRET when @triton.jit decorates a kernel (triton.knobs.runtime.interpret, in
# triton/runtime/jit.py), i.e. when ssamba.ops.scan_triton is first imported, by whichever module imports
# ssamba.ops first. pytest imports this file before any test module, so this is the one place that is early enough
# for the whole session (an environment variable set in a fixture or in the test module would be too late once
# another module has imported ssamba). With a CUDA device the kernels compile for it and the same tests run on CUDA
# tensors; an explicit TRITON_INTERPRET (0 or 1) in the environment is left alone.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# ../shared/conformance beside the checkout (CI always has it; a user's clone may not).
CONFORMANCE = Path(__file__).resolve().parents[2] / "shared" / "conformance"


def conformance_dir(name: str) -> Path:
    path = CONFORMANCE / name
    if not (path / "config.json").exists():
        pytest.skip(f"official-code fixture {path} is absent (it ships beside the repository as shared/conformance)")
    return path


# Tolerances, stated once with their reasons. u = 2^-24 ~ 6e-8 is the float32 unit roundoff. No test compares
# float32 results computed on another machine bit for bit: torch picks its GEMM, FFT and reduction kernels per CPU
# (AVX2, AVX-512, AMX, ARM) and per shape, so the summation order, and with it the last bits, differ. A test is
# exact only where both sides run here through the same kernels (saved and reloaded weights on one input; a
# dispatcher against the backend it dispatches to).
#
# Same float32 computation, other batch shape / padding / kernel (a padded batch against each item alone, SDPA
# against explicit attention): each GEMM output differs by O(u sqrt(K)) relative to its inputs' norm (K <= 256
# here), a few layers deep on O(1) activations, so ~1e-6; 1e-5 (~170 u) leaves a tenfold margin.
FP32_REORDER = {"rtol": 1e-5, "atol": 1e-5}
# The same through a waveform CNN (HuBERT: 7 convolutions over 1e3-1e4 samples, group norm over time) and a
# Conformer or Mamba stack: longer reductions (K up to ~5e3) and norms that divide by small variances, ~4x more.
FP32_REORDER_DEEP = {"rtol": 1e-4, "atol": 2e-5}
# Model conformance (official fixtures, ../shared/conformance): the float32 official outputs were made on one
# CPU; the same model here differs by reordered float32 sums only (max 1.7e-6 measured on an Intel Xeon with AMX,
# 1e-6 on AMD EPYC): the project's stated 1e-5.
CONFORMANCE_ATOL = 1e-5


# The numerics-sensitive modules (features, scan kernels, mixers, models, losses, conformance replay): the
# README's test command runs them once more under restricted CPU profiles (scripts/numerics.sh), standing in
# for the CPUs CI does not have.
NUMERICS_MODULES = {"test_cpu_math", "test_gemm_cpu", "test_features", "test_scan_cpu", "test_conv_cpu",
                    "test_mamba_inner_cpu", "test_selective_scan", "test_mamba", "test_models", "test_conformance",
                    "test_masking", "test_hubert"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in NUMERICS_MODULES:
            item.add_marker(pytest.mark.numerics)


def one_error_line(err: str) -> str:
    """stderr of a command that failed on the user's input or a diverged run: one line, no traceback."""
    assert err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err, err
    return err


def assert_stopped_by_divergence(run, err: str) -> tuple[dict, dict]:
    """The non-finite guard's contract for a run with train.max_bad_steps=2 that diverged: one stderr line naming
    the cause and the last good checkpoint, both skipped steps logged and counted, nothing written after the
    divergence. Returns that checkpoint's (tensors, state)."""
    import json

    from ssamba.train.checkpoint import latest_checkpoint, load_checkpoint

    one_error_line(err)
    assert "training diverged: 2 skipped steps in a row" in err and "non-finite loss" in err
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    skipped = [m for m in metrics if m.get("skipped")]
    assert [m["skipped_steps"] for m in skipped] == [1, 2] and all("non-finite loss" in m["reason"] for m in skipped)
    good = [m["step"] for m in metrics if "loss" in m]
    last = latest_checkpoint(run / "checkpoints")
    assert good and last.name == f"step_{good[-1]:08d}" and str(last) in err
    return load_checkpoint(last)
