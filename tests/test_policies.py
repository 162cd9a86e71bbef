"""The placement policies on the questions a shared homelab raises, with real model sizes and the real planner."""

import dataclasses
import re

import pytest

from orchestrator.cluster_config import ClusterConfig
from orchestrator.inventory import snapshot_from_config
from orchestrator.planner import make_plan
from orchestrator.scheduler.policies import PolicyInput, RunningJob, policy
from orchestrator.scheduler.table import QueuedJob, ThroughputTable
from orchestrator.scheduler.trace import TraceJob


def pool(*boxes: tuple[str, list[str]]):
    nodes = [{"name": name, "address": f"10.0.0.{i + 1}", "ram_gb": 64, "cpus": 8, "gpus": [{"model": m} for m in models]}
             for i, (name, models) in enumerate(boxes)]
    return snapshot_from_config(ClusterConfig.model_validate({"head": {"address": "10.0.0.1"}, "nodes": nodes}))


def job(job_id: str, steps: int = 200, submitted_at: float = 0.0, priority: int = 0, gpus: int = 1, method: str = "lora",
        model: str = "qwen2.5-0.5b", models: list[str] | None = None, **fields) -> QueuedJob:
    spec = TraceJob(job_id, submitted_at, model, method, 512, 8, steps, gpus, priority).spec()
    record = spec.model_dump(exclude_unset=True)
    record["gpus"]["models"] = models
    return QueuedJob(job_id, spec.model_validate({**record, **fields}), priority, submitted_at, steps)


def decide(name: str, cluster, queue, running=(), now: float = 0.0):
    held = {card for r in running for card in r.cards}
    x = PolicyInput(now, tuple(queue), tuple(c for c in cluster.cards if c.card_id not in held), tuple(running), ThroughputTable(cluster))
    decision = policy(name).allocate(x)
    return {a.job_id: [r.card.card_id for r in a.plan.ranks] for a in decision.assignments}, decision, x


def test_the_1080ti_goes_to_the_fp32_job_and_the_3090_to_the_bf16_job():
    box = pool(("attic", ["NVIDIA GeForce RTX 3090", "NVIDIA GeForce GTX 1080 Ti"]))
    fp32 = job("fp32-lora", steps=200, precision="fp32")  # first in the queue, and faster on the 3090 too
    bf16 = job("bf16-lora", steps=2000, submitted_at=1.0)
    cards, decision, x = decide("gain", box, [fp32, bf16])
    assert cards == {"fp32-lora": ["attic/1"], "bf16-lora": ["attic/0"]}
    plans = {a.job_id: a.plan for a in decision.assignments}
    assert (plans["fp32-lora"].precision, plans["bf16-lora"].precision) == ("fp32", "bf16")  # planned on the cards each got
    # Why: the 1080 Ti keeps a third of the fp32 job's speed but a sixth of the bf16 job's (normalised, estimates).
    on_1080 = {j.id: x.table.normalised(j, x.table.plan(j, frozenset({"attic/1"}))) for j in (fp32, bf16)}
    assert on_1080["fp32-lora"] > 1.5 * on_1080["bf16-lora"]
    # Type-blind first fit hands the first card listed to the first job.
    assert decide("fifo-first-fit", box, [fp32, bf16])[0] == {"fp32-lora": ["attic/0"], "bf16-lora": ["attic/1"]}


def test_a_one_card_job_takes_the_spare_card_of_a_part_used_box_not_half_of_a_free_pair():
    boxes = pool(("desk", ["NVIDIA GeForce RTX 4090"] * 2), ("attic", ["NVIDIA GeForce RTX 4090"] * 2))
    running = [RunningJob("other", ("attic/0",), 10_000.0)]
    assert decide("gain", boxes, [job("small")], running)[0] == {"small": ["attic/1"]}
    assert decide("fifo-first-fit", boxes, [job("small")], running)[0] == {"small": ["desk/0"]}  # splits desk's pair


def test_a_short_job_backfills_a_gap_but_a_long_one_may_not_delay_the_job_at_the_head():
    box = pool(("desk", ["NVIDIA GeForce RTX 3090"] * 2))
    running = [RunningJob("first", ("desk/0",), 3600.0)]  # frees desk/0 in an hour (estimate)
    big = job("big", gpus=2, steps=500, priority=5)  # needs both cards: waits, and reserves them from the hour on
    table = ThroughputTable(box)
    short_steps = int(0.5 * 3600 / table.plan(job("probe"), frozenset({"desk/1"})).plan.step.step_s)
    cards, decision, _ = decide("gain", box, [big, job("short", steps=short_steps)], running)
    assert cards == {"short": ["desk/1"]}  # ends in about 30 min, before big needs the card
    assert decision.waiting["big"].startswith("expected to start about")
    cards, decision, _ = decide("gain", box, [big, job("long", steps=short_steps * 4)], running)
    assert cards == {} and "reserved for job big" in decision.waiting["long"]


def test_a_job_that_has_waited_long_goes_before_a_short_one_that_just_arrived():
    box = pool(("desk", ["NVIDIA GeForce RTX 3090"]))
    long_job = job("long", steps=4000, submitted_at=0.0)
    run_s = ThroughputTable(box).best(long_job).duration_s(4000)
    now = run_s  # it has waited as long as it will run
    cards, decision, _ = decide("gain", box, [long_job, job("short", steps=100, submitted_at=now)], now=now)
    assert cards == {"long": ["desk/0"]} and "needs desk/0" in decision.waiting["short"]


def test_a_low_priority_job_waits_behind_higher_ones_for_a_bounded_time_not_for_ever():
    """AGING_PER_HOUR points an hour: after (10 - -10) / 6 = 3 h 20 min a priority -10 job queues as an equal of
    the priority 10 jobs, and among them it has waited longest. Before that, every newly arrived 10 goes first."""
    from orchestrator.scheduler.policies.gain import AGING_PER_HOUR, DUE

    box = pool(("desk", ["NVIDIA GeForce RTX 3090"]))
    low = job("low", steps=15000, priority=-10, submitted_at=0.0)  # 2 h on the 3090
    equal_after_s = (10 - -10) / AGING_PER_HOUR * 3600
    assert DUE * 2 * 3600 > equal_after_s + 60, "the low job must not be due yet (the due rule would decide, not aging)"
    for now, first in ((equal_after_s - 60, "high"), (equal_after_s + 60, "low")):
        high = job("high", steps=200, priority=10, submitted_at=now - 30)  # a stream of them: one just arrived
        assert decide("gain", box, [low, high], now=now)[0] == {first: ["desk/0"]}


def test_a_job_past_its_due_time_goes_before_a_higher_priority_one():
    """Aging would take (100 - -100) / 6 = 33 hours here; the due rule bounds the wait sooner: a job is due DUE x
    (its run + the work ahead of it) after it was submitted, and a due job goes first whatever its priority."""
    from orchestrator.scheduler.policies.gain import DUE, due_times

    box = pool(("desk", ["NVIDIA GeForce RTX 3090"]))
    low = job("low", steps=200, priority=-100, submitted_at=0.0)
    run_s = ThroughputTable(box).best(low).duration_s(200)
    for now, first in ((DUE * run_s - 60, "high"), (DUE * run_s + 60, "low")):
        high = job("high", steps=200, priority=100, submitted_at=now - 30)
        cards, _, x = decide("gain", box, [low, high], now=now)
        assert due_times(x)["low"] == pytest.approx(DUE * run_s)  # nothing was ahead of it when it came
        assert cards == {first: ["desk/0"]}
    holder = [RunningJob("holder", ("desk/0",), now + 3600, submitted_at=now - 10)]  # came after it; the queue says why low is first
    _, decision, x = decide("gain", box, [low, high], holder, now=now)
    assert x.now >= due_times(x)["low"] and decision.waiting["low"].startswith("due since about")


def test_constraints_hold_and_the_reason_names_who_holds_the_card_until_when():
    boxes = pool(("desk", ["NVIDIA GeForce RTX 3090", "NVIDIA GeForce RTX 2080 Ti"]))
    only_3060 = job("picky", models=["RTX 2080 Ti"])
    running = [RunningJob("holder-1", ("desk/1",), 7200.0)]
    for name in ("gain", "fifo-first-fit", "max-min-fairness"):
        cards, decision, _ = decide(name, boxes, [only_3060], running)
        assert cards == {}, name  # the free 3090 is not a 2080 Ti
        assert "desk/1 held by job holder-1 until about" in decision.waiting["picky"], name


def test_a_job_that_fits_nowhere_says_so_and_holds_nothing():
    boxes = pool(("attic", ["NVIDIA GeForce GTX 1080 Ti"]))
    cards, decision, _ = decide("gain", boxes, [job("huge", model="llama-3.1-8b", method="full", gpus=1)])
    assert cards == {} and decision.waiting["huge"].startswith("fits nowhere in this cluster")


def test_an_unknown_policy_is_one_clear_error():
    from orchestrator.errors import InputError

    with pytest.raises(InputError, match="--policy='lottery' is not allowed; one of gain, fifo-first-fit, max-min-fairness"):
        policy("lottery")


# ------------------------------------------------------------------------------------------ bounded waits (issue 20)
DESK_AND_ATTIC = (("desk", ["NVIDIA GeForce RTX 3090", "NVIDIA GeForce RTX 4090"]), ("attic", ["NVIDIA GeForce GTX 1080 Ti"]))


def test_a_job_waits_for_a_faster_card_only_counting_the_jobs_ahead_that_wait_for_it_too():
    """Three bf16 jobs whose best card is the busy 4090 (1.7x the 3090 for them). The first waits for it; the
    second would end later in line behind the first than on the free 3090 now, so it starts there (it used to
    wait too, as if it alone would get the 4090, and the 3090 sat idle)."""
    box = pool(*DESK_AND_ATTIC)
    jobs = [job(f"j{i}", steps=2000, submitted_at=float(i)) for i in range(3)]
    on_4090 = ThroughputTable(box).plan(jobs[0], frozenset({"desk/1"})).duration_s(2000)
    running = [RunningJob("holder", ("desk/1",), 0.1 * on_4090)]
    cards, decision, _ = decide("gain", box, jobs, running, now=10.0)
    assert cards == {"j1": ["desk/0"]}
    assert decision.waiting["j0"].startswith("waits for faster cards")
    assert "waits for faster cards" not in decision.waiting["j2"]


def test_a_job_does_not_wait_for_a_card_whose_job_has_run_past_its_estimated_end():
    """As above, with the 4090's job an hour past its estimated end (the estimate was off): when it frees is not known
    (its end by the estimate, now, would have every bf16 job wait for it each round while the 3090 sat idle), so the
    first job starts on the free 3090. A job waiting for such a card reads that its job is past its estimated end,
    not "until about" a time gone by."""
    box = pool(*DESK_AND_ATTIC)
    first = job("j0", steps=2000)
    cards, decision, _ = decide("gain", box, [first], [RunningJob("holder", ("desk/1",), 6400.0)], now=10000.0)
    assert cards == {"j0": ["desk/0"]}
    _, decision, _ = decide("gain", box, [first], [RunningJob("holder", ("desk/1",), 6400.0), RunningJob("other", ("desk/0",), 20000.0)], now=10000.0)
    assert "desk/1 held by job holder past its estimated end, 01:46 (estimate)" in decision.waiting["j0"]  # not "until about 01:46"
    cards, decision, _ = decide("gain", box, [first], [RunningJob("holder", ("desk/1",), 10100.0)], now=10000.0)
    assert cards == {} and "waits for faster cards" in decision.waiting["j0"]  # (ends in 100 s by the estimate)


def test_a_job_below_a_quarter_of_its_best_speed_waits_for_its_best_card_only_while_that_ends_it_sooner():
    """On the 1080 Ti a bf16 job keeps 11% of its 4090 speed. With the 4090 free again in twice its run there it
    waits for it; with the 4090 held for a week it takes the 1080 Ti at once: nine times its run there ends it
    sooner than a week's wait (in the bursts family 8 of 20 cards sat idle for hours while 70 short jobs queued for
    the 24 GB ones). A job just moved (stopped with a checkpoint to be placed again) takes the free cards at once."""
    box = pool(("desk", ["NVIDIA GeForce RTX 4090"]), ("attic", ["NVIDIA GeForce GTX 1080 Ti"]))
    late = job("late", steps=200)
    best_s = ThroughputTable(box).best(late).duration_s(200)
    running = [RunningJob("soon", ("desk/0",), 60.0 + 2 * best_s)]
    cards, decision, _ = decide("gain", box, [late], running, now=60.0)
    assert cards == {} and "of its best speed (estimate); it waits for better ones, it would end about" in decision.waiting["late"]
    assert decide("gain", box, [late], [RunningJob("week-long", ("desk/0",), 7 * 24 * 3600.0)], now=60.0)[0] == {"late": ["attic/0"]}
    moved = dataclasses.replace(late, moved=True)  # stopped with a checkpoint to be placed now: it does not wait
    assert decide("gain", box, [moved], running, now=60.0)[0] == {"late": ["attic/0"]}


def test_backfill_takes_a_reserved_card_when_that_is_faster_and_ends_before_it_is_needed():
    """The two-card job at the head reserves desk's pair from when its 3090 frees (in 2 hours). A short bf16 job
    ends on the reserved 4090 well before then: it goes there, not to the 1080 Ti nobody reserved (11% speed)."""
    box = pool(*DESK_AND_ATTIC)
    running = [RunningJob("first", ("desk/0",), 7200.0)]
    pair = job("pair", gpus=2, steps=500, priority=5, models=["RTX 3090", "RTX 4090"])
    cards, decision, _ = decide("gain", box, [pair, job("short", steps=200)], running)
    assert cards == {"short": ["desk/1"]} and decision.waiting["pair"].startswith("expected to start about")


def test_a_card_left_free_goes_to_a_job_beyond_the_first_32_that_fits_it():
    """32 two-card jobs ahead (a higher priority) cannot use the one free card; the 33rd, a one-card job, takes it
    (it used to wait its turn while the card sat idle)."""
    box = pool(("desk", ["NVIDIA GeForce RTX 3090"] * 2))
    running = [RunningJob("long", ("desk/0",), 100 * 3600.0)]
    pairs = [job(f"pair{i}", gpus=2, steps=20000, submitted_at=float(i), priority=1) for i in range(32)]
    assert decide("gain", box, [*pairs, job("one", steps=200, submitted_at=40.0)], running, now=50.0)[0] == {"one": ["desk/1"]}


def test_a_plan_made_on_more_free_cards_is_reused_only_where_a_fresh_plan_would_agree():
    """Within a round the free cards only shrink; the table answers from a larger free set when that plan's cards
    are all still free. Each answer equals what the planner gives on those cards from a cold table."""
    boxes = pool(("desk", ["NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 3090"]), ("attic", ["NVIDIA GeForce RTX 2080 Ti", "NVIDIA GeForce GTX 1080 Ti"]))
    everything = frozenset(c.card_id for c in boxes.cards)
    for queued in (job("lora"), job("pair", gpus=2, method="full", model="llama-3.2-1b"), job("fp32", precision="fp32")):
        warm = ThroughputTable(boxes)
        chosen = set(warm.plan(queued, everything).cards)
        for gone in sorted(everything):
            free = everything - {gone}
            fresh = ThroughputTable(boxes).plan(queued, free)
            again = warm.plan(queued, free)
            assert (again.cards, again.plan.step.step_s) == (fresh.cards, fresh.plan.step.step_s), (queued.id, gone)
            assert gone in chosen or again.plan is warm.plan(queued, everything).plan  # reused, not planned again


def test_a_groups_tuning_is_remembered_for_jobs_alike_and_every_plan_is_what_a_fresh_table_gives():
    """The table keeps each group of cards' tuning per job shape: planned again on other free cards, for another job
    of that shape (its own name and steps), the plan is what the planner gives from a cold table, and no group is
    tuned twice."""
    boxes = pool(("desk", ["NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 3090"]), ("closet", ["NVIDIA GeForce RTX 3060 12GB"]),
                 ("attic", ["NVIDIA GeForce RTX 2080 Ti", "NVIDIA GeForce GTX 1080 Ti"]))
    everything = sorted(c.card_id for c in boxes.cards)
    free_sets = [frozenset(everything)] + [frozenset(everything) - {a, b} for i, a in enumerate(everything) for b in everything[i + 1:]]
    for kind in ({"gpus": 3, "method": "full", "model": "llama-3.2-1b"}, {"gpus": 2}):
        warm = ThroughputTable(boxes)
        first, twin = job("first", steps=200, **kind), job("twin", steps=900, **kind)
        assert first.shape == twin.shape
        for queued in (first, twin):
            for free in free_sets:
                again, fresh = warm.plan(queued, free), ThroughputTable(boxes).plan(queued, free)
                assert (again.plan is None) == (fresh.plan is None), (queued.id, sorted(free))
                if fresh.plan:
                    assert (again.plan.job_name, again.plan.total_steps, again.cards, again.plan.grad_accum) == \
                        (queued.spec.name, 900 if queued is twin else 200, fresh.cards, fresh.plan.grad_accum)
                    assert ([r.tuning for r in again.plan.ranks], again.plan.step) == ([r.tuning for r in fresh.plan.ranks], fresh.plan.step)
            if queued is first:
                tuned = len(warm._tuned[first.shape])
        assert len(warm._tuned[first.shape]) == tuned  # the twin's plans asked for no group the first's had not
        remembered = {}  # the planner's own answer, from a kept tuning: the asking job's name and steps
        for queued in (first, twin):
            plan = make_plan(queued.spec, warm.facts(queued), boxes, queued.total_steps, tuned=remembered)
            assert (plan.job_name, plan.total_steps) == (queued.spec.name, queued.total_steps)


def test_jobs_alike_but_for_their_length_do_not_share_an_outer_step_count_that_follows_the_length():
    """`inner_steps: auto` picks H from the run's length (at least 8 outer steps a run): a 100-step job meets every
    12 steps, a 20,000-step one every 500. Planned one after the other by the same table (as a round does), each
    gets its own H, not the other's."""
    boxes = boxes_of([("desk", 64, ["NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 3090"]), ("attic", 64, ["NVIDIA GeForce RTX 3090"])])
    everything = frozenset(c.card_id for c in boxes.cards)
    kind = {"gpus": 3, "method": "full", "model": "llama-3.2-1b", "sync": {"mode": "outer", "inner_steps": "auto"}}
    table = ThroughputTable(boxes)
    for queued, h in ((job("short", steps=100, **kind), 12), (job("long", steps=20_000, **kind), 500)):
        plan = table.plan(queued, everything).plan
        assert plan.outer and plan.outer.inner_steps == h == ThroughputTable(boxes).plan(queued, everything).plan.outer.inner_steps


def boxes_of(boxes: list[tuple[str, int, list[str]]], link: str = "1GbE"):
    """Boxes with their own host RAM (GB), joined by `link`."""
    nodes = [{"name": name, "address": f"10.0.0.{i + 1}", "ram_gb": ram, "cpus": 8, "gpus": [{"model": m} for m in models]}
             for i, (name, ram, models) in enumerate(boxes)]
    return snapshot_from_config(ClusterConfig.model_validate({"head": {"address": "10.0.0.1"}, "network": {"link": link}, "nodes": nodes}))


def test_a_job_kept_off_a_box_by_its_host_ram_waits_a_bounded_time_rather_than_crawl_on_the_card_left():
    """Two full fine-tunes of llama-3.2-1b offload their optimizer states: about 28 GiB of host RAM each (estimate),
    and desk (48 GB) holds one. The second's best card, desk's free 4090, is beside the first: it would go to attic's
    1080 Ti instead, at 19% of its speed there. With no estimate of when it could have the 4090 it waits, as any job
    under a quarter of its best speed does, but only until it has waited PATIENCE times its run on its best card;
    then it takes the 1080 Ti. (The host-RAM fallback used to skip that check: on the 20-card pool a job ran 869 h on
    such cards where its best was 18 h.)"""
    from orchestrator.scheduler.host_ram import HostRam
    from orchestrator.scheduler.policies.gain import PATIENCE

    cluster = boxes_of([("desk", 48, ["NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 3090"]), ("attic", 64, ["NVIDIA GeForce GTX 1080 Ti"])])
    table = ThroughputTable(cluster)
    first, second = job("first", method="full", model="llama-3.2-1b"), job("second", method="full", model="llama-3.2-1b")
    ram = HostRam.in_use(cluster, [])
    ram.take("first", table.plan(first, frozenset({"desk/1"})).plan)
    assert table.best(second).cards == ("desk/0",) and ram.crowded(table.best(second).plan) == ["desk"]
    free = tuple(c for c in cluster.cards if c.card_id != "desk/1")
    running = (RunningJob("first", ("desk/1",), 7 * 24 * 3600.0),)
    decision = policy("gain").allocate(PolicyInput(60.0, (second,), free, running, table, ram))
    assert decision.assignments == [] and "19% of its best speed (estimate); it waits for better ones, until about" in decision.waiting["second"]
    patient = PATIENCE * table.best(second).duration_s(second.total_steps)
    decision = policy("gain").allocate(PolicyInput(patient + 1, (second,), free, running, table, ram))
    assert [(a.job_id, [r.card.card_id for r in a.plan.ranks]) for a in decision.assignments] == [("second", ["attic/0"])]


def test_a_job_kept_off_a_crowded_box_goes_to_a_box_with_room_not_to_another_crowded_one():
    """Offloading fine-tunes of llama-3.2-1b (about 28 GiB of host RAM each, estimate) run on a/0 and b/0, and each
    48 GB box holds one. A third finds its fastest card on a, whose RAM is taken; on the other boxes its fastest
    is b's spare 4090 (which the fragmentation rule also prefers to splitting c's free pair), but b's RAM is taken
    too. It starts on c's 3090.
    (It used to give up after the first crowded box: on the 64-card pool 61 jobs waited five hours while 51 cards
    sat idle.)"""
    from orchestrator.scheduler.host_ram import HostRam

    cluster = boxes_of([("a", 48, ["NVIDIA GeForce RTX 4090"] * 2), ("b", 48, ["NVIDIA GeForce RTX 4090"] * 2),
                        ("c", 64, ["NVIDIA GeForce RTX 3090"] * 2)])
    table = ThroughputTable(cluster)
    running = [job(name, method="full", model="llama-3.2-1b") for name in ("on-a", "on-b")]
    third = job("third", method="full", model="llama-3.2-1b", submitted_at=1.0)
    ram = HostRam.in_use(cluster, [])
    for queued, card in zip(running, ("a/0", "b/0")):
        ram.take(queued.id, table.plan(queued, frozenset({card})).plan)
    free = tuple(c for c in cluster.cards if c.card_id not in ("a/0", "b/0"))
    assert table.plan(third, frozenset(c.card_id for c in free)).cards == ("a/1",)  # its fastest: where a's RAM is taken
    x = PolicyInput(60.0, (third,), free, (RunningJob("on-a", ("a/0",), 36_000.0), RunningJob("on-b", ("b/0",), 36_000.0)),
                    table, ram)
    decision = policy("gain").allocate(x)
    assert [(a.job_id, [r.card.node for r in a.plan.ranks]) for a in decision.assignments] == [("third", ["c"])], decision.waiting


def test_a_job_across_boxes_keeps_off_links_another_such_job_uses_when_that_ends_it_sooner():
    """Boxes of two 4090s joined by 10GbE, and one of two 1080 Tis. A full fine-tune of qwen2.5-0.5b on a/1 + c/1
    alone takes 1.5 s a step, 88% of it collectives over the network (estimates), against 2.2 s inside the 1080 Ti
    box: it goes across. With another job across a and c using those links, its collectives would take twice as
    long (2.8 s a step) and slow that job too: it goes on the 1080 Tis. The simulator charges that sharing. (It has
    waited past PATIENCE, so neither plan's share of its best speed, a or c's pair, holds it back.)"""
    from orchestrator.scheduler.links import NetworkLinks

    waited = 3 * 3600.0  # past PATIENCE x its best run (1000 steps of 0.25 s in box a, estimate)

    cluster = boxes_of([("a", 64, ["NVIDIA GeForce RTX 4090"] * 2), ("b", 64, ["NVIDIA GeForce GTX 1080 Ti"] * 2),
                        ("c", 64, ["NVIDIA GeForce RTX 4090"] * 2)], link="10GbE")
    table = ThroughputTable(cluster)
    synchronous = {"sync": {"mode": "synchronous"}}  # (with outer steps across boxes the link would matter little)
    across, new = job("across", gpus=2, method="full", **synchronous), job("new", gpus=2, method="full", steps=1000, **synchronous)
    running = (RunningJob("across", ("a/0", "c/0"), 10 * 3600.0),)
    free = tuple(c for c in cluster.cards if c.card_id not in ("a/0", "c/0"))
    crossing, inside = table.plan(new, frozenset({"a/1", "c/1"})), table.plan(new, frozenset({"b/0", "b/1"}))
    assert crossing.duration_s(1000) < inside.duration_s(1000)

    quiet = policy("gain").allocate(PolicyInput(waited, (new,), free, running, table, links=NetworkLinks()))
    assert [r.card.card_id for r in quiet.assignments[0].plan.ranks] == ["a/1", "c/1"]

    links = NetworkLinks()
    links.take("across", table.plan(across, frozenset({"a/0", "c/0"})).plan, 10 * 3600.0)
    assert links.sharing(crossing.plan) == 2 and links.stretch(crossing.plan) > 1.8
    busy = policy("gain").allocate(PolicyInput(waited, (new,), free, running, table, links=links))
    assert [r.card.card_id for r in busy.assignments[0].plan.ranks] == ["b/0", "b/1"]


def test_the_links_in_use_are_read_from_the_running_jobs_plans():
    """What the real scheduler gives the policy: each active job's plan summary (its ranks' nodes, its estimated
    collective and step times) and its estimated end. A job inside one box uses no link."""
    from orchestrator.queue import JobRecord
    from orchestrator.scheduler.links import NetworkLinks

    cluster = boxes_of([("a", 64, ["NVIDIA GeForce RTX 4090"] * 2), ("c", 64, ["NVIDIA GeForce RTX 4090"] * 2)], link="10GbE")
    table = ThroughputTable(cluster)
    pair = job("pair", gpus=2, method="full")
    across, inside = table.plan(pair, frozenset({"a/0", "c/0"})).plan, table.plan(pair, frozenset({"a/1", "a/0"})).plan

    def record(job_id, plan, est_end):
        return JobRecord(job_id, job_id, {}, 200, 0, "running", 0.0, 0.0, None, est_end, (), plan.summary(), "", 1, {})

    links = NetworkLinks.in_use([record("x", across, 4000.0), record("y", inside, 4000.0)], now=1000.0)
    assert set(links.users) == {"a", "c"} and [u.job_id for u in links.users["a"]] == ["x"]
    user = links.users["a"][0]
    assert user.rest_s == 3000.0 and abs(user.network_share - across.step.comm_s / across.step.step_s) < 0.01
    assert links.sharing(across) == 2 and links.sharing(inside) == 1
    assert links.added_s(across, 1000.0) == 1000.0 * user.network_share  # while both run, x's collectives slow


def test_a_running_job_moves_to_faster_cards_nobody_queued_takes_when_that_ends_it_sooner_counting_the_move():
    """An fp32 fine-tune runs on the 1080 Ti with hours left; the 4090 beside it is free and nothing is queued. It
    is moved there (stopped with a checkpoint, placed again) because its rest on the 4090 plus the measured cost of
    the move ends it well before it would end where it is. With half a minute left, the move would not pay; a job
    the scheduler may not move (placing, already moving, moved MAX_MOVES times) stays; and a queued job that can
    use the 4090 gets it instead."""
    box = pool(("desk", ["NVIDIA GeForce RTX 4090", "NVIDIA GeForce GTX 1080 Ti"]))
    table = ThroughputTable(box)
    fine_tune = job("fine-tune", steps=2000, method="full", precision="fp32")
    step_s = table.plan(fine_tune, frozenset({"desk/1"})).plan.step.step_s
    on_4090 = table.plan(fine_tune, frozenset({"desk/0", "desk/1"}))
    assert on_4090.cards == ("desk/0",) and on_4090.plan.step.step_s < 0.5 * step_s

    def running(rest_s: float, movable: bool = True):
        return [RunningJob("fine-tune", ("desk/1",), 1000.0 + rest_s, 0.0, fine_tune if movable else None, step_s)]

    _, decision, _ = decide("gain", box, [], running(3 * 3600.0), now=1000.0)
    assert list(decision.moves) == ["fine-tune"] and decision.moves["fine-tune"].cards == ("desk/0",)
    assert re.fullmatch(r"on desk/0 GeForce RTX 4090 its rest would take about 0\.\d h instead of 3\.0 h where it runs \(estimates; .*\)",
                        decision.moves["fine-tune"].reason)
    assert decide("gain", box, [], running(30.0), now=1000.0)[1].moves == {}  # 4 s of steps + 39 s of moving: not under 24 s
    assert decide("gain", box, [], running(3 * 3600.0, movable=False), now=1000.0)[1].moves == {}
    cards, decision, _ = decide("gain", box, [job("queued", steps=500)], running(3 * 3600.0), now=1000.0)
    assert cards == {"queued": ["desk/0"]} and decision.moves == {}


def test_a_running_job_past_its_estimated_end_is_not_moved_to_a_card_like_its_own():
    """A LoRA job on attic's 3090 has run an hour past its plan's estimate (the estimate was off); desk's 3090 is free.
    What is left of it is not known, so no move can be shown to pay: it stays. (Before, its negative rest made any
    move look like a gain, and the trace moved such jobs between two 4090s: "its rest would take about -1.1 h instead
    of -1.1 h".) With three hours left by the estimate, a move to the same model does not pay either."""
    box = pool(("desk", ["NVIDIA GeForce RTX 3090"]), ("attic", ["NVIDIA GeForce RTX 3090"]))
    lora = job("lora", steps=2000)
    step_s = ThroughputTable(box).plan(lora, frozenset({"attic/0"})).plan.step.step_s
    for rest_s in (-3600.0, 3 * 3600.0):
        running = [RunningJob("lora", ("attic/0",), 1000.0 + rest_s, 0.0, lora, step_s)]
        assert decide("gain", box, [], running, now=1000.0)[1].moves == {}


def test_a_job_does_not_give_its_card_to_a_rival_when_it_would_crawl_on_the_card_left():
    """Comparative advantage with a floor. A long bf16 LoRA job goes first (alone it runs longer than the queue takes
    to drain); a job pinned to the 4090 comes next. Handing the 4090 to the pinned job and taking the 1080 Ti would raise
    the sum of normalised throughputs (0.11 + 1.0 against 1.0), but the first job would run at 11% of its speed,
    under MIN_SHARE: it keeps the 4090. (On the homelab trace a 7B LoRA gave its 4090 away this way and ran 212 h on
    a 3090 and a 3060 across boxes, against 24 h on its best cards.)"""
    box = pool(("desk", ["NVIDIA GeForce RTX 4090"]), ("attic", ["NVIDIA GeForce GTX 1080 Ti"]))
    long_job, pinned = job("long", steps=20000), job("pinned", steps=50, submitted_at=1.0, models=["RTX 4090"])
    table = ThroughputTable(box)
    assert table.normalised(long_job, table.plan(long_job, frozenset({"attic/0"}))) < 0.25
    assert not table.plan(pinned, frozenset({"attic/0"})).plan
    cards, decision, _ = decide("gain", box, [long_job, pinned], now=2.0)
    assert decision.turns[0] == "long" and cards == {"long": ["desk/0"]}
