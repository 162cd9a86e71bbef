"""The long-lived scheduler on a real multi-node Ray cluster: jobs side by side on disjoint cards, a queued
job started by the scheduler alone, cancel in every state, and a scheduler killed and restarted by Ray
while jobs are queued and running."""

import json

import pytest

from tests.conftest import LONG_JOB_CARD, job_status, queue_store, running, submitted_id, wait_for_rounds, wait_for_state, wait_until, zeromix

pytestmark = pytest.mark.cluster

SCRATCH = "jobs/examples/tiny-llama-scratch.yaml"
DESK_BOX = "gpus.models=[NVIDIA GeForce RTX 3090, NVIDIA GeForce RTX 4090]"
OTHER_CARDS = "gpus.models=[NVIDIA GeForce GTX 1080 Ti, NVIDIA GeForce RTX 3060]"


def submit(work, demo_data, name: str, *sets: str) -> str:
    done = zeromix("submit", SCRATCH, "--set", f"output_dir={work / name}", "--set", f"dataset.path={demo_data['pretrain']}",
                   "--set", "report_to=[]", *(arg for s in sets for arg in ("--set", s)))
    return submitted_id(done.stdout)


def live_holds() -> dict[str, str]:
    """card -> job, as Ray's live placement groups have it."""
    from orchestrator import registry

    return {c.card_id: c.held_by for c in registry.snapshot().cards if c.held_by}


def assert_nothing_double_booked():
    store, ray_holds = queue_store(), live_holds()
    active = {r.id: set(r.cards) for r in store.jobs(("placing", "running"))}
    for card, job in ray_holds.items():  # every card Ray holds is held for a job the queue counts as active ...
        assert card in active.get(job, set()), (card, job, active)
    cards = [c for cs in active.values() for c in cs]
    assert len(cards) == len(set(cards))  # ... and no card is in two active jobs


def test_two_jobs_run_side_by_side_and_a_third_starts_when_cards_free(connected, demo_data):
    state, work = connected
    first = submit(work, demo_data, "side-a", "max_steps=40", DESK_BOX)
    second = submit(work, demo_data, "side-b", "max_steps=40", OTHER_CARDS)
    third = submit(work, demo_data, "side-c", "max_steps=5", DESK_BOX)  # the same cards as the first: it must wait
    wait_for_state(first, ("running",), 120)
    wait_for_state(second, ("running",), 120)
    wait_for_rounds(state, 1)  # why a job waits is written at the end of a round: the one that started the second may predate the third
    store = queue_store()
    a, b = store.get(first), store.get(second)
    assert set(a.cards) == {"desk/0", "desk/1"} and set(b.cards) == {"attic/0", "closet/0"}
    assert store.get(third).state == "queued" and "held by job " + first in store.get(third).reason
    assert_nothing_double_booked()
    rows = {r["job"]: r for r in json.loads(zeromix("queue", "--json").stdout)["jobs"]}
    assert rows[third]["position"] == 1 and rows[first]["state"] == "running" and rows[first]["cards"] == list(a.cards)
    narrow = zeromix("queue", env={"COLUMNS": "80"}).stdout  # one line per job and its reason below: no wrapped cells
    assert max(len(line) for line in narrow.splitlines()) <= 80
    assert f"{third}  queued  pri 0  #1" in narrow and f"held by job {first}" in " ".join(narrow.split())

    # Nobody calls zeromix from here on: the scheduler starts the third job when the first one ends.
    assert wait_for_state(third, ("succeeded", "failed"), 300) == "succeeded"
    done = {j: store.get(j) for j in (first, second, third)}
    assert all(r.state == "succeeded" for r in done.values()), {j: (r.state, r.reason) for j, r in done.items()}
    assert done[third].started_at >= done[first].ended_at  # it got the desk cards only once they were free
    assert (done[first].started_at < done[second].ended_at) and (done[second].started_at < done[first].ended_at)  # side by side
    assert [e.target for e in store.events(third)] == ["queued", "placing", "running", "succeeded"]
    ours = {first, second, third}  # (the session's long job may hold its card meanwhile)
    assert not ours & set(live_holds().values()) and not ours & set(store.holds().values())


def test_a_box_that_joined_submits_follows_and_reads_its_job_through_the_heads_queue(connected, demo_data, tmp_path):
    """A joined box has a ZEROMIX_HOME of its own and no queue: `submit --follow` there queues the job on the head
    (it used to store it in a queue.db of its own that no scheduler read, and follow it for ever), follows it to
    its end, and `queue` and `logs` there show the same job."""
    import dataclasses
    import shutil

    from orchestrator import cluster_runtime

    state, work = connected
    box = tmp_path / "joined-box-home"
    box.mkdir()
    shutil.copy2(cluster_runtime.token_file(), box / "auth_token")
    (box / "cluster.json").write_text(json.dumps({**dataclasses.asdict(state), "dashboard_url": None, "node": "desk"}))
    on_box = {"ZEROMIX_HOME": str(box)}
    done = zeromix("submit", "--follow", SCRATCH, "--set", f"output_dir={work / 'from-a-joined-box'}", "--set", "max_steps=3",
                   "--set", f"dataset.path={demo_data['pretrain']}", "--set", "report_to=[]", env=on_box, timeout=300)
    job = submitted_id(done.stdout)
    assert f"{job}: succeeded" in done.stdout and "loss" in done.stdout.split(f"{job}: succeeded")[1]  # its result, drawn
    assert not (box / "state").exists()  # no queue of its own
    assert queue_store().get(job).state == "succeeded"
    assert job in [r["job"] for r in json.loads(zeromix("queue", "--json", "--all", env=on_box).stdout)["jobs"]]
    assert "zeromix: finished 3 steps; the result is in" in zeromix("logs", job, env=on_box).stdout


def test_cancel_works_in_every_state(connected, demo_data):
    state, work = connected
    running_id = submit(work, demo_data, "cancel-running", "max_steps=100000", DESK_BOX)
    queued = submit(work, demo_data, "cancel-queued", "max_steps=100000", DESK_BOX)
    wait_for_state(running_id, ("running",), 120)
    assert queue_store().get(queued).state == "queued"

    out = zeromix("cancel", queued).stdout
    assert "cancelled (was queued)" in out and queue_store().get(queued).state == "cancelled"
    assert "cancelled (was running); its cards are free" in zeromix("cancel", running_id).stdout
    # its cards free within seconds (a deadline, not a timing claim) and nothing else of it left
    wait_until(lambda: running_id not in live_holds().values(), 60, f"{running_id}'s cards free after its cancel")
    assert running_id not in queue_store().holds().values()
    wait_until(lambda: job_status(state, running_id) in ("STOPPED", "FAILED"), 60, "Ray's job stopped")
    assert job_status(state, running_id) == "STOPPED" and queue_store().get(running_id).state == "cancelled"
    assert "already ended (cancelled)" in zeromix("cancel", running_id).stdout
    missing = zeromix("cancel", "no-such-job", check=False)
    assert missing.returncode == 2 and "no job 'no-such-job' in the queue" in missing.stderr
    wait_for_rounds(state, 3)  # a few scheduler rounds: the queued job must not have started after all
    assert queue_store().get(queued).state == "cancelled" and not {running_id, queued} & set(live_holds().values())


def test_a_moved_job_stops_with_a_checkpoint_is_placed_again_and_runs_every_step_once(connected, demo_data):
    """`zeromix move`, through the path the scheduler's own moves take: the request in Ray's KV store, rank 0 reads it
    and tells every rank in the step's all-reduce, each saves at that step and stops, the job is queued again with
    the reason and placed again, and it resumes from that checkpoint: steps 1..k in the first placement, k+1..N in
    the second, each once. Not a restart (those stay counted apart)."""
    from workers import job_records

    state, work = connected
    steps = 150
    job = submit(work, demo_data, "moved", f"max_steps={steps}", "checkpoint_every=100000", DESK_BOX)  # no checkpoint but the move's
    first = queue_store().get(running(job)).ray_job_id
    wait_until(lambda: (job_records.get(first, "progress") or [{"step": 0}])[-1]["step"] >= 10, 120, "ten steps")
    assert "stops at its next step with a checkpoint" in zeromix("move", job).stdout

    assert wait_for_state(job, ("succeeded", "failed", "cancelled"), 300) == "succeeded", queue_store().get(job).reason
    store = queue_store()
    moved = [e for e in store.events(job) if (e.source, e.target) == ("running", "queued")]
    assert len(moved) == 1 and store.moves(job) == 1, [e.reason for e in moved]
    at = int(moved[0].reason.split("stopped after step ")[1].split()[0])
    assert moved[0].reason == (f"moved: stopped after step {at} of {steps} with a checkpoint because its user asked (zeromix move); "
                               "placed again, resuming there")
    assert job_records.get(first, "result") == {"stopped_at": at, "of": steps}
    result = json.loads((work / "moved" / "zeromix-result.json").read_text())
    assert result["resumed_from"] == f"step-{at}" and result["steps"] == steps
    assert [h["step"] for h in result["history"]] == list(range(at + 1, steps + 1))  # the rest, each once
    assert [e.target for e in store.events(job)] == ["queued", "placing", "running", "queued", "placing", "running", "succeeded"]
    done_again = zeromix("move", job, check=False)
    assert done_again.returncode == 1 and "is succeeded, not running; nothing to move" in done_again.stdout


def test_a_killed_scheduler_comes_back_and_every_job_is_where_it_was(connected, demo_data, long_job):
    """The session's long job runs on the 2080 Ti and another job waits for that card; the scheduler actor is
    killed. Ray restarts it, both jobs are where they were, and once the long job is cancelled (the last test to
    use it) the waiting one gets the card from the restarted scheduler and finishes."""
    import ray

    from orchestrator.scheduler.service import ACTOR_NAME, health

    state, work = connected
    running_id = running(long_job)
    queued = submit(work, demo_data, "restart-queued", "max_steps=10", "gpus.count=1", f"gpus.models=[{LONG_JOB_CARD}]")
    wait_for_rounds(state, 1)
    before = {j: queue_store().get(j).state for j in (running_id, queued)}

    ray.kill(ray.get_actor(ACTOR_NAME, namespace="zeromix"), no_restart=False)  # Ray restarts it
    assert health(state)["policy"] == "gain"  # answers again, restarted by Ray
    wait_for_rounds(state, 3)  # a few rounds of the new scheduler
    store = queue_store()
    assert {j: store.get(j).state for j in (running_id, queued)} == before == {running_id: "running", queued: "queued"}
    assert live_holds() == {c: running_id for c in store.get(running_id).cards}
    assert_nothing_double_booked()

    zeromix("cancel", running_id)  # the queued job now gets the card from the restarted scheduler
    assert wait_for_state(queued, ("succeeded", "failed"), 300) == "succeeded"
    assert_nothing_double_booked()
