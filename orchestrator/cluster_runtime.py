"""Bringing the Ray cluster up and down, and connecting to it. Side effects live here.

Ray's internal gRPC ports listen on every interface and Ray has no setting to change that, so zeromix
always runs Ray with token authentication: the token is made at `up`, kept in $ZEROMIX_HOME/auth_token
(mode 0600), and never printed. The dashboard and Jobs API listen on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from orchestrator.cluster_config import load_cluster
from orchestrator.errors import InputError, ZeromixError
from orchestrator.inventory import ClusterSnapshot, Node, snapshot_from_config

RAY_NAMESPACE = "zeromix"


@dataclass(frozen=True)
class ClusterState:
    gcs_address: str
    dashboard_url: str | None  # None on a joined node: the dashboard listens on the head's loopback only
    cluster_file: str | None  # the cluster.yaml of a simulated cluster
    simulated: bool
    node: str | None = None  # on a real node: this machine's zeromix name


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
        raise ZeromixError("this machine is in no zeromix cluster; start one with `zeromix up` (or `zeromix up --simulate "
                           "cluster.yaml`), or join one with `zeromix join --address HEAD:PORT`") from None


def _ray_cli(args: list[str]) -> subprocess.CompletedProcess:
    """Run the `ray` command of this interpreter's environment with the cluster's auth settings."""
    ray_bin = Path(sys.executable).with_name("ray")
    env = {**os.environ, **auth_env()}
    return subprocess.run([str(ray_bin), *args[1:]], env=env, capture_output=True, text=True)


def _start_and_register(node: Node, head_address: str | None, port: int, dashboard_port: int, gcs_address: str) -> None:
    """`ray start` for one node, then its record in the registry. The one path every node takes."""
    from orchestrator import registry
    from workers.registration import ray_start_command

    os.environ.update(auth_env())  # Ray reads its auth settings when it is first imported
    done = _ray_cli(ray_start_command(node, head_address, port, dashboard_port))
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ZeromixError(f"`ray start` failed for node {node.name}: {last[0]}")
    try:
        registry.publish(gcs_address, node)
    except BaseException:
        if not node.simulated:  # a real node that cannot register must not stay half-joined (simulated: the caller stops all)
            _ray_cli(["ray", "stop", "--force"])
        raise


def _refuse_if_up() -> None:
    if _state_file().exists():
        raise ZeromixError(f"this machine is already part of a zeromix cluster ({load_state().gcs_address}); run `zeromix down` first")


def up_simulated(cluster_file: str) -> tuple[ClusterState, ClusterSnapshot]:
    """Every node of cluster.yaml becomes a Ray node on this machine, its cards declared, not probed."""
    _refuse_if_up()
    config = load_cluster(cluster_file)
    snapshot = snapshot_from_config(config, simulated=True)
    _ensure_token()
    head = snapshot.node(config.head_node.name)
    gcs_address = f"127.0.0.1:{config.head.port}"
    try:
        for node in [head, *(n for n in snapshot.nodes if n is not head)]:
            _start_and_register(node, None if node is head else gcs_address, config.head.port, config.head.dashboard_port, gcs_address)
    except BaseException:
        _ray_cli(["ray", "stop", "--force"])  # every node of a simulated cluster is this machine's
        raise
    state = ClusterState(gcs_address, f"http://127.0.0.1:{config.head.dashboard_port}", str(Path(cluster_file).resolve()), True)
    _state_file().write_text(json.dumps(asdict(state)))
    return state, snapshot


def default_node_name() -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().lower()).strip("-")[:32]
    return name or "node"


def _check_name(name: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,31}", name):
        raise InputError("command line", "--name", name, "lower-case letters, digits and '-', at most 32, starting with a letter or digit")
    return name


def _check_own_address(address: str) -> str:
    import psutil

    mine = sorted({a.address for addrs in psutil.net_if_addrs().values() for a in addrs if a.family == socket.AF_INET})
    if address not in mine:
        raise InputError("command line", "--address", address, f"an IPv4 address of this machine: {', '.join(mine)}")
    return address


def up(name: str, address: str, port: int, dashboard_port: int, offload_dir: str, link_gbit_per_s: float | None) -> tuple[ClusterState, Node]:
    """Start the head on this machine and register its own cards, probed through NVML.

    The default address is loopback: a one-machine cluster. Giving a LAN address lets other nodes join;
    Ray's token auth is on either way (its gRPC ports listen on every interface regardless).
    """
    from workers.gpu_probe import probe
    from workers.registration import node_from_probe

    _refuse_if_up()
    node = node_from_probe(probe(offload_dir, head_ip=address), _check_name(name), _check_own_address(address), link_gbit_per_s)
    _ensure_token()
    gcs_address = f"{address}:{port}"
    _start_and_register(node, None, port, dashboard_port, gcs_address)
    state = ClusterState(gcs_address, f"http://127.0.0.1:{dashboard_port}", None, False, node.name)
    _state_file().write_text(json.dumps(asdict(state)))
    return state, node


def join(head: str, name: str, token_path: str | None, offload_dir: str, link_gbit_per_s: float | None) -> tuple[ClusterState, Node]:
    """Probe this machine, start Ray here as a worker of `head` (HOST:PORT), and register every card."""
    from orchestrator import registry
    from workers.gpu_probe import probe
    from workers.registration import node_from_probe

    _refuse_if_up()
    head_ip, _, port = head.rpartition(":")
    if not head_ip or not port.isdigit():
        raise InputError("command line", "--address", head, "the head's HOST:PORT, e.g. 192.168.1.10:6379 (as `zeromix up` printed it)")
    _install_token(token_path)
    found = probe(offload_dir, head_ip=head_ip)
    node = node_from_probe(found, _check_name(name), found.host.address, link_gbit_per_s)
    os.environ.update(auth_env())
    try:
        taken = registry.live_node_names(head)
    except Exception as err:  # unreachable head, wrong token
        raise ZeromixError(f"cannot reach the zeromix head at {head}: {err}. Is `zeromix up --address` running there, "
                           "and is its auth_token the one in this machine's ZEROMIX_HOME?") from None
    if node.name in taken:
        raise InputError("command line", "--name", node.name, f"a different node already uses this name (taken: {', '.join(sorted(taken))})")
    _start_and_register(node, head, 0, 0, head)
    state = ClusterState(head, None, None, False, node.name)
    _state_file().write_text(json.dumps(asdict(state)))
    return state, node


def _install_token(token_path: str | None) -> None:
    """Put the head's token in this machine's ZEROMIX_HOME (mode 0600), or check one is there."""
    path = token_file()
    if token_path:
        try:
            token = Path(token_path).expanduser().read_text().strip()
        except OSError as err:
            raise InputError("command line", "--token-file", token_path, f"a readable copy of the head's auth_token ({err.strerror})") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
    elif not path.exists():
        raise ZeromixError(f"no auth token at {path}: copy the head's ZEROMIX_HOME/auth_token here, or pass --token-file PATH")


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
