"""The `preprocess` step and the ffmpeg helpers: find, probe, convert, split at silences."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import math
import re
import shutil
import wave
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ffmpeg

from traxd.config import Settings
from traxd.errors import BackendFatal, Permanent, Retry, TraxdError
from traxd.pipeline.base import StepContext, StepResult
from traxd.pipeline.formats import WARNINGS_FACT, file_warning, write_warnings
from traxd.pipeline.tracks import Choice, Track, choose_track
from traxd.procs import LineHandler, ProcessLimits, ProcessResult, run_process

SAMPLE_RATE = 16_000
MIN_DURATION = 0.05  # seconds: anything shorter is empty audio
UPLOAD_LIMIT_BYTES = 25 * 1024 * 1024  # OpenAI's limit per transcription request
GLOBAL_ARGS = ("-hide_banner", "-nostdin", "-nostats", "-loglevel", "error",
               "-progress", "pipe:1")
SILENCE_NOISE = "-35dB"
SILENCE_MIN = 0.3  # seconds of quiet that count as a pause
CUT_WINDOWS = (1 / 3, 1 / 2)  # shares of a chunk before its limit searched for a pause
OVERLAP = 2.0  # seconds both chunks hold on each side of a cut that found no pause
LIMIT_KEY = "[daemon] max_duration_seconds"
DRIFT_SECONDS = 1.0  # a decode may end this far from the container's duration...
DRIFT_SHARE = 0.005  # ...or this share of it, whichever is more, without being damage
CLOCKED_BY_POSITION = ("mp3",)  # formats whose constant-bitrate bytes are their clock
UNDECODABLE = (
    "invalid data found when processing input", "moov atom not found",
    "failed to read frame size", "could not find codec parameters", "misdetection possible",
    "does not contain any stream", "matches no streams", "header missing",
    "ebml header parsing failed", "no decoder", "invalid argument", "end of file",
)


@dataclass(frozen=True)
class Tools:
    """Where the ffmpeg binaries are; no ffprobe means probing through ffmpeg itself."""

    ffmpeg: str
    ffprobe: str | None


def find_tools() -> Tools:
    """System ffmpeg/ffprobe on PATH first, else the binary that imageio-ffmpeg ships."""
    system = shutil.which("ffmpeg")
    if system is not None:
        return Tools(system, shutil.which("ffprobe"))
    try:
        import imageio_ffmpeg

        return Tools(str(imageio_ffmpeg.get_ffmpeg_exe()), shutil.which("ffprobe"))
    except (ImportError, RuntimeError) as exc:
        raise BackendFatal("ffmpeg not found: install ffmpeg or the imageio-ffmpeg package",
                           backend="ffmpeg", reason="ffmpeg") from exc


def media_url(path: Path) -> str:
    """An ffmpeg input/output name that cannot be read as an option or a protocol."""
    return "file:" + str(path.absolute())


@dataclass(frozen=True)
class AudioStream:
    index: int
    codec: str
    sample_rate: int
    channels: int
    language: str | None = None  # the stream's language tag (ISO 639-2, e.g. "eng")
    default: bool = False  # disposition default
    duration: float | None = None  # the stream's own duration, when the container says
    bit_rate: int | None = None

    @property
    def track(self) -> Track:
        return Track(self.index, self.language, self.default)


@dataclass(frozen=True)
class MediaInfo:
    format_name: str
    duration: float | None  # None when the container does not say
    audio: tuple[AudioStream, ...]
    video: tuple[str, ...]  # codecs of the video streams
    subtitles: int = 0  # how many subtitle streams it has


@dataclass(frozen=True)
class AudioFormat:
    suffix: str
    options: Mapping[str, Any]
    bits_per_second: int

    @property
    def max_upload_seconds(self) -> float:
        return 0.9 * UPLOAD_LIMIT_BYTES * 8 / self.bits_per_second


# RF64 past 4 GiB (37.3 h of 16 kHz mono s16), where a plain wav would silently stop
WAV = AudioFormat(".wav", {"acodec": "pcm_s16le", "rf64": "auto"}, SAMPLE_RATE * 16)
MP3 = AudioFormat(".mp3", {"acodec": "libmp3lame", "audio_bitrate": "32k"}, 32_000)
CHUNK_FORMATS = {"wav": WAV, "mp3": MP3}
DEFAULT_CHUNK_SECONDS = 600.0


@dataclass(frozen=True)
class ChunkTarget:
    """The chunks a transcriber takes: their format, and their longest length (None: whole)."""

    format: AudioFormat = WAV
    seconds: float | None = DEFAULT_CHUNK_SECONDS
    # Audio at least `piece_seconds` long per piece is cut into up to `pieces` about equal
    # chunks (one per model process) when that makes more than `seconds` would.
    pieces: int = 1
    piece_seconds: float = 0.0

    def pieces_for(self, duration: float) -> int:
        if self.pieces <= 1 or self.piece_seconds <= 0:
            return 1
        return max(1, min(self.pieces, math.floor(duration / self.piece_seconds)))

    def to_settings(self) -> dict[str, Any]:
        return {"chunk_format": self.format.suffix.lstrip("."), "chunk_seconds": self.seconds,
                "chunk_pieces": self.pieces, "chunk_piece_seconds": self.piece_seconds}

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> ChunkTarget:
        name = settings.get("chunk_format", "wav")
        if name not in CHUNK_FORMATS:
            raise ValueError(f"chunk_format must be one of {sorted(CHUNK_FORMATS)}, not {name!r}")
        seconds = settings.get("chunk_seconds", DEFAULT_CHUNK_SECONDS)
        return cls(CHUNK_FORMATS[name], None if seconds is None else float(seconds),
                   int(settings.get("chunk_pieces", 1)),
                   float(settings.get("chunk_piece_seconds", 0.0)))


def chunk_target(backend: str, chunk_seconds: float) -> ChunkTarget:
    """What a transcription backend takes: mp3 under the upload limit for openai, else wav."""
    if backend == "openai":
        return ChunkTarget(MP3, min(chunk_seconds, MP3.max_upload_seconds))
    return ChunkTarget(WAV, chunk_seconds)


@dataclass(frozen=True)
class Chunk:
    """A piece of the preprocessed audio and where it starts in the whole."""

    path: Path
    offset: float
    duration: float

    def to_fact(self) -> dict[str, Any]:
        return {"path": str(self.path), "offset": self.offset, "duration": self.duration}

    @classmethod
    def from_fact(cls, fact: Mapping[str, Any]) -> Chunk:
        return cls(Path(fact["path"]), float(fact["offset"]), float(fact["duration"]))


@dataclass(frozen=True)
class Prepared:
    audio: Path  # the whole input as 16 kHz mono wav
    duration: float
    chunks: tuple[Chunk, ...]
    source: MediaInfo
    choice: Choice  # which of the source's audio streams this is, and why
    warnings: tuple[dict[str, str], ...] = ()  # what the file should say about itself

    @property
    def stream(self) -> AudioStream:
        return self.source.audio[self.choice.position]

    def facts(self) -> dict[str, Any]:
        stream = self.stream
        facts: dict[str, Any] = {
            "duration": self.duration, "audio": str(self.audio),
            "chunks": [c.to_fact() for c in self.chunks],
            "source_format": self.source.format_name, "source_codec": stream.codec,
            "audio_stream": {"index": stream.index, "language": stream.language,
                             "default": stream.default, "chosen_by": self.choice.why},
            "audio_streams": len(self.source.audio)}
        if self.warnings:
            facts[WARNINGS_FACT] = list(self.warnings)
        return facts


# --- running ------------------------------------------------------------------------------


def compile_argv(stream: Any, tools: Tools) -> list[str]:
    """ffmpeg-python builds the argv; traxd runs it. Global options go first."""
    argv: list[str] = ffmpeg.compile(stream, cmd=tools.ffmpeg, overwrite_output=True)
    return [argv[0], *GLOBAL_ARGS, *argv[1:]]


async def run_tool(
    argv: Sequence[str], limits: ProcessLimits, *, on_line: LineHandler | None = None,
    capture: bool = False, stderr_lines: int = 40,
) -> ProcessResult:
    try:
        return await run_process(argv, limits=limits, on_stdout_line=on_line,
                                 capture_stdout=capture, stderr_lines=stderr_lines)
    except FileNotFoundError as exc:
        raise BackendFatal(f"{argv[0]} not found", backend="ffmpeg", reason="ffmpeg") from exc


def failure(result: ProcessResult, what: str, name: str) -> TraxdError:
    """Permanent when the input cannot be decoded, else worth a retry."""
    tail = result.stderr_tail.strip()
    last = tail.splitlines()[-1] if tail else "no error output"
    if any(marker in tail.lower() for marker in UNDECODABLE):
        why = last.rsplit(": ", 1)[-1]  # drop the "file:/path: " prefix
        return Permanent(f"cannot decode {name}: not audio or video that ffmpeg can read "
                         f"({why})", reason="undecodable")
    how = result.signal_name or f"exit status {result.returncode}"
    return Retry(f"ffmpeg {what} of {name} failed ({how}): {tail[-1500:]}", reason="ffmpeg")


class ProgressParser:
    """Turns `-progress pipe:1` lines into fractions [start, start + span] of the whole."""

    def __init__(self, total: float | None, report: Callable[[float], None],
                 start: float = 0.0, span: float = 1.0) -> None:
        self.total, self.report, self.start, self.span = total, report, start, span

    def __call__(self, line: str) -> None:
        key, _, value = line.partition("=")
        if key == "out_time_us" and value.isdigit() and self.total:
            done = min(1.0, int(value) / 1e6 / self.total)
            self.report(self.start + self.span * done)
        elif key == "progress" and value == "end":
            self.report(self.start + self.span)


# --- probing ------------------------------------------------------------------------------


async def probe(path: Path, tools: Tools, limits: ProcessLimits,
                stop: float | None = None) -> MediaInfo:
    """What the file holds; Permanent when it is undecodable or has no audio. A container
    that does not say how long it is gets measured, up to `stop` seconds."""
    if (await asyncio.to_thread(path.stat)).st_size == 0:
        raise Permanent(f"{path.name} is an empty file (0 bytes)", reason="empty")
    info = await (_ffprobe(path, tools, limits) if tools.ffprobe else _probe_with_ffmpeg(
        path, tools, limits))
    if not info.audio:
        kind = f"video only ({', '.join(info.video)})" if info.video else "no streams"
        raise Permanent(f"{path.name} has no audio stream: {kind}", reason="no_audio")
    if info.duration is None:
        info = dataclasses.replace(info, duration=await measure_duration(path, tools, limits,
                                                                          stop))
    if info.duration is not None and info.duration < MIN_DURATION:
        raise Permanent(f"{path.name} is empty audio ({info.duration:.3f} s)", reason="empty")
    return info


PROBE_TIMEOUT = 10.0  # seconds for ffprobe to read a header


async def header_duration(path: Path, tools: Tools) -> float | None:
    """The duration a file's header states (ffprobe; nothing is decoded); None when there
    is no ffprobe, or the file says none or cannot be read."""
    if tools.ffprobe is None:
        return None
    try:
        return (await _ffprobe(path, tools, ProcessLimits(timeout=PROBE_TIMEOUT))).duration
    except (TraxdError, OSError):
        return None


async def _ffprobe(path: Path, tools: Tools, limits: ProcessLimits) -> MediaInfo:
    assert tools.ffprobe is not None
    argv = [tools.ffprobe, "-hide_banner", "-v", "error", "-print_format", "json",
            "-show_format", "-show_streams", media_url(path)]
    result = await run_tool(argv, limits, capture=True)
    if result.returncode != 0:
        raise failure(result, "probe", path.name)
    try:
        return parse_ffprobe(json.loads(result.stdout))
    except (ValueError, KeyError, TypeError) as exc:
        raise Permanent(f"cannot decode {path.name}: unreadable probe output ({exc})",
                        reason="undecodable") from exc


def parse_ffprobe(data: Mapping[str, Any]) -> MediaInfo:
    streams = data.get("streams", [])
    audio = tuple(_audio_stream(s) for s in streams if s.get("codec_type") == "audio")
    video = tuple(str(s.get("codec_name", "?")) for s in streams
                  if s.get("codec_type") == "video"
                  and not s.get("disposition", {}).get("attached_pic"))
    subtitles = sum(1 for s in streams if s.get("codec_type") == "subtitle")
    fmt = data.get("format", {})
    durations = [float(d) for d in (fmt.get("duration"), *(s.get("duration") for s in streams))
                 if d not in (None, "N/A")]
    return MediaInfo(str(fmt.get("format_name", "?")), max(durations, default=None), audio, video,
                     subtitles)


def _audio_stream(s: Mapping[str, Any]) -> AudioStream:
    language = (s.get("tags") or {}).get("language")
    return AudioStream(
        int(s["index"]), str(s.get("codec_name", "?")), int(s.get("sample_rate") or 0),
        int(s.get("channels") or 0), None if language in (None, "", "und") else str(language),
        bool((s.get("disposition") or {}).get("default")), _number(str(s.get("duration"))),
        int(s["bit_rate"]) if str(s.get("bit_rate", "")).isdigit() else None)


_INPUT = re.compile(r"^Input #0, (.+), from ", re.MULTILINE)
_DURATION = re.compile(r"Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)")
_STREAM = re.compile(r"Stream #0:(\d+)(\S*): (Audio|Video): ([^\s,]+)[^\n]*")
_SUBTITLE = re.compile(r"^\s*Stream #0:\d+\S*: Subtitle: ", re.MULTILINE)
_TAG = re.compile(r"\((\w{2,3})\)$")
_RATE = re.compile(r", (\d+) Hz")
_CHANNELS = {"mono": 1, "stereo": 2}


async def _probe_with_ffmpeg(path: Path, tools: Tools, limits: ProcessLimits) -> MediaInfo:
    """No ffprobe: `ffmpeg -i` prints the same facts on stderr (and exits 1, no output)."""
    argv = [tools.ffmpeg, "-hide_banner", "-nostdin", "-i", media_url(path)]
    result = await run_tool(argv, limits, stderr_lines=1000)
    if not _INPUT.search(result.stderr_tail):
        raise failure(result, "probe", path.name)
    return parse_ffmpeg_banner(result.stderr_tail)


def parse_ffmpeg_banner(text: str) -> MediaInfo:
    fmt = _INPUT.search(text)
    duration = _DURATION.search(text)
    seconds = (None if duration is None else int(duration[1]) * 3600 + int(duration[2]) * 60
               + float(duration[3]))
    audio: list[AudioStream] = []
    video: list[str] = []
    for match in _STREAM.finditer(text):
        if match[3] == "Video":
            video.append(match[4])
            continue
        rate = _RATE.search(match[0])
        layout = match[0].split(", ")[2] if match[0].count(", ") >= 2 else ""
        channels = _CHANNELS.get(layout.split("(")[0], 0)
        tag = _TAG.search(match[2])
        language = tag[1] if tag and tag[1] != "und" else None
        audio.append(AudioStream(int(match[1]), match[4], int(rate[1]) if rate else 0, channels,
                                 language, match[0].rstrip().endswith("(default)")))
    return MediaInfo(fmt[1] if fmt else "?", seconds, tuple(audio), tuple(video),
                     len(_SUBTITLE.findall(text)))


async def measure_duration(path: Path, tools: Tools, limits: ProcessLimits,
                           stop: float | None = None) -> float:
    """Decode the first audio stream to nowhere (up to `stop` s) and read how far it got."""
    times: list[int] = []

    def keep(line: str) -> None:
        key, _, value = line.partition("=")
        if key == "out_time_us" and value.isdigit():
            times.append(int(value))

    bound = {} if stop is None else {"t": stop}
    stream = ffmpeg.input(media_url(path), **bound)["a:0"].output("-", format="null")
    result = await run_tool(compile_argv(stream, tools), limits, on_line=keep)
    if result.returncode != 0:
        raise failure(result, "decode", path.name)
    return max(times, default=0) / 1e6


# --- converting and splitting -------------------------------------------------------------


def wav_duration(path: Path) -> float:
    """Seconds of PCM in a wav, RIFF or RF64 (what ffmpeg writes past 4 GiB)."""
    with path.open("rb") as f:
        if f.read(4) == b"RIFF":
            with wave.open(str(path), "rb") as wav:
                return wav.getnframes() / wav.getframerate()
        f.seek(12)
        size64 = rate = block = 0
        while len(header := f.read(8)) == 8:
            ident, size = header[:4], int.from_bytes(header[4:], "little")
            body = f.read(min(size, 28)) if ident in (b"ds64", b"fmt ") else b""
            if ident == b"ds64":
                size64 = int.from_bytes(body[8:16], "little")
            elif ident == b"fmt ":
                rate, block = (int.from_bytes(body[4:8], "little"),
                               int.from_bytes(body[12:14], "little"))
            elif ident == b"data" and rate and block:
                data = size64 if size == 0xFFFFFFFF else size
                left = path.stat().st_size - f.tell()
                return min(data, left) // block / rate
            f.seek(size + (size & 1) - len(body), 1)
    raise ValueError(f"{path.name} is not a PCM wav file")


async def convert(
    src: Path, dst: Path, fmt: AudioFormat, tools: Tools, limits: ProcessLimits, *,
    progress: ProgressParser | None = None, start: float | None = None,
    duration: float | None = None, stream: int | None = None, audio_filter: str | None = None,
) -> None:
    """An audio stream of src (the first, or the one with index `stream`; optionally a time
    range, through a filter) -> 16 kHz mono in fmt."""
    cut = {k: v for k, v in (("ss", start), ("t", duration)) if v is not None}
    extra = {} if audio_filter is None else {"af": audio_filter}
    selector = "a:0" if stream is None else str(stream)
    output = ffmpeg.input(media_url(src), **cut)[selector].output(
        media_url(dst), ac=1, ar=SAMPLE_RATE, **fmt.options, **extra)
    result = await run_tool(compile_argv(output, tools), limits, on_line=progress)
    if result.returncode != 0:
        raise failure(result, "conversion", src.name)


SILENCE_LOG = "silences.txt"  # ametadata's own channel, written in the folder given


async def detect_silences(
    path: Path, tools: Tools, limits: ProcessLimits, duration: float, folder: Path
) -> list[tuple[float, float]]:
    """(start, end) of each pause in the audio, from ffmpeg's silencedetect.

    The metadata goes to a file of its own: stdout carries `-progress`, and two writers on
    one pipe interleave mid-line when a buffer is flushed early (a busy machine, a long file).
    The file is named relative to `folder` (the child's working folder), so no path ever
    needs filter-graph escaping.
    """
    log = folder / SILENCE_LOG
    stream = (ffmpeg.input(media_url(path))["a:0"]
              .filter("silencedetect", noise=SILENCE_NOISE, d=SILENCE_MIN)
              .filter("ametadata", mode="print", file=SILENCE_LOG)
              .output("-", format="null"))
    try:
        result = await run_process(compile_argv(stream, tools), limits=limits, cwd=folder)
        if result.returncode != 0:
            raise failure(result, "silence detection", path.name)
        text = await asyncio.to_thread(log.read_text, "utf-8", "replace")
    finally:
        await asyncio.to_thread(log.unlink, missing_ok=True)
    return parse_silences(text.splitlines(), duration)


def parse_silences(lines: Iterable[str], duration: float) -> list[tuple[float, float]]:
    """Pairs each `lavfi.silence_start` with the `lavfi.silence_end` after it; a pause still
    open at the end lasts to `duration`. Lines that are not one whole key=number are skipped,
    so a damaged line can cost one pause, never the file."""
    pauses: list[tuple[float, float]] = []
    start: float | None = None
    for line in lines:
        key, _, value = line.strip().partition("=")
        number = _number(value)
        if number is None:
            continue
        if key == "lavfi.silence_start":
            start = number
        elif key == "lavfi.silence_end" and start is not None:
            if number >= start:
                pauses.append((start, number))
            start = None
    if start is not None and start < duration:
        pauses.append((start, duration))
    return pauses


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def plan_cuts(
    duration: float, chunk_seconds: float, silences: Sequence[tuple[float, float]]
) -> list[float]:
    """Cut points so that no piece is longer than chunk_seconds. Each cut lies in the longest
    pause in the last third before the limit, else in the last half, else at the limit."""
    cuts: list[float] = []
    last = 0.0
    while duration - last > chunk_seconds:
        last = _cut_before(silences, last + chunk_seconds, chunk_seconds)
        cuts.append(last)
    return cuts


def even_cuts(duration: float, pieces: int,
              silences: Sequence[tuple[float, float]]) -> list[float]:
    """Cut points into `pieces` about equal parts: each in the pause nearest its even place
    within a tenth of a part, else at that place."""
    part = duration / pieces
    cuts = []
    for k in range(1, pieces):
        place, lo, hi = k * part, k * part - part / 10, k * part + part / 10
        middles = [(max(s, lo) + min(e, hi)) / 2 for s, e in silences if min(e, hi) > max(s, lo)]
        cuts.append(min(middles, key=lambda m: abs(m - place), default=place))
    return cuts


def chunk_spans(duration: float, chunk_seconds: float,
                silences: Sequence[tuple[float, float]],
                pieces: int = 1) -> list[tuple[float, float]]:
    """(start, end) of each chunk: none longer than chunk_seconds; with `pieces` > 1, at
    least that many about equal ones (local model processes; each may then be a tenth
    over chunk_seconds). A cut in a pause is where one chunk ends and the next begins; a
    cut with no pause (continuous noise or speech) is overlapped by OVERLAP on each side
    (at most a quarter of a chunk), so that a word it would split is whole in both chunks
    (merging drops the copy)."""
    if pieces > 1:
        count = max(pieces, math.ceil(duration / chunk_seconds))
        cuts = even_cuts(duration, count, silences)
        chunk_seconds = duration / count
    else:
        cuts = plan_cuts(duration, chunk_seconds, silences)
    bounds = [0.0, *cuts, duration]
    overlap = min(OVERLAP, chunk_seconds / 4)
    spans = []
    for cut_in, cut_out in itertools.pairwise(bounds):
        start = cut_in if cut_in == 0.0 or _in_pause(silences, cut_in) else cut_in - overlap
        end = cut_out if cut_out == duration or _in_pause(silences, cut_out) else (
            cut_out + overlap)
        spans.append((max(0.0, start), min(duration, end)))
    return spans


def _in_pause(silences: Sequence[tuple[float, float]], at: float) -> bool:
    return any(s <= at <= e for s, e in silences)


def _cut_before(silences: Sequence[tuple[float, float]], limit: float, chunk: float) -> float:
    for share in CUT_WINDOWS:
        cut = _pause_in(silences, limit - chunk * share, limit)
        if cut is not None:
            return cut
    return limit


def _pause_in(silences: Sequence[tuple[float, float]], lo: float, hi: float) -> float | None:
    """The middle of the longest pause's part inside [lo, hi], if any pause reaches in."""
    overlaps = [(min(e, hi) - max(s, lo), (max(s, lo) + min(e, hi)) / 2)
                for s, e in silences if min(e, hi) > max(s, lo)]
    return max(overlaps)[1] if overlaps else None


async def prepare_audio(ctx: StepContext, folder: Path, tools: Tools,
                        target: ChunkTarget) -> Prepared:
    """Any media -> 16 kHz mono wav in `folder`, cut into the chunks `target` asks for.

    The length is checked from the probe, before anything is decoded; the audio track is the
    one in the configured language, else the default one, else the first."""
    limit = ctx.settings.daemon.max_duration_seconds
    info = await probe(ctx.input, tools, ctx.limits, stop=limit + 1.0)
    if info.duration is not None and info.duration > limit:
        raise too_long(ctx.input.name, info.duration, limit, "is")
    choice = choose_track([a.track for a in info.audio], ctx.settings.transcribe.language)
    stream = info.audio[choice.position]
    if len(info.audio) > 1:
        ctx.log.info("audio_track_chosen", stream=stream.index, language=stream.language,
                     chosen_by=choice.why, others=[a.index for a in info.audio if a != stream])
    audio = folder / "audio.wav"
    duration, warnings = await _decode(ctx, info, stream, audio, tools)
    chunks = await _split(audio, duration, target, tools, ctx, folder)
    ctx.progress(1.0)
    ctx.log.info("preprocessed", duration=round(duration, 3), chunks=len(chunks),
                 source_format=info.format_name, codec=stream.codec)
    return Prepared(audio, duration, chunks, info, choice, tuple(warnings))


def too_long(name: str, seconds: float, limit: float, verb: str) -> Permanent:
    return Permanent(
        f"{name} {verb} {_clock(seconds)} long, over the {_clock(limit)} limit "
        f"({LIMIT_KEY} = {limit:.0f}); raise it to take longer files", reason="too_long")


def _clock(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def drift_allowed(expected: float) -> float:
    """How far a decode may end from the container's duration without damage."""
    return max(DRIFT_SECONDS, DRIFT_SHARE * expected)


async def _decode(ctx: StepContext, info: MediaInfo, stream: AudioStream, audio: Path,
                  tools: Tools) -> tuple[float, list[dict[str, str]]]:
    """The chosen stream as the whole 16 kHz wav, no longer than the limit; its duration
    checked against the container's (damage shifts every later timestamp)."""
    limit = ctx.settings.daemon.max_duration_seconds
    parser = ProgressParser(info.duration, ctx.progress, 0.0, 0.8)
    await convert(ctx.input, audio, WAV, tools, ctx.limits, progress=parser,
                  stream=stream.index, duration=limit + 1.0)
    duration = await asyncio.to_thread(wav_duration, audio)
    if duration < MIN_DURATION:
        raise Permanent(f"{ctx.input.name} holds no audio samples", reason="empty")
    if duration > limit:
        raise too_long(ctx.input.name, duration, limit, "decodes to more than")
    expected = stream.duration or info.duration
    if expected is None or abs(duration - expected) <= drift_allowed(expected):
        return duration, []
    return await _mend(ctx, info, stream, audio, tools, duration, expected)


async def _mend(ctx: StepContext, info: MediaInfo, stream: AudioStream, audio: Path,
                tools: Tools, duration: float, expected: float,
                ) -> tuple[float, list[dict[str, str]]]:
    """A decode that lost (or gained) time. In a constant-bitrate stream without a container
    the byte position is the clock: decoding again with timestamps from it puts silence where
    the damage was. Otherwise the file is flagged: later timestamps may be off."""
    name, log = ctx.input.name, ctx.log.bind(probed=round(expected, 3))
    if info.format_name in CLOCKED_BY_POSITION and stream.bit_rate:
        mended = audio.with_name("mended.wav")
        clock = (f"asetpts=POS*8/{stream.bit_rate}/TB,asetpts=PTS-STARTPTS,"
                 "aresample=async=1")
        await convert(ctx.input, mended, WAV, tools, ctx.limits, stream=stream.index,
                      duration=ctx.settings.daemon.max_duration_seconds + 1.0,
                      audio_filter=clock)
        fixed = await asyncio.to_thread(wav_duration, mended)
        if abs(fixed - expected) <= drift_allowed(expected):
            await asyncio.to_thread(mended.replace, audio)
            log.warning("damaged_media_mended", decoded=round(duration, 3), mended=fixed)
            return fixed, [file_warning("preprocess", "damaged_media", (
                f"{name} is damaged: {expected - duration:.1f} s of its audio could not be "
                "decoded and is silence in the transcript; timestamps stay on the "
                "source's clock"))]
        await asyncio.to_thread(mended.unlink, missing_ok=True)
    log.warning("damaged_media", decoded=round(duration, 3))
    return duration, [file_warning("preprocess", "damaged_media", (
        f"{name} is damaged: its audio decodes to {duration:.1f} s but the file says "
        f"{expected:.1f} s; timestamps after the damage may be off by up to "
        f"{abs(expected - duration):.1f} s"))]


async def _split(audio: Path, duration: float, target: ChunkTarget, tools: Tools,
                 ctx: StepContext, folder: Path) -> tuple[Chunk, ...]:
    limit = duration if target.seconds is None else target.seconds
    pieces = target.pieces_for(duration)
    if duration <= limit and pieces == 1 and target.format is WAV:
        return (Chunk(audio, 0.0, duration),)
    silences = (await detect_silences(audio, tools, ctx.limits, duration, folder)
                if duration > limit or pieces > 1 else [])
    chunks = []
    for index, (start, end) in enumerate(chunk_spans(duration, limit, silences, pieces)):
        path = folder / f"chunk-{index:03d}{target.format.suffix}"
        await convert(audio, path, target.format, tools, ctx.limits, start=start,
                      duration=end - start)
        chunks.append(Chunk(path, start, end - start))
        ctx.progress(0.8 + 0.2 * end / duration)
    return tuple(chunks)


class LazyTools:
    """Finds the ffmpeg binaries on first use, then keeps them."""

    def __init__(self) -> None:
        self._tools: Tools | None = None

    def get(self) -> Tools:
        if self._tools is None:
            self._tools = find_tools()
        return self._tools


class PreprocessStep:
    """Probe, convert to 16 kHz mono, split long files at pauses.

    The chunk format and length come from the step's own settings (ChunkTarget), which the
    daemon derives from the transcription that follows in the pipeline.
    """

    name = "preprocess"
    needs_workdir = True

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tools = LazyTools()

    async def run(self, ctx: StepContext) -> StepResult:
        target = ChunkTarget.from_settings(ctx.step_settings)
        prepared = await prepare_audio(ctx, ctx.workdir, self.tools.get(), target)
        artifacts = await asyncio.to_thread(write_warnings, ctx.workdir, ctx.job.stem,
                                            ctx.job.name, prepared.warnings)
        return StepResult(artifacts=artifacts, media=prepared.audio, facts=prepared.facts())

    async def aclose(self) -> None:
        return None
