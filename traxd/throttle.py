"""The resource governor: how many jobs may run now, given memory and CPU."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from traxd import metrics
from traxd.config import DaemonSettings


@dataclass(frozen=True)
class Sample:
    available_mb: float
    cpu_percent: float  # of the whole machine, used by processes other than traxd's own
    own_percent: float = 0.0  # of the whole machine, used by traxd and its step processes


class MachineSampler:
    """Available memory, and the CPU others used since the previous call (non-blocking).

    traxd's own CPU (the daemon and its step processes) is left out: the governor makes room
    for other work on the machine; how much of it traxd itself may use is `workers`.
    """

    def __init__(self) -> None:
        self._me = psutil.Process()
        self._cores = psutil.cpu_count() or 1
        self._last = (time.monotonic(), self._own_seconds())
        psutil.cpu_percent(interval=None)

    def __call__(self) -> Sample:
        now, own = time.monotonic(), self._own_seconds()
        then, before = self._last
        self._last = (now, own)
        mine = 100.0 * (own - before) / max(now - then, 1e-3) / self._cores
        others = max(0.0, psutil.cpu_percent(interval=None) - mine)
        return Sample(psutil.virtual_memory().available / 2**20, others, mine)

    def _own_seconds(self) -> float:
        """CPU seconds of the daemon, its live children, and the children it has reaped."""
        total = sum(self._me.cpu_times()[:4])  # user, system, reaped children's user, system
        for child in self._children():
            with contextlib.suppress(psutil.Error):
                total += sum(child.cpu_times()[:2])
        return total

    def _children(self) -> list[psutil.Process]:
        try:
            return self._me.children(recursive=True)
        except psutil.Error:
            return []


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
                 sampler: Callable[[], Sample] | None = None) -> None:
        self.cap = settings.workers
        self.reserve_mb = settings.memory_reserve_mb
        self.cpu_limit = settings.cpu_limit_percent
        self._sampler = sampler or MachineSampler()
        self.current = Admission(self.cap, memory_short=False, cpu_busy=False)

    def sample(self) -> Sample:
        """The machine now (reads /proc: the daemon calls it in a thread)."""
        return self._sampler()

    def evaluate(self, sample: Sample | None = None) -> Admission:
        sample = sample or self._sampler()
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
