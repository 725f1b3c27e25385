"""Builds steps from an inbox's `pipeline` list, once per daemon, and closes them at the end."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from traxd.config import Settings, StepSpec
from traxd.pipeline.base import Step, needs_workdir
from traxd.pipeline.command import CommandStep

# step name -> (module, class); imported when first used, so an unused step costs nothing.
BUILTIN_STEPS = {
    "download": ("traxd.pipeline.ytdlp", "DownloadStep"),
    "preprocess": ("traxd.pipeline.ffmpeg", "PreprocessStep"),
    "transcribe": ("traxd.pipeline.transcribe", "TranscribeStep"),
    "enhance": ("traxd.pipeline.enhance", "EnhanceStep"),
    "mux": ("traxd.pipeline.mux", "MuxStep"),
}


def step_label(spec: StepSpec) -> str:
    return spec if isinstance(spec, str) else "command"


def backend_of(spec: StepSpec, settings: Settings) -> str | None:
    """The backend a step depends on (what a fatal error pauses), if any."""
    if spec == "transcribe":
        return settings.transcribe.backend
    if spec == "enhance":
        return "enhance"
    return None


def _builtin_class(name: str) -> type[Any]:
    module_name, class_name = BUILTIN_STEPS[name]
    step_class: type[Any] = getattr(importlib.import_module(module_name), class_name)
    return step_class


class StepRegistry:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._steps: dict[StepSpec, Step] = {}

    def register(self, spec: StepSpec, step: Step) -> None:
        """Use `step` for `spec` (a plug-in, or a scripted step in tests)."""
        self._steps[spec] = step

    def get(self, spec: StepSpec) -> Step:
        if spec not in self._steps:
            self._steps[spec] = self._build(spec)
        return self._steps[spec]

    def needs_workdir(self, spec: StepSpec) -> bool:
        """Whether the step for `spec` wants a work folder; asks its class, builds nothing."""
        if spec in self._steps:
            return needs_workdir(self._steps[spec])
        if isinstance(spec, tuple):
            return needs_workdir(CommandStep)
        return spec not in BUILTIN_STEPS or needs_workdir(_builtin_class(spec))

    def _build(self, spec: StepSpec) -> Step:
        if isinstance(spec, tuple):
            return CommandStep(spec)
        step: Step = _builtin_class(spec)(self.settings)
        return step

    def backends(self, pipeline: Sequence[StepSpec]) -> set[str]:
        return {b for spec in pipeline if (b := backend_of(spec, self.settings)) is not None}

    async def aclose(self) -> None:
        steps, self._steps = list(self._steps.values()), {}
        for step in steps:
            await step.aclose()
