"""Pipeline steps and the registry that builds them from an inbox's `pipeline` list."""

from __future__ import annotations

from traxd.pipeline.base import JobInfo, Step, StepContext, StepResult

__all__ = ["JobInfo", "Step", "StepContext", "StepResult"]
