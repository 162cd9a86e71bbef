"""The job spec: a user's bad input gets one line naming the field, the value and what is allowed."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.errors import InputError
from orchestrator.jobspec import load_job, total_steps
from tests.conftest import REPO, TINY_LLAMA, cli


@pytest.fixture
def write_spec(tmp_path, demo_data):
    def write(**changes) -> str:
        spec = {
            "name": "t1",
            "model": {"init": "scratch", "path": str(TINY_LLAMA)},
            "dataset": {"path": str(demo_data["pretrain"]), "text_field": "text"},
            "seq_len": 32, "global_batch_size": 8, "max_steps": 5,
            "output_dir": str(tmp_path / "out"),
        }
        for key, value in changes.items():
            section, _, leaf = key.partition("__")
            if leaf:
                spec.setdefault(section, {})[leaf] = value
            elif value is None:
                spec.pop(section)
            else:
                spec[section] = value
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump(spec))
        return str(path)

    return write


def message(path: str) -> str:
    with pytest.raises(InputError) as err:
        load_job(path)
    return str(err.value).replace(path, "job.yaml")


def test_valid_spec_loads_with_absolute_paths(write_spec, tmp_path):
    job = load_job(write_spec())
    assert job.method == "full" and job.precision == "auto" and job.deepspeed.gradient_clipping == 1.0
    assert job.output_dir == str(tmp_path / "out")
    assert total_steps(job) == 5


@pytest.mark.parametrize("changes, expected", [
    ({"method": "dora"}, "job.yaml: method='dora' is not allowed; input should be 'full', 'lora' or 'qlora'"),
    ({"seq_len": 4}, "job.yaml: seq_len=4 is not allowed; input should be greater than or equal to 8"),
    ({"global_batch_size": "lots"}, "job.yaml: global_batch_size='lots' is not allowed; input should be a valid integer, unable to parse string as an integer"),
    ({"precision": "fp8"}, "job.yaml: precision='fp8' is not allowed; input should be 'auto', 'fp32', 'fp16' or 'bf16'"),
    ({"name": "My Job"}, "job.yaml: name='My Job' is not allowed; string should match pattern '^[a-z0-9][a-z0-9-]{0,40}$'"),
    ({"output_dir": None}, "job.yaml: output_dir is missing; it is required"),
    ({"epochs": 2}, "job.yaml: epochs=2 is not allowed; give exactly one of max_steps or epochs"),
    ({"lora__r": 0, "method": "lora"}, "job.yaml: lora.r=0 is not allowed; input should be greater than or equal to 1"),
    ({"lora__r": 8}, "job.yaml: lora={'r': 8} is not allowed; a lora section needs method: lora or qlora"),
    ({"gpus__count": 2, "gpus__min": 1}, "job.yaml: gpus={'count': 2, 'min': 1} is not allowed; give either count, or min/max, not both"),
    ({"gpus__models": ["RTX 3099"]}, "job.yaml: gpus.models[0]='RTX 3099' is not allowed; not a card in the catalog; did you mean 'GeForce RTX 3090', 'GeForce RTX 3090 Ti', 'GeForce RTX 5090'?"),
    ({"deepspeed__zero_stage": 4}, "job.yaml: deepspeed.zero_stage=4 is not allowed; input should be 'auto', 1, 2 or 3"),
    ({"deepspeed__zero_stage": 0}, "job.yaml: deepspeed.zero_stage=0 is not allowed; input should be 'auto', 1, 2 or 3"),
    ({"batch_size": 16}, "job.yaml: batch_size=16 is not allowed; unknown key; allowed keys here: checkpoint_every, dataset, deepspeed, epochs, global_batch_size, gpus, keep_last, lora, max_steps, method, model, name, optimizer, output_dir, precision, priority, quant, rebalance, report_to, seed, seq_len, sync"),
    ({"optimizer__lr": 0}, "job.yaml: optimizer.lr=0 is not allowed; input should be greater than 0"),
])
def test_schema_errors_name_field_value_and_allowed(write_spec, changes, expected):
    assert message(write_spec(**changes)) == expected


def test_missing_paths_fail_before_any_planning(write_spec, tmp_path, demo_data):
    assert message(write_spec(model={"init": "scratch", "path": str(tmp_path / "nope")})) == (
        f"job.yaml: model.path='{tmp_path / 'nope'}' is not allowed; init: scratch needs an existing directory with config.json")
    assert message(write_spec(model={"path": "someone/not-cached-model"})) == (
        "job.yaml: model.path='someone/not-cached-model' is not allowed; it must be a local directory or a Hugging Face id already in the local cache (nodes do not download)")
    assert message(write_spec(dataset={"path": str(tmp_path / "missing.jsonl"), "text_field": "text"})) == (
        f"job.yaml: dataset.path='{tmp_path / 'missing.jsonl'}' is not allowed; it must be an existing file (jsonl or text)")
    assert message(write_spec(dataset={"path": str(demo_data["pretrain"]), "text_field": "body"})) == (
        "job.yaml: dataset.text_field='body' is not allowed; line 1 of the data has only the fields text")


def test_a_finished_run_is_never_overwritten(write_spec, tmp_path):
    (tmp_path / "out" / "final").mkdir(parents=True)
    assert message(write_spec()) == (
        f"job.yaml: output_dir='{tmp_path / 'out'}' is not allowed; it already holds a finished run ({tmp_path / 'out' / 'final'}); choose a new output_dir or remove that one")


def test_checkpoints_of_another_model_in_the_output_dir_are_refused_at_submit_and_never_loaded(write_spec, tmp_path):
    """An output_dir used again: its checkpoints (complete, with a manifest) are of another model or method. The
    spec is refused naming them; a rank asked to resume there refuses too, loading and overwriting nothing."""
    import json

    from workers import checkpoint
    from workers.train import _resume_point

    config = json.loads((TINY_LLAMA / "config.json").read_text())
    saved = tmp_path / "out" / checkpoint.CHECKPOINT_DIR
    staged = saved / checkpoint.PARTIAL / "step-5"
    staged.mkdir(parents=True)
    (staged / "shard.pt").write_bytes(b"weights")
    other = checkpoint.what_it_trains(config, "lora", 8)  # a LoRA run of the same base wrote them
    checkpoint._publish(saved, staged, 5, {"trains": other})  # as rank 0 publishes a save
    assert message(write_spec()) == (f"job.yaml: output_dir={str(tmp_path / 'out')!r} is not allowed; its checkpoints "
                                     "(step-5) are of another model or method; choose a new output_dir or move them away")
    mine = checkpoint.what_it_trains(config, "full", 8)
    with pytest.raises(RuntimeError, match="step-5 was made for another model or method; nothing was loaded or overwritten"):
        _resume_point(saved, {"trains": mine})
    # The same model and method resume as before.
    assert load_job(write_spec(method="lora")).output_dir == str(tmp_path / "out")
    assert _resume_point(saved, {"trains": other, "world_size": None, "zero_stage": None, "precision": None})[0] == "step-5"


def test_yaml_syntax_and_overrides(tmp_path, write_spec):
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: x\nmodel: [unclosed\n")
    with pytest.raises(InputError) as err:
        load_job(bad)
    assert str(err.value) == f"""{bad}: line 3="expected ',' or ']', but got '<stream end>'" is not allowed; the file must be valid YAML"""
    job = load_job(write_spec(), overrides=["max_steps=7", "optimizer.lr=0.01"])
    assert (job.max_steps, job.optimizer.lr) == (7, 0.01)
    with pytest.raises(InputError, match="--set='max_steps' is not allowed; use key=value"):
        load_job(write_spec(), overrides=["max_steps"])


def test_cli_exits_2_with_one_line_and_submits_nothing(write_spec, tmp_path):
    """The CLI path a user hits, through the installed `zeromix` program: a bad spec is refused before any
    cluster is contacted."""
    env = {"ZEROMIX_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([str(Path(sys.executable).with_name("zeromix")), "submit", write_spec(seq_len=4)],
                          capture_output=True, text=True, cwd=REPO, env=env)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"zeromix: error: {tmp_path / 'job.yaml'}: seq_len=4 is not allowed; input should be greater than or equal to 8"]
    assert not (tmp_path / "home").exists()  # no cluster state, no token: nothing was touched


def test_a_sequence_longer_than_the_model_takes_is_refused_before_the_cluster(write_spec, tmp_path, monkeypatch):
    """The tiny Llama takes 64 positions: 128 would fail only inside training, after cards were reserved."""
    monkeypatch.setenv("ZEROMIX_HOME", str(tmp_path / "home"))
    for command in (["submit", write_spec(seq_len=128)], ["advise", "--model", str(REPO / "jobs" / "examples" / "tiny-llama"),
                                                         "--method", "lora", "--seq-len", "128"]):
        done = cli(*command, check=False)
        assert done.returncode == 2
        (line,) = done.stderr.strip().splitlines()
        assert "seq_len=128 is not allowed; at most 64, this llama model's max_position_embeddings" in line or \
            "--seq-len=128 is not allowed; at most 64" in line
    assert not (tmp_path / "home").exists()


def test_shipped_examples_are_valid():
    for path in sorted((REPO / "jobs" / "examples").glob("*.yaml")):
        job = load_job(path, check_files=False)
        assert job.name == path.stem


def test_report_to_names_only_trackers_each_once_and_an_uninstalled_one_is_refused_before_anything(tmp_path, demo_data, monkeypatch):
    import importlib.util

    path = tmp_path / "job.yaml"
    base = {"name": "j", "model": {"init": "scratch", "path": str(TINY_LLAMA)}, "dataset": {"path": str(demo_data["pretrain"]), "text_field": "text"},
            "max_steps": 1, "output_dir": str(tmp_path / "out")}
    path.write_text(yaml.safe_dump({**base, "report_to": ["tensorboard", "wandb", "tensorboard"]}))
    assert load_job(path).report_to == ["tensorboard", "wandb"]
    path.write_text(yaml.safe_dump({**base, "report_to": ["comet"]}))
    with pytest.raises(InputError, match=r"report_to\[0\]='comet' is not allowed; input should be 'tensorboard', 'wandb' or 'mlflow'"):
        load_job(path)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    path.write_text(yaml.safe_dump({**base, "report_to": ["mlflow"]}))
    with pytest.raises(InputError, match=r"report_to\[0\]='mlflow' .*pip install 'zeromix\[mlflow\]'"):
        load_job(path)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["../../etc", "a/b", "/abs", "x/../../y", ".hidden", "a\\b"])
def test_a_job_name_cannot_become_a_path_outside_the_output_dir(tmp_path, demo_data, name):
    """The job name ends up in ids, actor names, Ray submission ids and tracker runs: only [a-z0-9-] get in, so
    it cannot climb out of a directory (every file a job writes is under its own output_dir)."""
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"name": name, "model": {"init": "scratch", "path": str(TINY_LLAMA)},
                                    "dataset": {"path": str(demo_data["pretrain"]), "text_field": "text"}, "max_steps": 1,
                                    "output_dir": str(tmp_path / "out")}))
    with pytest.raises(InputError, match=r"name=.* is not allowed; string should match pattern"):
        load_job(path)
    assert not (tmp_path / "out").exists()
