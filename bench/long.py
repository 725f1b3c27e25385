"""One long file and many short ones: traxd beside faster-whisper, plain and batched.

    python -m bench.long [--minutes 10] [--files 40] [--rounds 1]

Speech from espeak-ng (16 kHz mono wav): one long file of varied sentences, paragraphs at
160 and 230 words a minute in turn, at least `--minutes` long; and `--files` short files of
two sentences (bench/beam.py's set). Each engine transcribes the long file, then the short
files, with the same model (tiny.en int8) and beam_size 5, English, model load included,
each in a process of its own:

- traxd: the transcribe step as the daemon runs it (chunks planned for its model
  processes; processes and threads chosen as the daemon does); the short files all at once.
- plain: `WhisperModel(...).transcribe(path, beam_size=5)`, faster-whisper's defaults
  (threads, no voice filter); the short files one after another.
- batched: `BatchedInferencePipeline(model).transcribe(path, beam_size=5, batch_size=8)`.

Prints wall time and word error rate per engine and set, the best wall of the rounds (with
its WER), and the targets (issue 14): the long file at least as fast as batched at a WER no
worse than plain; the short files faster than both.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.beam import make_speech
from bench.transcribe import audio_seconds, context
from tests.media.helpers import espeak_wav, varied_sentences, wer, words
from traxd.config import Settings
from traxd.logs import configure
from traxd.pipeline.plan import local_plan
from traxd.pipeline.transcribe import TranscribeStep
from traxd.pipeline.whisper_pool import model_path

ENGINES = ("traxd", "plain", "batched")
RATES = (160, 230)
BEAM, BATCH = 5, 8


def make_long(folder: Path, minutes: float) -> tuple[Path, str]:
    """Paragraphs of four sentences at alternating rates, joined into one wav."""
    parts, texts, total, index = [], [], 0.0, 0
    sentences = iter(varied_sentences(100_000, seed=10))
    while total < minutes * 60:
        text = " ".join(next(sentences) for _ in range(4))
        part = espeak_wav(text, folder / f"part-{index:03d}.wav", RATES[index % len(RATES)])
        parts.append(part)
        texts.append(text)
        total += audio_seconds([part])
        index += 1
    listing = folder / "parts.txt"
    listing.write_text("".join(f"file '{p}'\n" for p in parts))
    long = folder / "long.wav"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "concat", "-safe",
                    "0", "-i", str(listing), "-c", "copy", str(long)], check=True)
    for part in parts:
        part.unlink()
    return long, " ".join(texts)


def set_wer(pairs: Sequence[tuple[str, str]]) -> float:
    """Word error rate of a whole set: errors over the words of every reference."""
    wrong = sum(wer(ref, hyp) * len(words(ref)) for ref, hyp in pairs)
    return wrong / max(1, sum(len(words(ref)) for ref, _ in pairs))


# --- the engines, each in a child process -------------------------------------------------


def faster_whisper_child(engine: str, files: Sequence[str]) -> list[str]:
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    model = WhisperModel(model_path("tiny.en"), device="cpu", compute_type="int8")
    texts = []
    for path in files:
        if engine == "batched":
            segments, _ = BatchedInferencePipeline(model).transcribe(
                path, language="en", beam_size=BEAM, batch_size=BATCH)
        else:
            segments, _ = model.transcribe(path, language="en", beam_size=BEAM)
        texts.append(" ".join(s.text.strip() for s in segments))
    return texts


async def traxd_child(files: Sequence[str]) -> list[str]:
    settings = Settings()
    step = TranscribeStep(settings)
    with tempfile.TemporaryDirectory(prefix="traxd-bench-") as tmp:
        async def one(index: int, path: str) -> str:
            workdir = Path(tmp) / str(index)
            workdir.mkdir()
            ctx = context(settings, workdir)
            ctx = dataclasses.replace(ctx, input=Path(path), source=Path(path),
                                      formats=("txt",))
            result = await step.run(ctx)
            return result.artifacts["bench.txt"].read_text()
        try:
            return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(files))))
        finally:
            await step.aclose()


def child(engine: str, files: Sequence[str]) -> None:
    configure(level="warning")
    started = time.monotonic()
    texts = (asyncio.run(traxd_child(files)) if engine == "traxd"
             else faster_whisper_child(engine, files))
    print(json.dumps({"wall": time.monotonic() - started, "texts": texts}))


def measure(engine: str, files: Sequence[tuple[Path, str]]) -> tuple[float, float]:
    """(wall seconds, WER) of one engine on one set, in a fresh process."""
    argv = [sys.executable, "-m", "bench.long", "--child", engine, *(str(p) for p, _ in files)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    data = json.loads(out.strip().splitlines()[-1])
    pairs = [(ref, hyp) for (_, ref), hyp in zip(files, data["texts"], strict=True)]
    return float(data["wall"]), set_wer(pairs)


def verdict(ok: bool) -> str:
    return "OK" if ok else "MISSED"


def report(best: dict[tuple[str, str], tuple[float, float]]) -> None:
    print(f"{'':<10} {'long wall s':>12} {'long WER':>9} {'short wall s':>13} {'short WER':>10}")
    for engine in ENGINES:
        (lw, le), (sw, se) = best[engine, "long"], best[engine, "short"]
        print(f"{engine:<10} {lw:>12.1f} {le:>9.3f} {sw:>13.1f} {se:>10.3f}")
    (tw, te), (bw, _), (_, pe) = (best["traxd", "long"], best["batched", "long"],
                                  best["plain", "long"])
    print(f"long file: traxd {tw:.1f} s vs batched {bw:.1f} s (target: at most) "
          f"{verdict(tw <= bw)}; WER {te:.3f} vs plain {pe:.3f} (target: at most) "
          f"{verdict(te <= pe + 1e-9)}")
    short = [best[e, "short"][0] for e in ENGINES]
    print(f"short files: traxd {short[0]:.1f} s vs plain {short[1]:.1f} s, batched "
          f"{short[2]:.1f} s (target: fastest) {verdict(short[0] <= min(short[1:]))}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.long")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--files", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.child is not None:
        child(args.child, rest)
        return
    with tempfile.TemporaryDirectory(prefix="traxd-bench-") as tmp:
        folder = Path(tmp)
        long = [make_long(folder, args.minutes)]
        short = make_speech(folder, args.files, 2)
        procs, threads = local_plan(Settings().transcribe)
        print(f"long: {audio_seconds([long[0][0]]):.0f} s of speech; short: {len(short)} files, "
              f"{audio_seconds([p for p, _ in short]):.0f} s; tiny.en int8, beam {BEAM}; "
              f"traxd {procs} proc x {threads} thr; best of {args.rounds}", flush=True)
        best: dict[tuple[str, str], tuple[float, float]] = {}
        for _ in range(args.rounds):
            for name, files in (("long", long), ("short", short)):
                for engine in ENGINES:  # interleaved, so that load on the machine hits all
                    figures = measure(engine, files)
                    print(f"  {engine} {name}: {figures[0]:.1f} s, WER {figures[1]:.3f}",
                          flush=True)
                    best[engine, name] = min(best.get((engine, name), figures), figures)
    report(best)


if __name__ == "__main__":
    main()
