"""The binding cycle: starting and stopping jobs on Ray, apart from the scheduling round.

A round decides in milliseconds; a launch takes seconds (reserve the cards, store the train config, submit the
Ray job: up to RESERVE + AGENT_WAIT + HTTP timeouts in launch.py), and a stop waits on the Jobs API. As in
Kubernetes, where the scheduling cycle picks a node and the binding cycle binds apart from it, the round hands
these calls to a `Binder` and collects their outcomes in a later round, so one slow launch never holds the
placement of every other job.

A job with a call in flight, or an outcome not collected yet, is `busy`: the round does not place it again, so
the calls for one job never overlap (a stop of its last attempt cannot free the cards of its next).

`Inline` runs each call at once (the simulator and the controller's tests: the same code, deterministic);
`Threads` runs them on a small pool with a deadline (the scheduler on the head).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Protocol

log = logging.getLogger("zeromix.scheduler")

DEADLINE_S = 180.0  # a launch still running after this is given up (the job is queued again once the call returns)
WORKERS = 4


@dataclass(frozen=True)
class Outcome:
    job_id: str
    what: str  # "launch" | "stop"
    error: Exception | None  # None: it did what it was asked


class Binder(Protocol):
    deadline_s: float

    def launch(self, job_id: str, call: Callable[[], None]) -> None: ...

    def stop(self, job_id: str, call: Callable[[], None]) -> None: ...

    def outcomes(self) -> list[Outcome]:
        """The calls that ended since the last time this was asked, each once."""

    def busy(self) -> set[str]:
        """The jobs with a call in flight or an outcome not yet collected."""

    def overdue(self) -> set[str]:
        """The jobs whose launch has been in flight for longer than the deadline."""


class Inline:
    """Every call runs when it is handed over; its outcome waits for `outcomes`."""

    deadline_s = float("inf")

    def __init__(self):
        self._ended: list[Outcome] = []

    def launch(self, job_id: str, call: Callable[[], None]) -> None:
        self._ended.append(Outcome(job_id, "launch", _run(call)))

    def stop(self, job_id: str, call: Callable[[], None]) -> None:
        self._ended.append(Outcome(job_id, "stop", _run(call)))

    def outcomes(self) -> list[Outcome]:
        ended, self._ended = self._ended, []
        return ended

    def busy(self) -> set[str]:
        return {o.job_id for o in self._ended}

    def overdue(self) -> set[str]:
        return set()


class Threads:
    """Calls on a pool of threads. A stop handed over while the same job's stop is in flight is not run twice
    (stops are idempotent); a launch for a busy job is a caller's error."""

    def __init__(self, workers: int = WORKERS, deadline_s: float = DEADLINE_S, clock: Callable[[], float] = time.monotonic):
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="zeromix-binding")
        self.deadline_s, self._clock = deadline_s, clock
        self._in_flight: dict[tuple[str, str], tuple[Future, float]] = {}  # (job, what) -> (its call, when handed over)

    def launch(self, job_id: str, call: Callable[[], None]) -> None:
        if job_id in self.busy():
            raise RuntimeError(f"job {job_id} has a call in flight; the round must not place it")
        self._submit(job_id, "launch", call)

    def stop(self, job_id: str, call: Callable[[], None]) -> None:
        if (job_id, "stop") not in self._in_flight:
            self._submit(job_id, "stop", call)

    def _submit(self, job_id: str, what: str, call: Callable[[], None]) -> None:
        self._in_flight[(job_id, what)] = (self._pool.submit(_run, call), self._clock())

    def outcomes(self) -> list[Outcome]:
        ended = [(key, future) for key, (future, _) in self._in_flight.items() if future.done()]
        for key, _ in ended:
            del self._in_flight[key]
        return [Outcome(job_id, what, future.result()) for (job_id, what), future in ended]

    def busy(self) -> set[str]:
        return {job_id for job_id, _ in self._in_flight}

    def running(self) -> set[str]:
        """The jobs with a call that has not returned yet (busy, less the outcomes waiting to be collected)."""
        return {job_id for (job_id, _), (future, _) in self._in_flight.items() if not future.done()}

    def overdue(self) -> set[str]:
        now = self._clock()
        return {job_id for (job_id, what), (future, since) in self._in_flight.items()
                if what == "launch" and not future.done() and now - since > self.deadline_s}


def _run(call: Callable[[], None]) -> Exception | None:
    try:
        call()
        return None
    except Exception as err:  # an outcome, for the round to decide on
        return err
