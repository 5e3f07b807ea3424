"""Where the service is in its life: loading, ready, draining, stopped (or failed), and which requests it owes.

Readiness (/readyz) and admission of scoring requests both read it; the server's signal handling flips it to
draining; the server exits once :attr:`Lifecycle.drained` says every accepted request has been answered.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from service.errors import Unavailable


class Phase(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


class Lifecycle:
    def __init__(self, drain_timeout_s: float = 30.0, clock=time.monotonic):
        self._phase = Phase.LOADING
        self._lock = threading.Lock()
        self._accepted = 0
        self._drain_deadline: float | None = None
        self._drain_timeout_s = drain_timeout_s
        self._clock = clock
        self.failure: str | None = None

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def ready(self) -> bool:
        return self._phase is Phase.READY

    @property
    def accepted(self) -> int:
        """Scoring requests admitted and not yet answered."""
        return self._accepted

    def mark_ready(self) -> None:
        with self._lock:
            if self._phase is Phase.LOADING:
                self._phase = Phase.READY

    def mark_failed(self, reason: str) -> None:
        with self._lock:
            self.failure = reason
            self._phase = Phase.FAILED

    def begin_drain(self) -> bool:
        """Stop admitting (and turn /readyz 503) now. False if already draining (or failed: nothing to drain)."""
        with self._lock:
            if self._phase in (Phase.DRAINING, Phase.FAILED):
                return False
            self._phase = Phase.DRAINING
            self._drain_deadline = self._clock() + self._drain_timeout_s
            return True

    @property
    def drained(self) -> bool:
        """Draining, and every accepted request answered (or the drain timeout passed)."""
        if self._phase is not Phase.DRAINING:
            return False
        return self._accepted == 0 or self._clock() >= (self._drain_deadline or 0.0)

    @property
    def past_last_call(self) -> bool:
        """Draining, and so close to the drain deadline that what still waits must be refused now (503) for the
        process to finish answering, and exit, within the drain timeout: the last ``drain_reserve_s``."""
        return self._phase is Phase.DRAINING and self.drain_time_left() <= self.drain_reserve_s

    @property
    def drain_reserve_s(self) -> float:
        """Time kept at the end of a drain for the forwards already running, the answers and the exit: a fifth of
        the drain timeout, 2 to 5 s, at most half of it."""
        return min(5.0, max(2.0, self._drain_timeout_s / 5), self._drain_timeout_s / 2)

    def drain_time_left(self) -> float:
        if self._drain_deadline is None:
            return self._drain_timeout_s
        return max(0.0, self._drain_deadline - self._clock())

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Count a scoring request as accepted for its whole life; refuse it (503) unless ready."""
        with self._lock:
            if self._phase is not Phase.READY:
                raise refusal(self._phase)
            self._accepted += 1
        try:
            yield
        finally:
            with self._lock:
                self._accepted -= 1


def refusal(phase: Phase) -> Unavailable:
    """The 503 for a scoring request (or a question about the model) in ``phase``."""
    if phase is Phase.LOADING:
        return Unavailable("the model is still loading", retry_after_s=5)
    if phase is Phase.DRAINING:
        return Unavailable("the service is shutting down; use another replica", retry_after_s=1)
    return Unavailable("the model failed to load", retry_after_s=30)
