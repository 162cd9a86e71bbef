"""Outer-step mode across boxes (workers/outer_steps.py): ZeRO inside each box, DiLoCo's outer step between boxes.

Three real DeepSpeed ranks on CPU (gloo) as two boxes: box 0 holds ranks with micro-batches 3 and 1 (one DeepSpeed
world), box 1 the rank with 2 (another), joined only by the leaders' link. With inner SGD, one inner step per outer
step, outer lr 1 and no momentum, averaging the boxes' deltas weighted by their loss tokens is one synchronous
data-parallel step on the whole global batch: the trained weights must equal that, and weighting the boxes
equally must not.
"""

import pytest
import torch

from orchestrator.launch import with_outer_steps
from tests.helpers import final_weights, job, max_relative_difference, reference
from workers.outer_steps import decode, encode

pytestmark = pytest.mark.deepspeed

BOXES = (2, 1)  # ranks per box: micro-batches (3, 1) in box 0, (2,) in box 1
EXACT = 1e-6  # max relative difference per tensor, fp32


def outer_job(config, inner_steps=1, outer_lr=1.0, outer_momentum=0.0, wire="fp32"):
    return with_outer_steps(config, list(BOXES), inner_steps, outer_lr, outer_momentum, wire)


@pytest.mark.parametrize("stage", [1, 2])
def test_one_inner_step_per_outer_step_is_synchronous_data_parallel(ds_runs, tmp_path, demo_data, base_model, stage):
    config = job(tmp_path / "run", demo_data, base_model, stage, "full", 0.0, optimizer="SGD")
    initial = ds_runs.initial(config)
    ran, ranks = ds_runs.run(outer_job(config))
    trained = final_weights(ran)
    exact = reference(config, initial, "tokens")
    assert max_relative_difference(trained, exact) < EXACT  # measured 3.6e-7 (ZeRO-1), 4.3e-7 (ZeRO-2)
    assert max_relative_difference(trained, initial) > 10 * EXACT  # it did train
    # each box weighted the same, whatever its tokens: off by 0.22
    assert max_relative_difference(reference(config, initial, "per_rank_mean", groups=BOXES), exact) > 1e4 * EXACT
    assert [r["outer_steps"] for r in ranks] == [config.total_steps] * 3


def test_the_traffic_across_boxes_is_counted_and_falls_with_fewer_outer_steps_and_a_smaller_wire(ds_runs, tmp_path, demo_data, base_model):
    """Only the leaders send, only at outer steps: the payload of a delta (4, 2 or 1 byte a parameter, int8 with one
    4-byte scale per tensor) and 8 bytes of loss tokens. One outer step for three inner steps sends a third."""
    config = job(tmp_path / "run", demo_data, base_model, 2, "full", 0.0, optimizer="SGD")
    initial = ds_runs.initial(config)
    n, tensors = sum(t.numel() for t in initial.values()), len(initial)
    sent = {}
    for wire, inner in (("fp32", 1), ("fp32", 3), ("bf16", 3), ("int8", 3)):
        ran, ranks = ds_runs.run(outer_job(config, inner_steps=inner, wire=wire))
        assert [r["outer_bytes_sent"] > 0 for r in ranks] == [True, False, True]  # box leaders only
        sent[wire, inner] = ranks[0]["outer_bytes_sent"]
        assert ranks[2]["outer_bytes_sent"] == sent[wire, inner]
        assert [r["outer_steps"] for r in ranks] == [config.total_steps // inner] * 3
    steps = config.total_steps
    assert sent["fp32", 1] == steps * (4 * n + 8)
    assert sent["fp32", 3] == 4 * n + 8
    assert sent["bf16", 3] == 2 * n + 8
    assert sent["int8", 3] == n + 4 * tensors + 8


def test_a_delta_survives_each_wire_format_within_its_precision():
    torch.manual_seed(0)
    delta = [torch.randn(64, 32, device="cpu") * 1e-3, torch.randn(32, device="cpu") * 1e2]
    shapes = [d.shape for d in delta]
    for wire, bound in (("fp32", 0.0), ("bf16", 2 ** -8), ("int8", 0.5 / 127)):
        back = decode(encode(delta, wire), shapes, wire)
        for d, b in zip(delta, back):
            assert b.shape == d.shape and b.dtype == torch.float32
            assert (b - d).abs().max() <= bound * d.abs().max() + 1e-12, wire  # relative to each tensor's largest


def test_the_outer_step_is_nesterov_sgd_on_the_combined_delta():
    """What OuterSteps._nesterov does to the global weights equals torch's SGD(nesterov=True) fed the delta as the
    gradient, over several outer steps."""
    from workers.outer_steps import OuterConfig, OuterSteps

    torch.manual_seed(0)
    weights = [torch.randn(8, 4, device="cpu"), torch.randn(4, device="cpu")]
    deltas = [[torch.randn_like(w) for w in weights] for _ in range(4)]
    outer = OuterSteps.__new__(OuterSteps)  # the arithmetic alone: no box, no DeepSpeed
    outer.config = OuterConfig((1,), 1, 0.7, 0.9, "fp32")
    outer.global_weights = [w.clone() for w in weights]
    outer.momentum = [torch.zeros_like(w) for w in weights]
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    sgd = torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)
    for delta in deltas:
        outer._nesterov(delta)
        for p, d in zip(params, delta):
            p.grad = d.clone()
        sgd.step()
    for ours, theirs in zip(outer.global_weights, params):
        assert torch.allclose(ours, theirs.detach(), atol=1e-6)
