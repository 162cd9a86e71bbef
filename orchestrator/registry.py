"""The card registry, kept in Ray's own key-value store: one record per node, written when it joins.

Which job holds which card is read here from the live placement groups, what Ray has actually reserved; the
queue (queue.py) keeps its own record of the cards it gave out, and the scheduler checks one against the other. Records are written through Ray's GCS client, which needs
no local Ray driver: `zeromix join` registers a node before anything else runs there.
"""

from __future__ import annotations

import json
from dataclasses import replace

from orchestrator.inventory import ClusterSnapshot, Node, node_from_record, node_to_record

KV_NAMESPACE = "zeromix"
PLACEMENT_GROUP_PREFIX = "zeromix-job-"
GCS_TIMEOUT_S = 10
HEAD_RESOURCE = "node:__internal_head__"  # Ray's marker resource of the head node


def placement_group_name(job_id: str) -> str:
    return PLACEMENT_GROUP_PREFIX + job_id


def _gcs(gcs_address: str):
    from ray._raylet import GcsClient  # what ray.experimental.internal_kv uses underneath

    return GcsClient(address=gcs_address)


def publish(gcs_address: str, node: Node) -> None:
    _gcs(gcs_address).internal_kv_put(f"node/{node.name}".encode(), json.dumps(node_to_record(node)).encode(), True,
                                      KV_NAMESPACE.encode(), timeout=GCS_TIMEOUT_S)


def live_node_names(gcs_address: str) -> set[str]:
    """zeromix names of the Ray nodes alive now."""
    from workers.registration import NODE_LABEL

    alive = 0  # GcsNodeInfo.ALIVE
    infos = _gcs(gcs_address).get_all_node_info(timeout=GCS_TIMEOUT_S).values()
    return {info.labels[NODE_LABEL] for info in infos if info.state == alive and NODE_LABEL in info.labels}


def head_node_name() -> str:
    """The zeromix name of the head node (Ray marks it with a resource)."""
    import ray

    from workers.registration import NODE_LABEL

    return next(n["Labels"][NODE_LABEL] for n in ray.nodes() if n["Alive"] and HEAD_RESOURCE in n["Resources"])


def live_placement_groups() -> dict[str, dict]:
    """job id -> Ray's table entry, for zeromix placement groups that still exist."""
    import ray.util

    groups = {}
    for entry in ray.util.placement_group_table().values():
        name = entry.get("name", "")
        if name.startswith(PLACEMENT_GROUP_PREFIX) and entry["state"] != "REMOVED":
            groups[name.removeprefix(PLACEMENT_GROUP_PREFIX)] = entry
    return groups


def snapshot(live_free_memory: bool = False) -> ClusterSnapshot:
    """Registered nodes that Ray reports alive, each card marked with the job holding it; with
    `live_free_memory`, each real node's cards carry the free memory NVML reports now, not at join."""
    import ray
    from ray.experimental import internal_kv

    from workers.registration import NODE_LABEL

    alive = {n["Labels"].get(NODE_LABEL) for n in ray.nodes() if n["Alive"]}
    nodes = []
    for key in sorted(internal_kv._internal_kv_list("node/", namespace=KV_NAMESPACE)):
        record = json.loads(internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE))
        if record["name"] in alive:
            nodes.append(node_from_record(record))
    holders = {
        resource: job_id
        for job_id, entry in live_placement_groups().items()
        for bundle in entry["bundles"].values()
        for resource in bundle
        if resource.startswith("zm_card_")
    }
    current = ClusterSnapshot(tuple(nodes)).with_holders(holders)
    return _with_free_memory(current, free_memory([n.name for n in nodes if not n.simulated])) if live_free_memory else current


SPEED_MEMORY = 0.5  # each job's figure weighs this much against what earlier jobs measured
SPEED_BOUNDS = (0.2, 5.0)  # beyond these, a measurement says more about the job than about the card


def record_training_speeds(speeds: dict[str, float]) -> list[str]:
    """Fold what a job measured (card id -> its training speed over the plan's estimate) into its nodes' records:
    the next plan on those cards starts from it. Real nodes only: a simulated card's maths ran on this machine's
    CPU and says nothing about the card. Returns the cards updated."""
    from ray.experimental import internal_kv

    by_node: dict[str, dict[int, float]] = {}
    for card_id, speed in speeds.items():
        node, _, index = card_id.rpartition("/")
        by_node.setdefault(node, {})[int(index)] = speed
    updated = []
    for node, cards in by_node.items():
        key = f"node/{node}".encode()
        raw = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)
        record = json.loads(raw) if raw else None
        if not record or record["simulated"]:
            continue
        for card in record["cards"]:
            if card["index"] in cards:
                now = min(max(cards[card["index"]], SPEED_BOUNDS[0]), SPEED_BOUNDS[1])
                before = card.get("training_speed")
                card["training_speed"] = round(now if before is None else SPEED_MEMORY * now + (1 - SPEED_MEMORY) * before, 3)
                updated.append(f"{node}/{card['index']}")
        internal_kv._internal_kv_put(key, json.dumps(record).encode(), overwrite=True, namespace=KV_NAMESPACE)
    return updated


def _with_free_memory(current: ClusterSnapshot, free: dict[str, dict[int, int]]) -> ClusterSnapshot:
    def update(node):
        here = free.get(node.name, {})
        cards = tuple(replace(c, facts=replace(c.facts, memory_free_mib=here.get(c.index, c.facts.memory_free_mib))) for c in node.cards)
        return replace(node, cards=cards)

    return ClusterSnapshot(tuple(update(n) for n in current.nodes))


FREE_MEMORY_TIMEOUT_S = 15


def free_memory(nodes: list[str]) -> dict[str, dict[int, int]]:
    """Free memory per card now, asked of each real node by a small task pinned there by its label.
    A node that does not answer in time is left out (its caller shows the figure from registration)."""
    import ray

    from workers.gpu_probe import free_memory_mib
    from workers.registration import NODE_LABEL

    ask = ray.remote(num_cpus=0)(free_memory_mib)
    pending = {ask.options(label_selector={NODE_LABEL: name}).remote(): name for name in nodes}
    done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=FREE_MEMORY_TIMEOUT_S)
    answers = {}
    for ref in done:
        try:
            answers[pending[ref]] = ray.get(ref)
        except ray.exceptions.RayError:
            pass
    for ref in set(pending) - set(done):
        ray.cancel(ref, force=True)
    return answers


SHARED_PROBE_TIMEOUT_S = 30


def nodes_that_cannot_see(directory: str, nodes: list[str]) -> list[str]:
    """Of these nodes, those that do not see a file written into `directory` here (the head): a job across boxes
    writes its checkpoint shards from every rank into its output_dir, and rank 0 reads them all."""
    import os
    import secrets

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from workers.registration import NODE_LABEL

    ray_ids = {n["Labels"].get(NODE_LABEL): n["NodeID"] for n in ray.nodes() if n["Alive"]}
    os.makedirs(directory, exist_ok=True)
    probe = os.path.join(directory, f".zeromix-shared-{secrets.token_hex(4)}")
    open(probe, "w").close()
    try:
        look = ray.remote(num_cpus=0)(_exists)
        refs = {node: look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(ray_ids[node], soft=False)).remote(probe)
                for node in nodes if node in ray_ids}
        seen = dict(zip(refs, ray.get(list(refs.values()), timeout=SHARED_PROBE_TIMEOUT_S)))
    finally:
        os.remove(probe)
    return [node for node in nodes if not seen.get(node)]


def _exists(path: str) -> bool:
    import os

    return os.path.exists(path)
