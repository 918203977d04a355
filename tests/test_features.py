import json
import math
from pathlib import Path

import pytest
import torch

from ssamba import features
from tests.conftest import conformance_dir

KALDI_REFERENCE = Path(__file__).parent / "data" / "kaldi_reference.json"


@pytest.fixture(scope="module")
def official():
    return torch.load(conformance_dir("fbank") / "fbank.pt", weights_only=True)


def test_official_fbank_matches_fixture(official):
    raw = features.official_fbank(official["waveform"])
    err = (raw - official["fbank_raw"]).abs()
    # The tolerance; the implementation follows the official float32 order and is in fact exact.
    assert raw.shape == (298, 128)
    assert err.max() <= 1e-2 and err.mean() <= 1e-4
    assert torch.equal(raw, official["fbank_raw"])


@pytest.mark.parametrize("target", [1024, 256])
def test_official_pad_cut_and_normalisation(official, target):
    unnorm = features.official_fbank(official["waveform"], target)
    norm = features.normalize(unnorm, features.AUDIOSET_LIBRISPEECH_MEAN, features.AUDIOSET_LIBRISPEECH_STD)
    assert (unnorm - official[f"fbank_t{target}_unnormalised"]).abs().max() <= 1e-2
    assert (norm - official[f"fbank_t{target}_normalised"]).abs().max() <= 1e-3
    if target == 1024:  # padded frames are zeros before normalisation
        assert torch.allclose(norm[-1], torch.full((128,), 0.4670324))


def test_batched_fbank_equals_items_alone(official):
    wave = official["waveform"][0]
    other = torch.sin(torch.arange(30000) * 0.05) * 0.3
    batch = torch.zeros(2, 48000)
    batch[0] = wave
    batch[1, :30000] = other
    feats, frames = features.batch_fbank(batch, torch.tensor([48000, 30000]))
    assert frames.tolist() == [298, features.num_frames(30000)]
    assert torch.equal(feats[0], official["fbank_raw"])
    assert torch.equal(feats[1, : frames[1]], features.official_fbank(other))
    assert feats[1, frames[1]:].abs().max() == 0


def test_fbank_leading_dims_and_device_agnostic_dtype():
    x = torch.randn(2, 3, 4000, dtype=torch.float64) * 0.1
    out = features.fbank(x)
    assert out.shape == (2, 3, features.num_frames(4000), 128) and out.dtype == torch.float64
    assert torch.allclose(out[1, 2], features.fbank(x[1, 2]))


def test_fbank_floor_and_empty_mel_bin():
    # 128 bins on a 512-point FFT: bin 3 holds no FFT bin and sits at log(float32 eps).
    out = features.fbank(torch.randn(1600) * 0.1)
    assert torch.allclose(out[:, 3], torch.full((out.shape[0],), -15.942385))


def test_too_short_for_one_frame():
    with pytest.raises(ValueError, match="shorter than one frame"):
        features.fbank(torch.zeros(399))
    assert features.num_frames(399) == 0 and features.num_frames(400) == 1 and features.num_frames(560) == 2


def _reference_signal():
    t = torch.arange(8000, dtype=torch.float64) / 16000
    return (0.3 * torch.sin(2 * math.pi * (200 * t + 1500 * t * t))
            + 0.2 * torch.sin(2 * math.pi * 3100 * t) * (1 + 0.5 * torch.sin(2 * math.pi * 3 * t))).float()


@pytest.mark.parametrize("key,fn", [
    ("mfcc_default", lambda w: features.mfcc(w)),
    ("mfcc_energy", lambda w: features.mfcc(w, use_energy=True)),
    ("fbank_povey_energy_23", lambda w: features.fbank(w, num_mel_bins=23, window_type="povey", use_energy=True,
                                                        htk_compat=False)),
    ("fbank_hamming_40_htk_energy", lambda w: features.fbank(w, num_mel_bins=40, window_type="hamming",
                                                              use_energy=True, preemphasis=0.5, low_freq=60,
                                                              high_freq=-400)),
])
def test_matches_kaldi_compliance_reference(key, fn):
    ref = json.loads(KALDI_REFERENCE.read_text())
    out = fn(_reference_signal())[ref["frames"]]
    assert torch.allclose(out, torch.tensor(ref[key]), atol=1e-4, rtol=1e-5), key


def test_deltas_regression_formula():
    x = torch.arange(10.0).pow(2).unsqueeze(1)  # x[t] = t^2: interior delta = 2t
    d = features.deltas(x)
    assert torch.allclose(d[2:-2, 0], 2 * torch.arange(2.0, 8.0))
    # edges replicate the first/last frame
    assert torch.isclose(d[0, 0], torch.tensor((1 * (1 - 0) + 2 * (4 - 0)) / 10))


def test_mfcc_with_deltas_is_39d():
    out = features.mfcc_with_deltas(torch.randn(3, 16000) * 0.1)
    assert out.shape == (3, 98, 39)
    assert torch.allclose(out[..., 13:26], features.deltas(out[..., :13]))


def test_pad_or_cut():
    x = torch.ones(5, 4)
    assert features.pad_or_cut(x, 8)[5:].abs().sum() == 0 and features.pad_or_cut(x, 8).shape == (8, 4)
    assert features.pad_or_cut(x, 3).shape == (3, 4)


def test_bad_window_and_mel_range():
    with pytest.raises(ValueError, match="window_type"):
        features.fbank(torch.zeros(800), window_type="blackmanish")
    with pytest.raises(ValueError, match="mel range"):
        features.fbank(torch.zeros(800), low_freq=9000)
