"""Embeddings of recordings of any length: the window plan, windowed vs alone, streamed vs decoded, the CLI."""

import json

import numpy as np
import pytest
import soundfile
import torch
from safetensors.torch import load_file

from ssamba import features as feats
from ssamba.audio import save_audio
from ssamba.cli import main
from ssamba.models import create_model
from ssamba.tasks.embed import WindowPlan, column_times, embed_recording, embed_waveform
from tests.conftest import FP32_REORDER, one_error_line

TINY = {"ssamba_tiny": {"embed_dim": 32, "depth": 2}, "ssast_tiny": {"embed_dim": 32, "depth": 2, "num_heads": 2}}


@pytest.mark.parametrize("total", [16, 100, 128, 129, 500, 1001])
@pytest.mark.parametrize("window,hop", [(128, 64), (128, 16), (128, 128), (96, 48)])
def test_window_plan_tiles_every_column_once(total, window, hop):
    plan = WindowPlan.make(total, window, hop, tshape=16, tstride=16)
    assert plan.columns == (total - 16) // 16 + 1
    owned = [c for _, _, a, b in plan.windows for c in range(a, b)]
    assert owned == list(range(plan.columns))
    per_window = (window - 16) // 16 + 1
    for first, frames, a, b in plan.windows:
        assert first % 16 == 0 and 16 <= frames <= window and first + frames <= total
        assert first // 16 <= a <= b <= first // 16 + (frames - 16) // 16 + 1 <= first // 16 + per_window


def test_window_plan_rejects_bad_hops():
    with pytest.raises(ValueError, match="hop"):
        WindowPlan.make(500, 128, 24, 16, 16)  # not on the column grid
    with pytest.raises(ValueError, match="hop"):
        WindowPlan.make(500, 128, 256, 16, 16)  # longer than a window: columns would be missed


def test_column_times_are_frame_centres():
    t = column_times(3, tshape=16, tstride=16)
    # column 0: frames 0..15 = samples 0 .. 15*160 + 400 -> centre 1400 samples = 87.5 ms; then every 160 ms
    assert torch.allclose(t, torch.tensor([0.0875, 0.2475, 0.4075], dtype=torch.float64))


@pytest.mark.parametrize("name", sorted(TINY))
def test_windowed_columns_equal_each_window_alone(name):
    torch.manual_seed(0)
    model = create_model(name, input_tdim=128, **TINY[name]).eval()
    wave = torch.from_numpy((0.1 * np.random.default_rng(0).standard_normal(16000 * 5)).astype(np.float32))
    vectors, times = embed_waveform(model, wave, -4.0, 4.0, hop_frames=64, batch_size=3)
    plan = WindowPlan.make(feats.num_frames(wave.numel()), 128, 64, 16, 16)
    assert vectors.shape == (2 if name == "ssamba_tiny" else 3, plan.columns, 32) and times.shape == (plan.columns,)
    assert len(plan.windows) > 3  # the recording is several windows long
    for first, frames, a, b in plan.windows:
        chunk = wave[first * 160 : first * 160 + (frames - 1) * 160 + 400]
        x = feats.normalize(feats.official_fbank(chunk), -4.0, 4.0)[None]
        with torch.no_grad():
            layers, final, _ = model.extract_features_with_final(x)
        stack = torch.stack([*layers, final], dim=1)[0]  # (L + 1, K, C)
        s, t_valid = model.num_special_tokens, (frames - 16) // 16 + 1
        columns = stack[:, s:].unflatten(1, (8, t_valid)).mean(1)
        torch.testing.assert_close(vectors[:, a:b], columns[:, a - first // 16 : b - first // 16], **FP32_REORDER)


def test_streamed_file_equals_decoded_waveform_stereo_and_other_rates(tmp_path):
    torch.manual_seed(0)
    model = create_model("ssamba_tiny", input_tdim=128, **TINY["ssamba_tiny"]).eval()
    rng = np.random.default_rng(1)
    stereo = (0.1 * rng.standard_normal((16000 * 4, 2))).astype(np.float32)
    soundfile.write(tmp_path / "stereo.wav", stereo, 16000, subtype="FLOAT")
    got, times = embed_recording(model, tmp_path / "stereo.wav", -4.0, 4.0, hop_frames=48)
    want, want_times = embed_waveform(model, stereo.mean(1), -4.0, 4.0, hop_frames=48)
    torch.testing.assert_close(got, want, **FP32_REORDER)
    assert torch.equal(times, want_times)
    save_audio(tmp_path / "8k.wav", (0.1 * rng.standard_normal(8000 * 3)).astype(np.float32), 8000)
    vectors, times = embed_recording(model, tmp_path / "8k.wav", -4.0, 4.0)  # resampled whole, then windowed
    assert vectors.shape[1] == times.shape[0] == (feats.num_frames(16000 * 3) - 16) // 16 + 1


def test_embed_cli_long_recording_frames_and_mean(tmp_path, capsys):
    model = create_model("ssast_tiny", input_tdim=128, **TINY["ssast_tiny"])
    model.save_pretrained(tmp_path / "m")
    rng = np.random.default_rng(2)
    short, long = tmp_path / "short.wav", tmp_path / "long.wav"
    save_audio(short, (0.1 * rng.standard_normal(12000)).astype(np.float32))
    save_audio(long, (0.1 * rng.standard_normal(16000 * 20)).astype(np.float32))  # 20 s: 16 windows of 1.28 s
    files = [str(short), str(long)]
    assert main(["embed", "--model", str(tmp_path / "m"), *files, "--out", str(tmp_path / "f"), "--pool", "frames",
                 "--format", "safetensors", "--quiet"]) == 0
    assert "1 longer than the model's input" in capsys.readouterr().out
    out = load_file(str(tmp_path / "f.safetensors"))
    summary = json.loads((tmp_path / "f.json").read_text())
    assert summary["files"] == files and summary["windowed"] == 1 and summary["hop_frames"] == 64
    columns = (feats.num_frames(16000 * 20) - 16) // 16 + 1
    assert out["clip1"].shape == (3, columns, 32) and out["clip1.times"].shape == (columns,)
    times = out["clip1.times"].double()
    # all 20 s covered: the first column starts at 0, the last one ends less than a column (0.16 s) before the end
    assert times[0] == pytest.approx(0.0875, abs=1e-6) and 20.0 - 0.16 < times[-1] + 0.0875 <= 20.0
    assert torch.allclose(times.diff(), torch.full((columns - 1,), 0.16, dtype=torch.float64), atol=1e-6)
    # mean pooling = the mean of the frame vectors
    assert main(["embed", "--model", str(tmp_path / "m"), *files, "--out", str(tmp_path / "e.npy"), "--quiet"]) == 0
    pooled = np.load(tmp_path / "e.npy")
    assert pooled.shape == (2, 3, 32)
    np.testing.assert_allclose(pooled[1], out["clip1"].mean(1).numpy(), rtol=1e-5, atol=1e-6)
    # whole-clip tokens exist only for clips within the model's input: one line, exit 2
    assert main(["embed", "--model", str(tmp_path / "m"), *files, "--out", str(tmp_path / "t"), "--pool", "none",
                 "--format", "safetensors"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "long.wav" in err and "pool frames" in err
