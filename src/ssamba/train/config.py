"""The one config system of every run: ``RunConfig`` and the sections every run shares (one commented dataclass
per section), the pretraining config and its recipe presets. Files (TOML / YAML / JSON, ``load_config``) and
``--set section.key=value`` flags (``apply_overrides``) merge into a config with typed values through
``ssamba.fields``; unknown keys are errors naming the key. Precedence: recipe preset (by model family) < config
file < ``--set`` < explicit CLI flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ssamba.fields import apply_overrides, load_config, merge_sections

__all__ = ["DataSection", "LogSection", "ModelSection", "OptimSection", "PretrainConfig", "RunConfig",
           "SpectrogramOptimSection", "TrainSection", "apply_overrides", "load_config", "merge_sections", "recipe"]


# ------------------------------------------------------------------ the sections every run has (extended per task)


@dataclass
class DataSection:
    # manifests (SSAST JSON, .jsonl or a folder per class)
    train: str = ""
    valid: str = ""
    # DataLoader worker processes computing features (0 = in the training process)
    num_workers: int = 0
    # leave out unreadable files (counted) instead of stopping
    skip_bad: bool = False


@dataclass
class OptimSection:
    # "adamw" or "adam" (L2 weight decay)
    name: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    # weight decay on "all" tensors (the official SSAST / SSAMBA recipes) or on "matrices" only (not on biases,
    # norms and tensors marked _no_weight_decay: mamba_ssm's A_log and D, fairseq's HuBERT)
    decay: str = "all"
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    # linear warm-up over the first steps (each task's schedule says how)
    warmup_steps: int = 0
    # max gradient norm (0 = off; the official SSAST / SSAMBA code does not clip)
    grad_clip: float = 0.0


@dataclass
class TrainSection:
    # optimizer steps
    steps: int = 1000
    # clips per optimizer step over all processes (global batch)
    batch_size: int = 8
    # micro-batches per step per process; batch_size must divide by grad_accum * world size
    grad_accum: int = 1
    seed: int = 0
    # "fp32", "bf16" (autocast, CPU or CUDA), "fp16" (CUDA, with a GradScaler), "auto" (bf16 on CUDA when supported)
    precision: str = "fp32"
    # "auto", "cpu", "cuda"
    device: str = "auto"
    # stop with an error after this many non-finite losses in a row (each is skipped: no update)
    max_bad_steps: int = 5


@dataclass
class LogSection:
    # metrics.jsonl / progress bar every N steps
    log_every: int = 10
    # validation every N steps (0 = only at the end; fine-tuning: at each epoch end)
    eval_every: int = 100
    # resumable checkpoints every N steps (and at the end / on SIGINT, SIGTERM); keep the last K
    ckpt_every: int = 200
    keep_last: int = 2
    # TensorBoard scalars in RUN/tb (needs the optional `tensorboard` package)
    tensorboard: bool = False
    progress: bool = True


# ------------------------------------------------------------------------------------------ pretraining


@dataclass
class ModelSection:
    """A spectrogram encoder (SSAMBA or SSAST) of the registry: pretraining's and fine-tuning's ``model``."""

    # registry name (ssamba.list_models()): ssamba_tiny, ssast_tiny, ...
    name: str = "ssamba_tiny"
    # config overrides for create_model (e.g. {depth = 4}); input_tdim defaults to data.target_length
    overrides: dict = field(default_factory=dict)

    def check(self, hubert_command: str) -> None:
        """A spectrogram family and overrides its config knows (typed in place); ``hubert_command`` is what a
        HuBERT model runs instead."""
        from ssamba.models import check_overrides, model_family

        if model_family(self.name) not in ("ssamba", "ssast"):
            raise ValueError(f"model.name: {self.name} is not a spectrogram encoder (SSAMBA or SSAST); "
                             f"HuBERT models {hubert_command}")
        self.overrides = check_overrides(self.name, self.overrides)


@dataclass
class PretrainDataSection(DataSection):
    # frames per clip after pad/cut (official 1024 = 10.24 s); the demo's 1 s keywords fit 96
    target_length: int = 1024
    # mask and encode only each clip's valid patches (False = official: padding frames are patches too)
    use_lengths: bool = True
    # fbank normalisation (x - mean) / (2 std); official AudioSet+LibriSpeech values
    mean: float = -4.2677393
    std: float = 4.5689974


@dataclass
class MaskSection:
    # masked patches for a clip of `reference_patches` patches; scaled to the batch's shortest clip
    # (official 400 of 512 = 1024 frames x 128 bins in 16x16 patches)
    mask_patch: int = 400
    reference_patches: int = 512
    # "cluster" (official for 16x16 patches), "frame" (official for 128x2 frame tokens), "auto" by patch shape
    kind: str = "auto"
    # official pretrain_joint: separate masks and encoder passes for the two objectives
    two_pass: bool = True
    # InfoNCE softmax orientation: "official" (code) or "paper"
    nce_orientation: str = "official"
    # loss = nce + mpg_weight * mse
    mpg_weight: float = 10.0


@dataclass
class SpectrogramOptimSection(OptimSection):
    """The official SSAST / SSAMBA optimiser of pretraining and fine-tuning (run.py, traintest*.py): betas
    (0.95, 0.999) and the warm-up lr = step / warmup_steps * lr, updated every warmup_every steps."""

    betas: tuple = (0.95, 0.999)
    warmup_every: int = 50

    def warmup_factor(self, step: int) -> float:
        """The warm-up's factor of ``lr`` after ``step`` updates (1 once warm-up is over or off)."""
        if step >= self.warmup_steps:
            return 1.0
        return min(1.0, (step - step % self.warmup_every + self.warmup_every) / self.warmup_steps)


@dataclass
class PretrainOptimSection(SpectrogramOptimSection):
    # SSAMBA: AdamW, wd 5e-8; SSAST: Adam, wd 5e-7 (recipe); the official code sets lr = step/1000 * lr every 50 steps
    weight_decay: float = 5e-8
    warmup_steps: int = 1000
    # ReduceLROnPlateau on validation masked accuracy (official factor 0.5, patience 2 validations)
    plateau_factor: float = 0.5
    plateau_patience: int = 2


@dataclass
class PretrainLogSection(LogSection):
    # validation on at most eval_batches batches (0 = all), masks from a fixed seed
    eval_batches: int = 0
    eval_mask_seed: int = 1234


class RunConfig:
    """Base of every run config (pretraining, fine-tuning, HuBERT pretraining, CTC, reconstruction): a dataclass of
    sections, each a commented dataclass; ``update`` merges typed values (unknown keys are errors naming them),
    ``validate`` checks what types cannot. Presets are small functions that set fields (``recipe``,
    ``ssamba.tasks.recipes``)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        cfg = cls()
        cfg.update(values, source="config.json")
        return cfg

    def update(self, values: dict[str, Any], source: str = "config") -> None:
        """Merge ``{"section": {"key": value}}`` (see :func:`merge_sections`)."""
        merge_sections(self, values, source)

    def validate(self) -> None:
        t = self.train
        if t.steps < 0 or t.batch_size < 1 or t.grad_accum < 1:
            raise ValueError("train.steps, train.batch_size and train.grad_accum must be positive")
        if self.optim.name not in ("adam", "adamw") or self.optim.decay not in ("all", "matrices"):
            raise ValueError(f"optim.name must be adam or adamw, optim.decay all or matrices, got "
                             f"{self.optim.name!r}, {self.optim.decay!r}")
        if t.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"train.precision must be auto, fp32, bf16 or fp16, got {t.precision!r}")


@dataclass
class PretrainConfig(RunConfig):
    model: ModelSection = field(default_factory=ModelSection)
    data: PretrainDataSection = field(default_factory=lambda: PretrainDataSection(num_workers=2))
    mask: MaskSection = field(default_factory=MaskSection)
    optim: PretrainOptimSection = field(default_factory=PretrainOptimSection)
    train: TrainSection = field(default_factory=lambda: TrainSection(batch_size=64, precision="auto"))
    log: PretrainLogSection = field(default_factory=lambda: PretrainLogSection(
        log_every=1, eval_every=500, ckpt_every=500, keep_last=3, tensorboard=True))

    def validate(self) -> None:
        super().validate()
        if self.train.steps < 1:
            raise ValueError("train.steps must be positive")
        if self.mask.kind not in ("auto", "cluster", "frame"):
            raise ValueError(f"mask.kind must be auto, cluster or frame, got {self.mask.kind!r}")
        if self.mask.nce_orientation not in ("official", "paper"):
            raise ValueError(f"mask.nce_orientation must be official or paper, got {self.mask.nce_orientation!r}")
        self.model.check("pretrain with `ssamba hubert pretrain`")


def recipe(model_name: str) -> PretrainConfig:
    """Official preset for the model's family: SSAMBA (AdamW, wd 5e-8) or SSAST (Adam, wd 5e-7, batch 24 as
    in its run_mask_patch.sh); both lr 1e-4, betas (0.95, 0.999), warm-up 1000 steps, plateau on val accuracy."""
    cfg = PretrainConfig()
    cfg.model.name = model_name
    if model_name.startswith("ssast"):
        cfg.optim.name, cfg.optim.weight_decay, cfg.train.batch_size = "adam", 5e-7, 24
    return cfg
