"""The fbank reconstruction / denoising probe (``ssamba hubert reconstruct``): a step and an eval function on the
engine (``ssamba.train.engine``). The "reconstruction" kind of task of the Mamba-HuBERT paper's hypothesis
(Mamba excels at reconstruction, needs extra modules for classification): predict the 100 Hz log-mel fbank from one
layer of a (by default frozen) encoder, clean or from a noisy input; report MSE and R^2 = 1 - MSE / variance of the
normalised target.

Shape glossary: B batch, S samples, T frames (50 Hz), F fbank frames (100 Hz), M mel bins, N valid cells.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ssamba import features as feats
from ssamba.data.waveform import WaveformSet
from ssamba.models.heads import ReconstructionHead
from ssamba.tasks.ctc import FinetuneSection, HeadRunConfig, hubert_encoder
from ssamba.train.hubert import HuBERTOptimSection, hubert_engine, lr_at, mask_generator, prepare

__all__ = ["ReconstructConfig", "reconstruct"]


@dataclass
class ReconSection:
    # fbank target: mel bins, normalisation (x - mean) / (2 std) (the corpus's `ssamba data stats`)
    num_mel_bins: int = 80
    mean: float = -6.0
    std: float = 4.0
    # additive white noise on the input at this SNR in dB (denoising); None = clean reconstruction
    noise_snr_db: float | None = None
    # hidden width of the probe MLP (0 = linear probe)
    hidden: int = 0


@dataclass
class ReconstructConfig(HeadRunConfig):
    finetune: FinetuneSection = field(default_factory=lambda: FinetuneSection(freeze_encoder=True))
    optim: HuBERTOptimSection = field(
        default_factory=lambda: HuBERTOptimSection(lr=1e-3, weight_decay=0.0, warmup_steps=20))
    recon: ReconSection = field(default_factory=ReconSection)


def reconstruct(cfg: ReconstructConfig, run: str | Path, resume: bool = False) -> dict:
    """Fbank reconstruction (or denoising, ``recon.noise_snr_db``) from one layer of a (by default frozen)
    encoder; reports MSE and R^2 = 1 - MSE / variance of the normalised target on valid and test."""
    run, r = Path(run), cfg.recon
    eng = hubert_engine(cfg, run, resume, cfg.test)
    head = hubert_encoder(cfg, lambda enc: ReconstructionHead(enc, r.num_mel_bins, cfg.head.layer or None,
                                                              hidden=r.hidden))  # fmt: skip
    prepare(eng, head, WaveformSet(cfg.data.train, cfg.data.max_samples, cfg.data.skip_bad))
    device = eng.device

    def batch_loss(net, batch, gen: torch.Generator | None):
        """net: the head or its DDP wrapper (called for the forward)."""
        wave, lengths = batch["features"].to(device), batch["lengths"].to(device)
        target, t_frames = feats.batch_fbank(wave, lengths, num_mel_bins=r.num_mel_bins)  # (B, F, M), clean
        target = feats.normalize(target, r.mean, r.std)
        x = wave
        if r.noise_snr_db is not None:
            valid = torch.arange(wave.shape[1], device=device)[None, :] < lengths[:, None]
            power = (wave.pow(2) * valid).sum(1, keepdim=True) / lengths[:, None]
            noise = torch.randn(wave.shape, generator=gen).to(device) * (power / 10 ** (r.noise_snr_db / 10)).sqrt()
            x = wave + noise * valid
        pred, p_frames = net(x, lengths)  # (B, 2T, M)
        n = min(pred.shape[1], target.shape[1])
        frames = torch.minimum(p_frames, t_frames).clamp(max=n)
        sel = torch.arange(n, device=device)[None, :] < frames[:, None]  # (B, n)
        err = (pred[:, :n] - target[:, :n]).pow(2)[sel]  # (N, M)
        return err.mean(), err.sum().item(), target[:, :n][sel]

    def step_fn(step: int):
        eng.set_lr(lr_at(step, cfg.optim, cfg.train.steps))
        return eng.accumulate(lambda batch, a: (batch_loss(eng.model, batch, mask_generator(eng, step, a))[0], {}),
                              cfg.train.grad_accum)

    @torch.no_grad()
    def evaluate(manifest: str) -> dict:
        head.eval()
        ds = WaveformSet(manifest, cfg.data.max_samples, cfg.data.skip_bad)
        loader = torch.utils.data.DataLoader(ds, batch_size=cfg.train.batch_size, collate_fn=ds.collate)
        gen = torch.Generator().manual_seed(4321)
        sq, cells, targets = 0.0, 0, []
        for batch in loader:
            if batch["lengths"].numel() == 0:  # every item left out by data.skip_bad
                continue
            _, s, tgt = batch_loss(head, batch, gen)
            sq, cells = sq + s, cells + tgt.numel()
            targets.append(tgt.double().cpu())
        allt = torch.cat(targets)
        var = float((allt - allt.mean(0)).pow(2).mean())  # per-bin-mean predictor's MSE
        mse = sq / max(cells, 1)
        return {"mse": mse, "r2": 1.0 - mse / var, "baseline_mse": var}

    result = eng.fit(step_fn, cfg.train.steps,
                     (lambda step: evaluate(cfg.data.valid) if eng.ddp.main else {}) if cfg.data.valid else None)
    if result["interrupted"] is not None or not result["main"]:
        return result
    summary = {"task": "reconstruct" if r.noise_snr_db is None else "denoise", "metric": "r2",
               "init": cfg.finetune.init, "layer": cfg.head.layer or "last", "steps": result["step"],
               "skipped_steps": result["skipped_steps"]}
    for split, manifest in (("valid", cfg.data.valid), ("test", cfg.test)):
        if manifest:
            summary[split] = evaluate(manifest)
    (run / "metrics.json").write_text(json.dumps(summary, indent=1) + "\n")
    return {**result, **summary}
