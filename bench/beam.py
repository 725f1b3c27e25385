"""What a wider beam costs and buys: traxd's local backend at beam_size 1 and 5.

    python -m bench.beam [--files 40] [--sentences 2] [--rounds 2]

Speech from espeak-ng at two speaking rates (160 and 230 words a minute; the fast one is
where tiny.en errs), 16 kHz mono wav. Each round transcribes all files at each beam size
through LocalBackend (all submitted at once, processes and threads chosen as the daemon
does, model load included); the best wall time of the rounds is printed with the word
error rate of the whole set against the text spoken.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.transcribe import SENTENCES, audio_seconds, context
from tests.media.helpers import wer, words
from traxd.config import Settings
from traxd.logs import configure
from traxd.pipeline.plan import plan_workers, usable_cores
from traxd.pipeline.transcribe import LocalBackend

RATES = (160, 230)


def make_speech(folder: Path, count: int, sentences: int) -> list[tuple[Path, str]]:
    files = []
    for index in range(count):
        text = " ".join(SENTENCES[(index + k) % len(SENTENCES)] for k in range(sentences))
        raw, wav = folder / f"raw-{index}.wav", folder / f"speech-{index}.wav"
        rate = RATES[index % len(RATES)]
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", str(rate), "-w", str(raw), text],
                       check=True)
        subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(raw),
                        "-ac", "1", "-ar", "16000", "-acodec", "pcm_s16le", str(wav)],
                       check=True)
        files.append((wav, text))
    return files


async def run(files: Sequence[tuple[Path, str]], beam: int) -> tuple[float, float]:
    """(wall seconds, word error rate) of one pass at this beam size."""
    base = Settings()
    settings = dataclasses.replace(base, transcribe=dataclasses.replace(
        base.transcribe, beam_size=beam, language="en"))
    backend = LocalBackend(settings.transcribe)
    ctx = context(settings, files[0][0].parent)
    started = time.monotonic()
    try:
        transcripts = await asyncio.gather(*(backend.transcribe(p, ctx) for p, _ in files))
    finally:
        wall = time.monotonic() - started
        await backend.aclose()
    wrong = sum(wer(text, t.text) * len(words(text))
                for (_, text), t in zip(files, transcripts, strict=True))
    total = sum(len(words(text)) for _, text in files)
    return wall, wrong / total


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.beam")
    parser.add_argument("--files", type=int, default=40)
    parser.add_argument("--sentences", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 5])
    args = parser.parse_args(argv)
    configure(level="warning")
    with tempfile.TemporaryDirectory(prefix="traxd-bench-") as tmp:
        files = make_speech(Path(tmp), args.files, args.sentences)
        procs, threads = plan_workers(0, 0, usable_cores(), gpu=False)
        print(f"{len(files)} files, {audio_seconds([p for p, _ in files]):.0f} s of speech, "
              f"tiny.en int8, {procs} proc x {threads} thr, best of {args.rounds}")
        best: dict[int, tuple[float, float]] = {}
        for _ in range(args.rounds):
            for beam in args.beams:  # interleaved, so that load on the machine hits both
                wall, wer = asyncio.run(run(files, beam))
                best[beam] = min(best.get(beam, (wall, wer)), (wall, wer))
    for beam in args.beams:
        wall, wer = best[beam]
        print(f"beam_size {beam}: {wall:6.1f} s  WER {wer:.3f}")


if __name__ == "__main__":
    main()
