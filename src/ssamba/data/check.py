"""Up-front check of every split a command reads, from the audio headers alone (``soundfile.info``, nothing
decoded), so that a bad file stops a run in seconds, before any training, instead of after it (a run that trained
for 13 minutes and then died on an empty WAV of its test split).

The rules are `ssamba.audio.load_audio`'s, as far as a header shows them: a missing path or a directory, a file
libsndfile cannot open, 0 frames (empty), a WAV/AIFF whose data chunk runs past the end of the file (truncated:
the header log's "should be"), and fewer than ``min_samples`` samples once resampled to ``sample_rate`` (too short
for one 25 ms analysis frame). Any sample rate is accepted, as the loader resamples it. What only decoding shows
(NaN samples, a corrupt stream after a valid header) is still caught by the loader, naming the file.

Without ``skip_bad`` an unusable file is an `UnusableFilesError`: one line with the count per split and the first
few files. With it, the count per split is reported and the loader leaves those files out as before.

Cache: per manifest file, in memory (this process), keyed by the manifest's resolved path, modification time and
size and by the rules' parameters. A process that reads one manifest several times (k folds, the comparison
table's runs, valid given again as test) checks it once; a new process checks again (a header is cheap: about
0.1 ms a file), so an edited or repaired corpus is never judged from a stale cache file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ssamba.audio import MIN_SAMPLES, SAMPLE_RATE, header_problem
from ssamba.data.manifest import Example, ManifestError, read_manifest

__all__ = ["UnusableFilesError", "check_splits", "header_problem"]

# files named in the error line; the rest are counted
SHOWN = 5

# (resolved manifest, mtime_ns, size, sample_rate, min_samples) -> (entries, ((path, reason), ...))
_CACHE: dict[tuple, tuple[int, tuple[tuple[str, str], ...]]] = {}


class UnusableFilesError(ManifestError):
    """Unusable audio files in the splits a command was given (one line: counts per split, the first files)."""


def _check_examples(examples: Sequence[Example], sample_rate: int, min_samples: int) -> tuple[tuple[str, str], ...]:
    # paths as a user types them: a manifest's relative "../audio/x.wav" shown without the "manifests/.."
    found = ((os.path.normpath(ex.path), header_problem(ex.path, sample_rate, min_samples)) for ex in examples)
    return tuple((path, reason) for path, reason in found if reason is not None)


def _check_source(source: str | os.PathLike | Sequence[Example], sample_rate: int,
                  min_samples: int) -> tuple[int, tuple[tuple[str, str], ...]]:
    """(entries, bad (path, reason) pairs) of a manifest (cached, see the module docstring) or a list of examples."""
    if not isinstance(source, (str, os.PathLike)):
        return len(source), _check_examples(source, sample_rate, min_samples)
    path = Path(source)
    key = None
    if path.is_file():  # a folder per class changes without its own mtime changing: not cached
        st = path.stat()
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size, sample_rate, min_samples)
        if key in _CACHE:
            return _CACHE[key]
    examples = read_manifest(path)
    result = len(examples), _check_examples(examples, sample_rate, min_samples)
    if key is not None:
        _CACHE[key] = result
    return result


def check_splits(splits: Mapping[str, str | os.PathLike | Sequence[Example]], *, skip_bad: bool,
                 log: Callable[[str], None] | None = print, hint: str | None = "set data.skip_bad=true",
                 sample_rate: int = SAMPLE_RATE, min_samples: int = MIN_SAMPLES) -> dict[str, int]:
    """Check every split (name -> manifest path or list of examples; empty paths are ignored) before a run.

    Without ``skip_bad``: raise `UnusableFilesError` listing the first `SHOWN` unusable files and the count per
    split (``hint`` names the option that leaves them out, if any). With it: ``log`` one line with the count per
    split.
    Returns {split: unusable files}.
    """
    counts: dict[str, int] = {}
    totals: dict[str, int] = {}
    bad: list[tuple[str, str, str]] = []  # (split, path, reason)
    for name, source in splits.items():
        if isinstance(source, (str, os.PathLike)) and not str(source):
            continue
        totals[name], found = _check_source(source, sample_rate, min_samples)
        counts[name] = len(found)
        bad += [(name, path, reason) for path, reason in found]
    where = {name: (f"{splits[name]}, " if isinstance(splits[name], (str, os.PathLike)) else "") for name in counts}
    if bad and not skip_bad:
        per_split = ", ".join(f"{name} split ({where[name]}{n} of {totals[name]})" for name, n in counts.items() if n)
        listed = "; ".join(f"{path}: {reason}" for _, path, reason in bad[:SHOWN])
        more = f"; and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
        noun = "file" if len(bad) == 1 else "files"
        fix = "fix or remove them" + (f", or {hint} to leave them out" if hint else "")
        raise UnusableFilesError(f"{len(bad)} unusable audio {noun} in {per_split}: {listed}{more}; {fix}")
    if skip_bad and log is not None:
        log("data check: " + ", ".join(f"{name} {n} of {totals[name]} unusable" for name, n in counts.items())
            + (" (left out)" if bad else ""))
    return counts
