"""Bringing the Ray cluster up and down, and connecting to it. Side effects live here.

Ray's internal gRPC ports listen on every interface and Ray has no setting to change that, so zeromix
always runs Ray with token authentication: the token is made at `up`, kept in $ZEROMIX_HOME/auth_token
(mode 0600), and never printed. The dashboard and Jobs API listen on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from orchestrator.cluster_config import load_cluster
from orchestrator.errors import ZeromixError
from orchestrator.inventory import ClusterSnapshot, snapshot_from_config

RAY_NAMESPACE = "zeromix"


@dataclass(frozen=True)
class ClusterState:
    gcs_address: str
    dashboard_url: str
    cluster_file: str
    simulated: bool


def home() -> Path:
    return Path(os.environ.get("ZEROMIX_HOME", "~/.zeromix")).expanduser()


def _state_file() -> Path:
    return home() / "cluster.json"


def token_file() -> Path:
    return home() / "auth_token"


def auth_env() -> dict[str, str]:
    """What any process needs to talk to the cluster. The token's path, never the token itself."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file()), "RAY_USAGE_STATS_ENABLED": "0"}


def _ensure_token() -> None:
    path = token_file()
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


def load_state() -> ClusterState:
    try:
        return ClusterState(**json.loads(_state_file().read_text()))
    except FileNotFoundError:
        raise ZeromixError("no zeromix cluster is up; start one with `zeromix up --simulate cluster.yaml`") from None


def _ray_cli(args: list[str]) -> subprocess.CompletedProcess:
    """Run the `ray` command of this interpreter's environment with the cluster's auth settings."""
    ray_bin = Path(sys.executable).with_name("ray")
    env = {**os.environ, **auth_env()}
    return subprocess.run([str(ray_bin), *args[1:]], env=env, capture_output=True, text=True)


def up_simulated(cluster_file: str) -> tuple[ClusterState, ClusterSnapshot]:
    """Every node of cluster.yaml becomes a Ray node on this machine, its cards declared, not probed."""
    from workers.registration import ray_start_command

    if _state_file().exists():
        raise ZeromixError(f"a zeromix cluster is already up ({load_state().dashboard_url}); run `zeromix down` first")
    config = load_cluster(cluster_file)
    snapshot = snapshot_from_config(config, simulated=True)
    _ensure_token()
    head = snapshot.node(config.head_node.name)
    gcs_address = f"127.0.0.1:{config.head.port}"
    others = [n for n in snapshot.nodes if n is not head]
    for node in [head, *others]:
        command = ray_start_command(node, None if node is head else gcs_address, config.head.port, config.head.dashboard_port)
        done = _ray_cli(command)
        if done.returncode != 0:
            _ray_cli(["ray", "stop", "--force"])
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ZeromixError(f"`ray start` failed for node {node.name}: {last[0]}")
    state = ClusterState(gcs_address, f"http://127.0.0.1:{config.head.dashboard_port}", str(Path(cluster_file).resolve()), True)
    connect(state)
    from orchestrator import registry

    for node in snapshot.nodes:
        registry.publish(node)
    _state_file().write_text(json.dumps(asdict(state)))
    return state, snapshot


def down() -> bool:
    """Stop Ray on this machine and forget the cluster. Returns False if none was up."""
    was_up = _state_file().exists()
    _ray_cli(["ray", "stop", "--force"])
    _state_file().unlink(missing_ok=True)
    return was_up


def connect(state: ClusterState | None = None) -> ClusterState:
    """Join the cluster as a Ray driver (idempotent)."""
    state = state or load_state()
    os.environ.update(auth_env())  # Ray reads its auth settings when it is first imported
    import ray

    if not ray.is_initialized():
        ray.init(address=state.gcs_address, namespace=RAY_NAMESPACE, log_to_driver=False, logging_level="WARNING")
    return state
