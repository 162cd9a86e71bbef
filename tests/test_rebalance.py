"""The split corrects itself (workers/rebalance.py): the tuner on its own, and three real DeepSpeed ranks with one
of them slowed in the middle of the run."""

import dataclasses
import json
from collections import deque

import pytest

from orchestrator.launch import train_config, with_outer_steps
from orchestrator.planner import make_plan
from orchestrator.planner.memory import TrainingShape, ZeroSetting, max_micro_batch
from tests.helpers import HOMELAB, MICRO, TINY, TOLERANCE, final_weights, job, max_relative_difference, spec
from workers.rebalance import BOX_WINDOW_STEPS, WARMUP_STEPS, WINDOW_STEPS, SplitTuner, fit_line


def feed(tuner: SplitTuner, per_sample: list[float], fixed: list[float], steps: int, start: int = 1):
    """Steps whose busy times follow these cards' lines at the tuner's split; the first change proposed, if any."""
    for step in range(start, start + steps):
        busy = tuple(tuner.grad_accum * (f + s * n) for f, s, n in zip(fixed, per_sample, tuner.split))
        change = tuner.observe(step, busy, max(busy) * 1.1)
        if change:
            return change
    return None


def test_a_card_slower_than_planned_gives_samples_to_the_others_within_their_caps():
    tuner = SplitTuner((8, 8, 8), caps=(12, 12, 9), grad_accum=2)
    change = feed(tuner, per_sample=[0.2, 0.1, 0.1], fixed=[0.0, 0.0, 0.0], steps=WARMUP_STEPS + WINDOW_STEPS)
    assert change is not None and sum(change.new) == 24 and change.old == (8, 8, 8)
    assert change.new[0] < 8 and change.new[2] <= 9  # the slow card gives, the third takes no more than it holds
    assert change.step == WARMUP_STEPS + WINDOW_STEPS + 2  # decided after that step, sent in the next, run from the one after
    assert change.per_sample_s == pytest.approx((0.2, 0.1, 0.1)) and max(change.predicted_busy_s) < max(change.busy_s)
    assert "the slowest card sets the step" in change.why


def test_a_balanced_split_is_left_alone_and_a_small_gain_is_not_worth_a_change():
    assert feed(SplitTuner((4, 8), caps=(16, 16), grad_accum=1), [0.2, 0.1], [0.0, 0.0], steps=20) is None
    # 9 vs 10 samples' worth: moving one sample would save ~5% of the busy time, 4.5% of the step (threshold 5%)
    assert feed(SplitTuner((10, 10), caps=(16, 16), grad_accum=1), [0.1, 0.09], [0.0, 0.0], steps=20) is None


def test_after_a_change_the_new_split_is_measured_before_the_next_decision():
    tuner = SplitTuner((6, 6), caps=(12, 12), grad_accum=1)
    first = feed(tuner, [0.3, 0.1], [0.0, 0.0], steps=WARMUP_STEPS + WINDOW_STEPS)
    tuner.applied(first.new)
    # one step to warm up at the new split, then a full window: no decision before that
    assert feed(tuner, [0.3, 0.1], [0.0, 0.0], steps=WINDOW_STEPS, start=10) is None


def test_two_sizes_seen_separate_the_fixed_cost_from_the_per_sample_cost():
    assert fit_line({4: 0.5 + 4 * 0.25}) == (0.0, pytest.approx(1.5 / 4))  # one size: all of it per sample
    fixed, per_sample = fit_line({4: 0.5 + 4 * 0.25, 10: 0.5 + 10 * 0.25})
    assert (fixed, per_sample) == (pytest.approx(0.5), pytest.approx(0.25))
    assert fit_line({4: 2.0, 8: 1.0}) == (0.0, 1.0 / 8)  # faster with more samples: noise, not a line to trust


def test_the_plan_carries_each_cards_memory_cap_and_jobs_may_keep_the_planned_split():
    j = spec(gpus={"count": 2, "models": ["GTX 1080 Ti", "RTX 3090"]})
    plan = make_plan(j, TINY, HOMELAB, 10)
    for rank in plan.ranks:
        shape = TrainingShape(TINY, plan.trainable, j.seq_len, plan.precision, rank.tuning.activation_checkpointing)
        zero = ZeroSetting(rank.tuning.zero_stage, rank.tuning.offload_optimizer, rank.tuning.offload_params)
        assert rank.micro_cap == max_micro_batch(shape, zero, len(plan.ranks), rank.capacity_bytes) >= rank.tuning.micro_batch
    assert [r["micro_batch_cap"] for r in plan.summary()["ranks"]] == [r.micro_cap for r in plan.ranks]
    assert train_config(j, plan, "j-1").micro_batch_caps == tuple(r.micro_cap for r in plan.ranks)
    assert train_config(j.model_copy(update={"rebalance": False}), plan, "j-1").micro_batch_caps == ()


SLOW_FROM, STEPS = 2, 10  # rank 0 (3 of the 6 samples per micro-step) sleeps 50 ms a sample from step 3 on


@pytest.mark.deepspeed
def test_a_rank_slowed_mid_run_moves_the_split_and_the_weights_are_those_of_the_planned_split(ds_runs, tmp_path, demo_data, base_model):
    planned = job(tmp_path / "planned", demo_data, base_model, 2, "full", 0.0, steps=STEPS, optimizer="SGD")
    slowed = dataclasses.replace(planned, output_dir=str(tmp_path / "slowed"), micro_batch_caps=(4, 4, 4),
                                 emulated_seconds_per_sample=(0.05, 0.0, 0.0), emulated_from=SLOW_FROM)
    ran, ranks = ds_runs.run(slowed)
    changes, history = ranks[0]["rebalances"], ranks[0]["history"]
    assert changes, "the split never moved"
    first = changes[0]
    assert first["old"] == list(MICRO) and first["new"][0] < MICRO[0] and sum(first["new"]) == sum(MICRO)
    assert first["step"] <= SLOW_FROM + 1 + WINDOW_STEPS + 2  # measured for a window, then one step to tell every rank
    assert all(max(c["new"]) <= 4 for c in changes)  # within the caps
    assert list(history[first["step"] - 1]["split"]) == first["new"]  # every rank ran it from that step on
    assert [h["step"] for h in history] == list(range(1, STEPS + 1))  # no step skipped or repeated
    reference = ds_runs.run(planned)[1][0]["history"]
    assert [sum(h["tokens"]) for h in history] == [sum(h["tokens"]) for h in reference]  # the same samples in every step
    assert all(tuple(h["split"]) == MICRO for h in reference)  # no caps, no tuner: the planned split throughout
    assert max_relative_difference(final_weights(ran), ds_runs.weights(planned)) < TOLERANCE


@pytest.mark.deepspeed
def test_with_outer_steps_a_box_corrects_its_own_split_and_the_weights_are_still_those_of_the_planned_split(ds_runs, tmp_path, demo_data, base_model):
    """Two boxes (ranks 0 and 1; rank 2), one inner SGD step per outer step, outer lr 1: synchronous data parallel's
    maths (tests/test_outer_steps.py). With rank 0 slowed, box 0's tuner moves samples to rank 1 inside the box and
    keeps the box's share of the global batch, so box 1's slice never moves and no box needs to hear of it."""
    planned = job(tmp_path / "planned", demo_data, base_model, 2, "full", 0.0, steps=STEPS, optimizer="SGD")
    slowed = dataclasses.replace(planned, micro_batch_caps=(4, 4, 4), emulated_seconds_per_sample=(0.05, 0.0, 0.0), emulated_from=SLOW_FROM)
    ran, ranks = ds_runs.run(with_outer_steps(slowed, [2, 1], 1, 1.0, 0.0, "fp32"))
    changes = [c for c in ranks[0]["rebalances"] if len(c["old"]) == 2]  # box 0's own (the boxes' shares list every rank)
    assert changes, "box 0's split never moved"
    assert changes[0]["old"] == list(MICRO[:2]) and changes[0]["new"][0] < MICRO[0]
    assert all(len(c["new"]) == 2 and sum(c["new"]) == sum(MICRO[:2]) and max(c["new"]) <= 4 for c in changes)
    assert ranks[2]["rebalances"] == [] and all(list(h["split"]) == [MICRO[2]] for h in ranks[2]["history"])  # alone in its box
    assert [r["outer_steps"] for r in ranks] == [STEPS] * 3
    assert max_relative_difference(final_weights(ran), ds_runs.weights(planned)) < TOLERANCE


def test_the_boxes_shares_follow_their_measured_steps_within_caps_and_each_box_keeps_its_cards_proportions():
    """Box 0 (micro-batches 3 and 1) steps in 0.1 s, box 1 (2) in 0.4 s: at 0.025 and 0.2 s a sample, box 0 takes five
    samples, spread 4 and 1 as its cards' 3 to 1, and the slowest box's step is predicted to fall to 0.2 s. Boxes
    within 5% of each other are left alone; so is a split that no cap allows to improve."""
    from workers.rebalance import box_shares

    assert box_shares((3, 1, 2), (2, 1), (0.1, 0.4), (4, 4, 4)) == ((4, 1, 1), (0.025, 0.2), (0.125, 0.2))
    assert box_shares((3, 1, 2), (2, 1), (0.1, 0.104), (4, 4, 4)) is None
    assert box_shares((3, 1, 2), (2, 1), (0.1, 0.4), (3, 1, 2)) is None  # box 0's cards are full
    # with box 2 of three lost (no share), the two left move samples between them and box 2 gets none
    assert box_shares((3, 1, 2, 0), (2, 1, 1), (0.1, 0.4, 0.0), (4, 4, 4, 4)) == ((4, 1, 1, 0), (0.025, 0.2, 0.0), (0.125, 0.2, 0.0))


def test_a_box_lost_leaves_the_whole_global_batch_to_the_boxes_left_within_their_caps():
    """Box 1 of (2, 1) is lost: box 0 takes all six samples a micro-step, spread as its cards' 3 to 1 within their
    caps, box 1 none; where box 0's cards cannot hold six, None (the job is placed again). Of three boxes, the two
    left share the lost one's samples by their measured speeds (box 0 four times box 1's per sample)."""
    from workers.rebalance import shares_without

    assert shares_without((3, 1, 2), (2, 1), {1}, (0.1, 0.0), (5, 5, 4)) == (5, 1, 0)
    assert shares_without((3, 1, 2), (2, 1), {1}, (0.1, 0.0), (3, 1, 2)) is None
    assert shares_without((3, 1, 2, 2), (2, 1, 1), {2}, (0.1, 0.4, 0.0), (4, 4, 4, 4)) == (4, 3, 1, 0)
    # box 1 not measured yet: each box's share now stands for its speed (1/4 and 1/2 of a step a sample), so the
    # eight go 6 and 2 (1.5 and 1.0 steps; 5 and 3 would end at 1.5 too)
    assert shares_without((3, 1, 2, 2), (2, 1, 1), {2}, (0.1, 0.0, 0.0), (4, 4, 4, 4)) == (4, 2, 2, 0)


def test_after_a_meeting_the_leaders_agree_on_one_split_and_a_box_lost_at_the_last_outer_step_changes_nothing():
    """The split the box leaders take after a meeting (workers/outer_steps.BoxSplits), from the boxes' headers (loss
    tokens, stop, measured inner seconds and steps, micro-batches): box 1 of (2, 1) lost, box 0 takes its share within
    its caps, or the job is placed again (BoxesLost) where they are too small; a box let back in brings the plan's
    split; boxes measured apart correct their shares. At the job's last outer step a box lost changes nothing: no
    split runs after it, so caps too small for the batch do not place a finished job again."""
    import torch

    from workers.outer_steps import BoxesLost, BoxSplits, OuterConfig

    def config(caps):
        return OuterConfig((2, 1), 10, 1.0, 0.0, "fp32", caps=caps, planned=(3, 1, 2))

    def head(measured_s, steps, *micro):
        return torch.tensor([100.0, 0.0, measured_s, steps, *micro], dtype=torch.float64)

    split, both = (3, 1, 2), {0: head(1.0, 10, 3, 1), 1: head(4.0, 10, 2)}
    roomy, tight = BoxSplits(config((5, 5, 4)), rebalance=True), BoxSplits(config((3, 1, 2)), rebalance=True)
    alone = {0: both[0]}
    assert roomy.left(split, alone, back=()) == (1,) and roomy.left(split, both, back=()) == ()
    assert roomy.after(30, split, alone, (), (1,), last=False) == ((5, 1, 0), None)
    with pytest.raises(BoxesLost, match=r"box\(es\) \[1\] are out of the job .* within the plan's caps \[3, 1, 2\]"):
        tight.after(30, split, alone, (), (1,), last=False)
    assert tight.after(60, split, alone, (), (1,), last=True) == (None, None)  # the last outer step
    assert roomy.after(60, split, alone, (), (1,), last=True) == (None, None)
    # box 1 let back in (its header empty) while the job ran (5, 1, 0): the plan's split again, and it left nothing new
    back = {0: head(1.0, 10, 5, 1), 1: torch.zeros(7, dtype=torch.float64)}
    assert roomy.left((5, 1, 0), back, back=(1,)) == ()
    assert roomy.after(50, (5, 1, 0), back, (1,), (), last=False) == ((3, 1, 2), None)
    # both met, box 1 four times slower a step: the shares move (BoxShares says why), and not after the last step
    new, shares = roomy.after(20, split, both, (), (), last=False)
    assert new == shares.new and shares.step == 21 and sum(new) == sum(split) and new[2] < 2
    assert roomy.after(60, split, both, (), (), last=True) == (None, None)


@pytest.mark.deepspeed
def test_with_outer_steps_the_boxes_shares_follow_their_measured_speeds_and_the_weights_stay_those_of_the_planned_split(
        ds_runs, tmp_path, demo_data, base_model):
    """The same two boxes with rank 2, alone in box 1, slowed: box 0 waits for it at every outer step. The leaders
    exchange their measured inner steps with their deltas, and all move samples from box 1 to box 0 at the same step;
    the global batch, and so the maths, stay the same."""
    planned = job(tmp_path / "planned", demo_data, base_model, 2, "full", 0.0, steps=STEPS, optimizer="SGD")
    slowed = dataclasses.replace(planned, micro_batch_caps=(4, 4, 4), emulated_seconds_per_sample=(0.0, 0.0, 0.2), emulated_from=SLOW_FROM)
    ran, ranks = ds_runs.run(with_outer_steps(slowed, [2, 1], 1, 1.0, 0.0, "fp32"))
    shares = [c for c in ranks[0]["rebalances"] if c["ranks"] == [0, 1, 2]]
    assert shares, f"the boxes' shares never moved: {ranks[0]['rebalances']}"
    first = shares[0]
    assert first["new"][2] < MICRO[2] and sum(first["new"]) == sum(MICRO) and max(first["new"]) <= 4
    assert first["step"] <= SLOW_FROM + WARMUP_STEPS + BOX_WINDOW_STEPS + 2  # measured for a window after the warm-up
    assert [h["split"][0] for h in ranks[2]["history"][first["step"] - 1:]][0] == first["new"][2]  # box 1 took it at that step
    assert sum(ranks[0]["history"][first["step"] - 1]["split"]) == sum(first["new"][:2])  # and box 0 its share
    assert [h["step"] for h in ranks[2]["history"]] == list(range(1, STEPS + 1))
    assert max_relative_difference(final_weights(ran), ds_runs.weights(planned)) < TOLERANCE


def test_what_a_job_measured_becomes_the_speed_the_next_plan_assumes():
    """measured_speeds: the plan's compute per step over the median measured at the planned split, after warm-up;
    a card with half the speed then gets about half the samples of its twin."""
    from workers.rebalance import measured_speeds

    plan = {"ranks": [{"card": "box/0", "micro_batch": 4, "est_compute_s": 0.2}, {"card": "box/1", "micro_batch": 4, "est_compute_s": 0.2}]}
    history = [{"step": s, "split": [4, 4], "compute_s": [0.4 if s > WARMUP_STEPS else 9.0, 0.2]} for s in range(1, 8)]
    assert measured_speeds(history, plan) == {"box/0": pytest.approx(0.5), "box/1": pytest.approx(1.0)}
    assert measured_speeds(history[:WARMUP_STEPS + 1], plan) == {}  # too few steps measured to say

    from orchestrator.inventory import CardFacts, ClusterSnapshot, build_node

    twins = [CardFacts(i, "NVIDIA GeForce RTX 3090", 24576, 24576, (8, 6), training_speed=speed) for i, speed in enumerate((0.5, None))]
    box = build_node("box", "10.0.0.1", 64, 16, 10.0, twins, simulated=False)
    plan = make_plan(spec(gpus={"count": 2}), TINY, ClusterSnapshot((box,)), 10)
    micro = {r.card.card_id: r.tuning.micro_batch for r in plan.ranks}
    assert micro["box/1"] == pytest.approx(2 * micro["box/0"], abs=2)
    assert [r.rate_source for r in plan.ranks if r.card.card_id == "box/0"] == ["catalog x0.5 from runs"]


def test_measured_speeds_go_into_real_nodes_records_and_never_into_simulated_ones(connected):
    """On the session cluster's registry: a real node's record (published as `join` would) takes the speeds,
    averaged with what earlier jobs measured; a simulated node's does not."""
    from ray.experimental import internal_kv

    from orchestrator import registry
    from orchestrator.inventory import CardFacts, build_node

    state, _ = connected
    ghost = build_node("ghost-box", "10.9.9.9", 64, 16, 10.0, [CardFacts(0, "NVIDIA GeForce RTX 3090", 24576, 24576, (8, 6))], simulated=False)
    registry.publish(state.gcs_address, ghost)
    key = b"node/ghost-box"
    try:
        assert registry.record_training_speeds({"ghost-box/0": 0.5, "desk/0": 0.5}) == ["ghost-box/0"]
        assert registry.record_training_speeds({"ghost-box/0": 1.5}) == ["ghost-box/0"]
        record = json.loads(internal_kv._internal_kv_get(key, namespace=registry.KV_NAMESPACE))
        assert record["cards"][0]["training_speed"] == pytest.approx(1.0)  # 0.5, then half-way to 1.5
        desk = json.loads(internal_kv._internal_kv_get(b"node/desk", namespace=registry.KV_NAMESPACE))
        assert all(c.get("training_speed") is None for c in desk["cards"])
    finally:
        internal_kv._internal_kv_del(key, namespace=registry.KV_NAMESPACE)


def test_it_never_goes_back_to_a_split_it_measured_no_better():
    """A split left for another is returned to only when it measured better than where the job is now."""
    tuner = SplitTuner((4, 4), caps=(8, 8), grad_accum=1)
    # 0.2 and 0.12 s per sample: (3, 5) is the fit's best split (0.6 s for both cards, where (4, 4) takes 0.8)
    tuner.seen = [{4: deque([0.8] * 3, maxlen=3), 3: deque([0.6] * 3, maxlen=3)}, {4: deque([0.48] * 3, maxlen=3), 5: deque([0.6] * 3, maxlen=3)}]
    tuner._since_change = WINDOW_STEPS
    tuner.left = {(3, 5): 0.95}  # tried, and its slowest card took 0.95 s there
    assert tuner.observe(20, (0.8, 0.48), 0.9) is None  # measured no better than now: it stays
    tuner.left = {(3, 5): 0.5}  # had it measured better, back it goes
    assert tuner.observe(21, (0.8, 0.48), 0.9).new == (3, 5)
