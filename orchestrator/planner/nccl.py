"""NCCL settings for a group of cards, one environment per rank.

- NCCL_P2P_DISABLE=1 unless every pair of the group's cards that share a node is known (probed) to do
  peer-to-peer or NVLink. GeForce 40-series cards have no P2P and NCCL can hang trying it
  (deepspeedai/DeepSpeed#4433); a simulated node's cards were never probed, so they count as unknown.
  One value for the whole group: ranks must agree on their transports.
- Across nodes: NCCL_SOCKET_IFNAME, each rank its own node's interface toward the others (probed, or
  `nic:` in cluster.yaml), and NCCL_IB_DISABLE=1, for homelabs have no InfiniBand.
"""

from __future__ import annotations

from itertools import combinations

from orchestrator.inventory import Card, ClusterSnapshot


def _p2p_everywhere(group: list[Card], snapshot: ClusterSnapshot) -> bool:
    for node_name in {c.node for c in group}:
        node = snapshot.node(node_name)
        linked = set(node.p2p_pairs) | set(node.nvlink_pairs)
        here = sorted(c.index for c in group if c.node == node_name)
        if any(pair not in linked for pair in combinations(here, 2)):
            return False
    return True


def nccl_env(group: list[Card], snapshot: ClusterSnapshot) -> list[dict[str, str]]:
    shared_node = len({c.node for c in group}) < len(group)
    common = {"NCCL_P2P_DISABLE": "1"} if shared_node and not _p2p_everywhere(group, snapshot) else {}
    if len({c.node for c in group}) == 1:
        return [dict(common) for _ in group]
    envs = []
    for card in group:
        nic = snapshot.node(card.node).nic
        envs.append({**common, "NCCL_IB_DISABLE": "1", **({"NCCL_SOCKET_IFNAME": nic} if nic else {})})
    return envs
