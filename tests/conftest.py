import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workers import ports

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
TINY_LLAMA = REPO / "jobs" / "examples" / "tiny-llama"
# What a fixture costs, as a marker: `make test-fast` leaves out tests that start clusters or DeepSpeed ranks.
MARKED_BY_FIXTURE = {"cluster": "cluster", "connected": "cluster", "isolated_home": "cluster", "ds_runs": "deepspeed"}


# The one test that cancels the session's long job: it runs after every other user of that job, in any file order.
CANCELS_THE_LONG_JOB = "test_a_killed_scheduler_comes_back_and_every_job_is_where_it_was"


def pytest_collection_modifyitems(items):
    for item in items:
        for name in {MARKED_BY_FIXTURE[f] for f in getattr(item, "fixturenames", ()) if f in MARKED_BY_FIXTURE}:
            item.add_marker(name)
    _run_the_long_jobs_users_together(items)


def _run_the_long_jobs_users_together(items) -> None:
    """The long job trains from its first user to its cancel, a rank at full speed on one of CI's two cores: its
    users run one after another where the last of them was (the cancelling one last), not spread over the suite
    (they were: it took a core from ten minutes of other tests)."""
    users = [item for item in items if "long_job" in getattr(item, "fixturenames", ())]
    if not users:
        return
    at = sum(1 for item in items[:items.index(users[-1])] if item not in users)
    users.sort(key=lambda item: item.name == CANCELS_THE_LONG_JOB)  # stable: the others keep their order
    items[:] = [item for item in items if item not in users]
    items[at:at] = users


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict[str, Path]:
    from orchestrator.demo.task import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("demo-data"), pretrain_lines=1200, reverse_train=800, reverse_eval=50)


@pytest.fixture(scope="session")
def base_model(tmp_path_factory) -> str:
    """A 'pretrained' model for LoRA and resume cases: the tiny Llama, randomly initialised and saved."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("base")
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_LLAMA)).save_pretrained(path)
    AutoTokenizer.from_pretrained(TINY_LLAMA).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def ds_runs(tmp_path_factory):
    """Every distinct three-rank DeepSpeed run of the session, trained once (tests/helpers.DeepSpeedRuns)."""
    from tests.helpers import DeepSpeedRuns

    return DeepSpeedRuns(tmp_path_factory.mktemp("ds-runs"))


@pytest.fixture(scope="session", autouse=True)
def zeromix_home(tmp_path_factory) -> Path:
    """One ZEROMIX_HOME, hence one auth token, for every cluster this test process talks to: Ray reads its
    auth settings once per process, so clusters with different tokens cannot follow one another here. Set up before
    the session's first test (autouse): a test that imports Ray earlier (DeepSpeed runs do) would leave every later
    Jobs API call without the token, whichever order the tests are given in."""
    home = tmp_path_factory.mktemp("zeromix-home")
    os.environ["ZEROMIX_HOME"] = str(home)
    from orchestrator import cluster_runtime

    # Before anything in this process imports Ray: it reads its auth settings once, at import. The token is made
    # now, as the first `zeromix up` would (it keeps one it finds): a Ray client made before any cluster is up (the
    # Jobs API client's timeout test) fails on a token path with no file.
    os.environ.update(cluster_runtime.auth_env())
    cluster_runtime._ensure_token()
    yield home
    os.environ.pop("ZEROMIX_HOME")


def canary_env(secret: str) -> dict[str, str]:
    """A Hugging Face token exported as a user hands gated models to the workers (and W&B kept offline)."""
    return {"HF_TOKEN": secret, "HUGGING_FACE_HUB_TOKEN": secret, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


@pytest.fixture(scope="session")
def hf_canary() -> str:
    """The session cluster starts with this token in its environment; no log, metadata, result or database may
    ever hold it (tests/test_security.py searches them all at the end)."""
    import secrets

    return "hf_" + secrets.token_hex(16)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory, zeromix_home, hf_canary):
    """The shipped homelab on free ports, in the session's ZEROMIX_HOME: started once, shared by every test
    that needs a running cluster (`zeromix up` also starts the scheduler)."""
    from tests.helpers import cluster_file

    work = tmp_path_factory.mktemp("cluster")
    up = zeromix("up", "--simulate", str(cluster_file(work)), timeout=240, env=canary_env(hf_canary))
    assert "3 nodes and 5 cards registered" in up.stdout and "scheduler: running" in up.stdout
    from orchestrator import cluster_runtime

    yield cluster_runtime.load_state(), work
    import ray

    ray.shutdown()
    zeromix("down")


@pytest.fixture(scope="session")
def scratch_run(cluster, demo_data):
    """The demo's first job (full, ZeRO-2, on the 1080 Ti and the 3090) through `zeromix submit --follow`, once
    per session. Its model and output directories are named with shell text (`;`, `$(...)`, backticks): they
    must stay paths, and the canary file those commands would make must never appear (tests/test_security.py)."""
    import shutil

    state, work = cluster
    canary = work / "canary"
    model = work / f"m; touch {canary}; $(touch {canary}) `touch {canary}`"
    shutil.copytree(TINY_LLAMA, model)
    out = work / f"scratch; touch {canary}"
    done = zeromix("submit", "--follow", "jobs/examples/tiny-llama-scratch.yaml", "--set", f"model.path={model}", "--set", f"output_dir={out}",
                   "--set", f"dataset.path={demo_data['pretrain']}", "--set", "max_steps=60")
    return state, submitted_id(done.stdout), out, done.stdout


LONG_JOB_CARD = "NVIDIA GeForce RTX 2080 Ti"  # attic/1: no other test's job asks for it


@pytest.fixture(scope="session")
def long_job(cluster, demo_data) -> str:
    """One job that runs until it is cancelled, on the 2080 Ti alone: the tests of a running job (its holds, its
    metrics, a scheduler killed under it) share it, rather than each placing a job of its own only to cancel it.
    The one that cancels it (tests/test_scheduler_cluster.py, the scheduler's restart) is moved after the others."""
    state, work = cluster
    done = zeromix("submit", "jobs/examples/tiny-llama-scratch.yaml", "--set", f"output_dir={work / 'long'}", "--set", "max_steps=100000",
                   "--set", f"dataset.path={demo_data['pretrain']}", "--set", "gpus.count=1", "--set", f"gpus.models=[{LONG_JOB_CARD}]",
                   "--set", "report_to=[]")
    job_id = submitted_id(done.stdout)
    yield job_id
    zeromix("cancel", job_id, check=False)


def running(job_id: str) -> str:
    """The job, once it is running (a shared job's users each wait for that, whichever runs first)."""
    assert wait_for_state(job_id, ("running",), 120) == "running"
    return job_id


def wait_until(condition, timeout_s: float, what: str, every_s: float = 0.5):
    """Poll `condition` until it is truthy; fail after `timeout_s` saying what never happened."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(every_s)
    return value


def wait_for_rounds(state, rounds: int, timeout_s: float = 60) -> None:
    """Until the scheduler has run `rounds` more rounds (its own counter), rather than sleeping a guess."""
    from orchestrator.scheduler.service import health

    start = health(state)["rounds"]
    wait_until(lambda: health(state)["rounds"] >= start + rounds, timeout_s, f"{rounds} scheduler rounds")


@pytest.fixture
def connected(cluster):
    """The session cluster, with this process's Ray driver attached to it (a test with its own cluster
    detaches when it ends)."""
    from orchestrator import cluster_runtime

    state, work = cluster
    cluster_runtime.connect(state)
    return state, work


@pytest.fixture
def isolated_home(tmp_path, zeromix_home, monkeypatch):
    """A ZEROMIX_HOME of its own, for a test that starts its own cluster beside the session's. It holds a
    copy of the session's auth token: Ray reads the token once per process."""
    import shutil

    import ray

    from orchestrator import cluster_runtime

    home = tmp_path / "own-home"
    home.mkdir()
    shutil.copy2(cluster_runtime.token_file(), home / "auth_token")
    ray.shutdown()
    monkeypatch.setenv("ZEROMIX_HOME", str(home))
    yield home
    ray.shutdown()
    zeromix("down", check=False)


def queue_store():
    from orchestrator.queue import QueueStore
    from orchestrator.scheduler.service import queue_path

    return QueueStore(queue_path())


def wait_for_state(job_id: str, states: tuple[str, ...], timeout_s: float = 300) -> str:
    """Poll the queue (not the CLI: nobody calls zeromix meanwhile) until the job is in one of `states`."""
    store = queue_store()
    deadline = time.time() + timeout_s
    while (state := store.get(job_id).state) not in states:
        if time.time() > deadline:
            raise AssertionError(f"{job_id} still {state} after {timeout_s} s, not {states}: {store.get(job_id).reason}")
        time.sleep(0.5)
    return state


NVML_DOUBLE = REPO / "tests" / "nvml_double"
NVML_BOXES = REPO / "tests" / "data" / "nvml_boxes"


@pytest.fixture
def nvml():
    """A fresh copy of the NVML double (tests/nvml_double/pynvml.py), loaded under its own name so the
    real pynvml stays importable."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("nvml_double", NVML_DOUBLE / "pynvml.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    return ports.free_port("127.0.0.1")


def zeromix(*args: str, check: bool = True, timeout: int = 300, env: dict | None = None, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run the CLI as a user would (`prefix` runs it inside e.g. `ip netns exec NS`)."""
    done = subprocess.run([*prefix, sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "COLUMNS": "200", **(env or {})}, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"zeromix {' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def cli(*args: str, check: bool = True, columns: int = 200) -> subprocess.CompletedProcess:
    """A command that needs no cluster (plan --pool, advise, make-trace, simulate, a refused spec), run in this
    process through the CLI's own entry point, its error handling included: no interpreter to start and no
    imports to pay again. (`zeromix` above runs the installed program as a user would.)"""
    import contextlib
    import io

    from rich.console import Console

    from orchestrator.cli import commands as program, render

    out, err, code = io.StringIO(), io.StringIO(), 0
    saved = sys.argv, render.console, os.getcwd()
    sys.argv, render.console = ["zeromix", *args], Console(width=columns)
    os.chdir(REPO)  # relative paths as `zeromix` below sees them
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            program.main()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        sys.argv, render.console, cwd = saved
        os.chdir(cwd)
    if check and code != 0:
        raise AssertionError(f"zeromix {' '.join(args)} exited {code}:\n{out.getvalue()[-3000:]}\n{err.getvalue()[-3000:]}")
    return subprocess.CompletedProcess(["zeromix", *args], code, out.getvalue(), err.getvalue())


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
