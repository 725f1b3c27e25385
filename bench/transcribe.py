"""Local transcription throughput: faster-whisper called directly vs traxd's local backend.

    python -m bench.transcribe [--files 8] [--sentences 4]

Generates speech with espeak-ng (16 kHz mono wav, the form preprocess hands over), then
transcribes the same files (a) directly with faster-whisper in one process, one file after
another, and (b) with traxd's LocalBackend, all files submitted at once as the daemon's
pool would, for a few processes x threads plans. Prints files/s, the real-time factor
(processing seconds per second of audio; lower is better) and peak resident memory.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import Sequence
from pathlib import Path

import psutil

from traxd.config import Settings
from traxd.logs import configure, get_logger
from traxd.pipeline.base import JobInfo, StepContext
from traxd.pipeline.plan import plan_workers, usable_cores
from traxd.pipeline.transcribe import LocalBackend
from traxd.pipeline.whisper_pool import model_path
from traxd.procs import ProcessLimits

SENTENCES = (
    "The committee will meet again on Thursday to review the budget for next year.",
    "Please remember to bring your notes and the signed forms to the front desk.",
    "Rain is expected in the northern valleys, with clear skies later in the week.",
    "Our new library opens at nine in the morning and closes at six in the evening.",
    "She walked along the river and counted seven boats tied to the old wooden pier.",
    "The engineers tested the bridge with heavy trucks before it opened to traffic.",
)


@dataclasses.dataclass(frozen=True)
class Figures:
    label: str
    files: int
    audio_seconds: float
    wall_seconds: float
    peak_rss_mb: float

    def row(self) -> str:
        return (f"{self.label:<28} {self.files / self.wall_seconds:>8.2f} "
                f"{self.wall_seconds / self.audio_seconds:>8.3f} {self.wall_seconds:>8.1f} "
                f"{self.peak_rss_mb:>10.0f}")


def make_speech(folder: Path, count: int, sentences: int) -> list[Path]:
    files = []
    for index in range(count):
        text = " ".join(SENTENCES[(index + k) % len(SENTENCES)] for k in range(sentences))
        raw, wav = folder / f"raw-{index}.wav", folder / f"speech-{index}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "160", "-w", str(raw), text],
                       check=True)
        subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(raw),
                        "-ac", "1", "-ar", "16000", "-acodec", "pcm_s16le", str(wav)],
                       check=True)
        files.append(wav)
    return files


def audio_seconds(files: Sequence[Path]) -> float:
    total = 0.0
    for path in files:
        with wave.open(str(path), "rb") as wav:
            total += wav.getnframes() / wav.getframerate()
    return total


def run_direct(files: Sequence[Path], threads: int) -> Figures:
    """faster-whisper in a fresh process, so that its peak RSS is its own."""
    argv = [sys.executable, "-m", "bench.transcribe", "--direct", str(threads),
            *map(str, files)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    data = json.loads(out.strip().splitlines()[-1])
    label = f"direct cpu_threads={threads or 'default'}"
    return Figures(label, len(files), audio_seconds(files), data["wall"], data["rss"])


def direct_child(threads: int, files: Sequence[str]) -> None:
    from faster_whisper import WhisperModel

    started = time.monotonic()
    model = WhisperModel(model_path("tiny.en"), device="cpu", compute_type="int8",
                         cpu_threads=threads)
    for path in files:
        segments, _ = model.transcribe(path, beam_size=1)
        list(segments)
    wall = time.monotonic() - started
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"wall": wall, "rss": rss}))


async def sample_rss(backend: LocalBackend, peak: list[float]) -> None:
    while True:
        total = 0.0
        for pid in backend.pool().pids:
            try:
                total += psutil.Process(pid).memory_info().rss / 2**20
            except psutil.Error:
                continue
        peak[0] = max(peak[0], total)
        await asyncio.sleep(0.05)


def context(settings: Settings, workdir: Path) -> StepContext:
    job = JobInfo(0, "bench", "bench.wav", "", 0)
    return StepContext(job, workdir, workdir, workdir, {}, {}, settings, (), ProcessLimits(),
                       get_logger(), lambda _: None)


async def run_traxd(files: Sequence[Path], processes: int, threads: int) -> Figures:
    base = Settings()
    settings = dataclasses.replace(base, transcribe=dataclasses.replace(
        base.transcribe, processes=processes, threads=threads))
    backend = LocalBackend(settings.transcribe)
    ctx = context(settings, files[0].parent)
    peak = [0.0]
    started = time.monotonic()
    sampler = asyncio.ensure_future(sample_rss(backend, peak))
    try:
        await asyncio.gather(*(backend.transcribe(path, ctx) for path in files))
    finally:
        sampler.cancel()
        wall = time.monotonic() - started
        await backend.aclose()
    procs, each = plan_workers(processes, threads, usable_cores(), gpu=False)
    label = f"traxd {procs} proc x {each} thr" + (" (auto)" if not processes else "")
    return Figures(label, len(files), audio_seconds(files), wall, peak[0])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.transcribe")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--sentences", type=int, default=4)
    parser.add_argument("--direct", type=int, default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.direct is not None:
        direct_child(args.direct, rest)
        return
    configure(level="warning")
    with tempfile.TemporaryDirectory(prefix="traxd-bench-") as tmp:
        files = make_speech(Path(tmp), args.files, args.sentences)
        cores = usable_cores()
        print(f"{len(files)} files, {audio_seconds(files):.0f} s of speech, {cores} cores, "
              "model tiny.en int8, beam_size 1; model load included")
        results = [run_direct(files, 0), run_direct(files, cores)]
        for processes, threads in ((0, 0), (1, cores)):
            results.append(asyncio.run(run_traxd(files, processes, threads)))
    print(f"{'':<28} {'files/s':>8} {'RTF':>8} {'wall s':>8} {'peak MB':>10}")
    for figures in results:
        print(figures.row())


if __name__ == "__main__":
    main()
