"""How a node offers its cards to Ray: one custom resource per card, so a placement-group bundle can ask
for *that* card. Ray itself labels a node by GPU 0's type only (and older Ray collapsed every GeForce name
to "G"), which cannot tell a 3090 from the 1080 Ti beside it. A simulated node (cluster.yaml) and a real
one (NVML probe) become the same `Node` and go through this same code; only the source of the facts differs.
"""

from __future__ import annotations

import json

from orchestrator.inventory import Node, build_node
from workers.gpu_probe import NodeProbe
from workers.ports import free_ports

NODE_LABEL = "zeromix.io/node"
SIMULATED_OBJECT_STORE_BYTES = 256 * 1024**2  # several simulated nodes share one machine's /dev/shm
ASSUMED_LINK_GBIT = 1.0  # when neither the user nor the kernel says how fast the node's NIC is


def node_from_probe(probe: NodeProbe, name: str, address: str, link_gbit_per_s: float | None) -> Node:
    """A real node as it registers. Its link to the others is what the user said, else its NIC's speed."""
    speed = probe.host.nic_speed_mbit
    link = link_gbit_per_s or (speed / 1000 if speed else ASSUMED_LINK_GBIT)
    return build_node(name, address, probe.host.ram_gb, probe.host.cpus, link, list(probe.cards), simulated=False,
                      software=probe.software, disk_free_gb=probe.host.disk_free_gb, nic=probe.host.nic,
                      p2p_pairs=probe.p2p_pairs, nvlink_pairs=probe.nvlink_pairs, warnings=probe.warnings)


AGENT_PORTS = 5  # a node's dashboard agent (HTTP, gRPC), runtime-env agent, metrics export, and the head's client server


def agent_ports(nodes: int, avoid: tuple[int, ...] = ()) -> list[tuple[int, ...]]:
    """AGENT_PORTS free ports for each of `nodes` nodes started together, chosen in one go so that no two share one
    (each is listened on only once its `ray start` runs), and none of `avoid` (the head's GCS and dashboard ports)."""
    ports = free_ports(AGENT_PORTS * nodes, avoid=avoid)
    return [tuple(ports[i:i + AGENT_PORTS]) for i in range(0, len(ports), AGENT_PORTS)]


def ray_start_command(node: Node, head_address: str | None, port: int, dashboard_port: int, temp_dir: str,
                      ports: tuple[int, ...]) -> list[str]:
    """`ray start` for this node: the head when `head_address` is None, else a worker joining it; its agents on
    `ports` (from `agent_ports`).

    Ray's agents default to fixed ports (52365 for the dashboard agent, 10001 for the client server), so
    two clusters on one machine (or several simulated nodes) would collide: every node gets free ones,
    and its own temp dir (so simulated nodes' log monitors no longer read each other's files and print every
    line once per node)."""
    agent, grpc, runtime_env, metrics, client = ports
    command = ["ray", "start", "--disable-usage-stats", f"--temp-dir={temp_dir}",
               f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}",
               f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}"]
    if head_address is None:
        # The dashboard (and the Jobs API behind it) listens on loopback only.
        command += ["--head", f"--port={port}", "--include-dashboard=true", f"--ray-client-server-port={client}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
    else:
        command += [f"--address={head_address}"]
    resources = {card.resource: 1 for card in node.cards}
    command += [
        f"--num-cpus={node.cpus}",
        f"--num-gpus={len(node.cards)}",
        f"--resources={json.dumps(resources)}",
        f"--labels={NODE_LABEL}={node.name}",
    ]
    if node.simulated:
        command += [f"--object-store-memory={SIMULATED_OBJECT_STORE_BYTES}"]
    else:
        command += [f"--node-ip-address={node.address}"]  # the address other nodes reach it on
    return command
