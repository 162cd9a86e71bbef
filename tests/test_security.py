"""What a stranger on the home LAN, or a hostile job spec, must not get: the Jobs API without the token, or a
shell command smuggled in through a field. On the session cluster."""

import shutil
import urllib.error
import urllib.request

import pytest

from tests.conftest import TINY_LLAMA, job_status, submitted_id, zeromix

pytestmark = pytest.mark.cluster


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


def test_shell_text_in_a_path_is_a_path_never_a_command(connected, demo_data, tmp_path):
    """A model directory and an output dir whose names hold `;`, `$(...)` and backticks: the job trains from and
    writes to exactly those directories, and no command in them ever runs (the canary file stays absent)."""
    state, _ = connected
    canary = tmp_path / "canary"
    hostile = f"m; touch {canary}; $(touch {canary}) `touch {canary}`"
    model = tmp_path / hostile
    shutil.copytree(TINY_LLAMA, model)
    out = tmp_path / f"out; touch {canary}"
    done = zeromix("submit", "--follow", "jobs/examples/tiny-llama-scratch.yaml", "--set", f"model.path={model}",
                   "--set", f"output_dir={out}", "--set", f"dataset.path={demo_data['pretrain']}", "--set", "max_steps=2")
    assert job_status(state, submitted_id(done.stdout)) == "SUCCEEDED"
    assert (out / "final" / "model.safetensors").is_file()
    assert not canary.exists()
