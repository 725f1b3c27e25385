"""The resource governor: how many jobs may run now, given memory and CPU."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import psutil

from traxd import metrics
from traxd.config import DaemonSettings


@dataclass(frozen=True)
class Sample:
    available_mb: float
    cpu_percent: float


def sample_machine() -> Sample:
    """Available memory, and CPU use since the previous call (non-blocking)."""
    return Sample(psutil.virtual_memory().available / 2**20, psutil.cpu_percent(interval=None))


@dataclass(frozen=True)
class Admission:
    allowed: int
    memory_short: bool
    cpu_busy: bool

    @property
    def pressured(self) -> bool:
        return self.memory_short or self.cpu_busy


class Governor:
    """Additive increase, multiplicative decrease of the number of concurrent jobs.

    Under pressure no new job starts and the allowance halves (running jobs are not
    touched); when the machine has room it grows back by one per evaluation, up to the cap.
    """

    def __init__(self, settings: DaemonSettings,
                 sampler: Callable[[], Sample] = sample_machine) -> None:
        self.cap = settings.workers
        self.reserve_mb = settings.memory_reserve_mb
        self.cpu_limit = settings.cpu_limit_percent
        self._sampler = sampler
        self.current = Admission(self.cap, memory_short=False, cpu_busy=False)

    def evaluate(self) -> Admission:
        sample = self._sampler()
        memory_short = sample.available_mb < self.reserve_mb
        cpu_busy = sample.cpu_percent > self.cpu_limit
        allowed = self.current.allowed
        allowed = max(1, allowed // 2) if memory_short or cpu_busy else min(self.cap, allowed + 1)
        self.current = Admission(allowed, memory_short, cpu_busy)
        _publish(self.current)
        return self.current

    def may_start(self, running: int) -> bool:
        """Whether one more job may start; with nothing running, one always may."""
        if running == 0:
            return True
        return not self.current.pressured and running < self.current.allowed


def _publish(admission: Admission) -> None:
    metrics.WORKERS_ALLOWED.set(admission.allowed)
    metrics.THROTTLED.labels(reason="memory").set(int(admission.memory_short))
    metrics.THROTTLED.labels(reason="cpu").set(int(admission.cpu_busy))
