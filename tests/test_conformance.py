"""Official-code fixtures replayed through the importer; official checkpoint conversion."""

import json

import pytest
import torch

from ssamba.convert import conformance_cli, convert_checkpoint, import_official, replay
from ssamba.models import SSAMBAConfig, SSAMBAModel, SSASTConfig, SSASTModel, load_pretrained
from ssamba.pretrain import MaskedPatchPretraining
from tests.conftest import CONFORMANCE_ATOL, conformance_dir


@pytest.mark.parametrize("name", ["ssamba_a", "ssast_a"])
def test_fixture_replays_within_tolerance(name, capsys):
    folder = conformance_dir(name)
    results = replay(folder)
    bad = [r for r in results if not r.ok]
    assert not bad, bad
    compared = {r.output.split(" ")[0] for r in results}
    outputs = torch.load(folder / "outputs.pt", weights_only=True)
    replayable = {k for k in outputs if not k.endswith("_mask_index") and not k.startswith("ft_mlp_head.")}
    assert compared == replayable
    assert next(r for r in results if r.output == "mpc_acc").max_abs_err == 0
    assert conformance_cli(folder) == 0
    assert "mpc_nce" in capsys.readouterr().out


def test_convert_official_checkpoints(tmp_path):
    folder = conformance_dir("ssamba_a")
    config = json.loads((folder / "config.json").read_text())
    inputs = torch.load(folder / "inputs.pt", weights_only=True)
    outputs = torch.load(folder / "outputs.pt", weights_only=True)
    run = config["finetune_runs"]["ft_t256_s10"]
    # fine-tuned official checkpoint (mlp_head included) -> ssamba folder -> same logits
    kwargs_file = tmp_path / "kwargs.json"
    kwargs_file.write_text(json.dumps(run["constructor_kwargs"]))
    out = convert_checkpoint(folder / run["state_dict_file"], "ssamba", kwargs_file, tmp_path / "ft")
    model = load_pretrained(out).eval()
    with torch.no_grad():
        logits = model(inputs["fbank_t256"])
        torch.testing.assert_close(logits, outputs["ft_t256_s10_avgtok_logits"], rtol=0, atol=CONFORMANCE_ATOL)
    # pretraining checkpoint -> encoder + MSPM heads -> same pretraining loss
    out = convert_checkpoint(
        folder / "pretrain_state_dict.pt", "ssamba", config["pretrain_constructor_kwargs"], tmp_path / "pre"
    )
    objective = MaskedPatchPretraining.from_pretrained(out).eval()
    with torch.no_grad():
        mse = objective.mpg(inputs["fbank_t256"], outputs["mpg_mask_index"]).mse
    torch.testing.assert_close(mse, outputs["mpg_mse"], rtol=0, atol=CONFORMANCE_ATOL)


def test_importer_rejects_unsupported_configs():
    folder = conformance_dir("ssamba_a")
    kwargs = json.loads((folder / "config.json").read_text())["pretrain_constructor_kwargs"]
    state = torch.load(folder / "pretrain_state_dict.pt", weights_only=True)
    rms = {**kwargs, "vision_mamba_config": {**kwargs["vision_mamba_config"], "rms_norm": True}}
    with pytest.raises(NotImplementedError, match="rms_norm"):
        import_official(state, "ssamba", rms)
    with pytest.raises(ValueError, match="label_dimm"):
        import_official(state, "ssamba", {**kwargs, "label_dimm": 3})
    with pytest.raises(ValueError, match="depth"):
        import_official(
            state, "ssamba", {**kwargs, "vision_mamba_config": {**kwargs["vision_mamba_config"], "depth": 6}}
        )


# ---------------------------------------------------------------- a fixture of other sizes, same format


def _official_state(objective: MaskedPatchPretraining) -> dict:
    """ssamba names -> official DataParallel names (the inverse of the importer's mapping)."""
    enc = objective.encoder
    state = {f"module.v.{k}": v for k, v in enc.state_dict().items()}
    state |= {f"module.{k}": v for k, v in objective.state_dict().items() if not k.startswith("encoder.")}
    state["module.p_input_fdim"] = torch.tensor(enc.config.input_fdim)
    state["module.p_input_tdim"] = torch.tensor(enc.config.input_tdim)
    return state


def _our_overrides(kwargs: dict) -> dict:
    """Official fine-tuning constructor kwargs -> ssamba config overrides."""
    keys = ("input_fdim", "input_tdim", "fshape", "tshape", "fstride", "tstride")
    return {k: kwargs[k] for k in keys} | {"num_classes": kwargs["label_dim"]}


@pytest.mark.parametrize("family", ["ssamba", "ssast"])
def test_replay_reads_every_size_from_the_folder(family, tmp_path):
    """Another size, depth, batch, input length and mask count: nothing may be hard-coded."""
    torch.manual_seed(0)
    grid = dict(input_fdim=128, input_tdim=64, fshape=16, tshape=16, fstride=16, tstride=16)
    if family == "ssamba":
        vm = {"embed_dim": 64, "depth": 2, "if_bidirectional": True, "rms_norm": False, "fused_add_norm": False,
              "residual_in_fp32": False, "use_middle_cls_token": False}  # fmt: skip
        encoder = SSAMBAModel(SSAMBAConfig(embed_dim=64, depth=2, **grid))
        extra = {"vision_mamba_config": vm}
        final = "norm_f_out2"
    else:
        encoder = SSASTModel(SSASTConfig(embed_dim=192, num_heads=3, depth=1, **grid))
        extra = {}
        final = "norm_out"
    objective = MaskedPatchPretraining(encoder).eval()
    torch.save(_official_state(objective), tmp_path / "pretrain_state_dict.pt")
    batch, mask_patch = 3, 7
    inputs = {"fbank_t64": torch.randn(batch, 64, 128), "fbank_t48": torch.randn(batch, 48, 128)}
    masks = {k: torch.stack([torch.randperm(32)[:mask_patch] for _ in range(batch)]) for k in ("mpc", "mpg")}
    head = {"0.weight": torch.rand(64 if family == "ssamba" else 192) + 0.5}
    head |= {"0.bias": torch.randn_like(head["0.weight"]), "1.weight": torch.randn(4, head["0.weight"].numel())}
    head["1.bias"] = torch.randn(4)
    outputs = {"mpc_mask_index": masks["mpc"], "mpg_mask_index": masks["mpg"]}
    outputs |= {f"ft_mlp_head.{k}": v for k, v in head.items()}
    with torch.no_grad():
        mpc, mpg = objective.mpc(inputs["fbank_t64"], masks["mpc"]), objective.mpg(inputs["fbank_t64"], masks["mpg"])
        outputs |= {"mpc_acc": mpc.acc, "mpc_nce": mpc.nce, "mpc_cpred": mpc.pred, "mpg_mse": mpg.mse}
        outputs["mpg_gpred"] = mpg.pred
        runs = {}
        for frames, stride in ((48, 12), (64, 8)):
            tag = f"ft_t{frames}_s{stride}"
            kwargs = {**grid, "input_tdim": frames, "fstride": stride, "tstride": stride, "label_dim": 4,
                      "model_size": "tiny", "pretrain_stage": False, **extra}  # fmt: skip
            runs[tag] = {"input_tdim": frames, "constructor_kwargs": kwargs}
            config = encoder.config.from_dict({**encoder.config.to_dict(), **_our_overrides(kwargs)})
            tuned = type(encoder)(config).eval()
            tuned.load_adapted_state_dict(encoder.state_dict(), encoder.config)
            tuned.head.load_state_dict({("norm." if k[0] == "0" else "fc.") + k[2:]: v for k, v in head.items()})
            tokens, lengths = tuned.forward_features(inputs[f"fbank_t{frames}"])
            outputs[f"{tag}_pos_embed"] = tuned.pos_embed.detach()
            outputs[f"{tag}_avgtok_logits"] = tuned.forward_head(tokens, lengths, "avgtok")
            outputs[f"{tag}_cls_logits"] = tuned.forward_head(tokens, lengths, "cls")
            outputs[f"{tag}_final_tokens"] = tokens
            outputs[f"trace_{tag}_{final}"] = tokens[[1]]
    torch.save(inputs, tmp_path / "inputs.pt")
    torch.save(outputs, tmp_path / "outputs.pt")
    pretrain_kwargs = {**grid, "model_size": "tiny", "pretrain_stage": True, **extra}
    config = {"pretrain_input_tdim": 64, "pretrain_constructor_kwargs": pretrain_kwargs, "finetune_runs": runs}
    (tmp_path / "config.json").write_text(json.dumps(config | {"trace_batch": [1]}))

    results = replay(tmp_path)
    assert all(r.ok for r in results), [r for r in results if not r.ok]
    assert len(results) == len(outputs) - 2 - 4  # everything but the mask indices and head tensors

    outputs["mystery"] = torch.zeros(1)  # an output the replay does not know must fail, not pass silently
    torch.save(outputs, tmp_path / "outputs.pt")
    assert conformance_cli(tmp_path) == 1
    (tmp_path / "inputs.pt").unlink()
    assert conformance_cli(tmp_path) == 2
