"""The offline demo corpus: spoken keywords, speakers, environmental-style sounds and sentences.

Nothing is downloaded. Speech is rendered by the ``espeak-ng`` synthesiser (a Debian package) over many
"speakers"; sounds are synthesised procedurally with numpy. Four tasks come out of one build:

* ``kws``       the 35 Speech Commands v2 words, one word in a 1.0 s clip at a random offset over low
                background noise with a random gain (as in Speech Commands); speaker-independent splits;
* ``speaker``   the same clips labelled by speaker; split by utterance, every speaker in every split;
* ``sounds``    12 procedurally synthesised environmental-style classes, 1-5 s long; loudness (RMS) and
                duration are drawn from one distribution for every class, so only the spectro-temporal
                content tells the classes apart; split at random, stratified by class;
* ``sentences`` short grammar-generated sentences with a lower-case ``transcript`` (for CTC / HuBERT);
                speaker-independent splits.

A speaker is a fixed espeak-ng English voice (accent) + voice variant + base pitch + base rate + level;
each utterance jitters pitch and rate a little around the speaker's base.

Layout under the output folder (manifests: SSAST JSON, paths relative to the manifest folder)::

    audio/{kws,sentences,sounds}/...                    16 kHz mono 16-bit PCM WAV
    manifests/{kws,speaker,sounds,sentences}_{train,valid,test}.json
    manifests/{kws,speaker,sounds}_labels.csv           index,mid,display_name

Determinism: every random choice about the corpus as a whole (speakers, texts, splits) comes from one
RNG seeded by (seed, 0); every file is rendered by a pure function of its job and an RNG seeded by
(seed, task, index). So the same seed and scale give the same bytes in every file whatever the number
of worker processes or the order they finish in (given the same espeak-ng installation).

Shapes: a waveform is a 1-D float64 array (time,) at `SAMPLE_RATE` Hz unless stated otherwise.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ssamba.audio import SAMPLE_RATE, resample, save_audio
from ssamba.data.manifest import Example, LabelSet, write_manifest

INSTALL_HINT = "apt-get install -y espeak-ng"

SPEECH_COMMANDS_WORDS = (
    "backward", "bed", "bird", "cat", "dog", "down", "eight", "five", "follow", "forward", "four", "go",
    "happy", "house", "learn", "left", "marvin", "nine", "no", "off", "on", "one", "right", "seven",
    "sheila", "six", "stop", "three", "tree", "two", "up", "visual", "wow", "yes", "zero",
)  # fmt: skip

SPLITS = ("train", "valid", "test")
TASKS = ("kws", "speaker", "sounds", "sentences")

# English espeak-ng voices (accents) and voice variants a speaker is drawn from; only those the local
# espeak-ng reports are used. MBROLA voices are left out (they need the separate mbrola package), and so
# are the novelty variants (robots, whisper, "Demonic") whose speech is barely speech.
_VOICES = (
    "en-gb", "en-us", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029",
    "en-us-nyc",
)  # fmt: skip
_VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "Alex", "Andy", "Annie", "anika", "aunty", "belinda",
    "benjamin", "david", "edward", "grandma", "grandpa", "linda", "max", "michel", "norbert", "quincy",
    "rob", "robert", "shelby", "steph", "travis", "victor", "zac",
)  # fmt: skip

# RNG streams: (seed, 0) plans the corpus; (seed, code, index) renders file `index` of a task.
_PLAN_STREAM = 0
_FILE_STREAMS = {"kws": 1, "sentences": 2, "sounds": 3}


class SynthError(RuntimeError):
    """The demo corpus cannot be built (espeak-ng missing or failing); the message says what to do."""


@dataclass(frozen=True)
class _Scale:
    speakers: int  # espeak speakers; shared by kws, speaker ID and sentences
    words: int  # keywords used (the first `words` of SPEECH_COMMANDS_WORDS; all 35 for public scales)
    repeats: int  # utterances of each word by each speaker
    clips_per_sound: int  # clips per environmental sound class
    sentences: int


# small: 32 voices, so that the speaker-independent keyword split trains on ~24 voices (~24 clips per keyword)
# and tests on ~4 unseen ones (140 clips: one clip is 0.7 % accuracy); 40 clips per sound class
SCALES = {
    "small": _Scale(speakers=32, words=35, repeats=1, clips_per_sound=40, sentences=160),
    "medium": _Scale(speakers=40, words=35, repeats=2, clips_per_sound=120, sentences=800),
}
# Private: just enough of everything for the tests (every split non-empty, >= 3 utterances per speaker).
_SCALES = {**SCALES, "tiny": _Scale(speakers=5, words=6, repeats=1, clips_per_sound=4, sentences=10)}


@dataclass(frozen=True)
class Speaker:
    id: str  # label mid, e.g. "spk07"
    voice: str  # espeak-ng English voice (accent), e.g. "en-gb-scotland"
    variant: str  # espeak-ng voice variant (timbre, base pitch range), e.g. "f3"
    pitch: int  # base espeak pitch, -p (0-99)
    rate: int  # base speaking rate, -s (words per minute)
    level_db: float  # speaking level, peak dB relative to the clip's loudest allowed peak

    @property
    def name(self) -> str:
        return f"{self.voice}+{self.variant} p{self.pitch} s{self.rate} {self.level_db:+.1f}dB"


@dataclass(frozen=True)
class _Job:
    """One file to render; with the seed it fixes the file's bytes."""

    task: str  # "kws" | "sentences" | "sounds": the renderer and the RNG stream
    index: int  # position within the task's jobs (the RNG stream's last key)
    path: str  # relative to the output folder
    text: str = ""  # what to say (speech)
    speaker: Speaker | None = None  # who says it (speech)
    sound: str = ""  # class mid (sounds)


# --- public entry point -----------------------------------------------------------------------------


def synthesize(
    out_dir: str | os.PathLike,
    seed: int = 0,
    scale: str = "small",
    *,
    jobs: int | None = None,
    progress: bool = True,
) -> dict:
    """Build the demo corpus under `out_dir`; return a summary.

    `scale` is "small" (1120 keyword clips by 32 voices, 480 sound clips, 160 sentences: the demo's corpus,
    about a minute to build on one core) or "medium" (several times more). `jobs` worker processes render the
    files (default: one per CPU); the bytes written do not depend on it. The summary holds ``counts``
    (task -> split -> entries), ``classes`` (task -> number of labels), ``speakers``, ``files``,
    ``audio_minutes`` and ``seconds`` (wall time).
    """
    if scale not in _SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    jobs = (os.cpu_count() or 1) if jobs is None else jobs
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    espeak = find_espeak()
    started = time.perf_counter()
    cfg = _SCALES[scale]
    out_dir = Path(out_dir)

    plan = _plan(seed, cfg, *_installed_voices(espeak))
    render = partial(_render, out_dir=str(out_dir), seed=seed, espeak=espeak)
    all_jobs = plan.kws + plan.sentences + plan.sounds
    for job in all_jobs:
        (out_dir / job.path).parent.mkdir(parents=True, exist_ok=True)
    durations = _map(render, all_jobs, jobs)
    seconds = list(tqdm(durations, total=len(all_jobs), desc="synth", unit="file", disable=not progress))

    counts = _write_manifests(out_dir / "manifests", plan, out_dir)
    return {
        "out_dir": str(out_dir),
        "seed": seed,
        "scale": scale,
        "counts": counts,
        "classes": {"kws": len(plan.words), "speaker": len(plan.speakers), "sounds": len(_SOUNDS)},
        "speakers": len(plan.speakers),
        "files": len(all_jobs),
        "audio_minutes": round(sum(seconds) / 60, 2),
        "seconds": round(time.perf_counter() - started, 2),
    }


def find_espeak() -> str:
    """Path of the espeak-ng executable, or `SynthError` saying how to install it."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise SynthError(
            "espeak-ng is not on PATH; the demo corpus renders its speech with it. "
            f"Install it with `{INSTALL_HINT}` (Debian/Ubuntu)."
        )
    return path


# --- planning: speakers, texts, splits (main process, one RNG) --------------------------------------


@dataclass(frozen=True)
class _Plan:
    words: tuple[str, ...]
    speakers: list[Speaker]
    speaker_split: dict[str, str]  # speaker id -> split, for the speaker-independent tasks
    kws: list[_Job]
    utterance_split: list[str]  # split of each kws clip for speaker ID (by utterance, per speaker)
    sentences: list[_Job]
    sounds: list[_Job]
    sound_split: list[str]  # split of each sound clip (stratified by class)


def _plan(seed: int, cfg: _Scale, voices: list[str], variants: list[str]) -> _Plan:
    rng = np.random.default_rng([seed, _PLAN_STREAM])
    words = SPEECH_COMMANDS_WORDS[: cfg.words]
    speakers = _pick_speakers(rng, cfg.speakers, voices, variants)
    speaker_split = dict(zip([s.id for s in speakers], _assign_splits(rng, len(speakers)), strict=True))

    utterances = [(spk, word, rep) for spk in speakers for word in words for rep in range(cfg.repeats)]
    kws = [
        _Job("kws", i, f"audio/kws/{word}/{spk.id}_{rep}.wav", text=word, speaker=spk)
        for i, (spk, word, rep) in enumerate(utterances)
    ]
    # Speaker ID: within each speaker, its utterances are split at random (each speaker in every split).
    per_speaker = cfg.words * cfg.repeats
    utterance_split = [split for _ in speakers for split in _assign_splits(rng, per_speaker)]

    # Sentences go round-robin over the shuffled speakers, so each speaker says about as many.
    order = rng.permutation(len(speakers))
    sentences = []
    for i in range(cfg.sentences):
        spk = speakers[order[i % len(speakers)]]
        sentences.append(_Job("sentences", i, f"audio/sentences/{spk.id}/{i:05d}.wav", _sentence(rng), spk))

    sounds, sound_split = [], []
    for name in _SOUNDS:
        sound_split += _assign_splits(rng, cfg.clips_per_sound)
        for k in range(cfg.clips_per_sound):
            sounds.append(_Job("sounds", len(sounds), f"audio/sounds/{name}/{k:05d}.wav", sound=name))
    return _Plan(words, speakers, speaker_split, kws, utterance_split, sentences, sounds, sound_split)


def _pick_speakers(rng: np.random.Generator, count: int, voices: list[str], variants: list[str]) -> list[Speaker]:
    """`count` distinct (voice, variant) pairs, spreading over variants first, then voices."""
    combos = [(v, w) for v in voices for w in variants]
    if count > len(combos):
        raise SynthError(f"espeak-ng offers {len(combos)} voice/variant pairs; {count} speakers are needed")
    combos = [combos[i] for i in rng.permutation(len(combos))]  # random tie-breaking below
    used_voice, used_variant, speakers = Counter(), Counter(), []
    for k in range(count):
        voice, variant = min(combos, key=lambda c: (used_variant[c[1]], used_voice[c[0]]))
        combos.remove((voice, variant))
        used_voice[voice] += 1
        used_variant[variant] += 1
        speakers.append(
            Speaker(
                id=f"spk{k:02d}",
                voice=voice,
                variant=variant,
                pitch=int(rng.integers(25, 76)),
                rate=int(rng.integers(135, 186)),
                level_db=round(float(rng.uniform(-6.0, 0.0)), 1),
            )
        )
    return speakers


def _assign_splits(rng: np.random.Generator, n: int) -> list[str]:
    """A random train/valid/test assignment of n >= 3 items: 15% valid, 15% test, at least one each."""
    held = max(1, round(0.15 * n))
    names = ["train"] * (n - 2 * held) + ["valid"] * held + ["test"] * held
    return [names[i] for i in rng.permutation(n)]


def _installed_voices(espeak: str) -> tuple[list[str], list[str]]:
    """The entries of `_VOICES` and `_VARIANTS` this espeak-ng installation has (order kept)."""
    # `--voices=LANG` rows: Pty Language Age/Gender VoiceName File Other...; variant files are "!v/NAME".
    english = {row[1] for row in _voice_table(espeak, "en") if not row[4].startswith("mb/")}
    variants = {row[4].removeprefix("!v/") for row in _voice_table(espeak, "variant")}
    voices = [v for v in _VOICES if v in english]
    found = [v for v in _VARIANTS if v in variants]
    if not voices or not found:
        raise SynthError(f"{espeak} lists no English voices or no variants; reinstall: `{INSTALL_HINT}`")
    return voices, found


def _voice_table(espeak: str, which: str) -> list[list[str]]:
    out = subprocess.run([espeak, f"--voices={which}"], capture_output=True, text=True, check=False).stdout
    return [line.split() for line in out.splitlines()[1:] if len(line.split()) >= 5]


# --- sentences: a small grammar over the keywords and a few everyday words --------------------------

_NOUNS = ("dog", "cat", "bird", "house", "tree", "bed", "car", "boat", "garden", "window", "river", "table",
          "door", "road", "light", "book")  # fmt: skip
_PLURALS = ("dogs", "cats", "birds", "houses", "trees", "cars", "boats", "windows", "books", "doors")
_ADJECTIVES = ("happy", "small", "old", "green", "quiet", "big", "red", "cold", "bright", "little", "visual")
_VERBS = ("saw", "found", "followed", "watched", "left", "painted", "moved", "heard", "opened", "learned")
_NAMES = ("marvin", "sheila", "anna", "peter", "maria", "david", "sarah", "tom")
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_DIRECTIONS = ("up", "down", "left", "right", "forward", "backward")
_TEMPLATES = (
    "{name} {verb} the {adj} {noun}",
    "the {adj} {noun} is near the {noun2}",
    "go {direction} and stop at the {noun}",
    "turn {direction} after {number} {plural}",
    "{number} {adj} {plural} sat on the {noun}",
    "yes the {noun} is {adj} today",
    "no {name} did not see the {noun}",
    "wow look at the {adj} {noun} by the {noun2}",
    "{name} {verb} {number} {plural} and a {noun}",
    "please move the {noun} {direction} now",
    "the {noun} was {adj} and {adj2}",
    "follow the {adj} {noun} to the {noun2}",
)


def _sentence(rng: np.random.Generator) -> str:
    pick = lambda words: words[int(rng.integers(len(words)))]
    template = pick(_TEMPLATES)
    nouns = rng.choice(len(_NOUNS), size=2, replace=False)
    adjectives = rng.choice(len(_ADJECTIVES), size=2, replace=False)
    return template.format(
        name=pick(_NAMES), verb=pick(_VERBS), noun=_NOUNS[nouns[0]], noun2=_NOUNS[nouns[1]],
        adj=_ADJECTIVES[adjectives[0]], adj2=_ADJECTIVES[adjectives[1]], direction=pick(_DIRECTIONS),
        number=pick(_NUMBERS), plural=pick(_PLURALS),
    )  # fmt: skip


# --- rendering (worker processes; pure functions of the job and its RNG) -----------------------------


def _map(render: Callable[[_Job], float], jobs_: list[_Job], workers: int) -> Iterator[float]:
    """render(job) for every job, in job order; in a spawned process pool when workers > 1."""
    if workers == 1:
        with _one_torch_thread():
            yield from map(render, jobs_)
        return
    # "spawn", not "fork": a forked child can hang on the parent's OpenMP state (torch).
    context = get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        yield from pool.map(render, jobs_, chunksize=8)


@contextmanager
def _one_torch_thread():
    # The resampler's float64 convolution is computed with one thread in the workers; do the same here
    # so that jobs=1 cannot differ from jobs=N in the last bit.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _render(job: _Job, out_dir: str, seed: int, espeak: str) -> float:
    """Write one file; return its duration in seconds."""
    rng = np.random.default_rng([seed, _FILE_STREAMS[job.task], job.index])
    if job.task == "kws":
        wave = _keyword_clip(rng, espeak, job.text, job.speaker)
    elif job.task == "sentences":
        wave = _sentence_clip(rng, espeak, job.text, job.speaker)
    else:
        wave = _sound_clip(rng, job.sound)
    # libsndfile does not clip when converting float to 16-bit: out-of-range values would wrap around.
    save_audio(Path(out_dir) / job.path, np.clip(wave, -1.0, 32767 / 32768), SAMPLE_RATE, "PCM_16")
    return len(wave) / SAMPLE_RATE


# --- speech -------------------------------------------------------------------------------------------

_CLIP_SAMPLES = SAMPLE_RATE  # Speech Commands clips are 1.0 s
_PEAK = 0.9  # loudest speech peak, before the speaker level and the clip gain


def _keyword_clip(rng: np.random.Generator, espeak: str, word: str, speaker: Speaker) -> np.ndarray:
    """(16000,): the word at a random offset in 1 s of background noise, with a random gain."""
    speech = _speak(rng, espeak, word, speaker, pitch_jitter=6, rate_jitter=0.10)
    if len(speech) > _CLIP_SAMPLES:  # rare (a slow speaker, a long word): keep the first second
        speech = speech[:_CLIP_SAMPLES] * _fade(_CLIP_SAMPLES, 0.02)
    gain_db = rng.uniform(-12.0, 0.0)  # recording level varies from clip to clip
    clip = _background(rng, _CLIP_SAMPLES)
    start = int(rng.integers(0, _CLIP_SAMPLES - len(speech) + 1))
    clip[start : start + len(speech)] += speech * 10 ** ((speaker.level_db + gain_db) / 20)
    return clip


def _sentence_clip(rng: np.random.Generator, espeak: str, text: str, speaker: Speaker) -> np.ndarray:
    """(time,): the sentence with 0.1-0.4 s of background noise before and after."""
    speech = _speak(rng, espeak, text, speaker, pitch_jitter=4, rate_jitter=0.05)
    gain_db = rng.uniform(-12.0, 0.0)
    before, after = (int(rng.uniform(0.1, 0.4) * SAMPLE_RATE) for _ in range(2))
    clip = _background(rng, before + len(speech) + after)
    clip[before : before + len(speech)] += speech * 10 ** ((speaker.level_db + gain_db) / 20)
    return clip


def _speak(
    rng: np.random.Generator, espeak: str, text: str, speaker: Speaker, pitch_jitter: int, rate_jitter: float
) -> np.ndarray:
    """(time,) at 16 kHz: `text` said by `speaker` with jittered pitch and rate, trimmed, peak `_PEAK`."""
    pitch = int(np.clip(speaker.pitch + rng.integers(-pitch_jitter, pitch_jitter + 1), 0, 99))
    rate = round(speaker.rate * rng.uniform(1 - rate_jitter, 1 + rate_jitter))
    cmd = [espeak, "-v", f"{speaker.voice}+{speaker.variant}", "-p", str(pitch), "-s", str(rate), "--stdout", "--stdin"]
    done = subprocess.run(cmd, input=text.encode(), capture_output=True, check=False)
    if done.returncode != 0 or not done.stdout:  # an unknown voice exits 0 with no output at all
        why = done.stderr.decode(errors="replace").strip() or "no audio"
        raise SynthError(f"{' '.join(cmd)} <<< {text!r} failed: {why}")
    rate_in, pcm = _parse_wav(done.stdout)  # (time,) int16 at espeak's rate (22050 Hz)
    speech = _trim(resample(pcm.astype(np.float64) / 32768, rate_in, SAMPLE_RATE))
    return speech * (_PEAK / max(np.abs(speech).max(), 1e-9))


def _parse_wav(data: bytes) -> tuple[int, np.ndarray]:
    """(sample rate, (time,) int16) from espeak-ng's ``--stdout`` WAV bytes.

    Writing to a pipe, espeak-ng cannot go back to fill in the RIFF and data sizes, so it writes
    placeholders (0x7ffff024...). Only the bytes actually present are trusted.
    """
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise SynthError("espeak-ng --stdout did not produce WAV data")
    pos, rate = 12, None
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        body = pos + 8
        if chunk == b"fmt ":
            fmt, channels, rate = struct.unpack_from("<HHI", data, body)
            (bits,) = struct.unpack_from("<H", data, body + 14)
            if (fmt, channels, bits) != (1, 1, 16):
                raise SynthError(f"espeak-ng wrote WAV format {fmt}, {channels} ch, {bits} bit; want 1, 1, 16")
        elif chunk == b"data":
            if rate is None:
                raise SynthError("espeak-ng WAV has its data before its format chunk")
            count = (min(body + size, len(data)) - body) // 2
            return rate, np.frombuffer(data, "<i2", count=count, offset=body)
        pos = body + size + (size & 1)  # chunks are word-aligned
    raise SynthError("espeak-ng WAV has no data chunk")


def _trim(x: np.ndarray, floor_db: float = -40.0) -> np.ndarray:
    """Cut leading/trailing silence: keep 10 ms frames within `floor_db` of the loudest, plus 20 ms."""
    frame = SAMPLE_RATE // 100
    n = len(x) // frame
    energy = np.sqrt((x[: n * frame].reshape(n, frame) ** 2).mean(axis=1))  # (frames,)
    loud = np.flatnonzero(energy > energy.max() * 10 ** (floor_db / 20))
    if len(loud) == 0:
        raise SynthError("espeak-ng produced silence")
    first, last = max(loud[0] - 2, 0), min(loud[-1] + 3, n)
    return x[first * frame : last * frame] * _fade((last - first) * frame, 0.005)


def _background(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n,) low-level coloured noise: between white and brown, -65 to -45 dBFS RMS."""
    return _colored_noise(rng, n, rng.uniform(0.0, 2.0)) * 10 ** (rng.uniform(-65.0, -45.0) / 20)


# --- environmental-style sounds ----------------------------------------------------------------------
#
# Each generator returns (n,) of any level; `_sound_clip` gives every class the same duration and
# loudness distributions (and the same kind of noise bed), so a classifier must use the content.


def _sound_clip(rng: np.random.Generator, name: str) -> np.ndarray:
    """(time,): a 1-5 s clip of class `name` in a random room, at -44 to -29 dBFS RMS."""
    n = int(rng.uniform(1.0, 5.0) * SAMPLE_RATE)
    x = _room(rng, _unit_rms(_SOUNDS[name][1](rng, n)))
    x = x + _colored_noise(rng, n, rng.uniform(0.0, 2.0)) * 10 ** (rng.uniform(-40.0, -25.0) / 20)
    x = _unit_rms(x * _fade(n, 0.01)) * 10 ** (rng.uniform(-44.0, -29.0) / 20)
    # The most impulsive classes (clock ticks, footsteps) peak under 30 dB over their RMS, so this guard
    # against clipping is (almost) never needed; were it common it would make loudness depend on the class.
    peak = np.abs(x).max()
    return x * (0.99 / peak) if peak > 0.99 else x


def _room(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    """(n,) -> (n,): `x` heard in a room: the direct sound plus an exponentially decaying noise tail
    (reverberation time 0.1-0.8 s, tail energy 0.01-0.5 of the direct sound); cut to the input length."""
    rt60 = rng.uniform(0.1, 0.8)
    t = _time(int(rt60 * SAMPLE_RATE))
    tail = rng.standard_normal(len(t)) * 10 ** (-3 * t / rt60)  # -60 dB after rt60
    ir = np.concatenate([[1.0], tail / np.sqrt(np.sum(tail**2)) * np.sqrt(rng.uniform(0.01, 0.5))])
    size = len(x) + len(ir) - 1
    return np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(ir, size), size)[: len(x)]


def _siren(rng: np.random.Generator, n: int) -> np.ndarray:
    """A harmonic tone sweeping up and down: slow "wail" or fast "yelp"; approaching or receding."""
    t = _time(n)
    sweep_hz = rng.uniform(0.15, 0.5) if rng.random() < 0.5 else rng.uniform(2.0, 5.0)
    low = rng.uniform(500.0, 900.0)
    high = low * rng.uniform(1.4, 2.2)
    sweep = 0.5 - 0.5 * np.cos(2 * np.pi * sweep_hz * t + rng.uniform(0, 2 * np.pi))  # (n,) in [0, 1]
    phase = 2 * np.pi * np.cumsum(low + (high - low) * sweep) / SAMPLE_RATE
    rolloff = rng.uniform(0.2, 0.6)
    x = sum(rolloff**k * np.sin((k + 1) * phase) for k in range(int(7500 // high)))
    return x * np.linspace(rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0), n)


def _dog_bark(rng: np.random.Generator, n: int) -> np.ndarray:
    """Short harmonic bursts with a rise-fall pitch through one dog's formants, in series of 1-4."""
    f0 = rng.uniform(250.0, 600.0)  # small dogs bark higher
    formants = (rng.uniform(450, 800), rng.uniform(1100, 1700), rng.uniform(2300, 3000))
    x, at = np.zeros(n), rng.uniform(0.0, 0.3)
    while at < n / SAMPLE_RATE - 0.1:
        for _ in range(int(rng.integers(1, 5))):
            dur = rng.uniform(0.08, 0.25)
            _add(x, _bark(rng, dur, f0 * rng.uniform(0.9, 1.1), formants) * rng.uniform(0.5, 1.0), at)
            at += dur + rng.uniform(0.08, 0.25)
        at += rng.uniform(0.3, 1.2)
    return x


def _bark(rng: np.random.Generator, seconds: float, f0: float, formants: tuple) -> np.ndarray:
    t = _time(int(seconds * SAMPLE_RATE))
    pitch = f0 * (1 + 0.3 * np.sin(np.pi * t / seconds) - 0.2 * t / seconds)  # (m,) rise then fall
    phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
    # Harmonic k's amplitude: the formant resonances (bandwidth 150 Hz) at its mean frequency.
    x = sum(
        sum(1 / (1 + ((k * f0 - f) / 150.0) ** 2) for f in formants) * np.sin(k * phase)
        for k in range(1, int(6000 // (1.3 * f0)) + 1)
    )
    noise = _band_noise(rng, len(t), formants[1], 1.5) * np.exp(-t / 0.02) * rng.uniform(0.1, 0.5)
    return (x + noise) * (1 - np.exp(-t / 0.005)) * np.exp(-t / (seconds / 3))


def _rain(rng: np.random.Generator, n: int) -> np.ndarray:
    """High-passed noise plus a dense patter of drops (short pings at 1.5-6 kHz)."""
    f = _freqs(n)
    corner = rng.uniform(400.0, 2000.0)
    bed = _shaped_noise(rng, n, 1 / np.sqrt(1 + (corner / np.maximum(f, 1.0)) ** 4))
    x = bed * rng.uniform(0.2, 1.0)
    rate = rng.uniform(50.0, 400.0)  # drops per second
    for at in rng.uniform(0, n / SAMPLE_RATE, rng.poisson(rate * n / SAMPLE_RATE)):
        drop = _ping(rng.uniform(1500, 6000), rng.uniform(0.002, 0.006), 0.03, rng.uniform(0, 2 * np.pi))
        _add(x, drop * rng.lognormal(0.0, 0.6) * 0.5, at)
    return x * (1 + 0.3 * _wander(rng, n, rng.uniform(0.2, 1.0)))


def _engine(rng: np.random.Generator, n: int) -> np.ndarray:
    """Firing-rate harmonics (20-60 Hz fundamental) drifting with the revs, over low rumble."""
    fire = rng.uniform(20.0, 60.0) * (1 + rng.uniform(-0.3, 0.5) * np.linspace(0, 1, n))
    fire *= 1 + rng.uniform(0.03, 0.12) * _wander(rng, n, 0.5)
    phase = 2 * np.pi * np.cumsum(fire) / SAMPLE_RATE
    slope = rng.uniform(0.8, 1.6)
    top = int(3000 // fire.max())
    x = sum(k**-slope * rng.uniform(0.5, 1.5) * np.sin(k * phase + rng.uniform(0, 2 * np.pi)) for k in range(1, top))
    return x + _unit_rms(_colored_noise(rng, n, 2.0)) * rng.uniform(0.1, 0.4) * np.sqrt(np.mean(x**2))


def _bird_chirps(rng: np.random.Generator, n: int) -> np.ndarray:
    """Bouts of 3-10 fast frequency sweeps at 2-7 kHz."""
    base = rng.uniform(2500.0, 5000.0)
    bend = rng.uniform(0.5, 1.8)  # this bird's typical sweep: down (< 1) or up (> 1)
    x, at = np.zeros(n), rng.uniform(0.0, 0.3)
    while at < n / SAMPLE_RATE:
        for _ in range(int(rng.integers(3, 11))):
            dur = rng.uniform(0.03, 0.12)
            t = _time(int(dur * SAMPLE_RATE))
            start = base * rng.uniform(0.85, 1.15)
            freq = np.clip(start * (bend * rng.uniform(0.9, 1.1)) ** (t / dur), 1000.0, 7000.0)
            phase = 2 * np.pi * np.cumsum(freq) / SAMPLE_RATE
            chirp = (np.sin(phase) + 0.2 * np.sin(2 * phase) * (freq < 3900)) * np.sin(np.pi * t / dur) ** 2
            _add(x, chirp * rng.uniform(0.4, 1.0), at)
            at += dur + rng.uniform(0.03, 0.12)
        at += rng.uniform(0.2, 1.0)
    return x


def _clock_ticks(rng: np.random.Generator, n: int) -> np.ndarray:
    """A regular tick-tock: escapement clicks (2-3 within 5-20 ms) ringing at a few 1.5-5 kHz
    resonances of the case; the tock a little lower."""
    period = rng.uniform(0.2, 0.6)
    modes = rng.uniform(1500.0, 5000.0, size=int(rng.integers(2, 4)))
    tau = rng.uniform(0.005, 0.02)
    tock = rng.uniform(0.75, 0.9)
    clicks = np.sort(rng.uniform(0.0, rng.uniform(0.005, 0.02), size=int(rng.integers(2, 4))))
    x = np.zeros(n)
    for i, at in enumerate(np.arange(rng.uniform(0, period), n / SAMPLE_RATE, period)):
        scale = tock if i % 2 else 1.0
        ring = sum(_ping(f * scale, tau, 0.1, rng.uniform(0, 2 * np.pi)) for f in modes)
        for delay in clicks:
            _add(x, ring * rng.uniform(0.4, 1.0), at + delay + rng.normal(0, 0.0005))
    return x


def _bell(rng: np.random.Generator, n: int) -> np.ndarray:
    """Struck bell or chime: inharmonic partials (church-bell ratios), higher ones decaying faster."""
    f0 = rng.uniform(250.0, 1200.0)
    ratios = np.array([0.5, 1.0, 1.19, 1.5, 2.0, 2.5, 2.67, 3.0]) * rng.uniform(0.98, 1.02, 8)
    ratios = ratios[ratios * f0 < 7500]
    amps = rng.uniform(0.2, 1.0, len(ratios))
    taus = rng.uniform(0.4, 2.0) / ratios ** rng.uniform(0.5, 1.0)
    x, at = np.zeros(n), rng.uniform(0.0, 0.3)
    while at < n / SAMPLE_RATE:
        rest = n / SAMPLE_RATE - at
        strike = sum(a * _ping(f0 * r, tau, rest) for a, r, tau in zip(amps, ratios, taus, strict=True))
        _add(x, strike * rng.uniform(0.6, 1.0), at)
        at += rng.uniform(0.4, 1.5)
    return x


def _wind(rng: np.random.Generator, n: int) -> np.ndarray:
    """Noise in six 100 Hz-2 kHz bands, each swelling and fading on its own (gusts); maybe a whistle."""
    centres = np.geomspace(150.0, 2000.0, 6) * rng.uniform(0.8, 1.25, 6)
    gusts = [10 ** (rng.uniform(6, 15) * _wander(rng, n, rng.uniform(0.2, 1.0)) / 20) for _ in centres]
    x = sum(_band_noise(rng, n, c, 0.7) * gust for c, gust in zip(centres, gusts, strict=True))
    whistle = _band_noise(rng, n, rng.uniform(400.0, 1200.0), 0.08) * (1 + _wander(rng, n, 0.3))
    return x + whistle * rng.uniform(0.0, 0.5)


def _phone_ring(rng: np.random.Generator, n: int) -> np.ndarray:
    """Ring cadence (on/off) of a dual tone, a warbling trill, or a little electronic melody."""
    t = _time(n)
    style = int(rng.integers(3))
    if style == 0:  # dual tone
        f1 = rng.uniform(400.0, 1000.0)
        tone = np.sin(2 * np.pi * f1 * t) + np.sin(2 * np.pi * f1 * rng.uniform(1.05, 1.25) * t)
    elif style == 1:  # trill: a tone gated at 12-25 Hz
        gate = np.sin(2 * np.pi * rng.uniform(12.0, 25.0) * t) > 0
        tone = np.sin(2 * np.pi * rng.uniform(800.0, 2000.0) * t) * _smooth(gate.astype(float), 0.002)
    else:  # melody: 2-3 notes alternating every 50-150 ms
        notes = rng.uniform(600.0, 2000.0, size=int(rng.integers(2, 4)))
        step = int(rng.uniform(0.05, 0.15) * SAMPLE_RATE)
        freq = notes[(np.arange(n) // step) % len(notes)]
        tone = np.sin(2 * np.pi * np.cumsum(freq) / SAMPLE_RATE)
    tone = tone + rng.uniform(0.0, 0.3) * tone**3  # cheap loudspeaker distortion (odd harmonics)
    on, off = rng.uniform(0.4, 1.2), rng.uniform(0.2, 1.0)
    cadence = ((t + rng.uniform(0, on + off)) % (on + off)) < on
    return tone * _smooth(cadence.astype(float), 0.005)


def _footsteps(rng: np.random.Generator, n: int) -> np.ndarray:
    """Walking: a low heel thump then a brighter scuff, every 0.35-0.75 s, feet slightly unequal."""
    interval = rng.uniform(0.35, 0.75)
    thump_hz, thump_tau = rng.uniform(60.0, 140.0), rng.uniform(0.02, 0.05)
    scuff_hz, scuff_level = rng.uniform(1000.0, 3500.0), rng.uniform(0.1, 0.5)
    other_foot = rng.uniform(0.7, 1.0)
    x = np.zeros(n)
    for i, at in enumerate(np.arange(rng.uniform(0, interval), n / SAMPLE_RATE, interval)):
        t = _time(int(0.15 * SAMPLE_RATE))
        thud = _band_noise(rng, len(t), rng.uniform(200, 600), 1.5) * np.exp(-t / 0.02)
        heel = _ping(thump_hz, thump_tau, 0.15) + thud
        scuff = _band_noise(rng, len(t), scuff_hz, 1.0) * np.exp(-t / rng.uniform(0.01, 0.04)) * scuff_level
        step = (other_foot if i % 2 else 1.0) * rng.uniform(0.85, 1.0)
        _add(x, heel * step, at + rng.normal(0, 0.015))
        _add(x, scuff * step, at + rng.uniform(0.05, 0.1))
    return x


def _applause(rng: np.random.Generator, n: int) -> np.ndarray:
    """Many hands: 100-600 short band-limited noise claps a second, swelling in and dying away."""
    bank = [  # a few clap colours (hands differ), reused at random
        _band_noise(rng, 256, rng.uniform(800, 2500), 1.5) * np.exp(-_time(256) / rng.uniform(0.002, 0.006))
        for _ in range(12)
    ]
    x = np.zeros(n)
    seconds = n / SAMPLE_RATE
    for at in rng.uniform(0, seconds, rng.poisson(rng.uniform(100.0, 600.0) * seconds)):
        _add(x, bank[int(rng.integers(len(bank)))] * rng.uniform(0.3, 1.0), at)
    t = _time(n)
    swell_in, die_away = rng.uniform(0.1, 1.0), rng.uniform(0.3, 1.5)
    swell = np.minimum(1.0, (t + 0.01) / swell_in) * np.minimum(1.0, (seconds - t) / die_away)
    return x * swell


def _water_drips(rng: np.random.Generator, n: int) -> np.ndarray:
    """Drops into water: short "plinks" whose pitch rises (a bubble's resonance), regular or not."""
    seconds = n / SAMPLE_RATE
    if rng.random() < 0.5:  # a tap: nearly regular
        interval = rng.uniform(0.2, 0.8)
        times = np.arange(rng.uniform(0, interval), seconds, interval)
        times = times + rng.normal(0, 0.02 * interval, len(times))
    else:  # a leak: random (Poisson) drips
        times = np.cumsum(rng.exponential(rng.uniform(0.15, 0.6), int(seconds / 0.05)))
    f0 = rng.uniform(600.0, 2500.0)
    x = np.zeros(n)
    for at in times[times < seconds]:
        t = _time(int(0.08 * SAMPLE_RATE))
        freq = f0 * rng.uniform(0.85, 1.15) * (1 + rng.uniform(5.0, 30.0) * t)
        plink = np.sin(2 * np.pi * np.cumsum(freq) / SAMPLE_RATE) * np.exp(-t / rng.uniform(0.01, 0.04))
        _add(x, plink * rng.uniform(0.5, 1.0), at)
    return x


_SOUNDS: dict[str, tuple[str, Callable[[np.random.Generator, int], np.ndarray]]] = {
    "siren": ("Siren", _siren),
    "dog_bark": ("Dog bark", _dog_bark),
    "rain": ("Rain", _rain),
    "engine": ("Engine", _engine),
    "bird_chirps": ("Bird chirps", _bird_chirps),
    "clock_ticks": ("Clock ticks", _clock_ticks),
    "bell": ("Bell", _bell),
    "wind": ("Wind", _wind),
    "phone_ring": ("Phone ringing", _phone_ring),
    "footsteps": ("Footsteps", _footsteps),
    "applause": ("Applause", _applause),
    "water_drips": ("Water drips", _water_drips),
}
SOUND_CLASSES = tuple(_SOUNDS)


# --- signal helpers -------------------------------------------------------------------------------------


def _time(n: int) -> np.ndarray:
    return np.arange(n) / SAMPLE_RATE


def _freqs(n: int) -> np.ndarray:
    return np.fft.rfftfreq(n, 1 / SAMPLE_RATE)


def _unit_rms(x: np.ndarray) -> np.ndarray:
    return x / max(float(np.sqrt(np.mean(x**2))), 1e-12)


def _shaped_noise(rng: np.random.Generator, n: int, gain: np.ndarray) -> np.ndarray:
    """(n,) unit-RMS Gaussian noise with amplitude spectrum `gain` (n // 2 + 1,)."""
    return _unit_rms(np.fft.irfft(np.fft.rfft(rng.standard_normal(n)) * gain, n))


def _colored_noise(rng: np.random.Generator, n: int, beta: float) -> np.ndarray:
    """(n,) unit-RMS noise with power ~ 1/f**beta: 0 white, 1 pink, 2 brown (no DC)."""
    f = _freqs(n)
    return _shaped_noise(rng, n, np.where(f > 0, np.maximum(f, 1.0) ** (-beta / 2), 0.0))


def _band_noise(rng: np.random.Generator, n: int, centre: float, octaves: float) -> np.ndarray:
    """(n,) unit-RMS noise around `centre` Hz: Gaussian in log-frequency, `octaves` wide (2 sigma)."""
    f = np.maximum(_freqs(n), 1.0)
    return _shaped_noise(rng, n, np.exp(-0.5 * (np.log2(f / centre) / (octaves / 2)) ** 2))


def _ping(freq: float, tau: float, seconds: float, phase: float = 0.0) -> np.ndarray:
    """A damped sinusoid (one resonance struck once), `seconds` long."""
    t = _time(max(int(seconds * SAMPLE_RATE), 1))
    return np.sin(2 * np.pi * freq * t + phase) * np.exp(-t / tau)


def _wander(rng: np.random.Generator, n: int, hz: float) -> np.ndarray:
    """(n,) a slow random curve in [-1, 1]: random knots about `hz` per second, linearly joined."""
    knots = max(int(n / SAMPLE_RATE * hz), 1) + 2
    return np.interp(np.linspace(0, knots - 1, n), np.arange(knots), rng.uniform(-1.0, 1.0, knots))


def _smooth(x: np.ndarray, seconds: float) -> np.ndarray:
    """Moving average over `seconds`: softens the edges of on/off gates (no clicks)."""
    width = max(int(seconds * SAMPLE_RATE), 1)
    return np.convolve(x, np.ones(width) / width, mode="same")


def _fade(n: int, seconds: float) -> np.ndarray:
    """(n,) raised-cosine fade-in and fade-out of `seconds` each."""
    m = min(int(seconds * SAMPLE_RATE), n // 2)
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(m) / max(m, 1))
    env = np.ones(n)
    env[:m], env[n - m :] = ramp, ramp[::-1]
    return env


def _add(x: np.ndarray, event: np.ndarray, seconds: float) -> None:
    """Add `event` into `x` in place, starting `seconds` in; cropped at either end."""
    start = int(round(seconds * SAMPLE_RATE))
    if start < 0:
        event, start = event[-start:], 0
    m = min(len(event), len(x) - start)
    if m > 0:
        x[start : start + m] += event[:m]


# --- manifests -------------------------------------------------------------------------------------


def _write_manifests(folder: Path, plan: _Plan, out_dir: Path) -> dict:
    """Write every manifest and label CSV; return task -> split -> number of entries."""
    entries: dict[str, dict[str, list[Example]]] = {task: {s: [] for s in SPLITS} for task in TASKS}
    for job, utt_split in zip(plan.kws, plan.utterance_split, strict=True):
        spk, path = job.speaker, out_dir / job.path
        entries["kws"][plan.speaker_split[spk.id]].append(Example(path, (job.text,), {"speaker": spk.id}))
        by_speaker = Example(path, (spk.id,), {"speaker": spk.id, "keyword": job.text})
        entries["speaker"][utt_split].append(by_speaker)
    for job in plan.sentences:
        extra = {"transcript": job.text, "speaker": job.speaker.id}
        split = plan.speaker_split[job.speaker.id]
        entries["sentences"][split].append(Example(out_dir / job.path, (), extra))
    for job, split in zip(plan.sounds, plan.sound_split, strict=True):
        entries["sounds"][split].append(Example(out_dir / job.path, (job.sound,)))

    for task, splits in entries.items():
        for split, examples in splits.items():
            write_manifest(folder / f"{task}_{split}.json", examples)
    LabelSet(list(plan.words)).to_csv(folder / "kws_labels.csv")
    speakers = LabelSet([s.id for s in plan.speakers], [s.name for s in plan.speakers])
    speakers.to_csv(folder / "speaker_labels.csv")
    LabelSet(list(_SOUNDS), [display for display, _ in _SOUNDS.values()]).to_csv(folder / "sounds_labels.csv")
    return {task: {split: len(ex) for split, ex in splits.items()} for task, splits in entries.items()}


__all__ = ["SCALES", "SOUND_CLASSES", "SPEECH_COMMANDS_WORDS", "Speaker", "SynthError", "find_espeak", "synthesize"]
