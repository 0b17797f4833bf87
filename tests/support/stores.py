"""A fault-injecting store for tier and tree tests.

``ScriptedStore`` is a real ``FileStore`` that counts every get by key, can
hold gets at a gate until the test opens it, and can return replacement bytes
for chosen keys (to play a store that sends wrong data).
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

from lazyfs.store import FileStore

GATE_TIMEOUT_S = 60.0


class ScriptedStore(FileStore):
    """A FileStore with request counts, an optional gate and replaced objects."""

    def __init__(self, root: Path):
        super().__init__(root)
        self._lock = threading.Lock()
        self.gets: Counter[str] = Counter()
        self.replacements: dict[str, bytes] = {}
        self._gate: threading.Event | None = None
        self._arrivals = threading.Condition()
        self.gets_at_gate = 0

    def hold(self) -> None:
        """Make every following get wait until ``release()``."""
        self._gate = threading.Event()
        self.gets_at_gate = 0

    def wait_until_held(self, count: int) -> None:
        """Block until ``count`` gets have reached the gate since ``hold()`` (call from a thread)."""
        with self._arrivals:
            if not self._arrivals.wait_for(lambda: self.gets_at_gate >= count, GATE_TIMEOUT_S):
                raise TimeoutError(f"only {self.gets_at_gate} of {count} gets reached the gate")

    def release(self) -> None:
        """Let held and future gets run."""
        if self._gate is not None:
            self._gate.set()

    def chunk_gets(self) -> int:
        """Return the number of gets of chunks/ keys."""
        with self._lock:
            return sum(count for key, count in self.gets.items() if key.startswith("chunks/"))

    def get(self, key: str) -> bytes:
        with self._lock:
            self.gets[key] += 1
        gate = self._gate
        if gate is not None:
            with self._arrivals:
                self.gets_at_gate += 1
                self._arrivals.notify_all()
            if not gate.wait(GATE_TIMEOUT_S):
                raise TimeoutError(f"the test never released the gate for {key}")
        replacement = self.replacements.get(key)
        if replacement is not None:
            return replacement
        return super().get(key)
