"""The SQLite queue: states with timestamps and reasons, compare-and-set changes, one job per card, and
nothing lost or half-written across a reopen or a failed change."""

import sqlite3
import threading

import pytest

from orchestrator.queue import QueueStore, StaleTransition


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def store(tmp_path):
    clock = Clock()
    return QueueStore(tmp_path / "state" / "queue.db", clock), clock


def test_a_job_goes_through_its_states_each_change_recorded_with_time_and_reason(store):
    q, clock = store
    q.submit("a-1", "a", {"name": "a"}, 10, priority=5)
    clock.now += 1
    q.transition("a-1", "queued", "placing", "placing on desk/0", cards=("desk/0",), plan={"zero_stage": 2})
    clock.now += 1
    q.transition("a-1", "placing", "running", "running", est_end=2000.0)
    clock.now += 5
    q.transition("a-1", "running", "succeeded", "finished")
    job = q.get("a-1")
    assert (job.state, job.submitted_at, job.started_at, job.ended_at, job.cards, job.plan, job.attempts) == (
        "succeeded", 1000.0, 1002.0, 1007.0, ("desk/0",), {"zero_stage": 2}, 1)
    assert [(e.at, e.source, e.target, e.reason) for e in q.events("a-1")] == [
        (1000.0, None, "queued", "queued; waiting for the scheduler's next round"), (1001.0, "queued", "placing", "placing on desk/0"),
        (1002.0, "placing", "running", "running"), (1007.0, "running", "succeeded", "finished")]
    assert q.holds() == {}  # an ended job holds nothing


def test_a_card_is_never_held_by_two_jobs(store):
    q, _ = store
    for job in ("a-1", "b-1"):
        q.submit(job, job[0], {}, 10, 0)
    q.transition("a-1", "queued", "placing", "p", cards=("desk/0", "desk/1"), plan={})
    with pytest.raises(StaleTransition, match="already held"):
        q.transition("b-1", "queued", "placing", "p", cards=("attic/0", "desk/1"), plan={})
    assert q.get("b-1").state == "queued" and q.holds() == {"desk/0": "a-1", "desk/1": "a-1"}  # b took nothing, not even attic/0
    assert [e.target for e in q.events("b-1")] == ["queued"]


def test_a_change_from_the_wrong_state_loses_the_race_and_changes_nothing(store):
    q, _ = store
    q.submit("a-1", "a", {}, 10, 0)
    q.transition("a-1", ("queued", "placing", "running"), "cancelled", "cancelled by the user")
    with pytest.raises(StaleTransition):  # the scheduler, a moment late
        q.transition("a-1", "queued", "placing", "p", cards=("desk/0",), plan={})
    assert q.get("a-1").state == "cancelled" and q.holds() == {}


def test_the_queue_survives_a_reopen(tmp_path):
    path = tmp_path / "queue.db"
    first = QueueStore(path)
    first.submit("a-1", "a", {"model": {"path": "/m"}}, 10, 3)
    first.transition("a-1", "queued", "placing", "p", cards=("desk/0",), plan={"x": 1})
    first.close()
    again = QueueStore(path)
    assert (again.get("a-1").state, again.get("a-1").spec, again.holds()) == ("placing", {"model": {"path": "/m"}}, {"desk/0": "a-1"})
    assert again._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_writers_in_two_processes_worth_of_connections_do_not_corrupt_it(tmp_path):
    path = tmp_path / "queue.db"
    stores = [QueueStore(path) for _ in range(4)]

    def submit_many(i, q):
        for n in range(25):
            q.submit(f"j{i}-{n}", "j", {}, 1, 0)

    threads = [threading.Thread(target=submit_many, args=(i, q)) for i, q in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(QueueStore(path).jobs()) == 100
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_duplicate_id_is_refused_and_the_first_job_kept(store):
    q, _ = store
    q.submit("a-1", "a", {"v": 1}, 10, 0)
    with pytest.raises(sqlite3.IntegrityError):
        q.submit("a-1", "a", {"v": 2}, 10, 0)
    assert q.get("a-1").spec == {"v": 1} and len(q.events("a-1")) == 1  # the failed insert wrote no event either


def test_find_takes_an_id_or_a_prefix_only_one_job_has(store):
    q, _ = store
    for job in ("llama-aa11", "llama-bb22", "qwen-cc33"):
        q.submit(job, job.split("-")[0], {}, 1, 0)
    assert q.find("qwen").id == "qwen-cc33" and q.find("llama-bb22").id == "llama-bb22"
    with pytest.raises(KeyError, match="matches 2 jobs"):
        q.find("llama")
    with pytest.raises(KeyError):
        q.find("l%")  # LIKE wildcards are taken literally


def test_a_restart_is_counted_and_a_memory_cap_kept_with_a_new_ray_id_per_placement(store):
    """What the scheduler keeps about a job that lost a card or ran out of memory: how often it went back to the
    queue (its restarts are bounded), what its out-of-memory card may use, and a Ray submission id per placement
    (Ray never reuses one)."""
    store, _ = store
    store.submit("a-1", "a", {}, 10, 0)
    store.transition("a-1", "queued", "placing", "p", cards=("desk/0",), plan={})
    assert store.get("a-1").ray_job_id == "a-1"
    store.transition("a-1", "placing", "running", "r")
    store.transition("a-1", "running", "queued", "desk/0 ran out of memory", memory_caps={"desk/0": 9000})
    store.transition("a-1", "queued", "placing", "p", cards=("desk/0",), plan={})
    job = store.get("a-1")
    assert (job.memory_caps, job.ray_job_id, store.returns("a-1", "running"), store.returns("a-1", "placing")) == ({"desk/0": 9000}, "a-1-2", 1, 0)


def test_a_queue_from_before_memory_caps_is_upgraded_in_place(tmp_path):
    path = tmp_path / "queue.db"
    old = sqlite3.connect(path)
    old.executescript("CREATE TABLE jobs (id TEXT PRIMARY KEY, name TEXT NOT NULL, spec TEXT NOT NULL, total_steps INTEGER NOT NULL, "
                      "priority INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL, submitted_at REAL NOT NULL, started_at REAL, ended_at REAL, "
                      "est_end REAL, cards TEXT NOT NULL DEFAULT '[]', plan TEXT, reason TEXT NOT NULL DEFAULT '', attempts INTEGER NOT NULL DEFAULT 0);"
                      "INSERT INTO jobs (id, name, spec, total_steps, state, submitted_at) VALUES ('old-1', 'old', '{}', 5, 'queued', 1.0);")
    old.close()
    assert QueueStore(path).get("old-1").memory_caps == {}
