"""Which cards to use. More cards are not always faster: a slow card across 1 GbE adds little compute and
makes every step wait for the network, and one Pascal card drags the whole group down to fp32. So the
planner considers whole-node sets (every subset for a homelab, node prefixes by compute for bigger pools),
each also without its slowest precision class, and each as many cards as the job may take or as few as it
must; it ranks them by a quick throughput estimate and tunes the best few in full.
"""

from __future__ import annotations

from itertools import combinations, islice

from orchestrator.inventory import Card
from orchestrator.planner.step_time import card_tflops

MAX_NODES_ENUMERATED = 8  # 255 node subsets; beyond that, node prefixes ordered by compute
PRECISION_CLASSES = ((8, 0), (7, 0))  # bf16-capable, fp16-capable: dropping the cards below one changes the group's precision


def candidate_groups(eligible: list[Card], lo: int, hi: int, precision_for) -> list[tuple[Card, ...]]:
    """Distinct card sets of size lo..hi worth planning, each sorted fastest first. `precision_for(cc)` is the
    precision a set of cards whose lowest compute capability is `cc` runs."""
    by_node: dict[str, list[Card]] = {}
    for card in eligible:
        by_node.setdefault(card.node, []).append(card)
    floors = ((0, 0), *PRECISION_CLASSES)  # all the cards, then without those below each precision class
    # per node and floor, its lowest compute capability at or above the floor (None: no card that high)
    lowest_at = {n: {f: min((c.compute_capability for c in cards if c.compute_capability >= f), default=None) for f in floors}
                 for n, cards in by_node.items()}
    by_rate: dict[str, list[Card]] = {}  # every eligible card fastest first, per precision: sorted once, filtered per set

    def fastest_first(precision: str) -> list[Card]:
        if precision not in by_rate:
            by_rate[precision] = sorted(eligible, key=lambda c: (-card_tflops(c, precision), c.card_id))
        return by_rate[precision]

    lowest_of: dict[tuple, dict] = {(): {f: None for f in floors}}

    def lowest(node_set) -> dict:
        """Per floor, the set's lowest compute capability at or above it: from the set without its last node (every
        set's prefix is a set enumerated before it)."""
        if node_set not in lowest_of:
            before, last = lowest(node_set[:-1]), lowest_at[node_set[-1]]
            lowest_of[node_set] = {f: min((x for x in (before[f], last[f]) if x), default=None) for f in floors}
        return lowest_of[node_set]

    node_rate = {n: sum(card_tflops(c, precision_for(lowest_at[n][(0, 0)])) for c in cards) for n, cards in by_node.items()}
    nodes = sorted(by_node, key=lambda n: -node_rate[n])
    if len(nodes) <= MAX_NODES_ENUMERATED:
        node_sets = [s for k in range(1, len(nodes) + 1) for s in combinations(nodes, k)]
    else:
        node_sets = [tuple(nodes[:k]) for k in range(1, len(nodes) + 1)]
    seen, groups = set(), []
    for node_set in node_sets:
        lows = lowest(node_set)
        everything = lows[(0, 0)]
        for floor in floors:
            low = lows[floor]
            if low is None or (floor > (0, 0) and everything >= floor):
                continue  # no card that high, or none lower: nothing new
            members = set(node_set)
            fastest = tuple(islice((c for c in fastest_first(precision_for(low)) if c.node in members and c.compute_capability >= floor), hi))
            # every card the job may take, or only as few as it must: with no collective at all, one card can
            # beat several; in between, more cards only add compute at almost the same communication cost
            for group in (fastest, fastest[:max(lo, 1)]):
                key = frozenset(c.card_id for c in group)
                if len(group) >= lo and key not in seen:
                    seen.add(key)
                    groups.append(group)
    return groups
