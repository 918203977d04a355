import numpy as np
import pytest
import soundfile
import torch

from ssamba.audio import AudioError, load_audio, resample, save_audio


def _tone(rate, seconds=0.5, freq=440.0, amp=0.3):
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampler_reproduces_a_sine(rate):
    freq = 1000.0
    y = resample(np.sin(2 * np.pi * freq * np.arange(rate) / rate), rate, 16000)
    assert y.shape == (16000,)
    expected = np.sin(2 * np.pi * freq * np.arange(16000) / 16000)
    inner = slice(100, -100)  # the ends see the zero padding
    assert np.abs(y[inner] - expected[inner]).max() < 1e-5


def test_resampler_rejects_aliases():
    # a 10 kHz tone is above the 8 kHz Nyquist of the target: it must vanish, not fold to 6 kHz
    rate = 44100
    y = resample(np.sin(2 * np.pi * 10000 * np.arange(rate) / rate), rate, 16000)
    assert np.abs(y[100:-100]).max() < 1e-4


def test_resample_keeps_type_and_dtype_and_batch_dims():
    x = torch.randn(2, 3, 441, dtype=torch.float32)
    y = resample(x, 44100, 16000)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32 and y.shape == (2, 3, 160)
    assert torch.allclose(y[1, 2], resample(x[1, 2], 44100, 16000))
    assert resample(np.zeros(10, np.float32), 16000, 16000).dtype == np.float32


@pytest.mark.parametrize("fmt,suffix", [("WAV", ".wav"), ("FLAC", ".flac"), ("OGG", ".ogg"), ("MP3", ".mp3")])
def test_formats_decode_to_mono_16k_float32(tmp_path, fmt, suffix):
    x = _tone(16000)
    path = tmp_path / f"a{suffix}"
    soundfile.write(path, x, 16000, format=fmt)
    w = load_audio(path)
    assert w.dtype == np.float32 and w.ndim == 1 and abs(len(w) - len(x)) <= 1152
    if fmt in ("WAV", "FLAC"):  # lossless
        assert np.abs(w - x).max() < 1e-4


def test_stereo_mixdown_and_resampling(tmp_path):
    left, right = _tone(44100, freq=440), _tone(44100, freq=440, amp=0.1)
    soundfile.write(tmp_path / "s.wav", np.stack([left, right], 1), 44100, subtype="FLOAT")
    w = load_audio(tmp_path / "s.wav")
    assert w.shape == (8000,)
    expected = 0.2 * np.sin(2 * np.pi * 440 * np.arange(8000) / 16000)
    assert np.abs(w[100:-100] - expected[100:-100]).max() < 1e-4


def _bad(tmp_path, kind):
    good = tmp_path / "good.wav"
    save_audio(good, _tone(16000))
    path = tmp_path / f"{kind}.wav"
    if kind == "missing":
        return path
    if kind == "unreadable":
        path.write_bytes(b"not audio at all" * 10)
    elif kind == "empty":
        soundfile.write(path, np.zeros(0, np.float32), 16000)
    elif kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "header_only":
        path.write_bytes(good.read_bytes()[:30])
    elif kind == "nan":
        x = _tone(16000)
        x[10] = np.nan
        soundfile.write(path, x, 16000, subtype="FLOAT")
    elif kind == "inf":
        x = _tone(16000)
        x[10] = np.inf
        soundfile.write(path, x, 16000, subtype="FLOAT")
    elif kind == "too_short":
        save_audio(path, _tone(16000, seconds=0.02))
    elif kind == "directory":
        path.mkdir()
    return path


@pytest.mark.parametrize("kind,message", [
    ("missing", "not found"), ("unreadable", "unreadable"), ("empty", "empty"), ("truncated", "truncated"),
    ("header_only", "unreadable"), ("nan", "NaN"), ("inf", "infinite"), ("too_short", "too short"),
    ("directory", "directory"),
])
def test_bad_audio_gets_a_clear_error_naming_the_file(tmp_path, kind, message):
    path = _bad(tmp_path, kind)
    with pytest.raises(AudioError, match=message) as info:
        load_audio(path)
    assert str(path) in str(info.value)


def test_truncated_compressed_file(tmp_path):
    path = tmp_path / "a.flac"
    soundfile.write(path, _tone(16000), 16000)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioError, match="a.flac"):
        load_audio(path)
