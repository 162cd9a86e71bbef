"""What a stranger on the home LAN, or a hostile job spec, must not get: the Jobs API without the token, or a
shell command smuggled in through a field. On the session cluster (its tests are marked `cluster` by their fixtures)."""

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, job_status, submitted_id, zeromix


def _status(url: str, token: str | None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_the_jobs_api_refuses_a_request_without_the_token(connected):
    from orchestrator import cluster_runtime

    state, _ = connected
    url = f"{state.dashboard_url}/api/jobs/"
    assert _status(url, None) == 401
    assert _status(url, "0" * 64) == 403
    assert _status(url, cluster_runtime.token_file().read_text().strip()) == 200


def test_shell_text_in_a_path_is_a_path_never_a_command(cluster, scratch_run):
    """The session's scratch job ran from a model directory and into an output dir whose names hold `;`, `$(...)`
    and backticks (tests/conftest.py): it trained from and wrote to exactly those directories, and no command in
    them ever ran (the canary file stays absent)."""
    _, work = cluster
    state, job_id, out, _ = scratch_run
    canary = work / "canary"
    assert str(out) == f"{work}/scratch; touch {canary}"
    assert (work / f"m; touch {canary}; $(touch {canary}) `touch {canary}`" / "config.json").is_file()  # the model it trained from
    assert job_status(state, job_id) == "SUCCEEDED"
    assert (out / "final" / "model.safetensors").is_file()
    assert not canary.exists()


def test_a_token_in_the_environment_appears_in_no_log_metadata_result_or_database(connected, hf_canary, zeromix_home, demo_data, tmp_path):
    """A Hugging Face token exported where the cluster starts and the job is submitted (how a user hands gated
    models to the workers; the session cluster started with it) must not be written anywhere zeromix or Ray
    keeps things: this job's output and result, its report, TensorBoard and W&B files, ZEROMIX_HOME (queue
    database, state), Ray's logs for the whole session's cluster (every job run on it so far), or the Ray job's
    metadata."""
    from orchestrator.launch import jobs_client
    from tests.conftest import canary_env

    state, _ = connected
    env = canary_env(hf_canary)
    out = tmp_path / "out"
    done = zeromix("submit", "--follow", "jobs/examples/tiny-llama-scratch.yaml", "--set", f"output_dir={out}",
                   "--set", f"dataset.path={demo_data['pretrain']}", "--set", "max_steps=2", "--set", "report_to=[tensorboard, wandb]", env=env)
    job_id = submitted_id(done.stdout)
    zeromix("report", job_id, env=env)
    assert job_status(state, job_id) == "SUCCEEDED"
    info = jobs_client(state).get_job_info(job_id)
    assert hf_canary not in json.dumps({"metadata": info.metadata, "runtime_env": info.runtime_env, "message": info.message}, default=str)
    assert hf_canary not in zeromix("logs", job_id, env=env).stdout
    searched = []
    for root in (out, zeromix_home, Path(state.temp_dir)):
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink() and path.stat().st_size < 64 * 1024**2:
                searched.append(path)
                assert hf_canary.encode() not in path.read_bytes(), path
    assert len(searched) > 50  # the job's files, the queue database, Ray's session logs
    names = {p.name for p in searched}
    assert "report.html" in names and any(n.startswith("events.out.tfevents") for n in names) and any(n.endswith(".wandb") for n in names)


def test_no_command_imports_ray_before_its_auth_settings_are_in_the_environment():
    """Ray reads RAY_AUTH_MODE and the token's path once, when it is first imported: a module that imports Ray
    at load time makes every later connection go out without the token ("Missing authorization header"), which
    the tests, whose environment already holds the settings, would never notice."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    code = "import sys, orchestrator.cli.commands, orchestrator.client, orchestrator.demo, orchestrator.scheduler.service; print('ray' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert done.stdout.strip() == "False", done.stderr[-2000:]


def test_a_fault_hook_in_a_users_environment_does_nothing(monkeypatch, tmp_path):
    """The test-only hooks act only where the suite armed them too: ZEROMIX_FAULT alone, as a stray line in a
    user's shell profile would leave it, kills, fails and holds nothing."""
    import torch

    from workers import faults

    monkeypatch.delenv(faults.ARM_ENV, raising=False)
    monkeypatch.setenv(faults.FAULT_ENV, f"kill-in-save:2;oom:job:desk/0:1;hold:job:3:{tmp_path / 'never'}")
    faults.kill_in_save(2)  # would kill this process
    faults.out_of_memory("job", "desk/0", 8)  # would raise
    assert faults.armed("hold") == []
    monkeypatch.setenv(faults.ARM_ENV, faults.ARMED)
    with pytest.raises(torch.OutOfMemoryError):
        faults.out_of_memory("job", "desk/0", 8)


def test_the_token_is_readable_by_its_user_only_and_a_new_one_replaces_a_working_one_only_once_the_head_took_it(monkeypatch, tmp_path):
    import stat

    from orchestrator import cluster_runtime
    from tests.conftest import free_port

    def mode(path):
        return stat.S_IMODE(path.stat().st_mode)

    monkeypatch.setenv("ZEROMIX_HOME", str(tmp_path / "home"))
    for key in cluster_runtime.auth_env():  # join sets these in this process: put back after the test
        monkeypatch.setenv(key, os.environ.get(key, ""))
    token = cluster_runtime.token_file()
    token.parent.mkdir()
    token.write_text("copied-in-by-hand")
    token.chmod(0o644)
    cluster_runtime._ensure_token()
    assert (token.read_text(), mode(token)) == ("copied-in-by-hand", 0o600)

    copy = tmp_path / "zm-token"  # a copy the user made, readable by all
    copy.write_text("a-wrong-token\n")
    copy.chmod(0o644)
    with pytest.raises(cluster_runtime.ZeromixError, match="cannot reach the zeromix head"):
        cluster_runtime.join(f"127.0.0.1:{free_port()}", "box", str(copy), str(tmp_path / "offload"), None, measure_rates=False)
    assert (token.read_text(), mode(token)) == ("copied-in-by-hand", 0o600)  # the working token stays
    assert sorted(p.name for p in token.parent.iterdir()) == ["auth_token"]  # and the candidate is gone

    staged = cluster_runtime._stage_token(str(copy))
    assert (staged.read_text(), mode(staged)) == ("a-wrong-token", 0o600) and staged != token

    assert cluster_runtime.rotate_token() == token  # no cluster up here
    assert token.read_text() != "copied-in-by-hand" and len(token.read_text()) == 64 and mode(token) == 0o600
