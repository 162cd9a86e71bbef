"""The step-time model's communication, checked against what DeepSpeed itself records: real DeepSpeed on 3
CPU ranks (gloo; uneven partitions, which 2 ranks would not show) with zeromix's DeepSpeed configs and its
comms logger on (tests/comms_probe.py), for ZeRO 1/2/3 x full/LoRA x 1 and 2 accumulation steps (two counts
show the per-micro-step rule as well as more would), and on 4 ranks for hpZ. The model's bytes per optimizer
step, per kind of collective, must be within 5% of what the logger recorded."""

import functools

import pytest

from orchestrator.model_facts import facts_from_config
from orchestrator.planner.step_time import comm_volume

pytestmark = pytest.mark.deepspeed

PROBE_TIMEOUT_S = 600
LOGGED_AS = {"all_reduce": "all_reduce", "reduce_scatter_tensor": "reduce_scatter", "all_gather_into_tensor": "all_gather"}


def probe(ranks: int, mode: str = "") -> dict:
    """tests/comms_probe.py on `ranks` local CPU ranks; what rank 0 logged."""
    from tests import comms_probe
    from workers.local_launch import meeting_points, run_local

    return run_local(functools.partial(comms_probe.rank, mode), *meeting_points((ranks,)), timeout_s=PROBE_TIMEOUT_S)[0]


@pytest.fixture(scope="module")
def recorded():
    return probe(3)


def test_the_model_counts_the_bytes_deepspeed_moves(recorded):
    facts = facts_from_config(recorded["config"])
    adapters = facts.lora_params(recorded["lora_r"], recorded["lora_targets"])
    for case in recorded["cases"]:
        trainable = facts.n_params if case["method"] == "full" else adapters
        model = comm_volume(trainable, facts.n_params + (adapters if case["method"] == "lora" else 0), case["world"],
                            case["stage"], case["grad_accum"], 4, 4)
        logged = {LOGGED_AS[op]: b for op, b in case["logged"].items() if op in LOGGED_AS and b}
        expected = {kind: getattr(model, kind) for kind in ("all_reduce", "reduce_scatter", "all_gather") if getattr(model, kind)}
        assert set(logged) == set(expected), case
        for kind, value in expected.items():
            assert value == pytest.approx(logged[kind], rel=0.05), (kind, case)
        unmodelled = sum(b for op, b in case["logged"].items() if op not in LOGGED_AS)
        assert unmodelled <= 0.01 * sum(case["logged"].values()), case  # e.g. a one-off broadcast of buffers


def test_accumulation_multiplies_what_zero2_and_zero3_move_but_not_zero1(recorded):
    by = {(c["method"], c["stage"], c["grad_accum"]): sum(c["logged"].values()) for c in recorded["cases"]}
    for method in ("full", "lora"):
        assert by[(method, 1, 2)] == pytest.approx(by[(method, 1, 1)], rel=0.01)
        # twice the gradient reduction (and, at ZeRO-3, twice the gathers); ZeRO-2's one gather of the updated
        # partitions per step stays: 1.75x on three ranks
        assert by[(method, 2, 2)] > 1.6 * by[(method, 2, 1)]
        assert by[(method, 3, 2)] > 1.9 * by[(method, 3, 1)]


def test_hpz_keeps_backward_gathers_inside_a_box():
    """Four ranks as two boxes of two, ZeRO-3 with weights gathered again for backward (a model above the live
    limit): with ZeRO++ hpZ over pairs, backward's gathers read the pair's copy. The model's forward gathers
    (over all four) and in-box gathers (over the pair) together are within 12% of what the logger recorded
    (measured: the logger sees about 10% more, one extra gather of the box copy per step that the model leaves
    out), and the training is the same as without hpZ."""
    from tests.comms_probe import HPZ_MAX_LIVE

    logged = probe(4, "hpz")
    facts = facts_from_config(logged["config"])
    by = {(c["hpz"], c["grad_accum"]): c for c in logged["cases"]}
    for grad_accum in (1, 2):
        flat, hpz = by[(1, grad_accum)], by[(2, grad_accum)]
        model = comm_volume(facts.n_params, facts.n_params, 4, 3, grad_accum, 4, 4, 2, HPZ_MAX_LIVE)
        assert model.all_gather + model.all_gather_in_box == pytest.approx(hpz["logged"]["all_gather_into_tensor"], rel=0.12)
        assert model.all_gather == pytest.approx(comm_volume(facts.n_params, facts.n_params, 4, 3, grad_accum, 4, 4, 1, HPZ_MAX_LIVE).all_gather / 2)
        assert hpz["logged"]["reduce_scatter_tensor"] == flat["logged"]["reduce_scatter_tensor"]
        assert hpz["partition_checksum"] == pytest.approx(flat["partition_checksum"], rel=1e-6)
