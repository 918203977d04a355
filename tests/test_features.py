import json
import math
from pathlib import Path

import pytest
import torch

from ssamba import features
from tests.conftest import conformance_dir

KALDI_REFERENCE = Path(__file__).parent / "data" / "kaldi_reference.json"


# Tolerances. Nothing here compares float32 bits made on another machine: the fixtures were computed by
# torchaudio on one CPU, and torch's FFT and GEMM kernels differ per CPU (AVX2, AVX-512, AMX, ARM), so two
# correct float32 implementations differ by their rounding errors. The error model, in float32 unit roundoff
# u = 2^-24: an N-point FFT errs per output bin by about u log2(N) ||x_w|| (x_w the windowed frame; Parseval),
# so mel energy E_m = sum_k w_mk |X_k|^2 errs by at most 2 u log2(N) ||x_w|| sum_k w_mk |X_k| <=
# 2 u log2(N) ||x_w|| sqrt(W_m E_m) (Cauchy-Schwarz, W_m = sum_k w_mk), and its log by that over E_m: tight
# where a bin holds much of the frame's energy, loose (up to 1e-2) in near-empty bins just above the
# log(eps) floor. Measured |float32 - float64| of this implementation reaches 2.2x that bound (AMD EPYC, every
# numerics profile: the per-bin FFT error is not uniform), so one side gets C_FFT = 8 times it and a
# comparison of two float32 results the sum of both sides' bounds.
U32 = 2.0**-24
C_FFT = 8.0


def log_mel_rounding_bound(signal: torch.Tensor, **mel_options) -> torch.Tensor:
    """(frames, M) bound on the float32 rounding error of ``features.fbank(signal, **mel_options)``'s log mel
    energies, from a float64 evaluation (public options only: W_m is the mel energy of a unit impulse with a
    rectangular window and no DC removal or pre-emphasis, whose spectrum is 1 in every FFT bin)."""
    pre = mel_options.get("preemphasis", 0.97)
    banks = {k: v for k, v in mel_options.items() if k in ("num_mel_bins", "low_freq", "high_freq")}
    out = features.fbank(signal.double(), **mel_options, use_energy=True, htk_compat=True)
    log_mel, log_energy = out[..., :-1], out[..., -1:]
    impulse = torch.zeros(400, dtype=torch.float64)
    impulse[0] = 1.0
    weights = features.fbank(impulse, **banks, window_type="rectangular", preemphasis=0.0, remove_dc_offset=False)
    # ||x_w|| <= (1 + |pre-emphasis|) ||x|| (a window is <= 1); ||x||^2 is the frame energy Kaldi reports
    frame_norm = (1 + abs(pre)) * (0.5 * log_energy).exp()
    fft_bound = 2 * U32 * math.log2(512) * frame_norm * (weights[0].exp() / log_mel.exp()).sqrt()
    return C_FFT * fft_bound + 4 * U32 * log_mel.abs()  # + the rounding of the log itself


def assert_within(got: torch.Tensor, want: torch.Tensor, tol: torch.Tensor, what: str) -> None:
    err = (got.double() - want.double()).abs()
    worst = int((err - tol).argmax())
    assert bool((err <= tol).all()), (f"{what}: |error| {err.flatten()[worst]:.3g} > tolerance "
                                      f"{tol.flatten()[worst]:.3g} at flat index {worst}")


@pytest.fixture(scope="module")
def official():
    return torch.load(conformance_dir("fbank") / "fbank.pt", weights_only=True)


@pytest.fixture(scope="module")
def official_tolerance(official):
    """Our float32 fbank vs the fixture's (float32 on another CPU): both sides' rounding bounds."""
    wave = official["waveform"][0]
    return 2 * log_mel_rounding_bound(wave - wave.double().mean().float())


def test_official_fbank_matches_fixture(official, official_tolerance):
    raw = features.official_fbank(official["waveform"])
    assert raw.shape == (298, 128)
    assert_within(raw, official["fbank_raw"], official_tolerance, "official fbank")
    # The fixture README's own summary of float32 vs float64: typical cells move by ~3e-6.
    assert (raw - official["fbank_raw"]).abs().mean() <= 1e-4


@pytest.mark.parametrize("target", [1024, 256])
def test_official_pad_cut_and_normalisation(official, official_tolerance, target):
    unnorm = features.official_fbank(official["waveform"], target)
    norm = features.normalize(unnorm, features.AUDIOSET_LIBRISPEECH_MEAN, features.AUDIOSET_LIBRISPEECH_STD)
    tol = features.pad_or_cut(official_tolerance, target)  # padded frames are exact zeros on both sides
    assert_within(unnorm, official[f"fbank_t{target}_unnormalised"], tol, "unnormalised")
    # (x - mean) / (2 std) divides the error by 2 std and adds the rounding of the division
    assert_within(norm, official[f"fbank_t{target}_normalised"],
                  tol / (2 * features.AUDIOSET_LIBRISPEECH_STD) + 4 * U32 * norm.abs(), "normalised")
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
    # Same operations on the same machine, but a batch of 2 may take other FFT / GEMM kernels than 1, so the
    # items agree to one side's rounding bound, not bit for bit.
    for b, alone in ((0, wave), (1, other)):
        n = int(frames[b])
        tol = log_mel_rounding_bound(alone - alone.double().mean().float())
        assert_within(feats[b, :n], features.official_fbank(alone), tol, f"item {b}")
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


FBANK_REFERENCES = {  # key -> fbank options; every one with use_energy=True
    "fbank_povey_energy_23": {"num_mel_bins": 23, "window_type": "povey", "htk_compat": False},
    "fbank_hamming_40_htk_energy": {"num_mel_bins": 40, "window_type": "hamming", "preemphasis": 0.5,
                                    "low_freq": 60, "high_freq": -400, "htk_compat": True},
}
# A frame's log energy log(sum x^2) (400 squares) is relatively exact to 400 u per side.
ENERGY_TOL = 2 * 400 * U32


def _split_energy(out: torch.Tensor, htk_compat: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(log mel (F, M), log energy (F,)) of an fbank computed with use_energy=True."""
    return (out[..., :-1], out[..., -1]) if htk_compat else (out[..., 1:], out[..., 0])


@pytest.mark.parametrize("key", sorted(FBANK_REFERENCES))
def test_fbank_matches_kaldi_compliance_reference(key):
    ref = json.loads(KALDI_REFERENCE.read_text())
    opts = FBANK_REFERENCES[key]
    signal = _reference_signal()
    out = features.fbank(signal, **opts, use_energy=True)[ref["frames"]]
    mel_opts = {k: v for k, v in opts.items() if k != "htk_compat"}
    tol = 2 * log_mel_rounding_bound(signal, **mel_opts)[ref["frames"]]  # ours + the reference's rounding
    (mel, energy), (ref_mel, ref_energy) = (_split_energy(x, opts["htk_compat"]) for x in (out, torch.tensor(ref[key])))
    assert_within(mel, ref_mel, tol, key)
    assert_within(energy, ref_energy, ENERGY_TOL + 4 * U32 * energy.abs(), f"{key} energy")


def _kaldi_dct_and_lifter(num_ceps: int = 13, num_mel_bins: int = 23, lifter: float = 22.0):
    """Kaldi's MFCC transform written out again in float64: (M, C) DCT-II, orthonormal with a first basis of
    sqrt(1/M), and the sinusoidal lifter 1 + L/2 sin(pi i / L)."""
    m, c = torch.arange(num_mel_bins, dtype=torch.float64), torch.arange(num_ceps, dtype=torch.float64)
    dct = torch.cos(math.pi / num_mel_bins * (m[:, None] + 0.5) * c[None]) * math.sqrt(2.0 / num_mel_bins)
    dct[:, 0] = math.sqrt(1.0 / num_mel_bins)
    return dct, 1.0 + 0.5 * lifter * torch.sin(math.pi * c / lifter)


@pytest.mark.parametrize("key,use_energy", [("mfcc_default", False), ("mfcc_energy", True)])
def test_mfcc_matches_kaldi_compliance_reference(key, use_energy):
    """MFCC = lifter * DCT(log mel) of the 23-bin povey filterbank that ``fbank_povey_energy_23`` also holds.
    The cepstra magnify the log-mel rounding of near-empty bins (up to 2.6e-3 apart between two CPUs, on
    values near 150), so the spectral part is checked by the fbank test above and here the difference
    our log mel - the reference's log mel, measured, is propagated through the transform (exactly linear);
    what is left is the rounding of two 23-term float32 dot products."""
    ref = json.loads(KALDI_REFERENCE.read_text())
    frames, signal = ref["frames"], _reference_signal()
    out = features.mfcc(signal, use_energy=use_energy)[frames]
    want = torch.tensor(ref[key]).double()
    mel = _split_energy(features.fbank(signal, **FBANK_REFERENCES["fbank_povey_energy_23"], use_energy=True),
                        False)[0][frames].double()
    ref_mel = _split_energy(torch.tensor(ref["fbank_povey_energy_23"]).double(), False)[0]
    dct, lifter = _kaldi_dct_and_lifter()
    # the reference's cepstra are its own log mel transformed: checks our reading of Kaldi's DCT and lifter
    transform_rounding = 2 * 23 * U32 * (ref_mel.abs() @ dct.abs()) * lifter
    first = 1 if use_energy else 0  # with use_energy, c0 is the frame's log energy
    assert_within((ref_mel @ dct * lifter)[:, first:], want[:, first:], transform_rounding[:, first:], "reference")
    propagated = ((mel - ref_mel).abs() @ dct.abs()) * lifter + 2 * transform_rounding
    assert_within(out[:, first:], want[:, first:], propagated[:, first:], key)
    if use_energy:
        assert_within(out[:, 0], want[:, 0], ENERGY_TOL + 4 * U32 * want[:, 0].abs(), f"{key} energy")


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
