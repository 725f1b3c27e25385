"""Which inboxes may start jobs now: not paused or draining, their schedule window open,
and no backend of their pipeline paused (but for optional steps': their jobs run the steps
before, publish those outputs, and wait)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from datetime import datetime

from traxd import metrics
from traxd.config import Settings
from traxd.jobs import OPTIONAL_STEPS, BackendGate
from traxd.pipeline.registry import backend_of
from traxd.schedule import Window


class InboxGates:
    def __init__(self, settings: Settings, backends: BackendGate,
                 journal_writable: Callable[[], bool] = lambda: True) -> None:
        self.backends = backends
        self.journal_writable = journal_writable  # while it is not (disk full), nothing opens
        self.paused: set[str] = set()
        self.draining: set[str] = set()
        self._window_cache: dict[str, tuple[float, bool]] = {}  # inbox -> (valid until, open)
        self.configure(settings)

    def pause(self, names: Iterable[str]) -> None:
        self.paused.update(names)
        self._publish()

    def drain(self, names: Iterable[str]) -> None:
        self.draining.update(names)
        self._publish()

    def resume(self, names: Iterable[str]) -> None:
        self.paused.difference_update(names)
        self.draining.difference_update(names)
        self._publish()

    def _publish(self) -> None:
        for inbox in self.settings.inboxes:
            held = inbox.name in self.paused or inbox.name in self.draining
            metrics.INBOX_PAUSED.labels(inbox=inbox.name).set(int(held))

    def configure(self, settings: Settings) -> None:
        self.settings = settings
        self.windows = {i.name: Window.parse(i.schedule) for i in settings.inboxes}
        self._needs = {i.name: {b for spec in i.pipeline if spec not in OPTIONAL_STEPS
                                and (b := backend_of(spec, settings.for_inbox(i.name)))}
                       for i in settings.inboxes}
        self._window_cache.clear()

    def open(self, now: float) -> list[str]:
        if not self.journal_writable():
            return []
        return [inbox.name for inbox in self.settings.inboxes if self._is_open(inbox.name, now)]

    def _is_open(self, name: str, now: float) -> bool:
        if name in self.paused or name in self.draining:
            return False
        if self._needs[name] & self.backends.paused.keys():
            return False
        return self.window_open(name, now)

    def window_open(self, name: str, now: float) -> bool:
        """Evaluated when the answer can change: at the next minute while open, at the next
        opening while closed (never again for a window that never opens)."""
        window = self.windows[name]
        if window.always:
            return True
        cached = self._window_cache.get(name)
        if cached is None or now >= cached[0]:
            cached = self._evaluate(window, now)
            self._window_cache[name] = cached
        return cached[1]

    @staticmethod
    def _evaluate(window: Window, now: float) -> tuple[float, bool]:
        moment = datetime.fromtimestamp(now).astimezone()
        opens = window.next_open(moment)
        if opens == moment:
            return (now // 60 + 1) * 60, True
        return (opens.timestamp() if opens is not None else math.inf), False
