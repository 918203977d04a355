"""Long-recording embedding benchmark behind ``ssamba bench embed``: time (x real time) and peak memory of
``ssamba embed`` on recordings of several durations, each in a fresh child process.

Workload: a 16 kHz mono WAV of each duration (tones, chirps and noise, written once into a temporary folder), a
randomly initialised registry model (default SSAMBA-tiny at the official pretraining length, 1024 frames = 10.24 s
windows) saved with ``save_pretrained``; the child runs ``ssamba.tasks.embed.embed`` with ``pool="frames"`` (one
vector per 160 ms column and layer, the largest output) and reports its wall time and its peak RSS
(``ru_maxrss``: everything the process touched: Python, torch, the model, the audio blocks, the outputs). The
memory claim is about growth: a long recording's peak should stay within a small factor of one window's.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["format_table", "run"]

_CHILD = """
import json, resource, sys, time, torch
torch.set_num_threads({threads})
from ssamba.tasks.embed import embed
t0 = time.perf_counter()
summary = embed({model!r}, [{wav!r}], {out!r}, pool="frames", fmt="safetensors")
wall = time.perf_counter() - t0
print(json.dumps({{"wall_s": wall, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def _write_recording(path: Path, seconds: float, seed: int = 0) -> None:
    from ssamba.audio import save_audio

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    wave = 0.2 * np.sin(2 * np.pi * (300 + 200 * np.sin(2 * np.pi * 0.1 * t)) * t) + 0.05 * rng.standard_normal(t.size)
    save_audio(path, wave.astype(np.float32))


def run(model: str = "ssamba_tiny", seconds: tuple[float, ...] = (10.0, 300.0), threads: int | None = None,
        log=None) -> dict:
    """Measure each duration in a fresh process; returns {"config", "machine", "rows", "date"}."""
    import torch

    import ssamba
    from ssamba.bench.scan import machine_info
    from ssamba.features import num_frames
    from ssamba.tasks.embed import WindowPlan

    threads = threads or torch.get_num_threads()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ssamba-bench-embed-") as tmp:
        net = ssamba.create_model(model)
        c = net.config
        folder = net.save_pretrained(Path(tmp) / "model")
        del net
        for s in seconds:
            frames = num_frames(int(s * 16000))
            windows = 1 if frames <= c.input_tdim else len(WindowPlan.make(
                frames, c.input_tdim, c.input_tdim // 2 // c.tstride * c.tstride, c.tshape, c.tstride).windows)
            wav = Path(tmp) / f"rec_{s:g}s.wav"
            _write_recording(wav, s)
            if log:
                log(f"embedding {s:g} s with {model} ({threads} threads)")
            code = _CHILD.format(threads=threads, model=str(folder), wav=str(wav), out=str(Path(tmp) / f"e{s:g}"))
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "NUMBA_NUM_THREADS": str(threads)}
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
            child = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append({"seconds": s, "windows": windows, **child, "x_real_time": s / child["wall_s"]})
    return {"config": {"model": model, "threads": threads, "pool": "frames"}, "machine": machine_info(),
            "rows": rows, "date": datetime.datetime.now().isoformat(timespec="minutes")}


def format_table(result: dict) -> str:
    m, cfg = result["machine"], result["config"]
    base = result["rows"][0]["peak_rss_mib"]
    lines = [f"ssamba embed (pool frames), {cfg['model']} (random init), {cfg['threads']} threads; {m['cpu']}; "
             f"torch {m['torch']}; {result['date']}", "",
             f"| recording | windows | wall | x real time | peak RSS | vs {result['rows'][0]['seconds']:g} s |",
             "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in result["rows"]:
        lines.append(f"| {r['seconds']:g} s | {r['windows']} | {r['wall_s']:.2f} s "
                     f"| {r['x_real_time']:.1f}x | {r['peak_rss_mib']:.0f} MiB | {r['peak_rss_mib'] / base:.2f}x |")
    return "\n".join(lines) + "\n"
