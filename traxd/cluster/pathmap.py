"""Daemon paths to a worker's paths and back, when the shared storage is mounted elsewhere."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any


@dataclass(frozen=True)
class PathMap:
    """Prefix pairs (daemon prefix, worker prefix); the longest matching prefix wins, and a
    prefix matches whole path components only ("/srv/media" does not match "/srv/mediax")."""

    pairs: tuple[tuple[str, str], ...] = ()

    def to_worker(self, path: str) -> str:
        return _swap(path, [(PurePosixPath(d), PurePosixPath(w)) for d, w in self.pairs])

    def to_daemon(self, path: str) -> str:
        return _swap(path, [(PurePosixPath(w), PurePosixPath(d)) for d, w in self.pairs])

    def request_to_worker(self, data: Any) -> Any:
        """A request's JSON with every absolute path under a daemon prefix translated."""
        return map_paths(data, self.to_worker) if self.pairs else data

    def reply_to_daemon(self, data: Any) -> Any:
        return map_paths(data, self.to_daemon) if self.pairs else data

    def describe(self) -> str:
        if not self.pairs:
            return "[cluster] path_map is empty (paths are used as the daemon sends them)"
        return "[cluster] path_map: " + ", ".join(f"{d} -> {w}" for d, w in self.pairs)


def _swap(path: str, pairs: list[tuple[PurePosixPath, PurePosixPath]]) -> str:
    if not path.startswith("/"):
        return path
    pure = PurePosixPath(path)
    best: tuple[PurePosixPath, PurePosixPath] | None = None
    for src, dest in pairs:
        if pure.is_relative_to(src) and (best is None or len(src.parts) > len(best[0].parts)):
            best = (src, dest)
    if best is None:
        return path
    return str(best[1] / pure.relative_to(best[0]))


def map_paths(value: Any, swap: Callable[[str], str]) -> Any:
    """A copy of JSON-able `value` with each string that is an absolute path swapped."""
    if isinstance(value, str):
        return swap(value)
    if isinstance(value, dict):
        return {key: map_paths(item, swap) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [map_paths(item, swap) for item in value]
    return value
