"""What homelabs do to a running job, on a real 3-node Ray cluster of this module's own (a node is unplugged
here, so the session's shared cluster is left alone): a card out of memory, a node gone mid-training."""

import json
import math
import re
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, queue_store, submitted_id, wait_for_state, wait_until, zeromix
from tests.helpers import cluster_file, mean_token_loss
from workers.faults import environment as faults_env

pytestmark = pytest.mark.cluster
STEPS, EVERY = 200, 50
HOLD_AT = 60  # the unplugged and the restarted job wait before this step (after the checkpoint at 50) until released
RESTART_STEPS = 70  # the restarted job's: it resumes at 50 on other cards (in bf16, some 0.14 s a step here) and ends soon after
# two cards of these: the 3090 (desk) and the 3060 (closet) in bf16; without desk, the 3060 and the 1080 Ti (attic)
# in fp32 -- other cards and another precision, so the checkpoint goes through its universal form
MODELS = ("NVIDIA GeForce GTX 1080 Ti", "NVIDIA GeForce RTX 3090", "NVIDIA GeForce RTX 3060 12GB")
OOM_ABOVE = 21  # desk/0 "has memory" for this many samples of the tiny model, where the plan gives it 23 (and 21 once capped)
# An outer-step job on desk/0 (box 0) and attic/1 + attic/0 (box 1), meeting every INNER steps: attic/0's rank is killed
# before step DIE_AT, between two outer steps; box 0 waits before step BACK_HOLD until box 1, started again, asks back in
OUTER_STEPS, INNER, DIE_AT, BACK_HOLD = 60, 10, 25, 41
# An outer-step job on desk/0 (box 0) and closet/0 (box 1), meeting every MOVED_INNER steps: closet is unplugged while
# the job is held before step UNPLUG_HOLD, plugged back in (`zeromix up`) while box 0 is held before MOVED_HOLD, and
# the job is moved while box 1 asks back in, so that box 1 is let in at the outer step where the job stops
MOVED_STEPS, MOVED_INNER, UNPLUG_HOLD, MOVED_HOLD = 20, 5, 3, 6
# An outer-step job on desk/0 (box 0) and closet/0 (box 1) whose box 1 rank dies before the boxes first meet, once;
# and, placed again, in the exchange of the first outer step
START_STEPS, START_INNER = 6, 3
# Ray's health checks of this module's nodes, every second and dead after 3 missed (Ray's defaults: 3 s and 5, about
# 15 s): an unplugged node is declared dead, and what waits on that goes on, some 10 s sooner in each unplug test
QUICK_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def unplug(cluster_id: str, node: str) -> int:
    """Kill every process of one simulated node (its raylet, agents and workers), as pulling its plug would:
    only processes of this cluster, found by the marker zeromix starts them with and the node's temp dir."""
    from orchestrator.processes import cluster_processes, still_running

    gone = [p for p in cluster_processes(cluster_id) if f"/zm-{cluster_id}/{node}/" in _command_line(p)]
    for proc in gone:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass  # it exited between the listing and the kill
    assert not still_running(gone, 10), "a killed process of the node is still running after 10 s"
    return len(gone)


def _command_line(proc: psutil.Process) -> str:
    """A process's command line, or "" for one that exited after it was listed (a short-lived Ray worker does)."""
    try:
        return " ".join(proc.cmdline())
    except psutil.NoSuchProcess:
        return ""


def held(work, job: str) -> tuple[Path, Path]:
    """The hold armed for `job` (workers/faults.py): the file its rank 0 writes when it waits, and the one that lets it go."""
    return work / f"release-{job}.waiting", work / f"release-{job}"


@pytest.fixture(scope="module")
def own_cluster(tmp_path_factory, zeromix_home):
    """A 3-node cluster of this module's own (a test unplugs one of its nodes), with the test-only faults
    (workers/faults.py) armed: out of memory for the job named oom-probe on desk/0, box-lost-probe's rank on
    attic/0 killed before step DIE_AT and its box 0 paused before step BACK_HOLD, start-lost-probe's rank on closet/0
    killed before the boxes meet (once) and in the exchange of its first outer step, and a pause before step HOLD_AT
    for the jobs named unplug-probe and restart-probe, so a node is unplugged and the head restarted while the job is
    at a known step rather than at a guessed time."""
    import shutil

    import ray

    from orchestrator import cluster_runtime

    work = tmp_path_factory.mktemp("faults")
    (work / "home").mkdir()
    shutil.copy2(cluster_runtime.token_file(), work / "home" / "auth_token")  # Ray reads the token once per process
    ray.shutdown()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ZEROMIX_HOME", str(work / "home"))
        faults = [f"oom:oom-probe:desk/0:{OOM_ABOVE}", f"die:box-lost-probe:attic/0:{DIE_AT}", f"die:start-lost-probe:closet/0:0:{work / 'died-at-start'}",
                  f"die:start-lost-probe:closet/0:exchange-{START_INNER}",
                  f"hold:box-lost-probe:{BACK_HOLD}:{held(work, 'box-lost-probe')[1]}",
                  f"hold:box-back-moved-probe:{UNPLUG_HOLD}:{work / 'release-unplug'}", f"hold:box-back-moved-probe:{MOVED_HOLD}:{held(work, 'box-back-moved-probe')[1]}"] + [f"hold:{job}:{HOLD_AT}:{held(work, job)[1]}" for job in ("unplug-probe", "restart-probe")]
        zeromix("up", "--simulate", str(cluster_file(work)), timeout=240, env=faults_env(*faults) | QUICK_NODE_DEATH)
        (work / "faults").write_text("\n".join(faults))  # (for a node started again: `zeromix up` with the same faults)
        yield cluster_runtime.load_state(), work
        ray.shutdown()
        zeromix("down", check=False)


def test_a_card_out_of_memory_is_planned_again_with_less_and_the_job_finishes(own_cluster, demo_data):
    """desk/0 raises torch.OutOfMemoryError while its micro-batch is above OOM_ABOVE (the plan gives it 23). The
    job is placed again with desk/0 capped below what the plan assumed, and finishes."""
    state, work = own_cluster
    job_id = submitted_id(zeromix("submit", "jobs/examples/tiny-llama-scratch.yaml", "--set", "report_to=[]", "--set", "name=oom-probe", "--set", "max_steps=20",
                                  "--set", f"dataset.path={demo_data['pretrain']}", "--set", f"output_dir={work / 'oom'}").stdout)
    assert wait_for_state(job_id, ("succeeded", "failed", "cancelled"), 400) == "succeeded", queue_store().get(job_id).reason
    restart = next(e for e in queue_store().events(job_id) if (e.source, e.target) == ("running", "queued"))
    assert re.search(r"rank \d on desk/0 ran out of memory: OutOfMemoryError: CUDA out of memory on desk/0 \(injected", restart.reason), restart.reason
    assert "desk/0 is planned with at most" in restart.reason and "restart 1 of 3" in restart.reason
    record = queue_store().get(job_id)
    assert set(record.memory_caps) == {"desk/0"} and record.memory_caps["desk/0"] < 24 * 1024
    micro = {r["card"]: r["micro_batch"] for r in record.plan["ranks"]}  # the new plan, as placed
    assert 0 < micro.get("desk/0", 0) <= OOM_ABOVE or "desk/0" not in micro, micro
    assert sum(micro.values()) * record.plan["grad_accum"] == 32  # the global batch is kept
    result = json.loads((work / "oom" / "zeromix-result.json").read_text())
    assert result["steps"] == 20


def _submit_outer(name: str, steps: int, inner: int, models: list[str], out: Path, demo_data) -> str:
    """An outer-step job on these cards (one box per node), submitted as `name`, whose faults the module armed."""
    return submitted_id(zeromix("submit", "jobs/examples/tiny-llama-scratch.yaml", "--set", "report_to=[]", "--set", f"name={name}",
                                "--set", f"max_steps={steps}", "--set", "sync.mode=outer", "--set", f"sync.inner_steps={inner}",
                                "--set", f"gpus.count={len(models)}", "--set", f"gpus.models=[{', '.join(models)}]",
                                "--set", f"dataset.path={demo_data['pretrain']}", "--set", f"output_dir={out}").stdout)


def _asking_back_in(state, job_id: str) -> None:
    """Until the job's log says a box asks back in: read in this process (what `zeromix logs` prints), as a CLI call
    every poll took a core from the ranks starting meanwhile."""
    from orchestrator import client, cluster_runtime
    from orchestrator.errors import ZeromixError

    cluster_runtime.connect(state)

    def asking() -> bool:
        try:
            return "asking back in" in client.logs(job_id)
        except ZeromixError:  # right after a node died the Jobs API has failed to give a log for a while: not yet, then
            return False

    wait_until(asking, 180, "box 1 started again and asking back in", every_s=1)


def test_with_outer_steps_a_box_lost_is_left_out_and_let_back_in_without_a_restart(own_cluster, tmp_path, demo_data):
    """desk/0 (box 0) and attic's two cards (box 1) train with an outer step every INNER steps; attic/0's process (not
    its box's leader) is killed before step DIE_AT. The driver sees it die, stops the rest of box 1 and tells the box
    leaders; box 0 does not wait for it at the next outer step and takes the whole global batch from there within its
    caps. The driver starts box 1's ranks again; they ask back in, are let in at the next outer step with the global
    weights, and both boxes train the plan's split to the end: every step once, in the job's first placement. Box 1's
    share of the steps between the last outer step and its loss went untrained, and the result says so."""
    state, work = own_cluster
    out, (waiting, release) = tmp_path / "box-lost", held(work, "box-lost-probe")
    job_id = _submit_outer("box-lost-probe", OUTER_STEPS, INNER, ["NVIDIA GeForce RTX 3090", "NVIDIA GeForce GTX 1080 Ti", "NVIDIA GeForce RTX 2080 Ti"], out, demo_data)
    wait_until(waiting.exists, 240, f"box 0 held before step {BACK_HOLD}")
    _asking_back_in(state, job_id)
    release.touch()  # (so it is let in at the outer step at step 50, not at whichever one its start-up happens to meet)
    assert wait_for_state(job_id, ("succeeded", "failed", "cancelled"), 400) == "succeeded", queue_store().get(job_id).reason
    record = queue_store().get(job_id)
    assert [(b["node"], b["ranks"]) for b in record.plan["outer"]["boxes"]] == [("desk", 1), ("attic", 2)]
    assert record.attempts == 1 and not [e for e in queue_store().events(job_id) if (e.source, e.target) == ("running", "queued")]
    lost_at = (DIE_AT // INNER + 1) * INNER  # the first outer step after the loss
    back_at = (BACK_HOLD // INNER + 1) * INNER  # the first after it asked
    assert record.reason == f"finished; box(es) [1] lost before step {lost_at}; box(es) [1] back from step {back_at + 1}"  # `zeromix queue --all`

    result = json.loads((out / "zeromix-result.json").read_text())
    assert result["steps"] == OUTER_STEPS and [h["step"] for h in result["history"]] == list(range(1, OUTER_STEPS + 1))
    [left], [back] = result["outer"]["boxes_left"], result["outer"]["boxes_back"]
    assert (left["step"], left["boxes"], left["ranks"], left["untrained_steps"]) == (lost_at, [1], [1, 2], [lost_at - INNER + 1, lost_at])
    batch = 32 // record.plan["grad_accum"]  # samples a micro-step, over every card (the job's global batch is 32)
    assert left["untrained_samples_a_step"] == (batch - result["history"][lost_at - 1]["split"][0]) * record.plan["grad_accum"] > 0
    planned = [r["micro_batch"] for r in record.plan["ranks"]]
    assert (back["step"], back["boxes"], back["ranks"], back["new_split"]) == (back_at, [1], [1, 2], planned)
    assert result["outer"]["outer_steps"] == OUTER_STEPS // INNER
    assert [r["card"] for r in result["ranks"]] == ["desk/0", "attic/1", "attic/0"]
    out_of_job = [h for h in result["history"] if lost_at < h["step"] <= back_at]  # desk/0 alone, on the whole global batch
    assert out_of_job and all(h["split"] == [batch, 0, 0] and h["tokens"][1:] == [0, 0] and h["step_time_s"][1:] == [None, None]
                              for h in out_of_job)
    # both boxes again from the step after, at the plan's split; box 1's own tuner may then move samples between its two
    # cards, within its share
    after = [h for h in result["history"] if h["step"] > back_at]
    assert after and after[0]["split"] == planned and all(min(h["tokens"]) > 0 for h in after)
    assert all(h["split"][0] == planned[0] and sum(h["split"][1:]) == sum(planned[1:]) for h in after)
    assert math.isfinite(result["last_loss"]) and result["last_loss"] < result["first_loss"]
    assert (out / "final" / "config.json").exists()
    log = zeromix("logs", job_id).stdout
    assert "box 1 (attic/1, attic/0) was lost" in log and "went untrained with them" in log and "let back in with the global weights" in log, log[-3000:]
    shown = zeromix("logs", "--follow", job_id).stdout  # the job's result as `submit --follow` ends with it
    assert shown.index(f"lost before the outer step at step {lost_at}") < shown.index(f"back: let in at the outer step at step {back_at}")
    zeromix("report", job_id)  # the HTML report draws a card that was out of the job for a while


def test_with_outer_steps_a_box_lost_before_the_boxes_meet_restarts_the_job_at_once_and_one_lost_in_the_exchange_is_left_out(
        own_cluster, tmp_path, demo_data):
    """closet/0's rank (box 1) dies before the boxes first meet, as when its node is unplugged while the job starts.
    Box 0's leader, waiting for the other leaders, hears from the job's driver that box 1 was lost, and the job fails as
    lost at once; the scheduler places it again (the same cards: the node is still there) and it ends every step
    once. Before, box 0 waited 600 s for box 1 and the job then failed for good, as if it had a bug.
    Placed again, box 1's rank dies once more, after the boxes met at the first outer step and before its delta
    crossed: box 0's exchange breaks, the driver reports box 1 lost, and box 0 goes on alone with the whole batch
    (before, the job restarted from its last checkpoint)."""
    state, work = own_cluster
    out = tmp_path / "start-lost"
    job_id = _submit_outer("start-lost-probe", START_STEPS, START_INNER, ["NVIDIA GeForce RTX 3090", "NVIDIA GeForce RTX 3060 12GB"], out, demo_data)
    assert wait_for_state(job_id, ("succeeded", "failed", "cancelled"), 300) == "succeeded", queue_store().get(job_id).reason
    assert (work / "died-at-start").exists()  # the fault did fire, in the first placement
    events = queue_store().events(job_id)
    started = next(e for e in events if e.target == "running")
    [restart] = [e for e in events if (e.source, e.target) == ("running", "queued")]
    assert "box(es) [1] lost before the boxes met" in restart.reason and "restart 1 of 3" in restart.reason, restart.reason
    assert restart.at - started.at < 120, restart.at - started.at  # not the 600 s the leaders wait for each other
    result = json.loads((out / "zeromix-result.json").read_text())
    assert [h["step"] for h in result["history"]] == list(range(1, START_STEPS + 1)) and result["outer"]["outer_steps"] == START_STEPS // START_INNER
    [left] = result["outer"]["boxes_left"]  # (in the exchange: its delta of steps 1-3 never came)
    assert (left["step"], left["boxes"], left["untrained_steps"]) == (START_INNER, [1], [1, START_INNER]), left
    batch = 32 // queue_store().get(job_id).plan["grad_accum"]  # samples a micro-step, over every card (the job's global batch is 32)
    box_0 = [h["split"] for h in result["history"]]  # (box 1 ended lost: the history is box 0's)
    assert all(0 < split < batch for [split] in box_0[:START_INNER]) and box_0[START_INNER:] == [[batch]] * (START_STEPS - START_INNER), box_0
    assert (events[-1].target, events[-1].reason) == ("succeeded", f"finished; box(es) [1] lost before step {START_INNER}"), events[-1]


def test_a_box_whose_node_is_plugged_back_in_rejoins_and_stops_with_the_others_where_its_job_is_moved(own_cluster, tmp_path, demo_data):
    """desk/0 (box 0) and closet/0 (box 1) train with an outer step every MOVED_INNER steps; closet is unplugged (every
    process of it killed). Box 0 goes on alone; Ray declares the node dead some seconds later, and the box's new ranks,
    made at once, die with it before they run: the driver makes them again, and they wait until the node is plugged
    back in (`zeromix up` starts a stopped node of a simulated homelab) and Ray places the job's card there again.
    They ask back in; meanwhile the job's user moves it (`zeromix move`), so box 1 is let in at the outer step where
    the job stops: it learns that there and stops with the others, training no step (alone, it would have trained on
    and met nobody at its next outer step, failing the job). The job is placed again, resumes from that outer step and
    ends every step once."""
    state, work = own_cluster
    out, (waiting, release) = tmp_path / "box-back-moved", held(work, "box-back-moved-probe")
    job_id = _submit_outer("box-back-moved-probe", MOVED_STEPS, MOVED_INNER, ["NVIDIA GeForce RTX 3090", "NVIDIA GeForce RTX 3060 12GB"], out, demo_data)
    wait_until((work / "release-unplug.waiting").exists, 240, f"the job held before step {UNPLUG_HOLD}")
    assert [(b["node"], b["ranks"]) for b in queue_store().get(job_id).plan["outer"]["boxes"]] == [("desk", 1), ("closet", 1)]
    assert unplug(state.cluster_id, "closet") > 0
    (work / "release-unplug").touch()
    wait_until(waiting.exists, 240, f"box 0 held before step {MOVED_HOLD}, closet's box left out")
    back = zeromix("up", "--simulate", state.cluster_file, env=faults_env(*(work / "faults").read_text().splitlines()) | QUICK_NODE_DEATH)
    assert "node closet was not running (its processes are gone): started it again" in back.stdout, back.stdout
    _asking_back_in(state, job_id)
    assert "stops at its next step with a checkpoint" in zeromix("move", job_id).stdout
    release.touch()
    assert wait_for_state(job_id, ("succeeded", "failed", "cancelled"), 400) == "succeeded", queue_store().get(job_id).reason
    stop_at = (MOVED_HOLD // MOVED_INNER + 1) * MOVED_INNER  # the outer step after the move was asked, where box 1 is let in
    events = queue_store().events(job_id)
    assert [e.target for e in events] == ["queued", "placing", "running", "queued", "placing", "running", "succeeded"], [(e.target, e.reason) for e in events]
    moved = next(e for e in events if (e.source, e.target) == ("running", "queued"))
    assert moved.reason.startswith(f"moved: stopped after step {stop_at} of {MOVED_STEPS} with a checkpoint"), moved.reason
    result = json.loads((out / "zeromix-result.json").read_text())
    assert result["resumed_from"] == f"step-{stop_at}" and [h["step"] for h in result["history"]] == list(range(stop_at + 1, MOVED_STEPS + 1))
    assert all(min(h["tokens"]) > 0 for h in result["history"])  # the new placement: every box trains
    from orchestrator.launch import jobs_client

    first = jobs_client(state).get_job_logs(job_id)  # the first placement's Ray job (`zeromix logs` shows the last one's)
    assert "box 1 (closet/0) was lost" in first and f"let back in with the global weights of step {stop_at}, the job stops there" in first, first[-3000:]


def test_a_node_unplugged_mid_training_is_survived_on_the_cards_left(own_cluster, tmp_path, demo_data):
    """The job runs on desk/0 (RTX 3090) and closet/0 (RTX 3060); desk goes away after a checkpoint, while the job
    is held before step HOLD_AT. The job notices, is placed again on closet/0 and attic/0 (GTX 1080 Ti, so fp32),
    resumes from its checkpoint (through the universal form), and finishes with every requested step and a loss as
    low as a run never interrupted."""
    state, work = own_cluster
    waiting, release = held(work, "unplug-probe")
    spec = ["jobs/examples/tiny-llama-scratch.yaml", "--set", f"dataset.path={demo_data['pretrain']}", "--set", f"max_steps={STEPS}", "--set", "report_to=[]",
            "--set", f"checkpoint_every={EVERY}", "--set", f"gpus.models=[{', '.join(MODELS)}]"]
    job_id = submitted_id(zeromix("submit", *spec, "--set", "name=unplug-probe", "--set", f"output_dir={tmp_path / 'unplugged'}").stdout)
    wait_for_state(job_id, ("running",), 120)
    assert set(queue_store().get(job_id).cards) == {"desk/0", "closet/0"}
    wait_until(waiting.exists, 180, f"the job held before step {HOLD_AT}")
    assert (tmp_path / "unplugged" / "checkpoints" / "latest").read_text() == f"step-{EVERY}"
    starting = _reserve(state, "desk", 1)  # the cards of a job not started yet, on the node about to go
    assert unplug(state.cluster_id, "desk") > 0
    release.touch()  # the ranks left go on (into a collective whose peer is gone); the job placed again passes freely
    _starts_as_lost(*starting)

    assert wait_for_state(job_id, ("succeeded", "failed", "cancelled"), 400) == "succeeded", queue_store().get(job_id).reason
    events = queue_store().events(job_id)
    restart = next(e for e in events if (e.source, e.target) == ("running", "queued"))
    assert "was lost" in restart.reason and "restart 1 of 3" in restart.reason, restart.reason
    record = queue_store().get(job_id)
    assert set(record.cards) == {"closet/0", "attic/0"} and record.attempts >= 2
    result = json.loads((tmp_path / "unplugged" / "zeromix-result.json").read_text())
    assert result["steps"] == STEPS and {r["card"] for r in result["ranks"]} == {"closet/0", "attic/0"}
    resumed_at = result["history"][0]["step"] - 1  # this run took over from a checkpoint: not every step again
    assert resumed_at > 0 and resumed_at % EVERY == 0 and len(result["history"]) == STEPS - resumed_at
    assert result["resumed_from"] == f"step-{resumed_at}"
    log = zeromix("logs", job_id).stdout
    assert "through its universal form" in log

    # the same job never interrupted, on the cards left: its final model does as well on the training data
    _train_straight_through(spec, tmp_path / "straight", record.cards)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "straight" / "final")
    records = [json.loads(line) for line in demo_data["pretrain"].read_text().splitlines()[:256]]
    dataset = {"format": "jsonl", "text_field": "text"}
    losses = [mean_token_loss(AutoModelForCausalLM.from_pretrained(tmp_path / run / "final"), records, dataset, tokenizer)
              for run in ("unplugged", "straight")]
    assert losses[0] == pytest.approx(losses[1], abs=0.05), losses


def _train_straight_through(spec: list[str], out: Path, cards: list[str]) -> None:
    """The job planned as the scheduler plans it on the cards left, trained from start to end by the training loop
    its ranks run, as local processes (workers/local_launch.py): a cluster job more would add some 20 s of its ranks'
    start-up to the suite, for the same maths."""
    from orchestrator import registry
    from orchestrator.client import job_and_facts
    from orchestrator.jobspec import total_steps
    from orchestrator.launch import train_config
    from orchestrator.planner import make_plan
    from workers.local_launch import run_local_ranks

    overrides = [value for flag, value in zip(spec[1::2], spec[2::2]) if flag == "--set"]
    job, facts = job_and_facts(str(REPO / spec[0]), [*overrides, f"output_dir={out}"])
    plan = make_plan(job, facts, registry.snapshot().with_holders({}), total_steps(job))
    assert sorted(r.card.card_id for r in plan.ranks) == sorted(cards), plan.ranks  # the cards the resumed run ended on
    run_local_ranks(train_config(job, plan, "straight"))


def _reserve(state, node: str, index: int) -> tuple:
    """A placement group holding one card, as the scheduler reserves a job's cards before its driver starts."""
    from ray.util.placement_group import placement_group

    from orchestrator import cluster_runtime
    from orchestrator.inventory import card_resource

    cluster_runtime.connect(state)
    card = {"node": node, "index": index, "resource": card_resource(node, index)}
    group = placement_group([{"CPU": 1, "GPU": 1, card["resource"]: 1}], name=f"starting-{node}-{index}")
    assert group.wait(timeout_seconds=60), f"{node}/{index} could not be reserved"
    return group, card


def _starts_as_lost(group, card) -> None:
    """A job's driver starting after Ray declared its card's node dead: its rank is lost (the scheduler places the
    job again), where it used to wait 60 s for the card and then fail the job for good (Ray's GetTimeoutError).
    (Started before that, its ranks die with the node: WorkerGroup._answers.)"""
    import ray
    from ray.util.placement_group import remove_placement_group

    from orchestrator.worker_group import RankFailed, wait_for_cards

    wait_until(lambda: not any(n["Alive"] and card["resource"] in n["Resources"] for n in ray.nodes()), 120, f"Ray declares {card['node']} dead")
    with pytest.raises(RankFailed) as lost:
        wait_for_cards(group, [card], timeout_s=60)
    assert lost.value.kind == "lost", lost.value
    assert str(lost.value) == f"rank 0 on {card['node']}/{card['index']} failed: its node {card['node']} left after the job's cards were reserved"
    remove_placement_group(group)


def test_a_head_restarted_under_a_running_job_requeues_it_and_it_resumes_from_its_checkpoint(own_cluster, tmp_path, demo_data):
    """The whole cluster goes down (a power cut on the head) while a job runs, and comes back with `zeromix up`.
    The queue survives in ZEROMIX_HOME; the scheduler finds the job `running` but unknown to the new Ray, queues
    it again, and it resumes from its last checkpoint: nothing lost, nothing run twice at once."""
    import ray

    from orchestrator import cluster_runtime

    state, work = own_cluster
    waiting, release = held(work, "restart-probe")
    spec = ["jobs/examples/tiny-llama-scratch.yaml", "--set", f"dataset.path={demo_data['pretrain']}", "--set", f"max_steps={RESTART_STEPS}", "--set", "report_to=[]",
            "--set", f"checkpoint_every={EVERY}", "--set", f"gpus.models=[{', '.join(MODELS)}]", "--set", f"output_dir={tmp_path / 'out'}",
            "--set", "name=restart-probe"]
    job_id = submitted_id(zeromix("submit", *spec).stdout)
    wait_for_state(job_id, ("running",), 120)
    wait_until(waiting.exists, 180, f"the job held before step {HOLD_AT}")
    assert (tmp_path / "out" / "checkpoints" / "latest").read_text() == f"step-{EVERY}"
    ray.shutdown()
    zeromix("down")
    release.touch()  # (the cluster started again below has no fault armed)
    assert queue_store().get(job_id).state == "running"  # as the queue last saw it
    zeromix("up", "--simulate", state.cluster_file, timeout=240)
    assert cluster_runtime.load_state().cluster_id != state.cluster_id

    assert wait_for_state(job_id, ("succeeded", "failed", "cancelled"), 400) == "succeeded", queue_store().get(job_id).reason
    requeued = [e for e in queue_store().events(job_id) if (e.source, e.target) == ("running", "queued")]
    assert len(requeued) == 1 and "Ray has no record of it" in requeued[0].reason
    result = json.loads((tmp_path / "out" / "zeromix-result.json").read_text())
    resumed_at = result["history"][0]["step"] - 1
    assert result["steps"] == RESTART_STEPS and resumed_at > 0 and resumed_at % EVERY == 0
    assert [h["step"] for h in result["history"]] == list(range(resumed_at + 1, RESTART_STEPS + 1))
