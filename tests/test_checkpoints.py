"""Checkpoints a crash cannot corrupt (workers/checkpoint.py), written by real DeepSpeed on three CPU ranks."""

import dataclasses
import json

import pytest
from safetensors.torch import load_file

from tests.test_exact_update import TOLERANCE, job, max_relative_difference, train
from workers import checkpoint
from workers.local_launch import run_local_ranks


def test_a_rank_killed_in_the_middle_of_a_save_leaves_the_previous_checkpoint_to_resume_from(tmp_path, demo_data, base_model,
                                                                                           monkeypatch):
    """Rank 0 is killed after every rank wrote step 2's shards and before they were moved into place. The
    partial save stays in .partial/, `latest` still names step 1, and the job run again resumes from step 1
    and ends with the weights an uninterrupted run reaches."""
    config = dataclasses.replace(job(tmp_path / "run", demo_data, base_model, 2, "full", 0.0), checkpoint_every=1)
    monkeypatch.setenv(checkpoint.FAULT_ENV, "kill-in-save:2")
    with pytest.raises(RuntimeError, match=r"rank\(s\) \[0\] died"):
        run_local_ranks(config, timeout_s=300)
    monkeypatch.delenv(checkpoint.FAULT_ENV)
    saved = tmp_path / "run" / "checkpoints"
    assert (saved / "latest").read_text() == "step-1"
    assert (saved / ".partial" / "step-2").is_dir() and not (saved / "step-2").exists()
    assert checkpoint.newest_complete(saved) == ("step-1", [])

    resumed = run_local_ranks(config)
    assert resumed[0]["steps"] == 3 and len(resumed[0]["losses"]) == 2  # steps 2 and 3 run again, step 1 not
    uninterrupted = train(job(tmp_path / "straight", demo_data, base_model, 2, "full", 0.0))
    assert max_relative_difference(load_file(f"{config.output_dir}/final/model.safetensors"), uninterrupted) < TOLERANCE
    assert not (saved / ".partial" / "step-2").exists()  # the next save cleared it


def test_a_corrupt_checkpoint_is_skipped_for_the_one_before_and_old_ones_are_pruned(tmp_path, demo_data, base_model):
    config = dataclasses.replace(job(tmp_path / "run", demo_data, base_model, 2, "full", 0.0), checkpoint_every=1, keep_last=2)
    run_local_ranks(config)
    saved = tmp_path / "run" / "checkpoints"
    assert sorted(d.name for d in saved.iterdir() if d.name.startswith("step-")) == ["step-2", "step-3"]  # step-1 pruned
    manifest = json.loads((saved / "step-3" / checkpoint.MANIFEST).read_text())
    assert manifest["step"] == 3 and manifest["layout"] == {"world_size": 3, "micro_batches": [3, 1, 2], "grad_accum": 2, "zero_stage": 2, "precision": "fp32"}
    assert any("optim_states" in name for name in manifest["files"])  # every rank's optimizer partition is listed
    assert checkpoint.newest_complete(saved) == ("step-3", [])

    shard = next(saved / "step-3" / name for name in manifest["files"] if "optim_states" in name)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, different content
    shard.write_bytes(bytes(data))
    tag, skipped = checkpoint.newest_complete(saved)
    assert tag == "step-2" and len(skipped) == 1 and "does not match its checksum" in skipped[0] and "step-3" in skipped[0]

    (saved / "step-2" / checkpoint.MANIFEST).unlink()  # as if the save had died before its manifest
    assert checkpoint.newest_complete(saved)[0] is None
