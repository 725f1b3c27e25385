"""One long file on every core: cut at pauses into one piece per model process, each piece
through faster-whisper's BatchedInferencePipeline; short files as before."""

from __future__ import annotations

import difflib
import itertools
import json
from pathlib import Path

import pytest
import structlog

from traxd.config import Settings, TranscribeSettings
from traxd.executor import preprocess_settings
from traxd.pipeline.ffmpeg import MP3, WAV, ChunkTarget, chunk_spans
from traxd.pipeline.plan import transcribe_target
from traxd.pipeline.transcribe import LocalBackend, TranscribeStep

from .conftest import ContextFactory, with_changes
from .helpers import espeak_wav, varied_sentences, wer, words


def test_a_long_file_is_cut_at_a_pause_into_one_piece_per_process() -> None:
    # Given ten minutes with pauses near the middle, and two pieces asked for
    silences = [(120.0, 120.5), (291.0, 291.4), (309.0, 310.0), (450.0, 451.0)]
    # When the chunks are planned
    spans = chunk_spans(600.0, 600.0, silences, pieces=2)
    # Then there are two, cut in the pause nearest the middle, not overlapping
    assert spans == [(0.0, 291.2), (291.2, 600.0)]
    # And without a pause near the middle, the cut overlaps on both sides
    assert chunk_spans(600.0, 600.0, [(120.0, 121.0)], pieces=2) == [(0.0, 302.0),
                                                                    (298.0, 600.0)]
    # And a file a little over the chunk length gets even pieces, not one and a rest
    assert chunk_spans(611.0, 600.0, [(300.0, 301.0)], pieces=2) == [(0.0, 300.5),
                                                                    (300.5, 611.0)]
    # And a file long enough for more chunks than pieces gets even chunks of at most that
    assert [round(e - s) for s, e in chunk_spans(1800.0, 600.0, [], pieces=2)] == [
        602, 604, 602]


def test_how_many_pieces_a_file_gets() -> None:
    target = ChunkTarget(WAV, 600.0, pieces=4, piece_seconds=60.0)
    assert [target.pieces_for(s) for s in (8.0, 90.0, 130.0, 600.0)] == [1, 1, 2, 4]
    assert ChunkTarget(WAV, 600.0).pieces_for(600.0) == 1


def test_the_chunk_plan_follows_the_model_processes_and_reaches_preprocess() -> None:
    def target(**changes: object) -> ChunkTarget:
        return transcribe_target(TranscribeSettings(**changes))  # type: ignore[arg-type]

    # Then the local backend asks for one piece per model process, from 60 s a piece
    assert target(processes=3) == ChunkTarget(WAV, 600.0, pieces=3, piece_seconds=60.0)
    # And not with long_audio_seconds = 0, nor without the voice filter (batches come
    # from it), nor for the openai backend
    assert target(processes=3, long_audio_seconds=0).pieces == 1
    assert target(processes=3, vad_filter=False).pieces == 1
    assert target(backend="openai").format is MP3
    # And preprocess gets the same plan from the daemon
    settings = with_changes(Settings(), transcribe={"processes": 2})
    sent = ChunkTarget.from_settings(preprocess_settings(settings, ["transcribe"]))
    assert sent == transcribe_target(settings.transcribe)


def test_only_long_audio_asks_for_batches() -> None:
    request = LocalBackend(TranscribeSettings()).request(Path("a.wav"))
    assert (request["batch_size"], request["long_audio_seconds"]) == (8, 60.0)
    off = LocalBackend(TranscribeSettings(long_audio_seconds=0)).request(Path("a.wav"))
    assert off["batch_size"] == 0


@pytest.fixture(scope="module")
def long_speech(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """About 2.5 minutes of speech, sentences that rarely repeat."""
    text = " ".join(varied_sentences(30))
    return espeak_wav(text, tmp_path_factory.mktemp("long") / "talk.wav"), text


def doubled(reference: str, hypothesis: str) -> list[str]:
    """Words the hypothesis has that the reference does not (insertions)."""
    ref, hyp = words(reference), words(hypothesis)
    matcher = difflib.SequenceMatcher(a=ref, b=hyp, autojunk=False)
    extra = []
    for op, a1, a2, b1, b2 in matcher.get_opcodes():
        if op == "insert" or (op == "replace" and b2 - b1 > a2 - a1):
            extra.extend(hyp[b1 + (a2 - a1):b2])
    return extra


@pytest.mark.slow
async def test_a_long_file_goes_through_the_batched_pipeline_in_two_pieces(
        long_speech: tuple[Path, str], make_ctx: ContextFactory, tmp_path: Path) -> None:
    # Given the real tiny.en model in two processes, and ~2.5 minutes of speech
    audio, text = long_speech
    settings = with_changes(Settings(), daemon={"state_dir": tmp_path},
                            transcribe={"processes": 2, "threads": 1})
    step = TranscribeStep(settings)
    try:
        ctx, _ = make_ctx(audio, settings=settings, formats=("json",))
        # When it is transcribed
        with structlog.testing.capture_logs() as events:
            result = await step.run(ctx)
    finally:
        await step.aclose()
    # Then both halves went through the batched pipeline, one per model process
    batched = [e for e in events if e["event"] == "transcribed_batched"]
    assert sorted(e["chunk"] for e in batched) == ["chunk-000.wav", "chunk-001.wav"]
    assert all(e["seconds"] >= 60.0 for e in batched)
    # And every word is there, in order, none doubled at the cut or elsewhere
    doc = json.loads(result.artifacts["talk.json"].read_text())
    assert wer(text, doc["text"]) <= 0.1, doc["text"]
    assert len(doubled(text, doc["text"])) <= 1, doubled(text, doc["text"])
    assert len(words(doc["text"])) <= len(words(text)) + 1
    starts = [s["start"] for s in doc["segments"]]
    assert starts == sorted(starts)
    for first, second in itertools.pairwise(doc["segments"]):
        assert first["end"] <= second["start"] + 0.01
