"""Experiment tracking (`report_to`) written by rank 0 of a real DeepSpeed run on three CPU ranks, read back
with each library's own reader; no network (W&B offline, MLflow's file store)."""

import dataclasses
import json

import pytest

from tests.helpers import MICRO, job
from workers.local_launch import run_local_ranks
from workers.tracking import TENSORBOARD_DIR

pytestmark = pytest.mark.deepspeed

PLAN = {"job": "exact", "zero_stage": 2, "precision": "fp32", "grad_accum": 2, "est_step_s": 0.05, "est_tokens_per_s": 1000.0,
        "ranks": [{"card": f"box/{i}", "node": "box", "model": "GeForce RTX 3090", "micro_batch": m, "activation_checkpointing": False,
                   "offload_optimizer": False, "est_mem_gib": 0.1} for i, m in enumerate(MICRO)]}


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, demo_data, base_model):
    out = tmp_path_factory.mktemp("tracked")
    config = dataclasses.replace(job(out, demo_data, base_model, 2, "full", 0.0, steps=4), report_to=("tensorboard", "wandb", "mlflow"),
                                 plan=PLAN)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        return out, run_local_ranks(config, timeout_s=300)[0]


def test_tensorboard_holds_the_loss_of_every_step_each_cards_series_and_the_plan(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, result = tracked_run
    events = EventAccumulator(str(out / TENSORBOARD_DIR), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx(result["losses"], rel=1e-6)
    for card in ("box/0", "box/1", "box/2"):
        assert len(events.Scalars(f"step_time_s/{card}")) == 4 and len(events.Scalars(f"tokens_per_s/{card}")) == 4
    # each card's share of the tokens follows its micro-batch (3, 1, 2 samples)
    tokens = [events.Scalars(f"tokens_per_s/box/{i}")[0].value * events.Scalars(f"step_time_s/box/{i}")[0].value for i in range(3)]
    assert tokens == pytest.approx(result["history"][0]["tokens"], rel=1e-4)
    plan_text = events.Tensors("plan/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| 1 | box/1 | GeForce RTX 3090 | 1 |" in plan_text and "ZeRO-2" in plan_text


def test_wandb_offline_writes_a_run_directory_with_the_steps_and_the_plan(tracked_run):
    """W&B 0.31 ships no Python reader for its .wandb record log (its Go core reads it when `wandb sync` uploads
    it), so the records are checked as bytes: every step's loss, as W&B encodes it (JSON), and the plan."""
    out, result = tracked_run
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir())
    records = b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
    assert records.count(b"train/loss") >= len(result["losses"])
    assert all(json.dumps(loss).encode() in records for loss in result["losses"])
    assert b"box/2" in records and b'"zero_stage":2' in records


def test_mlflow_logs_the_metrics_per_step_and_the_plan_to_its_file_store(tracked_run, monkeypatch):
    import mlflow

    out, result = tracked_run
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    run = client.search_runs([client.get_experiment_by_name("zeromix").experiment_id])[0]
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(result["losses"], rel=1e-6)
    assert run.data.params["zero_stage"] == "2"
    plan = json.loads(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/plan.json"))
    assert plan["ranks"][1]["card"] == "box/1"


def test_the_history_accounts_every_cards_step_time(tracked_run):
    """compute + wait + communication is each card's step time; waits are measured against the fastest card."""
    _, result = tracked_run
    for step in result["history"]:
        assert min(step["wait_s"]) == 0.0
        for rank in range(len(MICRO)):
            assert step["compute_s"][rank] + step["wait_s"][rank] + step["comm_s"] == pytest.approx(step["step_time_s"][rank], rel=1e-6, abs=1e-9)
        assert all(m > 0 for m in step["memory_bytes"]) and all(p >= m for p, m in zip(step["peak_memory_bytes"], step["memory_bytes"]))
