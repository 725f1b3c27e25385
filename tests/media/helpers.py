"""Small helpers shared by the media tests."""

from __future__ import annotations

import random
import re
import subprocess
import wave
from array import array
from pathlib import Path


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate: word-level edit distance over the reference length."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        previous, row[0] = row[0], i
        for j, h in enumerate(hyp, start=1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (r != h))
    return row[len(hyp)] / max(1, len(ref))


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args],
                   check=True)


def ffprobe_stream(path: Path) -> dict[str, str]:
    """codec_name, sample_rate, channels of the first audio stream, as ffprobe says."""
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_entries",
         "stream=codec_name,sample_rate,channels", "-of", "default=nw=1", str(path)],
        check=True, capture_output=True, text=True).stdout
    return dict(line.split("=", 1) for line in out.split())


def loudness(path: Path, at: float, span: float = 0.1) -> float:
    """RMS of a 16-bit mono wav around second `at`, 0..1."""
    with wave.open(str(path), "rb") as wav:
        rate = wav.getframerate()
        start = max(0, int((at - span / 2) * rate))
        wav.setpos(min(start, wav.getnframes()))
        samples = array("h", wav.readframes(int(span * rate)))
    if not samples:
        return 0.0
    return float((sum(s * s for s in samples) / len(samples)) ** 0.5 / 32768)


_SUBJECTS = ("the committee", "our neighbor", "the young teacher", "a tired driver",
             "the old captain", "my sister", "the engineers", "a quiet student",
             "the city council", "the farmer")
_VERBS = ("painted", "repaired", "carried", "described", "visited", "cleaned", "ordered",
          "followed", "opened", "borrowed")
_OBJECTS = ("a wooden boat", "the broken fence", "several heavy boxes", "the green garden",
            "a small museum", "the long bridge", "a yellow bicycle", "the empty station",
            "the market square", "an ancient map")
_WHEN = ("early in the morning", "after the storm", "before lunch", "during the winter",
         "on a rainy evening", "late at night", "last weekend", "in the spring",
         "after the meeting", "before the holiday")
_WHY = ("because the weather was calm", "while the children were singing",
        "although nobody asked", "so that everyone could see it",
        "when the bells started ringing", "as the river began to rise")


def varied_sentences(count: int, seed: int = 14) -> list[str]:
    """`count` sentences of about 15 words, rarely the same twice (whisper drops a window
    whose text compresses too well: a long file of one repeated sentence is no test)."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(count):
        words = " ".join(rng.choice(part) for part in (_SUBJECTS, _VERBS, _OBJECTS, _WHEN, _WHY))
        sentences.append(words[0].upper() + words[1:] + ".")
    return sentences


def espeak_wav(text: str, out: Path, rate: int = 160) -> Path:
    """Speech for `text` as 16 kHz mono wav (what preprocess hands over)."""
    raw = out.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", str(rate), "-w", str(raw), text],
                   check=True)
    ffmpeg("-i", str(raw), "-ac", "1", "-ar", "16000", "-acodec", "pcm_s16le", str(out))
    raw.unlink()
    return out
