"""The controller's promises, each on the real Scheduler, QueueStore and gain policy with Ray's double
(tests/controller_world.py): milliseconds each. Every test here failed on the code before its fix."""

import dataclasses
import shutil
import threading
import time

import pytest

from orchestrator.queue import OutputDirTaken, QueueStore
from orchestrator.scheduler import MAX_ATTEMPTS, binding, table as table_module
from orchestrator.scheduler.table import Bounded, QueuedJob, ThroughputTable
from tests.controller_world import Clock, World


@pytest.fixture
def world(tmp_path):
    return World.make(tmp_path)


def test_a_job_whose_stored_spec_no_longer_validates_fails_alone_and_the_others_start(world):
    good = world.submit(world.spec())
    old = world.spec()
    broken = world.submit(old, stored={**old.model_dump(mode="json", exclude_unset=True), "deepspeed": {"zero_stage": 0}})
    world.scheduler.tick()
    assert world.state(good) == "running"
    record = world.store.get(broken)
    assert record.state == "failed"
    assert record.reason == (f"cannot be planned any more: InputError: job {broken}'s stored spec: deepspeed.zero_stage=0 is not "
                             "allowed; input should be 'auto', 1, 2 or 3")
    assert world.scheduler.last_error is None and world.scheduler.rounds == 1


def test_a_job_whose_model_config_cannot_be_read_fails_alone_with_the_path(world):
    lost = world.submit(world.spec("qwen2.5-0.5b", method="lora"))
    shutil.rmtree(world.model_dir("qwen2.5-0.5b"))  # the disk it was on is unmounted before the first round
    good = world.submit(world.spec())
    world.scheduler.tick()
    assert world.state(good) == "running"
    record = world.store.get(lost)
    assert record.state == "failed" and "no config.json found locally" in record.reason and "model-qwen2.5-0.5b" in record.reason


def test_a_model_gone_after_it_was_planned_fails_just_before_placing_with_one_line(world):
    first = world.submit(world.spec(gpus={"count": 5}))  # all five cards: the next job waits, planned
    waiting = world.submit(world.spec("qwen2.5-0.5b", method="lora", priority=-1))
    world.scheduler.tick()
    assert (world.state(first), world.state(waiting)) == ("running", "queued")
    shutil.rmtree(world.model_dir("qwen2.5-0.5b"))
    world.ray.endings[first] = _finished()
    world.scheduler.tick()
    record = world.store.get(waiting)
    assert record.state == "failed" and waiting not in world.ray.starts
    assert record.reason.startswith(f"job {waiting}: model.path='{world.root}"[:60])  # the path, cut at 80 characters
    assert record.reason.endswith(" is not allowed; it is gone (moved or deleted since the job was submitted)")


def test_a_launch_and_its_cleanup_both_failing_leave_the_job_queued_and_its_cards_freed_next_round(world):
    job = world.submit(world.spec())
    world.ray.fail_start = world.ray.fail_stop = True

    def start_that_reserves_then_fails(record, plan):  # as launch.submit: the reservation is made, the Jobs API is down
        world.ray.reservations[record.id] = tuple(r.card.resource for r in plan.ranks)
        raise RuntimeError("Failed to submit job: 503 Service Unavailable")

    world.ray.start = start_that_reserves_then_fails
    world.scheduler.tick()
    record = world.store.get(job)
    assert record.state == "queued" and record.reason == f"launch 1 of {MAX_ATTEMPTS} failed: Failed to submit job: 503 Service Unavailable"
    assert world.store.holds() == {} and world.ray.reservations  # the queue holds nothing; Ray's reservation leaked
    world.ray.fail_stop = False
    del world.ray.start  # Ray answers again
    world.ray.fail_start = False
    world.scheduler.tick()
    assert world.state(job) == "running" and list(world.ray.reservations) == [job]


def test_a_round_that_breaks_is_counted_and_shown_and_the_next_one_clears_it(world):
    world.submit(world.spec())
    cluster = world.ray.cluster
    world.ray.cluster = lambda: (_ for _ in ()).throw(RuntimeError("GCS unavailable"))
    with pytest.raises(RuntimeError):
        world.scheduler.tick()
    assert (world.scheduler.rounds, world.scheduler.last_error) == (1, "round 1: RuntimeError: GCS unavailable")
    world.ray.cluster = cluster
    world.scheduler.tick()
    assert (world.scheduler.rounds, world.scheduler.last_error) == (2, None)


def test_two_live_jobs_never_share_an_output_dir_even_from_two_clients_at_once(tmp_path, world):
    path = tmp_path / "queue.db"
    first, second = QueueStore(path), QueueStore(path)  # two `zeromix submit`s, each with its own connection
    spec = world.spec()
    first.submit("a-1", spec.name, spec.model_dump(mode="json"), 10, 0)
    with pytest.raises(OutputDirTaken, match="job a-1 \\(queued\\) writes there"):
        second.submit("b-1", spec.name, spec.model_dump(mode="json"), 10, 0)
    assert [r.id for r in second.jobs()] == ["a-1"]  # nothing half-written
    first.transition("a-1", "queued", "cancelled", "cancelled by the user")
    second.submit("b-1", spec.name, spec.model_dump(mode="json"), 10, 0)  # a dead job's directory may be reused


def test_the_table_is_rebuilt_when_a_cards_record_changes_not_only_when_cards_come_or_go(world):
    snapshot = world.ray.cluster()
    table = world.scheduler.table(snapshot)
    assert world.scheduler.table(world.ray.cluster()) is table  # nothing changed: the cache is kept
    desk = snapshot.node("desk")
    slower = dataclasses.replace(desk, cards=tuple(dataclasses.replace(c, facts=dataclasses.replace(c.facts, training_speed=0.5))
                                                   for c in desk.cards))  # a job measured desk's cards at half the plan
    changed = dataclasses.replace(snapshot, nodes=tuple(slower if n.name == "desk" else n for n in snapshot.nodes))
    rebuilt = world.scheduler.table(changed)
    assert rebuilt is not table
    job = QueuedJob("j", world.spec(gpus={"models": ["RTX 4090"]}), 0, 0.0, 100)
    assert rebuilt.best(job).plan.step.step_s > 1.5 * table.best(job).plan.step.step_s


def test_the_tables_caches_forget_the_least_recently_used_beyond_their_bound(monkeypatch, world):
    cache = Bounded(2)
    assert [cache.get_or_make(k, lambda k=k: k * 10) for k in (1, 2, 1, 3)] == [10, 20, 10, 30]
    assert list(cache) == [1, 3]  # 2 was the least recently used
    monkeypatch.setattr(table_module, "PLAN_CACHE", 3)
    table = ThroughputTable(world.ray.cluster())
    job = QueuedJob("j", world.spec(), 0, 0.0, 100)
    cards = [c.card_id for c in table.cluster.cards]
    for i in range(len(cards)):
        table.plan(job, frozenset(cards[: i + 1]))
    assert len(table._plans) == 3


def test_a_job_without_a_checkpoint_cadence_saves_about_every_ten_minutes_of_training(world):
    from orchestrator.launch import CHECKPOINT_EVERY_S, train_config
    from orchestrator.model_facts import facts_from_config, read_config
    from orchestrator.planner import make_plan

    spec = world.spec("qwen2.5-0.5b", method="lora", max_steps=100_000, seq_len=1024)
    plan = make_plan(spec, facts_from_config(read_config(spec.model.path)), world.ray.cluster(), 100_000)
    every = train_config(spec, plan, "j-1").checkpoint_every
    assert every == round(CHECKPOINT_EVERY_S / plan.step.step_s) and 0 < every < 100_000
    assert train_config(spec.model_copy(update={"checkpoint_every": 0}), plan, "j-1").checkpoint_every == 0  # only at the end
    assert train_config(spec.model_copy(update={"checkpoint_every": 7}), plan, "j-1").checkpoint_every == 7
    short = make_plan(spec, facts_from_config(read_config(spec.model.path)), world.ray.cluster(), 10)
    assert train_config(spec, short, "j-1").checkpoint_every == 0  # the whole run is shorter than ten minutes


def _finished():
    from orchestrator.scheduler import Ending

    return Ending("succeeded", "finished")


def test_a_jobs_api_that_never_answers_is_given_up_on_not_waited_for(monkeypatch):
    """Ray's client sends requests without a timeout; zeromix's gives up after HTTP_TIMEOUT_S, as the RuntimeError
    its callers treat as "did not answer" (a round goes on, a follow says so)."""
    import socket

    from orchestrator import launch

    monkeypatch.setattr(launch, "HTTP_TIMEOUT_S", 1)
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        with pytest.raises(RuntimeError, match="did not answer within 1 s"):  # without the timeout: a hang, cut by pytest-timeout
            launch._client(f"http://127.0.0.1:{silent.getsockname()[1]}", "no token")


def test_a_submit_waits_out_a_head_whose_job_agent_is_not_up_yet_and_nothing_else(monkeypatch):
    """Right after `up` the Jobs API answers 500 "No available agent": that is waited out; any other answer is
    the launch's failure at once."""
    from orchestrator import launch

    monkeypatch.setattr(launch, "AGENT_RETRY_S", 0.01)

    class JobsApi:
        def __init__(self, answers):
            self.answers, self.calls = list(answers), 0

        def submit_job(self, **job):
            self.calls += 1
            if self.answers:
                raise self.answers.pop(0)

    starting = JobsApi([launch.JobsApiError(500, "No available agent to submit job")] * 3)
    launch._submit_when_agent_ready(starting, submission_id="a")
    assert starting.calls == 4
    refusing = JobsApi([launch.JobsApiError(400, "entrypoint is empty"), None])
    with pytest.raises(launch.JobsApiError, match="status code 400"):
        launch._submit_when_agent_ready(refusing, submission_id="b")
    assert refusing.calls == 1


def test_a_log_the_jobs_api_failed_to_give_is_asked_for_again_and_only_does_not_exist_means_no_log(monkeypatch):
    """Right after a node was unplugged, Ray's Jobs API once answered 500 for a running job's log (and the next call
    worked): `zeromix logs` said "Ray has no logs for <job>". Now only Ray's "does not exist" means that; any other
    failure is asked again within LOG_WAIT_S and then named."""
    from orchestrator import launch

    monkeypatch.setattr(launch, "AGENT_RETRY_S", 0.01)
    monkeypatch.setattr(launch, "LOG_WAIT_S", 0.2)
    failing = launch.JobsApiError(500, "Traceback (most recent call last):\n  ...\nConnectionResetError: [Errno 104] Connection reset by peer")

    class JobsApi:
        def __init__(self, answers):
            self.answers, self.calls = list(answers), 0

        def get_job_logs(self, job_id):
            self.calls += 1
            answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
            if isinstance(answer, Exception):
                raise answer
            return answer

    recovering = JobsApi([failing, RuntimeError("the Jobs API at http://127.0.0.1:8265 did not answer within 30 s"), "step 1\n"])
    assert launch.job_log(recovering, "zm-a") == launch.JobLog(text="step 1\n") and recovering.calls == 3
    unknown = JobsApi([launch.JobsApiError(404, "Job zm-b does not exist")])
    assert launch.job_log(unknown, "zm-b") == launch.JobLog(missing=True) and unknown.calls == 1
    broken = JobsApi([failing])
    log = launch.job_log(broken, "zm-c")
    assert log.text is None and not log.missing and broken.calls > 1
    assert log.error == "ConnectionResetError: [Errno 104] Connection reset by peer (asked for 0.2 s)"


def test_the_failure_policy_reads_typed_signals_and_decides_restart_replan_or_fail(world):
    """One table (orchestrator/scheduler/failures.py): Ray's status and the driver's failure kind, never text."""
    from orchestrator.model_facts import facts_from_config, read_config
    from orchestrator.planner import make_plan
    from orchestrator.scheduler import failures

    spec = world.spec(gpus={"count": 2})
    plan = make_plan(spec, facts_from_config(read_config(spec.model.path)), world.ray.cluster(), 100).summary()
    card = plan["ranks"][0]["card"]
    record = {"rank": 0, "card": card, "kind": "oom", "detail": "CUDA out of memory"}
    assert failures.from_ray("SUCCEEDED", None, None) == failures.Ending("succeeded", "finished")
    assert failures.from_ray("STOPPED", None, None).state == "cancelled"
    assert failures.from_ray("FAILED", "Job entrypoint failed\nValueError: bad data", None) == failures.Ending("failed", "failed: ValueError: bad data")
    bug = failures.from_ray("FAILED", "", {**record, "kind": "error", "detail": "ValueError: bad data"})
    assert not bug.retryable and failures.decide(bug, 0, plan, {}).state == "failed"
    lost = failures.from_ray("FAILED", "", {**record, "kind": "lost", "detail": "node died"})
    assert failures.decide(lost, 0, plan, {}) == ("queued", f"rank 0 on {card} was lost (its process or node died, or a collective "
                                                  "lost it): node died; placed again on the cards free now, resuming from its last "
                                                  "checkpoint (restart 1 of 3)", None)
    assert failures.decide(lost, failures.MAX_RESTARTS, plan, {}).state == "failed"
    oom = failures.decide(failures.from_ray("FAILED", "", record), 1, plan, {"other/0": 1000})
    parts = plan["ranks"][0]["est_mem_breakdown_gib"]
    assert oom.state == "queued" and oom.memory_caps == {"other/0": 1000, card: int((sum(parts.values()) - parts["activations"] / 2) * 1024)}
    assert failures.decide(failures.UNKNOWN_TO_RAY, 2, plan, {}).reason.endswith("(restart 3 of 3)")
    moved = failures.from_ray("SUCCEEDED", None, None, {"stopped_at": 40, "of": 100}, {"reason": "faster cards are free"})
    assert failures.decide(moved, failures.MAX_RESTARTS, plan, {}) == (  # a move is not a restart: none left does not matter
        "queued", "moved: stopped after step 40 of 100 with a checkpoint because faster cards are free; placed again, resuming there", None)


def test_a_job_the_policy_moves_is_asked_once_requeued_with_the_reason_and_moved_at_most_max_moves_times(world):
    """The policy says which running jobs to move; the scheduler asks each once (not again every round while it
    saves), queues it again when it has stopped, and stops asking after MAX_MOVES moves. Moves are not restarts:
    a lost node after two moves is still restarted."""
    from orchestrator.scheduler import failures
    from orchestrator.scheduler.policies import Move
    from orchestrator.scheduler.policies.fifo import FifoFirstFit

    class MovesEverything:
        name = "moves-everything"

        def allocate(self, x):
            decision = FifoFirstFit().allocate(x)
            decision.moves = {r.id: Move("faster cards are free (test)") for r in x.running}
            return decision

    world.scheduler.policy = MovesEverything()
    job = world.submit(world.spec())
    world.scheduler.tick()  # placed and running
    for n in range(1, failures.MAX_MOVES + 2):
        world.scheduler.tick()
        world.scheduler.tick()  # still saving: not asked again
        asked = [j for j, _ in world.ray.moves if j == job]
        assert len(asked) == min(n, failures.MAX_MOVES)
        if n > failures.MAX_MOVES:
            break
        world.ray.endings[job] = failures.from_ray("SUCCEEDED", None, None, {"stopped_at": 10 * n, "of": 100}, {"reason": world.ray.moves[-1][1]})
        world.scheduler.tick()  # queued again with the reason, and placed again in the same round
        assert world.store.get(job).state == "running" and world.store.moves(job) == n
    assert [e.reason for e in world.store.events(job) if e.target == "queued"][1:] == [
        f"moved: stopped after step {10 * n} of 100 with a checkpoint because faster cards are free (test); placed again, resuming there"
        for n in (1, 2)]
    world.ray.endings[job] = failures.UNKNOWN_TO_RAY  # then a node is lost: its first restart, not its third
    world.scheduler.tick()
    assert [e.reason for e in world.store.events(job) if e.target == "queued"][-1].endswith("(restart 1 of 3)")


def test_the_card_a_job_is_moved_for_is_held_for_it_while_it_saves_and_it_is_placed_there(world):
    """gain moves a long job off the 1080 Ti when the 4090 frees. Saving its checkpoint takes a while: a job that
    arrives meanwhile and wants the 4090 must not take it (the moved job would then be placed on whatever is free,
    once across two boxes over 1 GbE: README, "The scheduler: measured"), nor may a scheduler restarted meanwhile ask
    it to move again. Once queued again, it gets the 4090."""
    from orchestrator.scheduler import Ending, failures

    on = lambda *models: {"count": 1, "models": list(models)}  # noqa: E731
    blocker = world.submit(world.spec(model="qwen2.5-0.5b", gpus=on("NVIDIA GeForce RTX 4090"), max_steps=2_000_000))  # 48 h
    long = world.submit(world.spec(model="qwen2.5-0.5b", gpus=on("NVIDIA GeForce GTX 1080 Ti", "NVIDIA GeForce RTX 4090"), precision="fp32",
                                   max_steps=100_000))  # 45 h on the 1080 Ti, 4 h on the 4090: it starts on the 1080 Ti
    world.scheduler.tick()
    assert world.store.get(blocker).cards == ("desk/1",) and world.store.get(long).cards == ("attic/0",)
    world.ray.endings[blocker] = Ending("succeeded", "finished")
    world.clock.now += 60
    world.scheduler.tick()  # the 4090 frees: gain moves the long job there, and the queue holds it for it
    assert [j for j, _ in world.ray.moves] == [long] and world.store.holds()["desk/1"] == long
    late = world.submit(world.spec(model="qwen2.5-0.5b", gpus=on("NVIDIA GeForce RTX 4090"), max_steps=50))
    world.clock.now += 60
    world.scheduler.tick()  # still saving
    assert world.state(late) == "queued" and world.store.holds()["desk/1"] == long
    assert f"desk/1 held by job {long} until about" in world.store.get(late).reason
    world.restart_scheduler()  # the new scheduler does not know it asked: the held 4090 tells it
    world.scheduler.tick()
    assert len(world.ray.moves) == 1 and world.store.holds()["desk/1"] == long and world.state(late) == "queued"
    world.ray.endings[long] = failures.from_ray("SUCCEEDED", None, None, {"stopped_at": 40, "of": 100_000}, {"reason": world.ray.moves[0][1]})
    world.scheduler.tick()  # queued again with its checkpoint, and placed first
    assert world.store.get(long).state == "running" and world.store.get(long).cards == ("desk/1",)
    assert world.state(late) == "queued"


def test_a_job_across_boxes_whose_output_dir_not_every_box_sees_fails_with_one_line(world, tmp_path):
    local = tmp_path / "the-heads-own-disk"
    world.ray.local_dirs.append(local)
    across = world.submit(world.spec(gpus={"count": 5}, output_dir=str(local / "run")))  # five cards: three boxes
    world.scheduler.tick()
    record = world.store.get(across)
    assert record.state == "failed" and across not in world.ray.starts and world.store.holds() == {}
    assert record.reason.startswith(f"job {across}: output_dir='{local}"[:60])  # the path, cut at 80 characters
    assert record.reason.endswith(" is not allowed; closet, desk cannot see it, and a job across boxes (attic, closet, desk) needs "
                                  "an output_dir every one of them sees (NFS): each rank writes its shards there")
    one_box = world.submit(world.spec(gpus={"count": 1}, output_dir=str(local / "run-1")))
    world.scheduler.tick()
    assert world.state(one_box) == "running"  # on one box, its own disk will do


def test_a_slow_launch_holds_only_its_own_job_and_is_given_up_at_its_deadline(tmp_path):
    """Launches run apart from the round (scheduler/binding.py): while one hangs, the next job starts; past the
    deadline its job is queued again, placed again only once the hung call has returned and been undone."""
    world, moment = World.make(tmp_path, "fifo-first-fit"), Clock(0.0)  # FIFO: both jobs are placed in the first round
    world.scheduler.binder = binder = binding.Threads(deadline_s=180, clock=moment)
    hung, quick = world.submit(world.spec(gpus={"count": 2})), world.submit(world.spec(gpus={"count": 1}))
    world.ray.slow[hung] = threading.Event()
    world.scheduler.tick()
    _wait_for(lambda: quick in world.ray.starts)
    world.scheduler.tick()
    assert (world.state(hung), world.state(quick)) == ("placing", "running")

    moment.now = 181.0
    world.scheduler.tick()
    record = world.store.get(hung)
    assert (record.state, record.reason) == ("queued", f"launch 1 of {MAX_ATTEMPTS} failed: took longer than 180 s (its cards are freed once Ray answers)")
    world.scheduler.tick()
    assert world.state(hung) == "queued" and hung in binder.busy()  # not placed again while its call hangs

    world.ray.slow.pop(hung).set()  # Ray answers at last: the late launch reserved cards, which are given back
    _wait_for(lambda: not binder.running())
    assert hung in world.ray.reservations
    world.scheduler.tick()  # collects the late launch and hands over its stop
    _wait_for(lambda: not binder.running())
    assert hung not in world.ray.reservations
    world.scheduler.tick()  # collects the stop; the job is placed again
    _wait_for(lambda: not binder.running())
    world.scheduler.tick()
    assert world.state(hung) == "running" and world.ray.starts.count(hung) == 2
    cards = [res for resources in world.ray.reservations.values() for res in resources]
    assert len(cards) == len(set(cards)) == 3


def _wait_for(condition, deadline_s: float = 10.0) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < end, "the binder's threads did not finish within 10 s"
        time.sleep(0.01)


def test_the_queues_positions_are_the_order_the_scheduler_serves_aged_priority_included(world):
    """`zeromix queue`'s POS: a priority -10 job is served after a priority 10 one that arrives with it, and once it
    has waited 4 hours before one that just arrived (gain's aging: equal after 3 h 20 min; it is also past its due
    time by then), and the queue says so (it used to sort by priority alone)."""
    from orchestrator.client import QueueView

    world.submit(world.spec(gpus={"count": 5}, max_steps=100_000))  # every card, for days
    world.scheduler.tick()
    low = world.submit(world.spec(priority=-10), at=world.clock.now)
    for hours, first in ((0, "high"), (4, "low")):
        world.clock.now += hours * 3600
        high = world.submit(world.spec(priority=10), at=world.clock.now)
        world.scheduler.tick()
        view = QueueView(world.store.jobs(), [], {"turns": list(world.scheduler.turns)})
        assert view.waiting[0].id == {"low": low, "high": high}[first]
        world.store.transition(high, ("queued",), "cancelled", "the next hour's stream")


def test_a_job_placed_before_is_planned_again_on_its_checkpoints_side_of_zero3(world):
    """DeepSpeed loads a checkpoint only on its side of ZeRO-3's boundary (workers/checkpoint.across_zero3). A job at
    `zero_stage: auto` that ran is weighed for a move, and planned again after a restart, at the stage family it
    ran at: planned at the other one, it could not load its checkpoint (DeepSpeed fails inside its loader: measured)."""
    from orchestrator.scheduler import failures, on_its_checkpoints_side

    job = world.submit(world.spec())
    world.scheduler.tick()
    record = world.store.get(job)
    assert record.state == "running" and record.plan["zero_stage"] == 2
    assert world.scheduler.queued_job(record).spec.deepspeed.zero_stage == 2  # what a move is weighed with, from then on
    world.ray.endings[job] = failures.UNKNOWN_TO_RAY  # lost: queued again, and placed again in the same round
    world.scheduler.tick()
    record = world.store.get(job)
    assert world.store.returns(job, "running") == 1 and record.state == "running" and record.plan["zero_stage"] == 2
    assert world.scheduler.queued_job(record).spec.deepspeed.zero_stage == 2

    auto, lora, qlora = world.spec(), world.spec(method="lora"), world.spec("qwen2.5-0.5b", method="qlora")
    assert on_its_checkpoints_side(auto, None) is auto  # never placed: nothing saved
    assert on_its_checkpoints_side(lora, {"zero_stage": 3}).deepspeed.zero_stage == 3
    assert on_its_checkpoints_side(auto, {"zero_stage": 1}).deepspeed.zero_stage == 2  # (auto's choices short of ZeRO-3)
    assert on_its_checkpoints_side(qlora, {"zero_stage": 2}) is qlora  # QLoRA's choices, 1 and 2, are one side
    pinned = world.spec(deepspeed={"zero_stage": 1})
    assert on_its_checkpoints_side(pinned, {"zero_stage": 3}) is pinned  # the user's choice stands (the resume then says why not)
