"""`task = "translate"`: English text from speech in another language, local and openai.

No multilingual model is at hand offline, so the local path is proven up to the model's
own call (the request, the model process's call, the outputs) with a stand-in model; the
openai path against the real client and a real local HTTP server.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from traxd.config import Settings, TranscribeSettings
from traxd.errors import ConfigError
from traxd.pipeline import whisper_worker
from traxd.pipeline.base import StepContext
from traxd.pipeline.formats import Transcript
from traxd.pipeline.transcribe import LocalBackend, TranscribeStep

from .conftest import ContextFactory, Media, with_changes
from .openai_server import FakeOpenAI
from .test_library import load


@dataclass
class TranslatingModel:
    """Stands in for a multilingual faster-whisper model: German heard, English given back
    when asked to translate."""

    calls: list[dict[str, Any]] = field(default_factory=list)

    def transcribe(self, audio: str, **options: Any) -> tuple[Any, Any]:
        self.calls.append(options)
        text = " Good morning" if options["task"] == "translate" else " Guten Morgen"
        segment = SimpleNamespace(start=0.5, end=2.0, text=text, avg_logprob=-0.2,
                                  no_speech_prob=0.01, words=None)
        info = SimpleNamespace(language=options["language"] or "de", duration=3.0,
                               language_probability=0.91)
        return iter([segment]), info


class WorkerBackend:
    """The local backend's request, answered by the model process's own code."""

    name = "local"

    def __init__(self, model: TranslatingModel) -> None:
        self.model = model

    async def transcribe(self, audio: Path, ctx: StepContext,
                         settings: TranscribeSettings | None = None) -> Transcript:
        ts = settings or ctx.settings.transcribe
        request = json.loads(json.dumps(LocalBackend(ts).request(audio, ts)))  # as sent
        reply = whisper_worker.transcribe(self.model, ts.model, request, io.StringIO())
        return Transcript.from_dict(reply["transcript"])

    async def aclose(self) -> None:
        return None


@pytest.mark.parametrize("language", [None, "de"])
async def test_the_local_backend_asks_the_model_to_translate(
        media: Media, make_ctx: ContextFactory, tmp_path: Path, language: str | None) -> None:
    # Given a multilingual model, task = "translate", and the spoken language given or not
    settings = with_changes(Settings(), daemon={"state_dir": tmp_path}, transcribe={
        "model": "small", "language": language, "task": "translate", "subtitles": "beside"})
    model = TranslatingModel()
    step = TranscribeStep(settings, backend=WorkerBackend(model))
    ctx, _ = make_ctx(media.speech_wav, settings=settings, formats=("json", "srt"))
    # When it is transcribed
    result = await step.run(ctx)
    # Then faster-whisper was called with task="translate" (the language as configured)
    assert [(c["task"], c["language"]) for c in model.calls] == [("translate", language)]
    # And the outputs are English, say what was spoken, and the subtitles are named English
    doc = json.loads(result.artifacts["speech.json"].read_text())
    assert (doc["language"], doc["translated_from"]) == ("en", "de")
    assert doc["segments"][0]["text"] == "Good morning"
    assert result.facts["language"] == "en"
    assert "beside:.en.srt" in result.artifacts


async def test_transcribing_is_still_the_default(media: Media, make_ctx: ContextFactory,
                                                 tmp_path: Path) -> None:
    settings = with_changes(Settings(), daemon={"state_dir": tmp_path},
                            transcribe={"model": "small"})
    model = TranslatingModel()
    ctx, _ = make_ctx(media.speech_wav, settings=settings, formats=("json",))
    result = await TranscribeStep(settings, backend=WorkerBackend(model)).run(ctx)
    assert [c["task"] for c in model.calls] == ["transcribe"]
    doc = json.loads(result.artifacts["speech.json"].read_text())
    assert (doc["language"], "translated_from" in doc) == ("de", False)


async def test_the_openai_backend_uses_the_translations_endpoint(
        media: Media, make_ctx: ContextFactory, tmp_path: Path, api_key: str) -> None:
    # Given the openai backend with task = "translate" and the spoken language configured
    with FakeOpenAI().running() as server:
        settings = with_changes(Settings(), daemon={"state_dir": tmp_path}, transcribe={
            "backend": "openai", "base_url": server.base_url, "api_key_env": api_key,
            "model": "whisper-1", "language": "de", "task": "translate"})
        step = TranscribeStep(settings)
        ctx, _ = make_ctx(media.speech_wav, settings=settings, formats=("json",))
        try:
            # When a file is transcribed
            result = await step.run(ctx)
        finally:
            await step.aclose()
    # Then it went to /audio/translations, which takes no language
    uploads = [r for r in server.requests if "/audio/" in r.path]
    assert [r.path for r in uploads] == ["/v1/audio/translations"]
    assert "language" not in uploads[0].fields and uploads[0].fields["model"] == "whisper-1"
    # And the transcript is English, translated from the configured language
    doc = json.loads(result.artifacts["speech.json"].read_text())
    assert (doc["language"], doc["translated_from"]) == ("en", "de")
    assert [s["text"] for s in doc["segments"]] == ["part 0", "part 1"]


@pytest.mark.parametrize(("text", "key"), [
    ('[transcribe]\ntask = "translate"\n', "transcribe.task"),
    ('[transcribe]\nmodel = "/models/faster-whisper-base.en"\ntask = "translate"\n',
     "transcribe.task"),
    ('[[inbox]]\nname = "a"\npath = "{root}/a/inbox"\n[inbox.transcribe]\ntask = "translate"\n',
     "inbox[0].transcribe.task"),
])
def test_translating_with_an_english_only_model_is_refused(tmp_path: Path, text: str,
                                                           key: str) -> None:
    # Given task = "translate" with tiny.en (the default) or another *.en model
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    # Then start-up stops, naming the file, the key and the fix
    error = caught.value
    assert (error.file, error.key) == (str(tmp_path / "traxd.toml"), key)
    assert "knows only English" in error.why and 'model = "small"' in error.why
    assert str(error).startswith(f"{tmp_path / 'traxd.toml'}: {key}: ")


def test_translating_with_a_multilingual_model_loads(tmp_path: Path) -> None:
    settings = load(tmp_path, '[transcribe]\nmodel = "small"\ntask = "translate"\n'
                              '[[inbox]]\nname = "a"\npath = "{root}/a/inbox"\n'
                              '[inbox.transcribe]\nbackend = "openai"\nmodel = "tiny.en"\n')
    assert settings.transcribe.task == "translate"
    assert settings.for_inbox("a").transcribe.task == "translate"  # whisper-1 there
    with pytest.raises(ConfigError, match="must be one of"):
        load(tmp_path, '[transcribe]\ntask = "summarise"\n')
