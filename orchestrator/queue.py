"""The job queue: every job zeromix was given, its state and every change of it, in SQLite on the head.

One file in the head's state dir (WAL mode), written only in transactions, so a crash leaves either the
old row or the new one. A state change is a compare-and-set (`transition`): it names the state it expects,
so the scheduler and a `zeromix cancel` racing each other cannot both win. A card is held through the
`holds` table, whose primary key is the card: the database itself refuses to give one card to two jobs.
The same class runs in memory (":memory:") inside the simulator.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from orchestrator.job_states import ACTIVE, LIVE, STATES, TERMINAL, check_move

__all__ = ["ACTIVE", "LIVE", "STATES", "TERMINAL", "JobRecord", "OutputDirTaken", "QueueStore", "StaleTransition"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    spec         TEXT NOT NULL,            -- the validated job spec, paths resolved (JSON)
    total_steps  INTEGER NOT NULL,
    priority     INTEGER NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('queued','placing','running','succeeded','failed','cancelled')),
    submitted_at REAL NOT NULL,
    started_at   REAL,
    ended_at     REAL,
    est_end      REAL,                     -- the plan's estimate of when a running job ends
    cards        TEXT,                     -- JSON list of card ids while placing/running, kept afterwards
    plan         TEXT,                     -- the plan it runs under (JSON summary)
    reason       TEXT NOT NULL DEFAULT '', -- why it is in its state: why it waits, why it failed
    attempts     INTEGER NOT NULL DEFAULT 0,
    memory_caps  TEXT NOT NULL DEFAULT '{}'  -- card -> MiB the planner may use there, learnt from an out-of-memory (JSON)
);
CREATE TABLE IF NOT EXISTS job_events (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    at     REAL NOT NULL,
    source TEXT,
    target TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS holds (
    card   TEXT PRIMARY KEY,               -- one job per card, enforced by the database
    job_id TEXT NOT NULL REFERENCES jobs(id)
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state, priority, submitted_at);
"""


@dataclass(frozen=True)
class JobRecord:
    id: str
    name: str
    spec: dict
    total_steps: int
    priority: int
    state: str
    submitted_at: float
    started_at: float | None
    ended_at: float | None
    est_end: float | None
    cards: tuple[str, ...]
    plan: dict | None
    reason: str
    attempts: int
    memory_caps: dict[str, int]  # card id -> MiB the planner may use on it for this job (after it ran out of memory there)

    @property
    def ray_job_id(self) -> str:
        """The Ray submission id of its current (or last) placement: Ray never reuses one, so a job placed again
        after a restart runs as <id>-<attempt>."""
        return self.id if self.attempts <= 1 else f"{self.id}-{self.attempts}"


@dataclass(frozen=True)
class Event:
    job_id: str
    at: float
    source: str | None
    target: str
    reason: str


class OutputDirTaken(Exception):
    """Two live jobs would write into one directory (and load each other's checkpoints)."""

    def __init__(self, output_dir: str, job_id: str, state: str):
        super().__init__(f"job {job_id} ({state}) writes there")
        self.output_dir, self.job_id, self.state = output_dir, job_id, state


class StaleTransition(Exception):
    """The job was not in the state the caller expected: someone else changed it first."""


class QueueStore:
    def __init__(self, path: str | Path, clock=time.time):
        self.clock = clock
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE), never implicit.
        self._db = sqlite3.connect(str(path), timeout=30, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)  # idempotent: every statement is CREATE ... IF NOT EXISTS
        if "memory_caps" not in {r["name"] for r in self._db.execute("PRAGMA table_info(jobs)")}:  # a queue from before it
            self._db.execute("ALTER TABLE jobs ADD COLUMN memory_caps TEXT NOT NULL DEFAULT '{}'")
        if str(path) != ":memory:":
            os.chmod(path, 0o600)  # job specs name the user's paths: readable by the user only

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _transaction(self):
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # ----------------------------------------------------------------------------------- writes
    def submit(self, job_id: str, name: str, spec: dict, total_steps: int, priority: int, reason: str = "queued; waiting for the scheduler's next round",
               at: float | None = None) -> JobRecord:
        at = self.clock() if at is None else at
        with self._transaction() as db:  # BEGIN IMMEDIATE: no other submit runs between the check and the insert
            output_dir = spec.get("output_dir")
            for row in db.execute(f"SELECT id, state, spec FROM jobs WHERE state IN ({','.join('?' * len(LIVE))})", LIVE):
                if output_dir and json.loads(row["spec"]).get("output_dir") == output_dir:
                    raise OutputDirTaken(output_dir, row["id"], row["state"])
            db.execute("INSERT INTO jobs (id, name, spec, total_steps, priority, state, submitted_at, reason) VALUES (?,?,?,?,?,?,?,?)",
                       (job_id, name, json.dumps(spec), total_steps, priority, "queued", at, reason))
            db.execute("INSERT INTO job_events VALUES (?,?,?,?,?)", (job_id, at, None, "queued", reason))
        return self.get(job_id)

    def transition(self, job_id: str, expected: str | tuple[str, ...], target: str, reason: str, *,
                   cards: tuple[str, ...] | None = None, plan: dict | None = None, est_end: float | None = None,
                   memory_caps: dict[str, int] | None = None) -> JobRecord:
        """Move a job from one of `expected` to `target`, atomically with its card holds: entering `placing`
        takes `cards` (refused if any is held), leaving the active states gives them back."""
        expected = (expected,) if isinstance(expected, str) else expected
        now = self.clock()
        with self._transaction() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(job_id)
            if row["state"] not in expected:
                raise StaleTransition(f"job {job_id} is {row['state']}, not {'/'.join(expected)}")
            check_move(row["state"], target)
            fields = {"state": target, "reason": reason}
            if target == "placing":
                try:
                    db.executemany("INSERT INTO holds VALUES (?, ?)", [(card, job_id) for card in cards])
                except sqlite3.IntegrityError:
                    raise StaleTransition(f"a card of {', '.join(cards)} is already held") from None
                fields.update(cards=json.dumps(list(cards)), plan=json.dumps(plan), attempts=_attempts(db, job_id) + 1)
            if target == "running":
                fields.update(started_at=now, est_end=est_end)
            if target not in ACTIVE:
                db.execute("DELETE FROM holds WHERE job_id = ?", (job_id,))
            if target in TERMINAL:
                fields["ended_at"] = now
            if target == "queued":
                fields.update(est_end=None, started_at=None)
            if memory_caps is not None:
                fields["memory_caps"] = json.dumps(memory_caps)
            db.execute(f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?", (*fields.values(), job_id))
            db.execute("INSERT INTO job_events VALUES (?,?,?,?,?)", (job_id, now, row["state"], target, reason))
        return self.get(job_id)

    def hold(self, job_id: str, cards: tuple[str, ...]) -> None:
        """Hold more cards for a running job (those it is being moved to); a card held already stays its holder's.
        They go back with the job's own when it leaves the active states."""
        with self._transaction() as db:
            if db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()["state"] == "running":
                db.executemany("INSERT OR IGNORE INTO holds VALUES (?, ?)", [(card, job_id) for card in cards])

    def set_reasons(self, reasons: dict[str, str]) -> None:
        """Why each queued job waits, as the policy said this round; no event (the state did not change)."""
        if not reasons:
            return
        with self._transaction() as db:
            db.executemany("UPDATE jobs SET reason = ? WHERE id = ? AND state = 'queued'", [(r, j) for j, r in reasons.items()])

    # ------------------------------------------------------------------------------------ reads
    def returns(self, job_id: str, source: str) -> int:
        """How often the job went from `source` back to the queue: from running, a restart (a lost node or card,
        a card out of memory); from placing, a launch that failed."""
        return self._db.execute("SELECT COUNT(*) FROM job_events WHERE job_id = ? AND source = ? AND target = 'queued'",
                                (job_id, source)).fetchone()[0]

    def moves(self, job_id: str) -> int:
        """How often the scheduler (or its user) moved the job: stopped it with a checkpoint and queued it again."""
        return self._db.execute("SELECT COUNT(*) FROM job_events WHERE job_id = ? AND source = 'running' AND target = 'queued' "
                                "AND reason LIKE 'moved:%'", (job_id,)).fetchone()[0]

    def get(self, job_id: str) -> JobRecord:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(job_id)
        return _record(row)

    def jobs(self, states: tuple[str, ...] = STATES) -> list[JobRecord]:
        marks = ",".join("?" * len(states))
        rows = self._db.execute(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY submitted_at, id", states).fetchall()
        return [_record(r) for r in rows]

    def holds(self) -> dict[str, str]:
        """card id -> job id, for every card a placing or running job holds."""
        return {r["card"]: r["job_id"] for r in self._db.execute("SELECT card, job_id FROM holds")}

    def events(self, job_id: str | None = None) -> list[Event]:
        query, args = ("SELECT * FROM job_events WHERE job_id = ? ORDER BY rowid", (job_id,)) if job_id else ("SELECT * FROM job_events ORDER BY rowid", ())
        return [Event(r["job_id"], r["at"], r["source"], r["target"], r["reason"]) for r in self._db.execute(query, args)]

    def find(self, prefix: str) -> JobRecord:
        """A job by id, or by a prefix of it that only one job has (`zeromix cancel tiny-llama`)."""
        rows = self._db.execute("SELECT * FROM jobs WHERE id = ? OR id LIKE ? ESCAPE '\\' ORDER BY submitted_at",
                                (prefix, prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")).fetchall()
        exact = [r for r in rows if r["id"] == prefix]
        if exact or len(rows) == 1:
            return _record((exact or rows)[0])
        raise KeyError(prefix if not rows else f"{prefix} matches {len(rows)} jobs: {', '.join(r['id'] for r in rows[:5])}")


def _attempts(db, job_id: str) -> int:
    return db.execute("SELECT attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()["attempts"]


def _record(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        id=row["id"], name=row["name"], spec=json.loads(row["spec"]), total_steps=row["total_steps"], priority=row["priority"],
        state=row["state"], submitted_at=row["submitted_at"], started_at=row["started_at"], ended_at=row["ended_at"],
        est_end=row["est_end"], cards=tuple(json.loads(row["cards"])) if row["cards"] else (),
        plan=json.loads(row["plan"]) if row["plan"] else None, reason=row["reason"], attempts=row["attempts"],
        memory_caps=json.loads(row["memory_caps"]),
    )
