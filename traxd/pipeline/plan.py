"""How local transcription uses the machine: model processes, their threads, and the
pieces a long file is cut into so that every process works on it."""

from __future__ import annotations

import os
from pathlib import Path

from traxd.config import TranscribeSettings
from traxd.pipeline.ffmpeg import WAV, ChunkTarget, chunk_target

MAX_AUTO_PROCESSES = 4  # each holds a copy of the model


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def has_nvidia_gpu() -> bool:
    return Path("/proc/driver/nvidia/version").exists()


def plan_workers(processes: int, threads: int, cores: int, gpu: bool) -> tuple[int, int]:
    """(model processes, threads each); 0 means choose.

    One process per GPU. On CPUs, files and chunks side by side in single-threaded
    processes beat one process using all cores for one file at a time (bench/transcribe.py:
    +20 % on 2 cores), up to MAX_AUTO_PROCESSES model copies; more cores go to threads.
    """
    if gpu:
        procs = processes or 1
        return procs, threads or max(1, min(4, cores // procs))
    procs = processes or max(1, min(cores, MAX_AUTO_PROCESSES))
    return procs, threads or max(1, cores // procs)


def uses_gpu(settings: TranscribeSettings) -> bool:
    return settings.device == "cuda" or (settings.device == "auto" and has_nvidia_gpu())


def local_plan(settings: TranscribeSettings) -> tuple[int, int]:
    """(model processes, threads each) of the local backend on this machine."""
    return plan_workers(settings.processes, settings.threads, usable_cores(),
                        uses_gpu(settings))


def transcribe_target(settings: TranscribeSettings, backend: str | None = None) -> ChunkTarget:
    """The chunks a backend takes. For the local one, a file at least `long_audio_seconds`
    long per model process is cut at pauses into one piece per process, so that one long
    file keeps every process busy (each piece then goes through the batched pipeline)."""
    backend = backend or settings.backend
    if backend == "openai":
        return chunk_target(backend, settings.chunk_seconds)
    if not settings.long_audio_seconds or not settings.vad_filter:
        return ChunkTarget(WAV, settings.chunk_seconds)
    return ChunkTarget(WAV, settings.chunk_seconds, pieces=local_plan(settings)[0],
                       piece_seconds=settings.long_audio_seconds)
