"""Import official SSAMBA (``AMBAModel``) and SSAST (``ASTModel``) checkpoints.

Official checkpoints are ``torch.save(DataParallel(model).state_dict())`` files: plain tensors with a
``module.`` prefix. They are read with ``torch.load(weights_only=True)`` only. The official constructor
arguments (``label_dim``, ``fshape`` ... ``pretrain_stage``, ``model_size``, and for SSAMBA
``vision_mamba_config``; see ``shared/conformance/*/config.json``) say which model the checkpoint is
loaded into, as in the official code:

* ``pretrain_stage=True`` and a pretraining checkpoint -> :class:`MaskedPatchPretraining` (encoder plus
  ``mask_embed`` / ``cpredlayer`` / ``gpredlayer``).
* ``pretrain_stage=False`` and a pretraining checkpoint -> the official fine-tuning conversion: the encoder
  on the pretraining grid (from ``p_input_fdim/tdim`` and the patch-conv shape) is adapted to the
  fine-tuning grid (position embedding cut/interpolated), and a fresh ``label_dim`` head is drawn.
* ``pretrain_stage=False`` and a fine-tuned checkpoint (``mlp_head.*`` keys) -> loaded as is.

Key mapping: ``module.v.X`` -> ``X`` (``v.head*`` / ``v.head_dist*`` are never used upstream and are
dropped), ``module.mlp_head.0/1`` -> ``head.norm/fc``, pretraining heads keep their names.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ssamba.models.spectrogram import (
    SpectrogramConfig,
    SpectrogramEncoder,
    SSAMBAConfig,
    SSAMBAModel,
    SSASTConfig,
    SSASTModel,
)
from ssamba.pretrain.mspm import MaskedPatchPretraining

__all__ = [
    "FAMILIES",
    "convert_checkpoint",
    "import_official",
    "load_official_state_dict",
    "official_config",
]

FAMILIES = ("ssamba", "ssast")

# Official constructor signatures (ast_models.py / both_models.py) and their defaults.
_CONSTRUCTOR_DEFAULTS: dict[str, Any] = {
    "label_dim": 527,
    "fshape": 128,
    "tshape": 2,
    "fstride": 128,
    "tstride": 2,
    "input_fdim": 128,
    "input_tdim": 1024,
    "pretrain_stage": True,
    "load_pretrained_mdl_path": None,
}
_MODEL_SIZE_DEFAULT = {"ssamba": "base", "ssast": "base_nokd"}
# ASTModel model_size -> (embed_dim, heads, cls_token_num); depth is read from the checkpoint.
_DEIT_SIZES = {"tiny": (192, 3, 2), "small": (384, 6, 2), "base": (768, 12, 2), "base_nokd": (768, 12, 1)}
# AMBAModel's default_vision_mamba_config, merged under the caller's config as upstream does.
_AMBA_VM_DEFAULTS: dict[str, Any] = {
    "img_size": (128, 1024),
    "patch_size": 16,
    "stride": 8,
    "embed_dim": 768,
    "depth": 24,
    "rms_norm": True,
    "residual_in_fp32": True,
    "fused_add_norm": True,
    "final_pool_type": "mean",
    "if_abs_pos_embed": True,
    "if_rope": False,
    "if_rope_residual": False,
    "bimamba_type": "v2",
    "if_cls_token": True,
    "if_devide_out": True,
    "use_middle_cls_token": True,
}
# VisionMamba's defaults for the keys that change the computation AMBAModel runs.
_VIM_DEFAULTS: dict[str, Any] = {
    "d_state": 16,
    "drop_rate": 0.0,
    "drop_path_rate": 0.1,
    "norm_epsilon": 1e-5,
    "if_bidirectional": False,
    "if_bimamba": False,
    "use_double_cls_token": False,
    "init_layer_scale": None,
    "ssm_cfg": None,
}
# Every keyword VisionMamba (hustvl/Vim models_mamba.py) accepts; anything else is most likely a typo.
_VIM_KEYS = (
    set(_AMBA_VM_DEFAULTS)
    | set(_VIM_DEFAULTS)
    | {
        "channels",
        "num_classes",
        "initializer_cfg",
        "device",
        "dtype",
        "ft_seq_len",
        "pt_hw_seq_len",
        "flip_img_sequences_ratio",
        "if_divide_out",
    }
)
# (key, value SSAMBA supports): AMBAModel's own forward only works with, or is only reproduced for, these.
# Not listed because they do not change AMBAModel's numbers: use_middle_cls_token / final_pool_type (only
# VisionMamba.forward reads them, AMBAModel always prepends the cls token), fused_add_norm /
# residual_in_fp32 (the same add + LayerNorm in float32), img_size / patch_size / stride / num_classes
# (patch conv and position embedding are replaced, v.head is unused).
_VIM_REQUIRED = [
    ("if_bidirectional", True),  # the layer-pair loop; False runs layers sequentially (not supported)
    ("bimamba_type", "v2"),
    ("if_bimamba", False),  # True forces bimamba v1 in create_block
    ("rms_norm", False),  # LayerNorm blocks and norm_f (the official scripts' choice)
    ("if_rope", False),
    ("if_rope_residual", False),
    ("if_cls_token", True),
    ("use_double_cls_token", False),
    ("if_abs_pos_embed", True),
    ("init_layer_scale", None),
]

_PRETRAIN_HEAD = re.compile(r"^(mask_embed|[cg]predlayer\.[02]\.(weight|bias))$")
_PRETRAIN_META = ("p_input_fdim", "p_input_tdim")


def load_official_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read an official ``.pth`` with ``weights_only=True`` and strip the DataParallel ``module.`` prefix."""
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (an official AMBAModel/ASTModel checkpoint)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _kwargs(family: str, official_kwargs: dict[str, Any]) -> dict[str, Any]:
    known = set(_CONSTRUCTOR_DEFAULTS) | {"model_size"} | ({"vision_mamba_config"} if family == "ssamba" else set())
    unknown = sorted(set(official_kwargs) - known)
    if unknown:
        raise ValueError(f"unknown official {family} constructor argument(s): {', '.join(unknown)}")
    return {**_CONSTRUCTOR_DEFAULTS, "model_size": _MODEL_SIZE_DEFAULT[family], **official_kwargs}


def _vision_mamba_config(vm: dict[str, Any] | None) -> dict[str, Any]:
    if vm is None:
        raise ValueError("an official SSAMBA constructor needs vision_mamba_config (AMBAModel fails without it)")
    unknown = sorted(set(vm) - _VIM_KEYS)
    if unknown:
        raise ValueError(f"unknown VisionMamba argument(s) in vision_mamba_config: {', '.join(unknown)}")
    merged = {**_VIM_DEFAULTS, **_AMBA_VM_DEFAULTS, **vm}
    for key, want in _VIM_REQUIRED:
        if merged[key] != want:
            raise NotImplementedError(
                f"vision_mamba_config {key}={merged[key]!r} is not supported (SSAMBA uses {want!r})"
            )
    return merged


def _layer_count(state: dict[str, Tensor], prefix: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(rf"^{re.escape(prefix)}(\d+)\.", k))}
    if found != set(range(len(found))):
        raise ValueError(f"checkpoint layers under {prefix!r} are not numbered 0..n-1: {sorted(found)}")
    return len(found)


def official_config(
    family: str, official_kwargs: dict[str, Any], state: dict[str, Tensor], grid_from_checkpoint: bool = False
) -> SpectrogramConfig:
    """ssamba config equivalent to an official constructor call for the (prefix-stripped) ``state``.

    With ``grid_from_checkpoint`` the patch grid is the pretraining one recorded in the checkpoint
    (``p_input_fdim/tdim``, stride = patch shape), as the official fine-tuning constructor rebuilds it.
    Architecture sizes that the official code takes from its defaults (d_state, d_conv, expand, dt_rank,
    mlp width, depth of a cut-down DeiT) are read from the tensor shapes.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    kw = _kwargs(family, official_kwargs)
    fshape, tshape = (int(n) for n in state["v.patch_embed.proj.weight"].shape[2:])
    if (kw["fshape"], kw["tshape"]) != (fshape, tshape):
        raise ValueError(
            f"patch shape {kw['fshape']}x{kw['tshape']} differs from the checkpoint's {fshape}x{tshape} "
            "(the official code refuses this too)"
        )
    if grid_from_checkpoint:
        grid = {
            "input_fdim": int(state["p_input_fdim"]),
            "input_tdim": int(state["p_input_tdim"]),
            "fstride": fshape,
            "fshape": fshape,
            "tstride": tshape,
            "tshape": tshape,
        }
    else:
        grid = {k: int(kw[k]) for k in ("input_fdim", "input_tdim", "fshape", "tshape", "fstride", "tstride")}
    num_classes = 0 if kw["pretrain_stage"] else int(kw["label_dim"])
    embed_dim = int(state["v.pos_embed"].shape[-1])

    if family == "ssast":
        if kw["model_size"] not in _DEIT_SIZES:
            raise ValueError(f"model_size must be one of {', '.join(_DEIT_SIZES)}, got {kw['model_size']!r}")
        dim, heads, n_cls = _DEIT_SIZES[kw["model_size"]]
        if dim != embed_dim:
            raise ValueError(f"model_size {kw['model_size']!r} means embed_dim {dim}, the checkpoint has {embed_dim}")
        return SSASTConfig(
            **grid,
            embed_dim=dim,
            num_heads=heads,
            num_cls_tokens=n_cls,
            depth=_layer_count(state, "v.blocks."),
            mlp_ratio=state["v.blocks.0.mlp.fc1.weight"].shape[0] / dim,
            num_classes=num_classes,
        )

    vm = _vision_mamba_config(kw.get("vision_mamba_config"))
    depth = _layer_count(state, "v.layers.")
    if (int(vm["embed_dim"]), int(vm["depth"])) != (embed_dim, depth):
        raise ValueError(
            f"vision_mamba_config says embed_dim={vm['embed_dim']}, depth={vm['depth']}; "
            f"the checkpoint has {embed_dim}, {depth}"
        )
    if "v.layers.0.mixer.in_proj.bias" in state or "v.layers.0.mixer.conv1d.bias" not in state:
        raise NotImplementedError("Mamba mixers with an in/out_proj bias or without a conv bias are not supported")
    a_log = state["v.layers.0.mixer.A_log"]  # (E, N)
    d_inner = int(a_log.shape[0])
    if d_inner % embed_dim:
        raise ValueError(f"d_inner {d_inner} is not a multiple of embed_dim {embed_dim}")
    return SSAMBAConfig(
        **grid,
        embed_dim=embed_dim,
        depth=depth,
        d_state=int(a_log.shape[1]),
        d_conv=int(state["v.layers.0.mixer.conv1d.weight"].shape[-1]),
        expand=d_inner // embed_dim,
        dt_rank=int(state["v.layers.0.mixer.dt_proj.weight"].shape[1]),
        norm_eps=float(vm["norm_epsilon"]),
        divide_out=bool(vm.get("if_devide_out", vm.get("if_divide_out", True))),
        drop_rate=float(vm["drop_rate"]),
        drop_path_rate=float(vm["drop_path_rate"]),
        num_classes=num_classes,
    )


def _split_state(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Official keys -> (encoder state in ssamba names, pretraining-head state)."""
    encoder, heads = {}, {}
    for key, value in state.items():
        if key.startswith("v.head.") or key.startswith("v.head_dist.") or key in _PRETRAIN_META:
            continue  # unused classifier of the timm/Vim backbone; grid metadata (read separately)
        if key.startswith("v."):
            encoder[key[2:]] = value
        elif key.startswith("mlp_head.0."):
            encoder["head.norm." + key.removeprefix("mlp_head.0.")] = value
        elif key.startswith("mlp_head.1."):
            encoder["head.fc." + key.removeprefix("mlp_head.1.")] = value
        elif _PRETRAIN_HEAD.match(key):
            heads[key] = value
        else:
            raise ValueError(f"unexpected key in official checkpoint: {key!r}")
    return encoder, heads


def _build(config: SpectrogramConfig, fast_path: bool = True) -> SpectrogramEncoder:
    if isinstance(config, SSAMBAConfig):
        return SSAMBAModel(dataclasses.replace(config, fast_path=fast_path))
    return SSASTModel(config)


def _load_exact(model: torch.nn.Module, state: dict[str, Tensor]) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"official checkpoint does not fit: missing {missing}, unexpected {unexpected}")


def import_official(
    checkpoint: str | Path | dict[str, Tensor], family: str, official_kwargs: dict[str, Any], fast_path: bool = True
) -> SpectrogramEncoder | MaskedPatchPretraining:
    """Build the ssamba model that the official constructor ``official_kwargs`` would give for
    ``checkpoint`` (a ``.pth`` path or an already loaded state dict, ``module.`` prefix optional).

    Returns a :class:`MaskedPatchPretraining` for ``pretrain_stage=True``, else a classifier
    (:class:`SSAMBAModel` / :class:`SSASTModel` with ``num_classes=label_dim``); module in eval mode.
    ``load_pretrained_mdl_path`` is ignored: ``checkpoint`` is the weights to use. ``fast_path=False`` gives SSAMBA's
    faithful arithmetic (the official operation order and the reference scan), as the conformance replay uses.
    """
    if isinstance(checkpoint, dict):
        state = {k.removeprefix("module."): v for k, v in checkpoint.items()}
    else:
        state = load_official_state_dict(checkpoint)
    kw = _kwargs(family, official_kwargs)
    encoder_state, head_state = _split_state(state)
    is_pretrain_ckpt = all(k in state for k in _PRETRAIN_META)

    if kw["pretrain_stage"]:
        if not is_pretrain_ckpt or not head_state:
            raise ValueError("pretrain_stage=True needs a pretraining checkpoint (p_input_*, mask_embed, c/gpredlayer)")
        if (kw["fstride"], kw["tstride"]) != (kw["fshape"], kw["tshape"]):
            raise ValueError("pretraining uses stride = patch shape (official ValueError)")
        config = official_config(family, kw, state)
        if (config.input_fdim, config.input_tdim) != (int(state["p_input_fdim"]), int(state["p_input_tdim"])):
            raise ValueError("input_fdim/input_tdim differ from the checkpoint's p_input_fdim/p_input_tdim")
        model = MaskedPatchPretraining(_build(config, fast_path))
        _load_exact(model, {**{"encoder." + k: v for k, v in encoder_state.items()}, **head_state})
        return model.eval()

    config = official_config(family, kw, state)
    model = _build(config, fast_path)
    if any(k.startswith("head.") for k in encoder_state):
        _load_exact(model, encoder_state)  # fine-tuned checkpoint: already on the fine-tuning grid
        return model.eval()
    if not is_pretrain_ckpt:
        raise ValueError("checkpoint has neither mlp_head (fine-tuned) nor p_input_fdim/tdim (pretraining) keys")
    # Official pretrain_stage=False path: rebuild the pretraining encoder, then cut/interpolate pos_embed.
    # (Its new patch Conv2d for another stride sums the weight over the single input channel: a no-op.)
    source = official_config(family, kw, state, grid_from_checkpoint=True)
    model.load_adapted_state_dict(encoder_state, source)
    return model.eval()


def convert_checkpoint(
    in_path: str | Path, family: str, official_kwargs: dict[str, Any] | str | Path, out_dir: str | Path
) -> Path:
    """``ssamba convert``: official ``.pth`` + constructor kwargs (dict or JSON file) -> ``save_pretrained``
    folder (safetensors + config.json; pretraining checkpoints also write ``mspm.safetensors``)."""
    if not isinstance(official_kwargs, dict):
        official_kwargs = json.loads(Path(official_kwargs).read_text())
    model = import_official(in_path, family, official_kwargs)
    card = {"source": f"Converted by `ssamba convert` from the official {family.upper()} checkpoint "
                      f"`{Path(in_path).name}` (constructor arguments: `{json.dumps(official_kwargs)}`)."}
    return model.save_pretrained(out_dir, card)
