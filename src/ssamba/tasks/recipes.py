"""Fine-tuning configuration (one commented dataclass per section, as ``ssamba.train.config``) and the
official recipes as small preset functions, one per task.

Precedence: task preset < config file (``--config``) < ``--set section.key=value`` < explicit CLI flags.
Values are typed and unknown sections / keys are errors naming them (``ssamba.train.config.merge_sections``);
``ssamba.train.config.apply_overrides`` applies ``--set`` flags (``model.overrides.depth=2`` sets one override).

Sources of the presets (hyper-parameters copied as numbers, cited per preset):
  SSAST  src/finetune/{speechcommands_v2_35/run_sc.sh, esc50/run_esc_patch.sh, audioset/run_as.sh}
  SSAMBA src/finetune/{speechcommands_v2/run_sc.sh, esc50/run_esc_patch_amba.sh, voxceleb1/run_sid.sh,
         iemocap/run_er.sh} (the last two run s3prl's SUPERB downstreams with ``-s hidden_states -f``)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ssamba.models.heads import PROBE_POOLS
from ssamba.train.config import DataSection, LogSection, ModelSection, RunConfig, SpectrogramOptimSection, TrainSection

__all__ = ["TASKS", "FinetuneConfig", "task_recipe"]


@dataclass
class FTModelSection(ModelSection):
    # (name: must match the family of --init when one is given; overrides apply to load_pretrained too)
    # "none" (random init), a pretraining run folder (uses RUN/final), a save_pretrained folder, or a
    # pretraining checkpoint folder RUN/checkpoints/step_N
    init: str = "none"
    # fine-tuning patch stride (official: 10 with 16x16 patches, overlapping); 0 = keep the encoder's own
    fstride: int = 0
    tstride: int = 0
    # clip pooling of the fine-tuning head (official ft_avgtok = "avgtok")
    pool: str = "avgtok"


@dataclass
class FTDataSection(DataSection):
    test: str = ""
    # class_labels_indices.csv (index,mid,display_name)
    labels: str = ""
    # frames per clip after pad/cut; the encoder's position grid is converted to it
    target_length: int = 128
    # fbank normalisation (x - mean) / (2 std); null = the init's pretraining values (else AudioSet's)
    mean: float | None = None
    std: float | None = None
    # keep every clip's fbank in memory after its first use, shared by the runs of one process (with
    # num_workers = 0; workers would fill their own copies); a probe also keeps each clip's pooled vectors of every
    # pooling (for SSAMBA/SSAST-tiny ~160 KB a clip, about three times its fbank)
    cache_features: bool = True
    # k-fold cross-validation over the train manifest (0 = off; ESC-50: 5, IEMOCAP: 5 sessions). Entries
    # carry their fold in `fold_key` (e.g. "fold": 1..K); without it folds are a seeded round-robin split.
    folds: int = 0
    fold_key: str = "fold"


@dataclass
class FTTaskSection:
    # kws, kws12, sid, sounds, audioset, esc, er (the preset); recorded in metrics.json
    name: str = "kws"
    # "finetune" (whole encoder + head) or "probe" (frozen encoder, learnable weighted sum of layers + linear)
    mode: str = "finetune"
    # the probe's pooling over patch tokens: "mean" (SUPERB's) or "row_stats" (mean and std per frequency row of
    # the patch grid; ssamba.models.heads.WeightedSumProbe)
    probe_pool: str = "mean"
    # "ce" (softmax cross-entropy), "bce" (sigmoid BCE; official for Speech Commands and AudioSet)
    loss: str = "ce"
    # metric that selects the best checkpoint and is reported: "acc" or "mAP"
    metric: str = "acc"
    # multi-label task (AudioSet-style): mAP, AUC, d-prime, no confusion matrix
    multilabel: bool = False


@dataclass
class FTAugmentSection:
    # SpecAugment: max width of one frequency mask / one time mask (official freqm, timem; 0 = off)
    freqm: int = 0
    timem: int = 0
    # probability of mixing an item with another one of the batch (official mixup; lambda ~ Beta(10, 10))
    mixup: float = 0.0
    # official `noise`: add uniform noise * U(0,1)/10 and roll the time axis by U{-10..9} frames
    noise: bool = False


@dataclass
class FTOptimSection(SpectrogramOptimSection):
    # "adam" (official run.py: Adam, wd 5e-7, betas (0.95, 0.999)) or "adamw"
    name: str = "adam"
    weight_decay: float = 5e-7
    # learning-rate multiplier of the classification head (official head_lr)
    head_lr: float = 1.0
    # MultiStepLR per epoch: lr *= decay at epochs start, start + step, ... (official lrscheduler_*)
    lr_start: int = 5
    lr_step: int = 1
    lr_decay: float = 0.85
    # weight averaging of the end-of-epoch weights of epochs wa_start..wa_end (1-based; 0 = off; official wa)
    wa_start: int = 0
    wa_end: int = 0


@dataclass
class FTTrainSection(TrainSection):
    # optimizer steps (0 = epochs decide); with steps, validation happens every `eval_every` steps and at the end
    steps: int = 0
    batch_size: int = 32
    epochs: int = 10
    # linear probe: run the frozen encoder once per split and train on the cached per-layer vectors
    # (exact: the encoder is frozen and deterministic in eval mode; off when augmentation is on)
    cache_probe_features: bool = True


MODES = ("finetune", "probe")


@dataclass
class FinetuneConfig(RunConfig):
    model: FTModelSection = field(default_factory=FTModelSection)
    data: FTDataSection = field(default_factory=FTDataSection)
    task: FTTaskSection = field(default_factory=FTTaskSection)
    augment: FTAugmentSection = field(default_factory=FTAugmentSection)
    optim: FTOptimSection = field(default_factory=FTOptimSection)
    train: FTTrainSection = field(default_factory=FTTrainSection)
    log: LogSection = field(default_factory=lambda: LogSection(eval_every=0, tensorboard=True))

    def validate(self) -> None:
        super().validate()
        t = self.task
        if t.mode not in MODES:
            raise ValueError(f"task.mode must be one of {MODES}, got {t.mode!r}")
        if t.probe_pool not in PROBE_POOLS:
            raise ValueError(f"task.probe_pool must be one of {PROBE_POOLS}, got {t.probe_pool!r}")
        if t.loss not in ("ce", "bce"):
            raise ValueError(f"task.loss must be ce or bce, got {t.loss!r}")
        if t.metric not in ("acc", "mAP"):
            raise ValueError(f"task.metric must be acc or mAP, got {t.metric!r}")
        if t.multilabel and t.loss != "bce":
            raise ValueError("a multi-label task needs task.loss = bce")
        if self.train.epochs < 1 and self.train.steps < 1:
            raise ValueError("train.epochs or train.steps must be positive")
        if not 0.0 <= self.augment.mixup <= 1.0:
            raise ValueError(f"augment.mixup is a probability, got {self.augment.mixup}")
        self.model.check("fine-tune with `ssamba hubert finetune` (CTC)")


# ------------------------------------------------------------------------------------------------ presets


def kws(cfg: FinetuneConfig) -> None:
    """Keyword spotting, Speech Commands v2 35 classes (SSAST speechcommands_v2_35/run_sc.sh and SSAMBA
    speechcommands_v2/run_sc.sh: lr 2.5e-4, freqm 48, timem 48, mixup 0.6, 30 epochs, batch 128, 16x16 patches
    with fstride = tstride = 10, target_length 128, noise, warm-up, MultiStepLR from epoch 5 by 0.85, head_lr 1,
    loss BCE, metric acc)."""
    d, a, o, t = cfg.data, cfg.augment, cfg.optim, cfg.train
    d.target_length, d.mean, d.std = 128, -6.845978, 5.5654526
    a.freqm, a.timem, a.mixup, a.noise = 48, 48, 0.6, True
    o.lr, o.head_lr, o.warmup_steps, o.warmup_every = 2.5e-4, 1.0, 1000, 50
    o.lr_start, o.lr_step, o.lr_decay = 5, 1, 0.85
    t.epochs, t.batch_size = 30, 128
    cfg.model.fstride = cfg.model.tstride = 10
    cfg.task.loss, cfg.task.metric = "bce", "acc"


def kws12(cfg: FinetuneConfig) -> None:
    """Keyword spotting, Speech Commands v1 12 classes (SUPERB KS; the official patch-model recipe of v2
    applied to v1, as SSAMBA's speechcommands_v1 scripts do)."""
    kws(cfg)


def esc(cfg: FinetuneConfig) -> None:
    """ESC-50-style single-label sound classification with 5-fold cross-validation (SSAST run_esc_patch.sh:
    lr 1e-4, freqm 24, timem 96, mixup 0, 50 epochs, batch 48, fstride = tstride = 10, target_length 512,
    noise, no warm-up, MultiStepLR from epoch 5 by 0.85, head_lr 10 (SSAMBA's script: 1, from epoch 6),
    loss CE, metric acc)."""
    d, a, o, t = cfg.data, cfg.augment, cfg.optim, cfg.train
    d.target_length, d.mean, d.std, d.folds = 512, -6.6268077, 5.358466, 5
    a.freqm, a.timem, a.mixup, a.noise = 24, 96, 0.0, True
    o.lr, o.head_lr, o.warmup_steps = 1e-4, 10.0, 0
    o.lr_start, o.lr_step, o.lr_decay = 5, 1, 0.85
    t.epochs, t.batch_size = 50, 48
    cfg.model.fstride = cfg.model.tstride = 10
    cfg.task.loss, cfg.task.metric = "ce", "acc"


def sounds(cfg: FinetuneConfig) -> None:
    """The demo corpus's sound classes: the ESC-50 recipe with its own valid/test splits (no k-fold) and
    2.56 s clips."""
    esc(cfg)
    cfg.data.folds, cfg.data.target_length, cfg.data.mean, cfg.data.std = 0, 256, None, None


def audioset(cfg: FinetuneConfig) -> None:
    """AudioSet-style multi-label tagging (SSAST audioset/run_as.sh, balanced set: lr 5e-5, 25 epochs,
    freqm 48, timem 192, mixup 0.5, batch 12, fstride = tstride = 10, target_length 1024, no noise,
    MultiStepLR from epoch 10 every 5 by 0.5, weight averaging of epochs 6..25, loss BCE, metric mAP)."""
    d, a, o, t = cfg.data, cfg.augment, cfg.optim, cfg.train
    d.target_length, d.mean, d.std = 1024, -4.2677393, 4.5689974
    a.freqm, a.timem, a.mixup, a.noise = 48, 192, 0.5, False
    o.lr, o.head_lr, o.warmup_steps = 5e-5, 1.0, 0
    o.lr_start, o.lr_step, o.lr_decay = 10, 5, 0.5
    o.wa_start, o.wa_end = 6, 25
    t.epochs, t.batch_size = 25, 12
    cfg.model.fstride = cfg.model.tstride = 10
    cfg.task.loss, cfg.task.metric, cfg.task.multilabel = "bce", "mAP", True


def sid(cfg: FinetuneConfig) -> None:
    """Speaker identification, VoxCeleb1-style utterance classification. SSAMBA runs it through s3prl's
    SUPERB voxceleb1 downstream (weighted sum of hidden states, mean pooling, linear; upstream fine-tuned
    with -f) at lr 1e-4 (voxceleb1/run_sid.sh); here: AdamW lr 1e-4, no augmentation, CE, accuracy."""
    d, o, t = cfg.data, cfg.optim, cfg.train
    d.target_length = 128
    o.name, o.lr, o.weight_decay, o.head_lr, o.lr_decay = "adamw", 1e-4, 0.0, 1.0, 1.0
    t.epochs, t.batch_size = 20, 32
    cfg.task.loss, cfg.task.metric = "ce", "acc"


def er(cfg: FinetuneConfig) -> None:
    """Emotion recognition, IEMOCAP-style, 5-fold over sessions (SSAMBA iemocap/run_er.sh: s3prl emotion
    downstream, lr 1e-5, cross-validation on test_fold); CE, accuracy."""
    sid(cfg)
    cfg.optim.lr, cfg.data.folds, cfg.data.target_length = 1e-5, 5, 512


TASKS: dict[str, Callable[[FinetuneConfig], None]] = {
    "kws": kws, "kws12": kws12, "sid": sid, "sounds": sounds, "audioset": audioset, "esc": esc, "er": er,
}  # fmt: skip


def task_recipe(task: str, model_name: str = "ssamba_tiny") -> FinetuneConfig:
    """The official preset of ``task`` for ``model_name``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    cfg = FinetuneConfig()
    cfg.model.name, cfg.task.name = model_name, task
    TASKS[task](cfg)
    cfg.validate()
    return cfg
