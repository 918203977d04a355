"""Pretraining configuration: one commented dataclass per section, recipe presets, TOML files, ``a.b=value``
overrides. Precedence: recipe preset (by model family) < config file < ``--set`` < explicit CLI flags.
Unknown keys are errors naming the key."""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssamba.fields import coerce, field_types, parse_text, typed_fields

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser as a package
    import tomli as tomllib

__all__ = ["DataSection", "LogSection", "OptimSection", "PretrainConfig", "RunConfig", "TrainSection",
           "apply_overrides", "load_config", "merge_sections", "recipe"]


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
    # registry name (ssamba.list_models()): ssamba_tiny, ssast_tiny, ...
    name: str = "ssamba_tiny"
    # config overrides for create_model (e.g. {depth = 4}); input_tdim defaults to data.target_length
    overrides: dict = field(default_factory=dict)


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
class PretrainOptimSection(OptimSection):
    # SSAMBA: AdamW, wd 5e-8; SSAST: Adam, wd 5e-7 (recipe); the official code sets lr = step/1000 * lr every 50 steps
    weight_decay: float = 5e-8
    betas: tuple = (0.95, 0.999)
    warmup_steps: int = 1000
    warmup_every: int = 50
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
        from ssamba.models import check_overrides, model_family

        if model_family(self.model.name) not in ("ssamba", "ssast"):
            raise ValueError(f"model.name: {self.model.name} is not a spectrogram encoder (SSAMBA or SSAST); "
                             "HuBERT models pretrain with `ssamba hubert pretrain`")
        self.model.overrides = check_overrides(self.model.name, self.model.overrides)


def recipe(model_name: str) -> PretrainConfig:
    """Official preset for the model's family: SSAMBA (AdamW, wd 5e-8) or SSAST (Adam, wd 5e-7, batch 24 as
    in its run_mask_patch.sh); both lr 1e-4, betas (0.95, 0.999), warm-up 1000 steps, plateau on val accuracy."""
    cfg = PretrainConfig()
    cfg.model.name = model_name
    if model_name.startswith("ssast"):
        cfg.optim.name, cfg.optim.weight_decay, cfg.train.batch_size = "adam", 5e-7, 24
    return cfg


def merge_sections(cfg: Any, values: dict[str, Any], source: str) -> None:
    """Merge ``{"section": {"key": value}}`` into a sectioned config dataclass (pretraining, fine-tuning and
    HuBERT configs alike) and validate it. Every value is converted to its field's type (``ssamba.fields``);
    unknown sections / keys and wrong types raise a ValueError naming them and ``source``. All or nothing:
    after an error the config is unchanged."""
    before = copy.deepcopy(cfg.__dict__)
    try:
        sections = field_types(type(cfg))
        for section, entries in values.items():
            if section not in sections:
                raise ValueError(f"unknown config section {section!r}; known: {', '.join(sorted(sections))}")
            if not dataclasses.is_dataclass(sections[section]):  # a top-level key (e.g. HuBERT's test)
                setattr(cfg, section, coerce(entries, sections[section], section))
                continue
            if not isinstance(entries, dict):
                raise ValueError(f"[{section}] must be a table of keys, got {entries!r}")
            target = getattr(cfg, section)
            for key, value in typed_fields(type(target), entries, section).items():
                setattr(target, key, value)
        cfg.validate()
    except ValueError as e:
        cfg.__dict__.update(before)
        raise ValueError(f"{source}: {e}") from None


def apply_overrides(cfg: Any, pairs: list[str]) -> None:
    """``--set section.key=value`` on any sectioned config, the text parsed for the field's type (TOML or JSON
    values; a string field takes the text as written); ``model.overrides.depth=2`` sets one model override,
    checked against the model's config by ``validate``. Errors name the flag, the key and the expected type."""
    for pair in pairs:
        key, sep, text = pair.partition("=")
        parts = key.strip().split(".")
        source = f"--set {pair}"
        if not sep or len(parts) < 2 or not all(parts):
            raise ValueError(f"{source}: expected section.key=value")
        section, name, *rest = parts
        sections = field_types(type(cfg))
        if section not in sections or not dataclasses.is_dataclass(sections[section]):
            raise ValueError(f"{source}: unknown config section {section!r}; known: "
                             f"{', '.join(s for s, t in sections.items() if dataclasses.is_dataclass(t))}")
        fields = field_types(sections[section])
        if name in fields and rest and (fields[name] is not dict or len(rest) != 1):
            raise ValueError(f"{source}: {section}.{name} is not a table, so {key.strip()} does not exist")
        if name in fields and rest:  # one entry of a table, e.g. model.overrides.depth: typed in validate
            value = {**getattr(getattr(cfg, section), name), rest[0]: parse_text(text)}
        else:  # (an unknown key is named, with the known ones, by merge_sections)
            value = parse_text(text, fields.get(name, Any))
        merge_sections(cfg, {section: {name: value}}, source)


def load_config(path: str | Path) -> dict[str, Any]:
    """A TOML (``.toml``), YAML (``.yaml``/``.yml``) or JSON (``.json``, e.g. a run's saved config.json) file as a
    dict of sections. A malformed file is a ValueError naming it."""
    path = Path(path)
    text = path.read_text()
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        import yaml  # only YAML configs need it

        try:
            values = yaml.safe_load(text) or {}  # safe_load: plain data, never Python objects
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: cannot read the config: {e}") from e
    else:
        try:
            values = json.loads(text) if suffix == ".json" else tomllib.loads(text)
        except ValueError as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
            raise ValueError(f"{path}: cannot read the config: {e}") from e
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a config file holds sections (a mapping), got {type(values).__name__}")
    return values
