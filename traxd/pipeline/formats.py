"""Transcripts: the data model, its JSON form, and the txt, srt, vtt and json writers."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

LOW_LOGPROB = -1.0  # below this a segment's words are likely wrong
HIGH_NO_SPEECH = 0.6  # above this a segment is likely noise or silence


@dataclass(frozen=True)
class TimedWord:
    """One word with its own times (faster-whisper's word timestamps)."""

    start: float
    end: float
    word: str
    probability: float | None = None

    def shifted(self, offset: float) -> TimedWord:
        return replace(self, start=self.start + offset, end=self.end + offset)


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    text: str
    avg_logprob: float | None = None
    no_speech_prob: float | None = None
    words: tuple[TimedWord, ...] = ()  # when the backend timed each word

    def shifted(self, offset: float) -> Segment:
        return replace(self, start=self.start + offset, end=self.end + offset,
                       words=tuple(w.shifted(offset) for w in self.words))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Segment:
        words = tuple(TimedWord(**w) for w in data.get("words") or ())
        return cls(**{**data, "words": words})

    @property
    def confidence(self) -> float | None:
        """The mean token probability, exp(avg_logprob), when the backend gave one."""
        return None if self.avg_logprob is None else math.exp(self.avg_logprob)

    def quality_problems(self) -> list[str]:
        problems = []
        if self.avg_logprob is not None and self.avg_logprob < LOW_LOGPROB:
            problems.append(f"low confidence (avg_logprob {self.avg_logprob:.2f})")
        if self.no_speech_prob is not None and self.no_speech_prob > HIGH_NO_SPEECH:
            problems.append(f"probably not speech (no_speech_prob {self.no_speech_prob:.2f})")
        return problems


@dataclass(frozen=True)
class Transcript:
    segments: tuple[Segment, ...]
    language: str | None
    duration: float
    model: str
    language_probability: float | None = None  # when the (spoken) language was detected
    translated_from: str | None = None  # task = "translate": what was spoken, when known

    @property
    def text(self) -> str:
        return " ".join(s.text.strip() for s in self.segments if s.text.strip())

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "language": self.language, "duration": self.duration, "model": self.model,
            "language_probability": self.language_probability,
            "segments": [asdict(s) for s in self.segments]}
        if self.translated_from is not None:
            data["translated_from"] = self.translated_from
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Transcript:
        segments = tuple(Segment.from_dict(s) for s in data["segments"])
        probability = data.get("language_probability")
        return cls(segments, data.get("language"), float(data["duration"]), str(data["model"]),
                   None if probability is None else float(probability),
                   data.get("translated_from"))

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(self.to_dict(), ensure_ascii=False), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: Path) -> Transcript:
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))


def merge(parts: Iterable[tuple[float, Transcript]], *, duration: float) -> Transcript:
    """One transcript from chunk transcripts, each shifted by its chunk's start offset."""
    segments: list[Segment] = []
    language: str | None = None
    probability: float | None = None
    model = ""
    for offset, part in parts:
        segments.extend(s.shifted(offset) for s in part.segments)
        if language is None and part.language:
            language, probability = part.language, part.language_probability
        model = model or part.model
    return Transcript(tuple(segments), language, duration, model, probability)


@dataclass(frozen=True)
class SourceInfo:
    """What the json output says about where a transcript came from."""

    name: str
    sha256: str
    timings: Mapping[str, float] = field(default_factory=dict)
    flags: tuple[str, ...] = ()  # what is wrong with the file as a whole (damage, hallucination)


@dataclass(frozen=True)
class QualityWarning:
    segment: int
    start: float
    end: float
    problems: tuple[str, ...]


def quality_warnings(transcript: Transcript) -> list[QualityWarning]:
    return [QualityWarning(i, s.start, s.end, tuple(p))
            for i, s in enumerate(transcript.segments) if (p := s.quality_problems())]


HALLUCINATION_SHARE = 0.5  # of the lines, all the same short line: the model made them up
HALLUCINATION_MIN_LINES = 3
SHORT_LINE_WORDS = 3


def hallucination(transcript: Transcript) -> str | None:
    """Why the transcript is probably mostly invented (whisper fills silence and noise with
    the same short line: "you", "Thank you.", "."), or None."""
    lines = [s.text.strip() for s in transcript.segments]
    short = Counter(" ".join(re.findall(r"[\w']+", line.lower())) for line in lines
                    if len(line.split()) <= SHORT_LINE_WORDS)
    if not short:
        return None
    text, count = short.most_common(1)[0]
    if count < HALLUCINATION_MIN_LINES or count < HALLUCINATION_SHARE * len(lines):
        return None
    shown = text or next(line for line in lines if not re.search(r"\w", line))
    return (f"{count} of {len(lines)} lines are the same short line ({shown!r}): most of this "
            "transcript is probably made up by the model over silence or noise")


# --- warnings about a whole file ------------------------------------------------------------

# The fact that carries them from step to step: [{"step", "reason", "message"}]. Each step
# that adds one writes them all into `<stem>.warnings.json`, an output like the transcript.
WARNINGS_FACT = "file_warnings"


def file_warning(step: str, reason: str, message: str) -> dict[str, str]:
    return {"step": step, "reason": reason, "message": message}


def write_warnings(folder: Path, stem: str, name: str,
                   warnings: Iterable[Mapping[str, str]]) -> dict[str, Path]:
    """`<stem>.warnings.json` in folder when there is any warning: output name -> file."""
    listed = [dict(w) for w in warnings]
    if not listed:
        return {}
    path = folder / f"{stem}.warnings.json"
    body = {"file": name, "warnings": listed}
    path.write_text(json.dumps(body, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return {path.name: path}


# --- writers ------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    """Cue text on one line: a blank line or an arrow would end or break a cue."""
    return " ".join(text.split()).replace("-->", "->")


def _clock(seconds: float, separator: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


MAX_CUE_SECONDS = 7.0  # longest a split cue stays on screen
MIN_CUE_SECONDS = 0.001
Cue = tuple[float, float, str]


@dataclass(frozen=True)
class WriteOptions:
    """How subtitles are laid out and what the json output holds."""

    max_line_width: int | None = None  # characters a subtitle line holds; None: no limit
    max_line_count: int | None = None  # lines a cue holds; None: no limit
    word_timestamps: bool = False  # words with their times in the json output

    @property
    def splits(self) -> bool:
        """Whether cues are cut to the limits (else one cue per segment)."""
        return self.max_line_width is not None or self.max_line_count is not None


def _cues(transcript: Transcript, options: WriteOptions = WriteOptions()) -> list[Cue]:
    cues: list[Cue] = []
    for segment in transcript.segments:
        text = _one_line(segment.text)
        if text and options.splits:
            cues.extend(_split(segment, options))
        elif text:
            cues.append((segment.start, segment.end, text))
    return _apart(cues)


def _apart(cues: list[Cue]) -> list[Cue]:
    """Cues in order that never overlap: each starts no earlier than the one before ends."""
    out: list[Cue] = []
    for index, (given_start, given_end, text) in enumerate(cues):
        start = max(given_start, out[-1][1]) if out else given_start
        following = cues[index + 1][0] if index + 1 < len(cues) else math.inf
        end = min(given_end, following) if following > start else given_end
        out.append((start, max(end, start + MIN_CUE_SECONDS), text))
    return out


def _timed_words(segment: Segment) -> list[TimedWord]:
    """The segment's words with their times; without word timestamps, times guessed in
    proportion to the characters before each word."""
    if segment.words:
        words = [replace(w, word=_one_line(w.word)) for w in segment.words]
        return [w for w in words if w.word]
    parts = _one_line(segment.text).split()
    total = sum(len(p) + 1 for p in parts) or 1
    span, done, out = max(0.0, segment.end - segment.start), 0, []
    for part in parts:
        start = segment.start + span * done / total
        done += len(part) + 1
        out.append(TimedWord(start, segment.start + span * done / total, part))
    return out


def _wrap(words: list[str], width: int | None) -> list[str]:
    """Words into lines of at most `width` characters (a longer word gets a line alone)."""
    lines: list[str] = []
    for word in words:
        if lines and (width is None or len(lines[-1]) + 1 + len(word) <= width):
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def _split(segment: Segment, options: WriteOptions) -> list[Cue]:
    """A segment as cues cut at word boundaries: each within the line width and count,
    and on screen at most MAX_CUE_SECONDS."""
    groups: list[list[TimedWord]] = []
    count = options.max_line_count
    for word in _timed_words(segment):
        group = groups[-1] if groups else []
        lines = _wrap([w.word for w in [*group, word]], options.max_line_width)
        if not group or (count is not None and len(lines) > count) \
                or word.end - group[0].start > MAX_CUE_SECONDS:
            groups.append([word])
        else:
            group.append(word)
    return [(g[0].start, min(g[-1].end, g[0].start + MAX_CUE_SECONDS),
             "\n".join(_wrap([w.word for w in g], options.max_line_width))) for g in groups]


def to_txt(transcript: Transcript) -> str:
    lines = [_one_line(s.text) for s in transcript.segments]
    return "\n".join(line for line in lines if line) + "\n"


def to_srt(transcript: Transcript, options: WriteOptions = WriteOptions()) -> str:
    blocks = [f"{i}\n{_clock(start, ',')} --> {_clock(end, ',')}\n{text}\n"
              for i, (start, end, text) in enumerate(_cues(transcript, options), start=1)]
    return "\n".join(blocks)


def to_vtt(transcript: Transcript, options: WriteOptions = WriteOptions()) -> str:
    escape = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;"})
    blocks = [f"{_clock(start, '.')} --> {_clock(end, '.')}\n{text.translate(escape)}\n"
              for start, end, text in _cues(transcript, options)]
    return "\n".join(["WEBVTT\n", *blocks])


def _json_segment(index: int, segment: Segment, words: bool) -> dict[str, Any]:
    data = {"id": index, **asdict(segment), "confidence": segment.confidence}
    if not words:
        del data["words"]
    return data


def to_json(transcript: Transcript, source: SourceInfo,
            options: WriteOptions = WriteOptions()) -> str:
    segments = [_json_segment(i, s, options.word_timestamps)
                for i, s in enumerate(transcript.segments)]
    document = {
        "source": source.name, "sha256": source.sha256, "duration": transcript.duration,
        "model": transcript.model, "language": transcript.language,
        "language_probability": transcript.language_probability,
        "timings": dict(source.timings), "text": transcript.text, "segments": segments,
        "warnings": [asdict(w) for w in quality_warnings(transcript)],
        "flags": list(source.flags),
    }
    if transcript.translated_from is not None:
        document["translated_from"] = transcript.translated_from
    return json.dumps(document, ensure_ascii=False, indent=2) + "\n"


Writer = Callable[[Transcript, SourceInfo, WriteOptions], str]
WRITERS: Mapping[str, Writer] = {
    "txt": lambda t, _, __: to_txt(t),
    "srt": lambda t, _, o: to_srt(t, o),
    "vtt": lambda t, _, o: to_vtt(t, o),
    "json": to_json,
}


def write_formats(
    transcript: Transcript, formats: Iterable[str], folder: Path, stem: str, source: SourceInfo,
    options: WriteOptions = WriteOptions(),
) -> dict[str, Path]:
    """Write `<stem>.<fmt>` for each format into folder; output name -> file."""
    written: dict[str, Path] = {}
    for fmt in formats:
        name = f"{stem}.{fmt}"
        path = folder / name
        path.write_text(WRITERS[fmt](transcript, source, options), encoding="utf-8")
        written[name] = path
    return written
