"""The simulator replays a trace through the real queue, scheduler, policies and planner in virtual time."""

import json
import re

import pytest

from orchestrator.cluster_config import load_cluster
from orchestrator.errors import InputError
from orchestrator.inventory import snapshot_from_config
from orchestrator.scheduler import trace
from orchestrator.scheduler.policies import policy
from orchestrator.scheduler.simulate import simulate
from tests.conftest import REPO, cli

HOMELAB = snapshot_from_config(load_cluster(REPO / "cluster.yaml"))


def test_the_same_trace_replayed_twice_gives_identical_results():
    jobs = trace.generate(40, 6.0, seed=7)
    assert jobs == trace.generate(40, 6.0, seed=7) and jobs != trace.generate(40, 6.0, seed=8)
    first, second = (simulate(HOMELAB, jobs, policy("gain")) for _ in range(2))
    assert [(j.id, j.cards, j.started_at, j.ended_at) for j in first.jobs] == [(j.id, j.cards, j.started_at, j.ended_at) for j in second.jobs]


@pytest.mark.parametrize("name", ["gain", "fifo-first-fit", "max-min-fairness"])
def test_every_job_runs_once_and_no_card_is_ever_shared(name):
    jobs = trace.generate(40, 6.0, seed=3)
    result = simulate(HOMELAB, jobs, policy(name))
    assert sorted(j.id for j in result.jobs) == sorted(j.job_id for j in jobs if j.job_id not in result.rejected)
    assert all(j.state == "succeeded" for j in result.jobs) and not result.unfinished
    for card in result.card_ids:  # intervals on one card never overlap
        spans = sorted((s, e) for c, _, s, e in result.occupancy() if c == card)
        assert all(prev_end <= start for (_, prev_end), (start, _) in zip(spans, spans[1:])), card
    across = [j for j in result.jobs if len({r["node"] for r in j.plan["ranks"]}) > 1]
    stopped_at = {e.job_id: int(re.search(r"stopped after step (\d+) of", e.reason)[1]) for e in result.events
                  if e.source == "running" and e.reason.startswith("moved:")}  # the last move of each job moved
    for j in result.jobs:  # a job runs for its steps times the step time the planner gave for the cards it got ...
        steps = j.total_steps - stopped_at.get(j.id, 0)  # (after a move, the steps it had left)
        alone = steps * j.plan["est_step_s"]
        if j in across:  # ... and longer while it shares its boxes' network links with other jobs across boxes
            assert alone * 0.99 <= j.ended_at - j.started_at <= alone + steps * j.plan["est_comm_s"] * (len(across) - 1) * 1.01
        else:
            assert j.ended_at - j.started_at == pytest.approx(alone, rel=0.01)
        assert j.started_at >= j.submitted_at


def test_the_heterogeneity_aware_policy_beats_type_blind_first_fit():
    jobs = trace.generate(200, 6.0, seed=1)  # bench/scheduler.py's trace
    gain, fifo = (simulate(HOMELAB, jobs, policy(n)) for n in ("gain", "fifo-first-fit"))
    assert gain.avg_jct_s < 0.67 * fifo.avg_jct_s and gain.makespan_s < fifo.makespan_s


def test_a_trace_row_with_a_bad_value_is_one_line_naming_the_line_and_column(tmp_path):
    path = tmp_path / "trace.csv"
    trace.write(trace.generate(3, 6.0, 1), path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1], lines[2].replace(",lora,", ",dpo,").replace(",full,", ",dpo,")]))
    with pytest.raises(InputError, match=r"line 3: method='dpo' is not allowed"):
        trace.read(path)
    path.write_text("\n".join([lines[0], lines[1].replace("qwen", "gwen").replace("llama", "lama").replace("gemma", "jemma").replace("phi", "fi").replace("mistral", "mistrel")]))
    with pytest.raises(InputError, match=r"line 2: model=.* is not allowed; one of gemma-2-2b"):
        trace.read(path)


def test_the_simulate_command_prints_the_figures_and_draws_the_plot(tmp_path):
    cli("make-trace", "--jobs", "30", "--seed", "2", "--out", str(tmp_path / "trace.csv"))
    done = cli("simulate", "--trace", str(tmp_path / "trace.csv"), "--png", str(tmp_path / "sim.png"), "--json")
    report = json.loads(done.stdout.split("\nplot:")[0])
    assert [r["policy"] for r in report["results"]] == ["gain", "fifo-first-fit", "max-min-fairness"]
    assert all(r["avg_jct_h"] > 0 and r["makespan_h"] > 0 and set(r["utilisation"]) == {"attic/0", "attic/1", "desk/0", "desk/1", "closet/0"}
               for r in report["results"])
    png = (tmp_path / "sim.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    bad = cli("simulate", "--trace", str(tmp_path / "trace.csv"), "--policy", "random", check=False)
    assert bad.returncode == 2 and "--policy='random' is not allowed" in bad.stderr


def test_a_run_costs_start_weights_checkpoints_and_an_estimate_error_the_policy_never_sees():
    """With the measured costs a job's run is its start, reading its weights, its checkpoints and its steps at the
    planner's step time times a drawn error; the scheduler still only knows the estimate (its est_end)."""
    from orchestrator.scheduler.costs import Costs

    one = [trace.TraceJob("solo", 0.0, "llama-3.2-1b", "full", 1024, 16, 3000, 1, 0)]
    costs = Costs.measured(seed=4)
    result = simulate(HOMELAB, one, policy("gain"), costs)
    (job,) = result.jobs
    estimate = job.total_steps * job.plan["est_step_s"]  # the summary's step time has 3 significant digits
    assert job.est_end - job.started_at == pytest.approx(estimate, rel=0.005)
    took = job.ended_at - job.started_at
    assert abs(took / (job.est_end - job.started_at) - 1) > 0.01 and took > costs.start_s
    assert took == pytest.approx(result.alone_s["solo"], rel=1e-6) and result.slowdowns == [pytest.approx(1.0)]
    saves = (took - costs.start_s) // costs.checkpoint_every_s
    assert saves >= 1  # a full fine-tune of a 1B model for hours: at least one checkpoint charged
    assert simulate(HOMELAB, one, policy("gain"), Costs.measured(seed=4)).jobs[0].ended_at == job.ended_at  # drawn from the seed


def test_the_simulator_names_every_job_that_never_ran_and_why():
    """A policy that never places anything: every job is reported with the scheduler's last reason, and the CLI's
    table lists them."""
    from orchestrator.cli import render
    from orchestrator.scheduler.policies import Decision

    class Never:
        name = "never"

        def allocate(self, x):
            return Decision(waiting={job.id: "this policy starts nothing" for job in x.queue})

    jobs = trace.generate(3, 6.0, seed=5)
    result = simulate(HOMELAB, jobs, Never())
    assert result.never_ran == {j.job_id: "this policy starts nothing" for j in jobs}
    with render.console.capture() as shown:
        render.simulation([render.sim_row(result)], len(jobs), "cluster.yaml", result.costs)
    assert all(f"never: {j.job_id} never ran: this policy starts nothing" in shown.get() for j in jobs)


@pytest.mark.parametrize("family", list(trace.FAMILIES))
def test_no_job_waits_past_the_bound_the_readme_states(family):
    """README, "How long a job can wait": a job starts by its due time, submitted + DUE x (its run alone on its best
    cards + the work ahead of it when it arrived, over all the cards), or, if later, once it has waited PATIENCE x
    its run (the longest the 25% rule holds it); plus what it then waits behind: the rest of the runs holding cards
    at that time, and the runs of due jobs ahead of it. Measured with what a real cluster charges (runs longer than
    the estimates the policy sees). The policy before the due rule broke it by 1 to 80 h on two of these
    families."""
    from orchestrator.scheduler.policies.gain import DUE, PATIENCE
    from orchestrator.scheduler.costs import Costs

    result = simulate(HOMELAB, trace.family(family, 200, seed=11), policy("gain"), Costs.measured(seed=11))
    assert not result.never_ran and not result.unfinished
    due = {j.id: j.submitted_at + DUE * (result.alone_s[j.id] + result.ahead_s[j.id]) for j in result.jobs}
    late = []
    for job in result.jobs:
        at = max(due[job.id], job.submitted_at + PATIENCE * result.alone_s[job.id])
        left = max((k.ended_at - at for k in result.jobs if k.started_at <= at < k.ended_at), default=0.0)
        ahead = sum(k.ended_at - k.started_at for k in result.jobs if due[k.id] < at < k.started_at <= job.started_at)
        if job.started_at > at + left + ahead + 1.0:
            late.append(f"{job.id} started {(job.started_at - at - left - ahead) / 3600:.1f} h past its bound")
    assert not late, late


def test_jobs_whose_host_ram_together_exceeds_a_box_do_not_run_there_together():
    """Two full fine-tunes of gemma-2-2b, one card each: the planner offloads their optimizer states (about 58 GiB of
    host RAM each, estimates), so each fits desk (64 GB) alone, not both at once. The second waits, saying why, and
    starts when the first ends. Two llama-3.2-1b fine-tunes (about 28 GiB each) share the box."""
    from orchestrator.queue import QueueStore
    from orchestrator.scheduler import Scheduler, spec_record
    from orchestrator.scheduler.simulate import SimulatedLaunch, VirtualClock

    def pair(model):
        return [trace.TraceJob(f"{model[:5]}-{i}", 0.0, model, "full", 512, 8, 200, 1, 0) for i in range(2)]

    for name in ("gain", "fifo-first-fit"):  # gain counts the RAM as it places; for fifo, the scheduler's own check holds
        result = simulate(HOMELAB, pair("gemma-2-2b"), policy(name))
        first, second = sorted(result.jobs, key=lambda j: j.started_at)
        assert {first.cards[0].split("/")[0], second.cards[0].split("/")[0]} == {"desk"}, name
        assert second.started_at >= first.ended_at, name  # never together on desk
        assert all(j.plan["est_host_gib"]["desk"] > 30 for j in result.jobs)
    small = simulate(HOMELAB, pair("llama-3.2-1b"), policy("gain"))
    assert [j.started_at for j in small.jobs] == [0.0, 0.0]  # together: 2 x 28 GiB fit in 60

    clock = VirtualClock(0.0)  # the reason, as `zeromix queue` shows it while the first runs
    store = QueueStore(":memory:", clock)
    scheduler = Scheduler(store, SimulatedLaunch(HOMELAB, clock), policy("gain"), clock)
    for job in pair("gemma-2-2b"):
        store.submit(job.job_id, job.spec().name, spec_record(job.spec()), job.steps, job.priority, at=0.0)
    scheduler.tick()
    (waiting,) = store.jobs(("queued",))
    assert waiting.reason.startswith("host RAM on desk: it needs about 58 GiB beside job(s) gemma-") and "of the 60 GiB" in waiting.reason


def test_a_moved_job_stops_after_its_checkpoint_and_its_next_placement_runs_only_its_rest():
    """The simulator's side of a move (Decision.moves; `zeromix move` on a real cluster). A box of a 4090 and a
    1080 Ti: a LoRA job holds the 4090 for 8 h; an fp32 fine-tune that would take 3 h there and 11.3 h on the
    1080 Ti starts on the 1080 Ti (waiting would end it later). A policy that moves it when the 4090 frees (gain,
    plus that one move) gets it back on the 4090 at once (a moved job goes first), with only its rest to run and
    the measured costs of a checkpoint, a start and a load; it is not counted as a restart."""
    from orchestrator.scheduler.policies import Move
    from orchestrator.scheduler.policies.gain import Gain

    class GainMovingLong(Gain):
        def allocate(self, x):
            decision = super().allocate(x)
            if "desk/0" in decision_free(x, decision) and any(r.id == "long" and r.cards == ("desk/1",) for r in x.running):
                decision.moves = {"long": Move("the 4090 is free (test)", ("desk/0",))}
            return decision

    def decision_free(x, decision):
        return x.free_ids - {r.card.card_id for a in decision.assignments for r in a.plan.ranks}

    from orchestrator.cluster_config import ClusterConfig
    from orchestrator.scheduler.costs import Costs
    from orchestrator.scheduler.table import QueuedJob, ThroughputTable

    box = snapshot_from_config(ClusterConfig.model_validate({"head": {"address": "10.0.0.1"}, "nodes": [
        {"name": "desk", "address": "10.0.0.1", "ram_gb": 64, "cpus": 8,
         "gpus": [{"model": "NVIDIA GeForce RTX 4090"}, {"model": "NVIDIA GeForce GTX 1080 Ti"}]}]}))
    table = ThroughputTable(box)

    def steps_for(job: trace.TraceJob, card: str, hours: float) -> int:
        queued = QueuedJob(job.job_id, job.spec(), 0, 0.0, job.steps)
        return round(hours * 3600 / table.plan(queued, frozenset({card})).plan.step.step_s)

    first = trace.TraceJob("first", 0.0, "qwen2.5-0.5b", "lora", 512, 8, 1, 1, 0)
    first = trace.TraceJob(**{**first.__dict__, "steps": steps_for(first, "desk/0", 8.0)})
    long = trace.TraceJob("long", 60.0, "llama-3.2-1b", "full", 512, 8, 1, 1, 0, precision="fp32")
    long = trace.TraceJob(**{**long.__dict__, "steps": steps_for(long, "desk/0", 3.0)})
    result = simulate(box, [first, long], GainMovingLong(), Costs.measured(seed=1, estimate_sigma=0.0))

    moved = {j.id: j for j in result.jobs}["long"]
    assert moved.state == "succeeded" and moved.cards == ("desk/0",)  # it ended on the 4090
    reasons = [e.reason for e in result.events if e.job_id == "long" and (e.source, e.target) == ("running", "queued")]
    assert len(reasons) == 1 and reasons[0].startswith("moved: stopped after step ")
    assert reasons[0].endswith("because the 4090 is free (test); placed again, resuming there") and result.moves == 1
    on_the_1080ti_s = long.steps / steps_for(long, "desk/1", 1.0) * 3600  # its whole run there (estimate)
    jct = moved.ended_at - long.arrival_s
    assert 8 * 3600 < jct < 0.85 * on_the_1080ti_s  # after the first job's 8 h, well before its run on the 1080 Ti
    assert moved.ended_at - moved.started_at < 0.5 * 3 * 3600  # the 4090 ran only the rest: about 1 h and the move


def test_jobs_across_boxes_share_each_boxs_network_link():
    """Two full fine-tunes, each on one card of each of two boxes on 1 GbE: while both run, each link carries both
    jobs' collectives, so each step's communication takes twice as long; when one ends the other speeds up again.
    A job inside one box is not slowed."""
    from types import SimpleNamespace

    from orchestrator.model_facts import facts_from_config
    from orchestrator.planner import make_plan
    from orchestrator.scheduler.simulate import SimulatedLaunch, VirtualClock
    from tests.helpers import model_config, pool, scenario

    two = pool(("a", 64, ["RTX 3090", "RTX 4090", "RTX 3060 12GB"]), ("b", 64, ["RTX 3090", "RTX 4090"]))
    qwen = facts_from_config(model_config("qwen2.5-0.5b"))

    def plan(models: list[str], count: int):
        return make_plan(scenario(method="full", seq_len=512, global_batch_size=8, gpus={"count": count, "models": models},
                                  sync={"mode": "synchronous"}), qwen, two, 100)  # (collectives across the link every step)

    first, second, inside = plan(["RTX 3090"], 2), plan(["RTX 4090"], 2), plan(["RTX 3060 12GB"], 1)
    assert [{r.card.node for r in p.ranks} for p in (first, second, inside)] == [{"a", "b"}, {"a", "b"}, {"a"}]
    assert first.step.comm_s > 0.1 * first.step.step_s  # the link matters to these jobs
    clock = VirtualClock(0.0)
    launch = SimulatedLaunch(two, clock)
    for job_id, p in (("first", first), ("second", second), ("inside", inside)):
        launch.start(SimpleNamespace(id=job_id), p)
    alone = {job_id: 100 * p.step.step_s for job_id, p in (("first", first), ("second", second), ("inside", inside))}
    ends = {job_id: end for job_id, (_, end) in launch.running.items()}
    assert ends["first"] == pytest.approx(100 * (first.step.step_s + first.step.comm_s))
    assert ends["second"] == pytest.approx(100 * (second.step.step_s + second.step.comm_s))
    assert ends["inside"] == pytest.approx(alone["inside"])
    clock.now = ends["inside"]  # the job inside one box ends: it shared no link, so nobody's pace changes
    launch.stop("inside")
    assert launch.running["first"][1] == pytest.approx(ends["first"])
    # the second job leaves halfway through the first's shared run: the first runs the rest at its own pace
    clock.now = half = ends["first"] / 2
    launch.stop("second")
    done_alone = half * first.step.step_s / (first.step.step_s + first.step.comm_s)  # its own seconds done by then
    assert launch.running["first"][1] == pytest.approx(half + alone["first"] - done_alone)
