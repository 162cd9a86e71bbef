"""A job's states and the only moves between them, in one table: the queue refuses any other move, and the
scheduler's fuzzer (tests/test_controller_fuzz.py) checks every job's history against it.

    queued  -> placing    the policy gave it cards; they are held in the queue from here on
    queued  -> failed     it can no longer be planned (its spec or model is unreadable, a path is gone)
    queued  -> cancelled
    placing -> running    launched
    placing -> queued     the launch failed (tried again) or the scheduler restarted while placing it
    placing -> failed     the launch failed too often
    placing -> cancelled
    running -> succeeded | failed | cancelled
    running -> queued     it lost a card, a node or its memory, or it was moved (stopped with a checkpoint): placed
                          again, resuming from its checkpoint
"""

from __future__ import annotations

STATES = ("queued", "placing", "running", "succeeded", "failed", "cancelled")
ACTIVE = ("placing", "running")  # states that hold cards
LIVE = ("queued", *ACTIVE)  # not ended: what `cancel` can still stop
TERMINAL = ("succeeded", "failed", "cancelled")

MOVES: dict[str, tuple[str, ...]] = {
    "queued": ("placing", "failed", "cancelled"),
    "placing": ("running", "queued", "failed", "cancelled"),
    "running": ("succeeded", "failed", "cancelled", "queued"),
    "succeeded": (),
    "failed": (),
    "cancelled": (),
}


class IllegalMove(ValueError):
    """A move the table does not have: a bug in the caller, never a race (races are StaleTransition)."""


def check_move(source: str, target: str) -> None:
    if target not in MOVES.get(source, ()):
        allowed = ", ".join(MOVES.get(source, ())) or "nothing (it has ended)"
        raise IllegalMove(f"a job cannot go from {source} to {target}; from {source} it may go to {allowed}")


def is_valid_history(moves: list[tuple[str | None, str]]) -> bool:
    """A job's events (source, target) in order: it entered `queued`, and each move starts where the last ended."""
    at = None
    for source, target in moves:
        if source != at or (at is None and target != "queued") or (at is not None and target not in MOVES[at]):
            return False
        at = target
    return True
