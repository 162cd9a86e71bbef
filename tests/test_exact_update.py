"""Uneven per-card micro-batches give the same update as one process taking each global batch whole.

Three real DeepSpeed ranks on CPU (gloo) run `workers.train.main` with micro-batches 3, 1 and 2 and two
accumulation steps; one process runs the same optimizer on the same global batches, weighting the loss by
token. After 3 optimizer steps the trained weights (the full model, or the LoRA adapter) must agree.

SGD is linear in the gradient, so it shows the weighting exact to 1e-5. AdamW, what jobs use, is checked too,
at a tolerance its normalisation forces (see TOLERANCE_ADAMW).
"""

import dataclasses
import json

import pytest

from tests.conftest import TINY_LLAMA
from tests.helpers import MICRO, STEPS, TOLERANCE, TOLERANCE_ADAMW, final_weights, job, max_relative_difference, reference
from workers.local_launch import run_local_ranks
from workers.train import utilisation

pytestmark = pytest.mark.deepspeed


CASES = [(1, "full", 0.0), (1, "full", 0.5), (2, "full", 0.0), (2, "full", 0.5), (3, "full", 0.0), (3, "full", 0.5),
         (1, "lora", 0.5), (2, "lora", 0.0), (3, "lora", 0.5)]


@pytest.mark.parametrize("optimizer, stage, method, clip", [("SGD", *case) for case in CASES] + [
    ("AdamW", 2, "full", 0.5), ("AdamW", 3, "full", 0.0), ("AdamW", 3, "lora", 0.5)])
def test_uneven_micro_batches_match_the_full_batch_update(ds_runs, tmp_path, demo_data, base_model, optimizer, stage, method, clip):
    # ZeRO-3 builds the model inside zero.Init, which draws its random init differently from a plain
    # from_config; a 0-step run saves exactly the weights the ranks start from (tests/helpers.DeepSpeedRuns.initial).
    config = job(tmp_path / "run", demo_data, base_model, stage, method, clip, optimizer=optimizer)
    initial, trained = ds_runs.initial(config), ds_runs.weights(config)
    exact = reference(config, initial, "tokens")
    tolerance = TOLERANCE if optimizer == "SGD" else TOLERANCE_ADAMW
    assert max_relative_difference(trained, exact) < tolerance
    assert max_relative_difference(trained, initial) > 10 * tolerance  # it did train
    # The tolerance can tell the right weighting from the naive one: averaging each rank's own mean is off.
    assert max_relative_difference(reference(config, initial, "per_rank_mean"), exact) > 10 * tolerance


@pytest.mark.parametrize("stage, method", [(3, "full"), (2, "lora")])
def test_the_loss_a_chunk_of_tokens_at_a_time_keeps_the_update(ds_runs, tmp_path, demo_data, base_model, stage, method):
    """workers/loss.py with chunks of 5 tokens (a micro-batch here holds up to 3 x 32): the output head runs in
    the loss once per chunk and again in backward (under ZeRO-3 gathered each time, and its gradient reduced once),
    and LoRA's prompts are left out before the head. The same update as one process on the whole logits."""
    whole = job(tmp_path / "run", demo_data, base_model, stage, method, 0.5, optimizer="SGD")
    config = dataclasses.replace(whole, loss_chunk_tokens=5)
    initial, trained = ds_runs.initial(whole), ds_runs.weights(config)  # (the start the whole-logits cases share)
    assert max_relative_difference(trained, reference(config, initial, "tokens")) < TOLERANCE
    assert max_relative_difference(trained, initial) > 10 * TOLERANCE


def test_optimizer_offload_keeps_the_update(ds_runs, tmp_path, demo_data, base_model):
    """Optimizer states on the host (DeepSpeed's CPU Adam) on every rank: the same update as on the card."""
    config = job(tmp_path / "run", demo_data, base_model, 2, "full", 0.5, offload=True)
    assert config.ds_configs[0]["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    initial, trained = ds_runs.initial(config), ds_runs.weights(config)
    assert max_relative_difference(trained, reference(config, initial, "tokens")) < TOLERANCE_ADAMW


@pytest.mark.parametrize("method", ["full", "lora"])
def test_checkpointing_on_some_cards_only_gives_the_uniform_update(ds_runs, tmp_path, demo_data, base_model, method):
    """The planner lets a card short of memory recompute activations while roomier ones do not (ZeRO-1/2). That
    changes only where time and memory go: ranks 0 and 2 recomputing, rank 1 not, train to the same weights as
    no rank recomputing."""
    config, ranks = ds_runs.run(job(tmp_path / "mixed", demo_data, base_model, 2, method, 0.5, recompute=(True, False, True)))
    assert [r["recomputes"] for r in ranks] == [True, False, True]
    uniform = ds_runs.weights(job(tmp_path / "uniform", demo_data, base_model, 2, method, 0.5))
    assert max_relative_difference(final_weights(config), uniform) < TOLERANCE


def test_optimizer_offload_on_one_rank_only_keeps_the_update(ds_runs, tmp_path, demo_data, base_model):
    """ZeRO-2 lets the planner offload the optimizer of the one card short of memory: rank 0 runs DeepSpeed's CPU
    Adam on its partition, ranks 1 and 2 torch's AdamW on theirs. The collectives are the same either way (no
    hang), and the update is the one no rank offloading gives (measured: 4e-7 relative)."""
    mixed = ds_runs.weights(job(tmp_path / "mixed", demo_data, base_model, 2, "full", 0.5, offload=(True, False, False)))
    uniform = ds_runs.weights(job(tmp_path / "uniform", demo_data, base_model, 2, "full", 0.5))
    assert max_relative_difference(mixed, uniform) < TOLERANCE


def test_a_resumed_job_continues_exactly(ds_runs, tmp_path, demo_data, base_model):
    """Stopped after step 2, restarted on the same output_dir: it resumes from the checkpoint (weights,
    Adam state, schedule, data position) and lands where an uninterrupted run does."""
    run_local_ranks(job(tmp_path / "run", demo_data, base_model, 2, "full", 0.0, steps=2))
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-2"
    resumed = job(tmp_path / "run", demo_data, base_model, 2, "full", 0.0)
    assert run_local_ranks(resumed)[0]["resumed_from"] == "step-2"
    exact = reference(resumed, ds_runs.initial(resumed), "tokens")
    assert max_relative_difference(final_weights(resumed), exact) < TOLERANCE_ADAMW


def test_straggler_accounting_and_emulation_stay_out_of_real_jobs(tmp_path, demo_data, base_model):
    """Every rank reports busy and wait time; the benchmark-only slowdown makes the slowed rank the one the
    others wait for, and nothing a user submits can switch it on."""
    import dataclasses

    from orchestrator.cluster_config import load_cluster
    from orchestrator.inventory import snapshot_from_config
    from orchestrator.jobspec import JobSpec
    from orchestrator.launch import train_config
    from orchestrator.model_facts import facts_from_config, read_config
    from orchestrator.planner import make_plan
    from tests.conftest import REPO

    config = dataclasses.replace(job(tmp_path, demo_data, base_model, 2, "full", 0.0), emulated_seconds_per_sample=(0.0, 0.0, 0.05))
    ranks = run_local_ranks(config)
    first = ranks[0]
    assert len(first["step_times"]) == STEPS and len(first["busy_s"]) == len(first["wait_s"]) == len(MICRO)
    util = utilisation(first["busy_s"], first["wait_s"])
    assert util[2] == pytest.approx(1.0) and max(util[:2]) < 0.8  # ranks 0 and 1 wait for the slowed rank 2
    assert json.loads(config.to_json())["emulated_seconds_per_sample"] == [0.0, 0.0, 0.05]
    # A submitted job: no spec field can ask for it, and the launcher's config leaves it off.
    assert "emulated_seconds_per_sample" not in JobSpec.model_fields
    spec = JobSpec.model_validate({"name": "j", "model": {"path": "m"}, "dataset": {"path": "d", "text_field": "text"},
                                   "max_steps": 3, "output_dir": "o"})
    plan = make_plan(spec, facts_from_config(read_config(str(TINY_LLAMA))), snapshot_from_config(load_cluster(REPO / "cluster.yaml")), 3)
    assert train_config(spec, plan, "j-1").emulated_seconds_per_sample is None
