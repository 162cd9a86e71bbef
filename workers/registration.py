"""How a node offers its cards to Ray: one custom resource per card, so a placement-group bundle can ask
for *that* card. Ray itself labels a node by GPU 0's type only, which cannot tell a 3090 from the 1080 Ti
beside it. The simulated cluster and a real node go through this same function; only the source of the
card list differs (cluster.yaml vs NVML)."""

from __future__ import annotations

import json

from orchestrator.inventory import Node

NODE_LABEL = "zeromix.io/node"
SIMULATED_OBJECT_STORE_BYTES = 256 * 1024**2  # several simulated nodes share one machine's /dev/shm


def ray_start_command(node: Node, head_address: str | None, port: int, dashboard_port: int) -> list[str]:
    """`ray start` for this node: the head when `head_address` is None, else a worker joining it."""
    command = ["ray", "start", "--disable-usage-stats"]
    if head_address is None:
        # The dashboard (and the Jobs API behind it) listens on loopback only.
        command += ["--head", f"--port={port}", "--include-dashboard=true",
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
    return command
