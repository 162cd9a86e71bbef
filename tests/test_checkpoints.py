"""Checkpoints a crash cannot corrupt (workers/checkpoint.py), written by real DeepSpeed on three CPU ranks."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import TOLERANCE, final_weights, job, max_relative_difference
from workers import checkpoint
from workers.faults import environment as faults_env
from workers.local_launch import run_local_ranks

pytestmark = pytest.mark.deepspeed


@pytest.fixture(scope="module")
def killed_then_resumed(tmp_path_factory, demo_data, base_model):
    """A job saving every step, its rank 0 killed after every rank wrote step 2's shards and before they were
    moved into place; what its checkpoints looked like then; and the same job run again to its end."""
    out = tmp_path_factory.mktemp("killed") / "run"
    config = dataclasses.replace(job(out, demo_data, base_model, 2, "full", 0.0), checkpoint_every=1)
    with pytest.MonkeyPatch.context() as env:
        for name, value in faults_env("kill-in-save:2").items():
            env.setenv(name, value)
        with pytest.raises(RuntimeError, match=r"local ranks failed: rank 0 killed by signal 9"):
            run_local_ranks(config, timeout_s=300)
    saved = out / "checkpoints"
    after_kill = {"latest": (saved / "latest").read_text(), "partial": (saved / ".partial" / "step-2").is_dir(),
                  "moved": (saved / "step-2").exists(), "newest_complete": checkpoint.newest_complete(saved)}
    return config, after_kill, run_local_ranks(config)


def test_a_rank_killed_in_the_middle_of_a_save_leaves_the_previous_checkpoint_to_resume_from(killed_then_resumed, ds_runs, demo_data,
                                                                                           base_model, tmp_path):
    """The partial save stays in .partial/, `latest` still names step 1, and the job run again resumes from
    step 1 and ends with the weights an uninterrupted run reaches."""
    config, after_kill, resumed = killed_then_resumed
    assert after_kill == {"latest": "step-1", "partial": True, "moved": False, "newest_complete": ("step-1", [])}
    assert resumed[0]["steps"] == 3 and len(resumed[0]["losses"]) == 2  # steps 2 and 3 run again, step 1 not
    assert resumed[0]["resumed_from"] == "step-1"
    uninterrupted = ds_runs.weights(job(tmp_path / "straight", demo_data, base_model, 2, "full", 0.0))
    assert max_relative_difference(final_weights(config), uninterrupted) < TOLERANCE
    assert not (Path(config.output_dir) / "checkpoints" / ".partial" / "step-2").exists()  # the next save cleared it


def test_a_corrupt_checkpoint_is_skipped_for_the_one_before_and_old_ones_are_pruned(killed_then_resumed, tmp_path):
    """The resumed job saved every step with keep_last 2: on a copy of its checkpoints, a flipped byte and a
    missing manifest."""
    config, _, _ = killed_then_resumed
    saved = tmp_path / "checkpoints"
    shutil.copytree(f"{config.output_dir}/checkpoints", saved)
    assert config.keep_last == 2
    assert sorted(d.name for d in saved.iterdir() if d.name.startswith("step-")) == ["step-2", "step-3"]  # step-1 pruned
    manifest = json.loads((saved / "step-3" / checkpoint.MANIFEST).read_text())
    assert manifest["step"] == 3 and manifest["layout"] == {"world_size": 3, "micro_batches": [3, 1, 2], "grad_accum": 2, "zero_stage": 2, "precision": "fp32",
                                                         "trains": config.trains}  # what the weights are: a reused output_dir is refused
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


def test_a_checkpoint_that_cannot_be_converted_to_the_universal_form_fails_in_one_line_and_leaves_nothing_half_made(killed_then_resumed, tmp_path):
    """A resume on other ranks converts the checkpoint first (in the rank's own process); when DeepSpeed's converter
    fails, the job's error names the checkpoint and DeepSpeed's reason, and no converted or staging dir is left."""
    config, _, _ = killed_then_resumed
    saved = tmp_path / "checkpoints"
    shutil.copytree(f"{config.output_dir}/checkpoints", saved, ignore=shutil.ignore_patterns("*optim_states.pt"))
    with pytest.raises(RuntimeError) as failed:
        checkpoint.universal(saved, "step-3")
    assert str(failed.value).startswith(f"converting {saved / 'step-3'} to DeepSpeed's universal form failed: FileNotFoundError: ")
    assert "optim_states" in str(failed.value) and "\n" not in str(failed.value)
    assert not (saved / checkpoint.UNIVERSAL).exists() or not any((saved / checkpoint.UNIVERSAL).iterdir())

    shutil.copytree(f"{config.output_dir}/checkpoints/step-3", saved / "step-3", dirs_exist_ok=True)  # its shards back
    assert checkpoint.universal(saved, "step-3") == saved / checkpoint.UNIVERSAL
    assert sorted(p.name for p in (saved / checkpoint.UNIVERSAL).iterdir()) == ["step-3"]  # converted; no staging dir, nor a pointer to one
