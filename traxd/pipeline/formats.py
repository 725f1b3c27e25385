"""Transcripts: the data model, its JSON form, and the txt, srt, vtt and json writers."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

LOW_LOGPROB = -1.0  # below this a segment's words are likely wrong
HIGH_NO_SPEECH = 0.6  # above this a segment is likely noise or silence


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    text: str
    avg_logprob: float | None = None
    no_speech_prob: float | None = None

    def shifted(self, offset: float) -> Segment:
        return replace(self, start=self.start + offset, end=self.end + offset)

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

    @property
    def text(self) -> str:
        return " ".join(s.text.strip() for s in self.segments if s.text.strip())

    def to_dict(self) -> dict[str, Any]:
        return {"language": self.language, "duration": self.duration, "model": self.model,
                "segments": [asdict(s) for s in self.segments]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Transcript:
        segments = tuple(Segment(**s) for s in data["segments"])
        return cls(segments, data.get("language"), float(data["duration"]), str(data["model"]))

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
    model = ""
    for offset, part in parts:
        segments.extend(s.shifted(offset) for s in part.segments)
        language = language or part.language
        model = model or part.model
    return Transcript(tuple(segments), language, duration, model)


@dataclass(frozen=True)
class SourceInfo:
    """What the json output says about where a transcript came from."""

    name: str
    sha256: str
    timings: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class QualityWarning:
    segment: int
    start: float
    end: float
    problems: tuple[str, ...]


def quality_warnings(transcript: Transcript) -> list[QualityWarning]:
    return [QualityWarning(i, s.start, s.end, tuple(p))
            for i, s in enumerate(transcript.segments) if (p := s.quality_problems())]


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


def _cues(transcript: Transcript) -> list[tuple[float, float, str]]:
    cues = []
    for segment in transcript.segments:
        text = _one_line(segment.text)
        if text:
            end = max(segment.end, segment.start + 0.001)
            cues.append((segment.start, end, text))
    return cues


def to_txt(transcript: Transcript) -> str:
    lines = [_one_line(s.text) for s in transcript.segments]
    return "\n".join(line for line in lines if line) + "\n"


def to_srt(transcript: Transcript) -> str:
    blocks = [f"{i}\n{_clock(start, ',')} --> {_clock(end, ',')}\n{text}\n"
              for i, (start, end, text) in enumerate(_cues(transcript), start=1)]
    return "\n".join(blocks)


def to_vtt(transcript: Transcript) -> str:
    escape = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;"})
    blocks = [f"{_clock(start, '.')} --> {_clock(end, '.')}\n{text.translate(escape)}\n"
              for start, end, text in _cues(transcript)]
    return "\n".join(["WEBVTT\n", *blocks])


def to_json(transcript: Transcript, source: SourceInfo) -> str:
    segments = [{"id": i, **asdict(s), "confidence": s.confidence}
                for i, s in enumerate(transcript.segments)]
    document = {
        "source": source.name, "sha256": source.sha256, "duration": transcript.duration,
        "model": transcript.model, "language": transcript.language,
        "timings": dict(source.timings), "text": transcript.text, "segments": segments,
        "warnings": [asdict(w) for w in quality_warnings(transcript)],
    }
    return json.dumps(document, ensure_ascii=False, indent=2) + "\n"


Writer = Callable[[Transcript, SourceInfo], str]
WRITERS: Mapping[str, Writer] = {
    "txt": lambda t, _: to_txt(t),
    "srt": lambda t, _: to_srt(t),
    "vtt": lambda t, _: to_vtt(t),
    "json": to_json,
}


def write_formats(
    transcript: Transcript, formats: Iterable[str], folder: Path, stem: str, source: SourceInfo
) -> dict[str, Path]:
    """Write `<stem>.<fmt>` for each format into folder; output name -> file."""
    written: dict[str, Path] = {}
    for fmt in formats:
        name = f"{stem}.{fmt}"
        path = folder / name
        path.write_text(WRITERS[fmt](transcript, source), encoding="utf-8")
        written[name] = path
    return written
