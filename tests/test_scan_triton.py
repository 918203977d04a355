"""The ``triton`` selective-scan backend (ssamba.ops.scan_triton) against the float64 oracle (tests/scan_oracle.py):
outputs, last state and all eight gradients; and an SSAMBA-tiny forward + backward against the reference backend.

Where the kernels run: without a CUDA device, under Triton's interpreter on CPU tensors (numpy, one program after
another). Triton reads TRITON_INTERPRET when ``@triton.jit`` decorates the kernels, i.e. when ssamba.ops is first
imported, so it must be set before any test module imports ssamba: tests/conftest.py sets it (pytest imports it
before every test module) unless the environment already says 0 or 1. With a CUDA device the kernels compile and the
same tests run on CUDA tensors. Without triton installed (``pip install 'ssamba[triton]'``) every kernel test skips,
saying so; the test that ssamba then imports and refuses the backend clearly still runs.

Shape glossary: B batch, D channels, L length, N state size, G groups of B/C (0 = B/C as (B, N, L), no group axis).

Tolerances: tests/scan_oracle.py (RTOL, with reasons): float64 1e-12, float32 2e-5, bfloat16 2e-2 against the
oracle on bf16-rounded inputs (float16 5e-3 likewise); worst observed under the interpreter at these shapes:
1.1e-15, 4.6e-7, 7.3e-3 (float16 4.8e-4).

The shapes are small because the interpreter costs about 10 ms per program and step (forward + backward) on one
core; every feature is covered at least once: L in {1, 7, 40, 64, 129, 300}, B/C with no group axis, G = 1 and 2,
B and C grouped differently and strided, several channel blocks per group, N below a power of two, with and
without D, z and delta_bias, softplus on and off and above its threshold, float32, bfloat16, float64 and float16.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import ssamba
from ssamba.ops import scan_triton
from ssamba.ops.selective_scan import ENV_VAR, available_backends, resolve_backend, selective_scan
from tests.scan_oracle import NAMES, check_backend, make_inputs, scan_float64

if scan_triton.triton is None:
    DEVICE, SKIP = None, "triton is not installed (pip install 'ssamba[triton]'), so the triton backend cannot run"
elif scan_triton.INTERPRETED:
    DEVICE, SKIP = "cpu", None
elif torch.cuda.is_available():
    DEVICE, SKIP = "cuda", None
else:
    DEVICE, SKIP = None, ("the triton kernels were compiled for a GPU, not interpreted (TRITON_INTERPRET was not 1 "
                          "when ssamba.ops was first imported), and there is no CUDA device")  # fmt: skip
needs_kernels = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")

F32, BF16, F64, F16 = torch.float32, torch.bfloat16, torch.float64, torch.float16
# (batch, D, L, N, groups, with_d, with_z, with_bias, softplus, dtypes)
CASES = [
    pytest.param(2, 4, 1, 16, 0, True, True, True, True, (F32, BF16, F64), id="L1-full"),
    pytest.param(2, 4, 7, 8, 1, False, False, False, False, (F32, BF16, F64, F16), id="L7-G1-bare"),
    pytest.param(2, 8, 64, 16, 2, True, True, False, True, (F32, BF16), id="L64-G2"),  # 2 blocks, one per group
    pytest.param(1, 6, 129, 5, 0, True, False, True, True, (F32, F64), id="L129-N5-3blocks"),  # a group over 3 blocks
    pytest.param(2, 4, 300, 16, 0, True, True, True, True, (F32, BF16), id="L300-full"),
    pytest.param(1, 4, 300, 4, 2, False, True, True, False, (F32,), id="L300-G2-noD"),
]


@needs_kernels
@pytest.mark.parametrize("batch,dim,seqlen,nstate,groups,with_d,with_z,with_bias,softplus,dtypes", CASES)
def test_matches_float64(batch, dim, seqlen, nstate, groups, with_d, with_z, with_bias, softplus, dtypes):
    inputs = make_inputs(batch, dim, seqlen, nstate, groups, with_d=with_d, with_z=with_z, with_bias=with_bias,
                         softplus=softplus, seed=seqlen)  # fmt: skip
    for dtype in dtypes:
        check_backend("triton", dtype, inputs, softplus, device=DEVICE, round_inputs=dtype in (BF16, F16))


@needs_kernels
def test_softplus_threshold():
    """delta + bias above 20 passes through softplus unchanged, with gradient 1, as torch's softplus."""
    inputs = make_inputs(2, 2, 40, 16, 0, with_d=True, with_z=True, with_bias=True, softplus=True, seed=7,
                         big_delta=True)  # fmt: skip
    check_backend("triton", F32, inputs, softplus=True, device=DEVICE)


@needs_kernels
def test_strided_and_mixed_b_c_layouts():
    """B shared by all channels (B, N, L) while C is grouped (B, G, N, L), both strided views of one larger tensor
    (as the mixers' x_proj output split into dt, B, C), in float64 where any mismatch is a bug, not rounding."""
    batch, dim, seqlen, nstate = 2, 4, 20, 16
    inputs = make_inputs(batch, dim, seqlen, nstate, 0, with_d=True, with_z=True, with_bias=True, softplus=True,
                         seed=3)  # fmt: skip
    g = torch.Generator().manual_seed(5)
    x_dbl = torch.randn(batch, 3 * nstate, seqlen, generator=g, dtype=F64)  # (B, 3N, L): [B | C group 0 | C group 1]
    b_view, c_view = x_dbl[:, :nstate], x_dbl[:, nstate:].unflatten(1, (2, nstate))  # (B, N, L), (B, 2, N, L)
    assert not b_view.is_contiguous() and not c_view.is_contiguous()
    inputs["B"], inputs["C"] = b_view.requires_grad_(), c_view.requires_grad_()
    # check_backend moves inputs to the device (a copy there): on the CPU they stay views
    check_backend("triton", F64, inputs, softplus=True, device=DEVICE)


@needs_kernels
def test_last_state_only_and_no_grad_path():
    """A loss on the last state alone (the output's gradient is None in the backward) gives the float64 gradients;
    without autograd the forward skips the checkpoints but gives the same numbers."""
    inputs = make_inputs(1, 2, 70, 16, 0, with_d=True, with_z=True, with_bias=False, softplus=True, seed=2)
    present = [k for k in NAMES if inputs[k] is not None]
    _, ref_last = scan_float64(*inputs.values(), True)
    want = torch.autograd.grad(ref_last.sum(), [inputs[k] for k in present], allow_unused=True)
    args = {k: None if v is None else v.detach().to(DEVICE).requires_grad_() for k, v in inputs.items()}
    out, last = selective_scan(*args.values(), delta_softplus=True, return_last_state=True, backend="triton")
    got = torch.autograd.grad(last.sum(), [args[k] for k in present], allow_unused=True)
    for name, a, b in zip(present, got, want, strict=True):
        if b is None:  # D and z do not reach the state
            assert a is None or not a.abs().max() > 0, name
        else:
            torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-12, msg=name)
    with torch.no_grad():
        out_ng, last_ng = selective_scan(*args.values(), delta_softplus=True, return_last_state=True,
                                         backend="triton")  # fmt: skip
    # exact by construction under the interpreter: the same arithmetic, the grad path only also stores checkpoints;
    # compiled, the two are separate specialisations of the kernel, which the compiler may schedule differently
    exact = {"rtol": 0, "atol": 0} if DEVICE == "cpu" else {"rtol": 1e-12, "atol": 1e-14}
    torch.testing.assert_close(out_ng, out.detach(), **exact)
    torch.testing.assert_close(last_ng, last.detach(), **exact)


@needs_kernels
def test_dispatch(monkeypatch):
    """``triton`` is chosen only by name on CPU tensors (``cpu`` stays automatic there); by name, from the
    environment variable too."""
    u = torch.zeros(1, 2, 3, device=DEVICE)
    assert "triton" in available_backends()
    assert resolve_backend(u, "triton") == "triton"
    if DEVICE == "cpu":
        assert resolve_backend(u) == "cpu"
    else:  # mamba_ssm's kernel first when it is importable, then ours
        assert resolve_backend(u) == ("cuda" if ssamba.ops.scan_cuda.selective_scan_fn is not None else "triton")
    monkeypatch.setenv(ENV_VAR, "triton")
    assert resolve_backend(u) == "triton"


# Compiles the two kernels for GPUs (Hopper sm_90, Ampere sm_80) in a process where they are not interpreted; Triton's
# compiler (frontend, LLVM, the ptxas it ships) needs no GPU. Prints the register use and local-memory spills.
_COMPILE_SCRIPT = """
import itertools, pathlib, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ssamba.ops import scan_triton as st

assert not st.INTERPRETED
compute_ptrs = {"a_ptr", "dskip_ptr", "bias_ptr", "last_ptr", "ckpt_ptr", "dlast_ptr", "work_ptr", "steps_ptr",
                "da_ptr", "dd_ptr", "dbias_ptr", "db_ptr", "dc_ptr"}
cuobjdump = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
for arch, io, flag in [(90, "fp32", True), (90, "fp32", False), (90, "bf16", True), (90, "fp64", True),
                       (80, "fp32", True)]:
    compute = "fp64" if io == "fp64" else "fp32"
    for fn, extra in [(st._scan_forward_kernel, {"SAVE": True}), (st._scan_backward_kernel, {})]:
        consts = dict(HAS_D=flag, HAS_Z=flag, HAS_BIAS=flag, SOFTPLUS=flag, CHUNK_K=st.CHUNK, BLOCK_D=16,
                      BLOCK_N=16, **extra)
        sig = {n: "constexpr" if n in consts else (f"*{compute if n in compute_ptrs else io}" if n.endswith("_ptr")
                                                   else "i32") for n in fn.arg_names}
        kernel = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": 2})
        cubin = pathlib.Path(tempfile.mkdtemp()) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([str(cuobjdump), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
        print(arch, io, flag, fn.__name__, [line.strip() for line in usage.splitlines() if "REG:" in line])
"""


@pytest.mark.skipif(scan_triton.triton is None, reason=SKIP or "")
def test_kernels_compile_for_a_gpu_without_one():
    """The interpreter runs the kernels as Python; this compiles them as a GPU would (sm_90 and sm_80, float32,
    bfloat16 and float64, every optional input on and off), so that code only the compiler rejects (types, constexpr
    rules, layouts) fails here rather than on a GPU machine. No local-memory spills either."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env)
    if proc.returncode != 0 and "ASTSource" in proc.stderr and "TypeError" in proc.stderr:
        pytest.skip(f"this Triton's compiler API differs (ASTSource): {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 10 and all("LOCAL:0 " in line for line in lines), proc.stdout


def test_without_triton_ssamba_imports_and_refuses_the_backend_clearly():
    """Triton hidden (an import of it fails, as when it is not installed): ssamba imports, ``auto`` never picks
    triton, and asking for it is a clear error, not an ImportError."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, ssamba.ops\n"
        "from ssamba.ops import scan_triton\n"
        "from ssamba.ops.selective_scan import resolve_backend\n"
        "assert scan_triton.triton is None and not scan_triton.is_available(torch.zeros(1, 1, 1))\n"
        "assert resolve_backend(torch.zeros(1, 2, 3)) == 'cpu'\n"
        "try:\n"
        "    resolve_backend(torch.zeros(1, 2, 3), 'triton')\n"
        "except ValueError as e:\n"
        "    assert \"'triton' cannot run\" in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@needs_kernels
def test_ssamba_tiny_forward_backward_matches_reference(monkeypatch):
    """SSAMBA_SCAN_BACKEND=triton: an SSAMBA-tiny forward and backward (two bidirectional layers, a padded item)
    against the reference backend: final tokens and every parameter gradient.

    The reference run is the faithful model (``fast_path=False``: the official operation order and the reference
    scan), the triton run the same weights on the fast path (channel-major left-multiplied projections) with
    SSAMBA_SCAN_BACKEND=triton, so this compares triton + fast layout with the official numbers. Tolerance, in the
    max norm relative to each tensor's largest entry: 1e-5, FP32_REORDER's (tests/conftest.py): both runs are
    float32, the projections round differently (~1e-7 relative) and the scans differ by float32 rounding of the
    state over 25 steps (~1e-7, test_matches_float64), carried through two layers, their norms and gates; worst
    observed 7e-7 (the gradient of a dt_proj bias; the final tokens 1.5e-7), a tenfold margin.
    """
    if DEVICE == "cuda":  # TF32 matmuls / convolutions would round both runs to 1e-3, far above what is compared
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    fast = ssamba.create_model("ssamba_tiny", embed_dim=32, depth=2, input_tdim=48).to(DEVICE)
    faithful = ssamba.create_model("ssamba_tiny", embed_dim=32, depth=2, input_tdim=48, fast_path=False).to(DEVICE)
    faithful.load_state_dict(fast.state_dict())
    x = torch.randn(2, 48, 128, device=DEVICE)
    lengths = torch.tensor([48, 32], device=DEVICE)
    weight = None
    results = {}
    for backend, model in (("reference", faithful), ("triton", fast)):
        monkeypatch.setenv(ENV_VAR, backend)
        model.zero_grad(set_to_none=True)
        tokens, _ = model.forward_features(x, lengths)  # (B, K, C)
        if weight is None:
            weight = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
        (tokens * weight).sum().backward()
        results[backend] = {"tokens": tokens.detach()} | {
            name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None
        }
    ref, got = results["reference"], results["triton"]
    assert ref.keys() == got.keys() and len(ref) > 10
    for name in ref:
        err = (got[name] - ref[name]).abs().max().item()
        scale = ref[name].abs().max().item()
        assert err <= 1e-5 * max(scale, 1e-30), f"{name}: max err {err:.3g}, max |ref| {scale:.3g}"


def test_bench_scan_device_option_and_refusal_without_cuda(capsys):
    """``ssamba bench scan --device cuda`` parses; without a CUDA device it measures nothing and says why in one line
    (exit 2); the CPU path stays the default."""
    from ssamba.cli import build_parser, main

    parser = build_parser()
    assert parser.parse_args(["bench", "scan"]).device == "cpu"
    args = parser.parse_args(["bench", "scan", "--device", "cuda", "--quick", "--json"])
    assert args.device == "cuda" and args.quick and args.json
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "scan", "--device", "tpu"])
    capsys.readouterr()  # argparse's usage message
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the refusal is for machines without one (test_bench_scan_cuda runs)")
    assert main(["bench", "scan", "--device", "cuda", "--quick"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert "--device cuda needs a CUDA device" in captured.err and "nothing was measured" in captured.err


def test_bench_scan_cuda_table_and_targets():
    """The CUDA result's table and issue 18's targets, from made-up rows (the layout run_cuda returns)."""
    from ssamba.bench import scan as bench

    def row(method, length, fb_s):
        return {"method": method, "length": length, "forward_s": fb_s / 3, "forward_runs": 3,
                "forward_backward_s": fb_s, "forward_backward_runs": 3, "forward_updates_per_s": 1e9,
                "forward_backward_updates_per_s": 3e8, "forward_peak_extra_mib": 10.0,
                "forward_backward_peak_extra_mib": 30.0}  # fmt: skip

    rows = [row("backend:cuda", 2048, 1e-3), row("backend:triton", 2048, 1.5e-3), row("backend:reference", 2048, 0.3)]
    targets = bench._cuda_targets(rows)
    assert [t["met"] for t in targets] == [True, True] and targets[0]["value"] == pytest.approx(200.0)
    result = {"date": "now", "config": {"batch": 2, "channels": 768, "state": 16, "dtype": "float32",
                                        "options": "o", "device": "cuda"},
              "machine": {**bench.machine_info(), "gpu": "Some GPU"}, "rows": rows, "subject": bench.CUDA_SUBJECT,
              "speedups": bench._speedups(rows, bench.CUDA_SUBJECT), "targets": targets, "targets_issue": 18,
              "notes": []}  # fmt: skip
    table = bench.format_table(result)
    assert table.startswith("Selective scan (Some GPU)") and "| 2048 | backend:triton |" in table
    assert "Speed-up of backend:triton" in table and "| 2048 | backend:reference | " in table
    assert "Targets (issue 18):" in table and "NOT met" not in table


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_scan_cuda():
    """run_cuda end to end at a toy length (no timing asserted, only the contract)."""
    from ssamba.bench import scan as bench

    result = bench.run_cuda(lengths=(64,))
    methods = {r["method"] for r in result["rows"]}
    assert {"backend:triton", "backend:reference"} <= methods
    assert all(r["forward_s"] > 0 and r["forward_backward_peak_extra_mib"] >= 0 for r in result["rows"])
    assert "Speed-up of backend:triton" in bench.format_table(result)
