"""Replay an official-code conformance fixture (the ``shared/conformance/<name>/`` format).

A fixture folder holds ``config.json`` (official constructor kwargs of the pretraining model and of each
fine-tuning run), ``pretrain_state_dict.pt`` (official keys), ``inputs.pt`` (fbank batches
``fbank_t<T>``) and ``outputs.pt`` (what the official code produced). Every model is rebuilt through
:func:`ssamba.convert.official.import_official`; all sizes come from the folder, none are assumed.

Outputs replayed (anything else in ``outputs.pt`` is reported as not replayed, which fails):
    mpc_acc / mpc_nce / mpc_cpred, mpg_mse / mpg_gpred    pretraining passes with the recorded masks
    <run>_avgtok_logits, <run>_cls_logits                 per fine-tuning run (head: ft_mlp_head.*)
    <run>_pos_embed, <run>_final_tokens                   converted position embedding, final tokens
    trace_<run>_<point>                                   per-layer trace (forward hooks)
Inputs taken from ``outputs.pt``: ``mpc_mask_index``, ``mpg_mask_index``, ``ft_mlp_head.*``.
If a run names a ``state_dict_file`` (official fine-tuning checkpoint), its import is replayed too.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ssamba.convert.official import import_official
from ssamba.models.spectrogram import SpectrogramEncoder
from ssamba.ops.selective_scan import use_backend

__all__ = ["ReplayResult", "conformance_cli", "replay"]

ATOL = 1e-5
EXACT = {"mpc_acc"}  # a count: must match exactly
_INPUT_KEYS = re.compile(r"^(mpc_mask_index|mpg_mask_index|ft_mlp_head\..+)$")


class ReplayResult(NamedTuple):
    output: str  # key in outputs.pt (plus a note for extra checks)
    max_abs_err: float  # nan when not replayed, inf on a shape mismatch
    tol: float
    ok: bool


def _require(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"conformance fixture {folder} has no {name}")
    return path


def _load(folder: Path, name: str) -> Any:
    path = _require(folder, name)
    if name.endswith(".json"):
        return json.loads(path.read_text())
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _family(config: dict[str, Any]) -> str:
    return "ssamba" if "vision_mamba_config" in config["pretrain_constructor_kwargs"] else "ssast"


def _compare(name: str, got: Tensor, want: Tensor, tol: float) -> ReplayResult:
    if tuple(got.shape) != tuple(want.shape):
        return ReplayResult(f"{name} (shape {tuple(got.shape)} != {tuple(want.shape)})", math.inf, tol, False)
    err = float((got.detach().double() - want.double()).abs().max()) if want.numel() else 0.0
    return ReplayResult(name, err, tol, err <= tol)


class _Recorder:
    """Forward hooks on the backbone layers and final norms, recording (input, output) of every call."""

    def __init__(self, model: SpectrogramEncoder):
        self.calls: dict[str, list[tuple[Tensor, Any]]] = defaultdict(list)
        self._handles = []
        for name, module in model.named_modules():
            if re.fullmatch(r"(layers|blocks)\.\d+|norm_f|norm", name):
                self._handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            self.calls[name].append((args[0], output))

        return record

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def point(self, point: str) -> Tensor | None:
        """Trace point name from the fixture README -> recorded tensor (None if unknown)."""
        first = "layers.0" if "layers.0" in self.calls else "blocks.0"
        if point == "embed":
            return self.calls[first][0][0]
        if m := re.fullmatch(r"layer(\d+)_(hidden|residual)", point):
            calls = self.calls.get(f"layers.{m.group(1)}")
            return calls[0][1][0 if m.group(2) == "hidden" else 1] if calls else None
        if m := re.fullmatch(r"norm_f_(in|out)(\d+)", point):
            calls, k = self.calls.get("norm_f", []), int(m.group(2)) - 1
            return calls[k][0 if m.group(1) == "in" else 1] if 0 <= k < len(calls) else None
        if m := re.fullmatch(r"block(\d+)_out", point):
            calls = self.calls.get(f"blocks.{m.group(1)}")
            return calls[0][1] if calls else None
        if point == "norm_out" and self.calls.get("norm"):
            return self.calls["norm"][0][1]
        return None


def _head_state(outputs: dict[str, Tensor]) -> dict[str, Tensor]:
    # official mlp_head = Sequential(LayerNorm, Linear) -> ssamba head.norm / head.fc
    names = {"0": "norm", "1": "fc"}
    return {
        f"{names[m.group(1)]}.{m.group(2)}": v
        for k, v in outputs.items()
        if (m := re.fullmatch(r"ft_mlp_head\.([01])\.(weight|bias)", k))
    }


@torch.no_grad()
def replay(folder: str | Path, atol: float = ATOL, backend: str = "reference") -> list[ReplayResult]:
    """Replay every output of a fixture folder; one :class:`ReplayResult` per compared tensor.

    ``backend``: "reference" replays SSAMBA's faithful path (the official operation order and the reference scan,
    ``fast_path=False``); another selective-scan backend replays the fast path with that backend, showing how far
    it is from the official numbers."""
    with use_backend(backend):
        return _replay(Path(folder), atol, fast_path=backend != "reference")


def _replay(folder: Path, atol: float, fast_path: bool) -> list[ReplayResult]:
    config = _load(folder, "config.json")
    inputs, outputs = _load(folder, "inputs.pt"), _load(folder, "outputs.pt")
    pretrain_path = _require(folder, "pretrain_state_dict.pt")
    family = _family(config)
    results: list[ReplayResult] = []
    done: set[str] = {k for k in outputs if _INPUT_KEYS.match(k)}

    def check(key: str, got: Tensor) -> None:
        if key in outputs:
            results.append(_compare(key, got, outputs[key], 0.0 if key in EXACT else atol))
            done.add(key)

    # Pretraining passes (official pretrain_mpc / pretrain_mpg) with the recorded mask indices.
    pre = import_official(pretrain_path, family, config["pretrain_constructor_kwargs"], fast_path)
    x = inputs[f"fbank_t{config['pretrain_input_tdim']}"]
    if "mpc_mask_index" in outputs:
        mpc = pre.mpc(x, outputs["mpc_mask_index"])
        check("mpc_acc", mpc.acc)
        check("mpc_nce", mpc.nce)
        check("mpc_cpred", mpc.pred)
    if "mpg_mask_index" in outputs:
        mpg = pre.mpg(x, outputs["mpg_mask_index"])
        check("mpg_mse", mpg.mse)
        check("mpg_gpred", mpg.pred)

    head = _head_state(outputs)
    trace_batch = config.get("trace_batch", [0])
    for tag, run in config.get("finetune_runs", {}).items():
        x = inputs[f"fbank_t{run['input_tdim']}"]
        model = import_official(pretrain_path, family, run["constructor_kwargs"], fast_path)
        if head:
            model.head.load_state_dict(head)
        check(f"{tag}_pos_embed", model.pos_embed)
        recorder = _Recorder(model)
        tokens, token_lengths = model.forward_features(x)
        recorder.remove()
        check(f"{tag}_final_tokens", tokens)
        if head:
            check(f"{tag}_avgtok_logits", model.forward_head(tokens, token_lengths, "avgtok"))
            check(f"{tag}_cls_logits", model.forward_head(tokens, token_lengths, "cls"))
        for key in [k for k in outputs if k.startswith(f"trace_{tag}_")]:
            got = recorder.point(key.removeprefix(f"trace_{tag}_"))
            if got is not None:
                check(key, got[trace_batch])
        if run.get("state_dict_file"):
            # the official fine-tuning checkpoint of this run, imported directly
            tuned = import_official(_require(folder, run["state_dict_file"]), family, run["constructor_kwargs"],
                                    fast_path)
            tokens, token_lengths = tuned.forward_features(x)
            for pool in ("avgtok", "cls"):
                key = f"{tag}_{pool}_logits"
                if key in outputs:
                    got = tuned.forward_head(tokens, token_lengths, pool)
                    results.append(_compare(f"{key} [{run['state_dict_file']}]", got, outputs[key], atol))

    for key in outputs:
        if key not in done:
            results.append(ReplayResult(f"{key} (not replayed)", math.nan, atol, False))
    return results


def conformance_cli(folder: str | Path, backend: str = "reference") -> int:
    """Print a max_abs_err table for a fixture folder; 0 when every output is within tolerance, else 1."""
    try:
        results = replay(folder, backend=backend)
    except (FileNotFoundError, ValueError, NotImplementedError, KeyError) as err:
        print(f"conformance: {folder}: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    width = max(len(r.output) for r in results)
    print(f"{'output':<{width}}  {'max_abs_err':>11}  {'tol':>7}  status")
    for r in results:
        print(f"{r.output:<{width}}  {r.max_abs_err:>11.3e}  {r.tol:>7.0e}  {'ok' if r.ok else 'FAIL'}")
    failed = sum(not r.ok for r in results)
    print(f"{folder}: {len(results) - failed}/{len(results)} outputs within tolerance")
    return 1 if failed else 0
