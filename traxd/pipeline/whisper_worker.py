"""The model process of the local backend: `python -m traxd.pipeline.whisper_worker`.

Loads a faster-whisper model once, then answers one request per stdin line with JSON lines
on stdout: {"event": "ready"} once, then per request any number of {"event": "progress"}
and one {"event": "result"} or {"event": "error"}. A model that cannot be loaded gives
{"event": "fatal"} and exit status 2. End of stdin ends the process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from traxd.pipeline.jsonlines import protocol_stream, send

EXIT_FATAL = 2


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="traxd.pipeline.whisper_worker")
    parser.add_argument("--model", required=True, help="faster-whisper model name or path")
    parser.add_argument("--label", required=True, help="model name reported in results")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compute-type", default="int8")
    parser.add_argument("--threads", type=int, default=0)
    return parser.parse_args(argv)


def load_model(args: argparse.Namespace) -> Any:
    from faster_whisper import WhisperModel

    return WhisperModel(args.model, device=args.device, compute_type=args.compute_type,
                        cpu_threads=args.threads, num_workers=1)


SAMPLE_RATE = 16000  # what faster-whisper decodes to


def decode(path: str) -> Any:
    from faster_whisper import decode_audio

    return decode_audio(path, sampling_rate=SAMPLE_RATE)


def run_model(model: Any, request: dict[str, Any]) -> tuple[Any, Any, bool]:
    """faster-whisper on the request's audio: windows decoded a batch at a time
    (BatchedInferencePipeline) when it is at least `long_audio_seconds` long and the
    request has a batch size, else one window after another; (segments, info, batched)."""
    audio = decode(request["audio"])
    options = {"language": request.get("language"), "task": request.get("task", "transcribe"),
               "beam_size": request["beam_size"], "vad_filter": request["vad_filter"],
               "word_timestamps": bool(request.get("word_timestamps", False))}
    batch = int(request.get("batch_size") or 0)
    batched = bool(batch) and len(audio) >= float(request["long_audio_seconds"]) * SAMPLE_RATE
    if batched:
        from faster_whisper import BatchedInferencePipeline

        model = BatchedInferencePipeline(model)
        options["batch_size"] = batch
    segments, info = model.transcribe(audio, **options)
    return segments, info, batched


def transcribe(model: Any, label: str, request: dict[str, Any], out: TextIO) -> dict[str, Any]:
    segments, info, batched = run_model(model, request)
    kept = []
    for segment in segments:
        kept.append({"start": segment.start, "end": segment.end, "text": segment.text.strip(),
                     "avg_logprob": segment.avg_logprob,
                     "no_speech_prob": segment.no_speech_prob,
                     "words": [{"start": w.start, "end": w.end, "word": w.word.strip(),
                                "probability": w.probability} for w in segment.words or ()]})
        fraction = min(1.0, segment.end / info.duration) if info.duration else 0.0
        send(out, {"event": "progress", "fraction": fraction})
    # A language given in the request was not detected: it has no probability.
    probability = None if request.get("language") else info.language_probability
    transcript = {"language": info.language, "duration": info.duration, "model": label,
                  "language_probability": probability, "segments": kept,
                  "batched": batched}
    return {"event": "result", "transcript": transcript}


def failure(exc: Exception) -> dict[str, Any]:
    """Undecodable audio cannot get better; anything else may (memory, a busy device)."""
    permanent = type(exc).__module__.split(".")[0] == "av"
    return {"event": "error", "category": "permanent" if permanent else "retry",
            "message": f"{type(exc).__name__}: {exc}"}


def serve(model: Any, label: str, requests: TextIO, out: TextIO) -> None:
    for line in requests:
        request = json.loads(line)
        try:
            reply = transcribe(model, label, request, out)
        except Exception as exc:  # every failure goes back to the daemon
            reply = failure(exc)
        send(out, reply)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = protocol_stream()
    try:
        model = load_model(args)
    except Exception as exc:  # the daemon pauses the backend
        send(out, {"event": "fatal", "message": f"cannot load model {args.label!r}: {exc}"})
        return EXIT_FATAL
    send(out, {"event": "ready", "device": str(model.model.device), "pid": os.getpid()})
    serve(model, args.label, sys.stdin, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
