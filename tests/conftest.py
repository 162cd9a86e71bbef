import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
TINY_LLAMA = REPO / "jobs" / "examples" / "tiny-llama"


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict[str, Path]:
    from orchestrator.demo.task import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("demo-data"), pretrain_lines=1200, reverse_train=800, reverse_eval=50)


@pytest.fixture(scope="session")
def zeromix_home(tmp_path_factory) -> Path:
    """One ZEROMIX_HOME, hence one auth token, for every cluster this test process talks to: Ray reads its
    auth settings once per process, so clusters with different tokens cannot follow one another here."""
    home = tmp_path_factory.mktemp("zeromix-home")
    os.environ["ZEROMIX_HOME"] = str(home)
    yield home
    os.environ.pop("ZEROMIX_HOME")


NVML_DOUBLE = REPO / "tests" / "nvml_double"
NVML_BOXES = REPO / "tests" / "data" / "nvml_boxes"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zeromix(*args: str, check: bool = True, timeout: int = 300, env: dict | None = None, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run the CLI as a user would (`prefix` runs it inside e.g. `ip netns exec NS`)."""
    done = subprocess.run([*prefix, sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "COLUMNS": "200", **(env or {})}, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"zeromix {' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def nvml_box_env(box: str) -> dict[str, str]:
    """Environment that makes every process started with it (Ray's raylets and workers included) see the
    NVML double answering as the named box."""
    return {"PYTHONPATH": os.pathsep.join([str(NVML_DOUBLE), str(REPO)]), "ZEROMIX_TEST_NVML_BOX": str(NVML_BOXES / f"{box}.json")}


def submitted_id(stdout: str) -> str:
    return next(line.split()[1] for line in stdout.splitlines() if line.startswith("submitted "))


def job_status(state, job_id: str) -> str:
    from orchestrator.launch import jobs_client

    return jobs_client(state).get_job_status(job_id).value


def wait_for_end(state, job_id: str, timeout_s: float = 300) -> str:
    deadline = time.time() + timeout_s
    while (status := job_status(state, job_id)) not in ("SUCCEEDED", "FAILED", "STOPPED") and time.time() < deadline:
        time.sleep(1)
    return status
