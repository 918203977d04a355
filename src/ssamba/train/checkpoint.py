"""Training checkpoints that never lose work: safetensors for tensors + JSON for everything else (nothing is
pickled), written to a temporary folder and renamed into place, so a crash leaves either the old or the new
checkpoint, never half of one.

Layout: ``RUN/checkpoints/step_00000100/{tensors.safetensors, state.json}``. Tensor keys are prefixed by
what they belong to (``model.``, ``optim.<param index>.<name>``, ``rng.``).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

__all__ = ["catch_stop_signals", "latest_checkpoint", "load_checkpoint", "optimizer_state", "restore_optimizer",
           "restore_rng", "rng_state", "save_checkpoint"]

STEP_DIR = re.compile(r"^step_(\d+)$")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(folder: Path, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any],
                    keep_last: int) -> Path:
    """Write ``folder/step_<step>`` atomically (temp folder + os.replace) and delete all but the last K."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{step:08d}"
    tmp = folder / f".tmp-step_{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state))
    for f in tmp.iterdir():
        _fsync(f)
    if final.exists():  # the same step saved again (e.g. a signal right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(folder)
    for old in sorted(p for p in folder.iterdir() if STEP_DIR.match(p.name))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint (temp folders of an interrupted save are ignored)."""
    if not folder.is_dir():
        return None
    done = sorted(p for p in folder.iterdir() if STEP_DIR.match(p.name) and (p / "state.json").exists())
    return done[-1] if done else None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return load_file(str(path / "tensors.safetensors")), json.loads((path / "state.json").read_text())


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten ``optimizer.state_dict()``: tensors -> ``optim.<index>.<name>``, the rest -> JSON."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in sd["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state(mask_gen: torch.Generator) -> tuple[dict, dict]:
    """Every RNG a run draws from (torch, numpy, python, CUDA, and the run's own generator) as
    (tensors for safetensors, JSON-able meta)."""
    np_state = np.random.get_state()
    tensors = {"rng.torch": torch.get_rng_state(), "rng.mask": mask_gen.get_state(),
               "rng.numpy": torch.from_numpy(np_state[1].astype(np.int64))}  # fmt: skip
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda{i}"] = s
    meta = {"python": random.getstate(), "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def restore_rng(tensors: dict, meta: dict, mask_gen: torch.Generator) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    mask_gen.set_state(tensors["rng.mask"])
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"rng.cuda{i}" in tensors:
                torch.cuda.set_rng_state(tensors[f"rng.cuda{i}"], i)


def catch_stop_signals() -> tuple[dict, Callable[[], None]]:
    """SIGINT / SIGTERM no longer kill a training loop: they set ``stop["signal"]`` (the signal's name), so the
    loop finishes its step, saves a checkpoint and exits. Returns (stop, restore); call ``restore()`` in the
    loop's ``finally`` to put the previous handlers back."""
    stop: dict = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signal.Signals(signum).name

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for s, handler in previous.items():
            signal.signal(s, handler)

    return stop, restore
