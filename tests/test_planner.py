"""The planner's mechanics on the shipped homelab: a precision every card runs, per-card micro-batches that
keep the global batch exact with one accumulation count for all ranks, and clear refusals. (Which cards to
choose is tested on real model sizes in test_planner_scenarios.py.)"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.planner import NoPlacement, make_plan
from orchestrator.planner.split import RankCost, best_split, split_batch, split_fits, step_lower_bound

from tests.helpers import HOMELAB, TINY
from tests.helpers import spec as job


def test_pascal_in_the_group_means_fp32_and_the_split_follows_the_rates():
    plan = make_plan(job(gpus={"count": 2, "models": ["GeForce GTX 1080 Ti", "GeForce RTX 3090"]}), TINY, HOMELAB, 10)
    assert {r.card.card_id: r.tuning.precision for r in plan.ranks} == {"desk/0": "fp32", "attic/0": "fp32"}
    micro = {r.card.short_name: r.tuning.micro_batch for r in plan.ranks}
    # The tiny model's step is as much memory traffic as matmul: the 3090 is 3.2x the 1080 Ti's FP32 rate but
    # only 1.9x its bandwidth (936 vs 484 GB/s), so it takes about 2.5x the samples, not 3.2x.
    assert micro == {"GeForce RTX 3090": 23, "GeForce GTX 1080 Ti": 9}
    per_sample = [c / m for c, m in zip(plan.step.compute_s, [r.tuning.micro_batch for r in plan.ranks])]
    assert per_sample[1] / per_sample[0] == pytest.approx(23 / 9, rel=0.15)  # the split follows the speeds
    assert plan.global_batch == 32 and plan.grad_accum == 1


def test_ampere_and_ada_get_bf16_and_every_ds_config_is_explicit():
    j = job(gpus={"count": 2, "models": ["RTX 3090", "RTX 4090"]}, deepspeed={"gradient_clipping": 0.0})
    plan = make_plan(j, TINY, HOMELAB, 10)
    configs = plan.ds_configs(j)
    assert [c["bf16"]["enabled"] for c in configs] == [True, True]
    assert [c["train_micro_batch_size_per_gpu"] for c in configs] == [r.tuning.micro_batch for r in plan.ranks]
    assert {c["gradient_accumulation_steps"] for c in configs} == {plan.grad_accum}
    assert all(c["gradient_clipping"] == 0.0 for c in configs)


def test_turing_without_pascal_gets_fp16_and_explicit_bf16_leaves_old_cards_out():
    plan = make_plan(job(gpus={"count": 2, "models": ["RTX 2080 Ti", "RTX 3090"]}), TINY, HOMELAB, 10)
    assert {r.tuning.precision for r in plan.ranks} == {"fp16"}
    plan = make_plan(job(precision="bf16", gpus={"count": 3}), TINY, HOMELAB, 10)
    assert sorted(r.card.card_id for r in plan.ranks) == ["closet/0", "desk/0", "desk/1"]
    assert {x.card_id: x.reason for x in plan.rejected} == {
        "attic/0": "bf16 needs compute capability >= 8.0 (older cards only emulate it, very slowly)",
        "attic/1": "bf16 needs compute capability >= 8.0 (older cards only emulate it, very slowly)",
    }


def test_held_cards_are_not_planned_and_the_error_says_what_would_help():
    held = HOMELAB.with_holders({"zm_card_desk_0": "other-job", "zm_card_desk_1": "other-job"})
    with pytest.raises(NoPlacement) as err:
        make_plan(job(gpus={"count": 2, "models": ["RTX 3090", "RTX 4090"]}), TINY, held, 10)
    assert str(err.value).startswith("no placement for job 'j': attic/0 (GeForce GTX 1080 Ti): not in gpus.models (RTX 3090, RTX 4090);")
    assert "desk/0 (GeForce RTX 3090): held by job other-job" in str(err.value)
    assert "To fix: lower gpus.count (needs 2, 0 eligible) or free more cards" in str(err.value)


def test_a_global_batch_smaller_than_the_cards_uses_fewer_cards():
    plan = make_plan(job(global_batch_size=2, gpus={"min": 2}), TINY, HOMELAB, 10)
    assert len(plan.ranks) == 2 and plan.global_batch == 2
    assert all("at most 2 card(s)" in x.reason for x in plan.rejected)


def costs(rates, caps, recompute_caps=None):
    """Ranks at these rates; with `recompute_caps`, each may recompute (4/3 slower) to take more samples."""
    recompute_caps = recompute_caps or [0] * len(rates)
    return [RankCost(1 / r, c, 4 / 3 / r, rc) for r, c, rc in zip(rates, caps, recompute_caps)]


@pytest.mark.parametrize("total, ranks", [
    (32, costs([35.6, 11.3], [99, 99])), (7, costs([1.0, 1.0, 1.0], [5, 5, 5])), (100, costs([165.2, 71.2, 11.3], [40, 40, 40])),
    (100, costs([165.2, 71.2, 11.3], [20, 30, 40], [60, 50, 45])), (40, costs([10.0, 10.0], [8, 30], [30, 30]))])
def test_split_sums_exactly_respects_caps_and_no_move_helps(total, ranks):
    micro = split_batch(total, ranks)
    assert sum(micro) == total and all(1 <= m <= r.cap for m, r in zip(micro, ranks))
    slowest = max(r.seconds(m) for m, r in zip(micro, ranks))
    # moving one sample from any rank to any other never makes the step faster
    for i in range(len(micro)):
        for j in range(len(micro)):
            if i != j and micro[i] > 1 and micro[j] < ranks[j].cap:
                moved = list(micro)
                moved[i] -= 1
                moved[j] += 1
                assert max(r.seconds(m) for m, r in zip(moved, ranks)) >= slowest - 1e-12


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.lists(st.tuples(st.floats(0.5, 200.0), st.integers(1, 64), st.integers(0, 96), st.floats(0.0, 5.0)), min_size=1, max_size=6),
       st.sampled_from([8, 12, 32, 60, 128]))
def test_the_lower_bound_that_skips_settings_never_exceeds_a_real_split(ranks, global_batch):
    """The planner skips an accumulation count or a ZeRO setting whose lower bound is no better than the best
    plan so far: exact only if no split beats the bound."""
    costs_ = [RankCost(1 / rate, cap, 4 / 3 / rate, recompute_cap) for rate, cap, recompute_cap, _ in ranks]
    plain = [c.plain_s for c in costs_]
    for grad_accum in (g for g in range(1, global_batch + 1) if global_batch % g == 0):
        fixed = tuple(f * grad_accum for *_, f in ranks)  # communication and offload grow with the accumulation count
        micro = split_batch(global_batch // grad_accum, costs_, [f / grad_accum for f in fixed])
        if micro:
            step = max(c.seconds(m) * grad_accum + f for c, m, f in zip(costs_, micro, fixed))
            assert step_lower_bound(global_batch, plain, fixed) <= step * (1 + 1e-12)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.lists(st.tuples(st.floats(0.5, 200.0), st.integers(0, 16), st.integers(0, 24)), min_size=1, max_size=6),
       st.sampled_from([1, 3, 8, 12, 32, 60]))
def test_a_group_counts_as_fitting_exactly_when_some_split_fits(ranks, global_batch):
    """A group another group's plan already beats is not tuned in full, only asked whether it fits (if not, the
    planner drops its smallest card and tries again): that answer must be best_split's."""
    costs_ = [RankCost(1 / rate, cap, 4 / 3 / rate, recompute_cap) for rate, cap, recompute_cap in ranks]
    assert split_fits(global_batch, costs_) == (best_split(global_batch, costs_) is not None)


def test_a_rank_recomputes_only_past_what_fits_without():
    """Equal cards, one with room for 8 samples without recomputing: at 16 samples it recomputes (slower per
    sample) rather than leave the other card 2 more; at 8 samples neither recomputes."""
    ranks = costs([10.0, 10.0], [4, 30], [30, 30])
    assert [r.recomputes(m) for r, m in zip(ranks, split_batch(8, ranks))] == [False, False]
    micro = split_batch(16, ranks)
    assert [r.recomputes(m) for r, m in zip(ranks, micro)] == [True, False] and micro[0] < micro[1]


def test_split_refuses_what_cannot_fit():
    assert split_batch(10, costs([1.0, 1.0], [4, 4])) is None
    assert split_batch(1, costs([1.0, 1.0], [4, 4])) is None
