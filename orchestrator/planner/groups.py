"""Which cards to use. More cards are not always faster: a slow card across 1 GbE adds little compute and
makes every step wait for the network, and one Pascal card drags the whole group down to fp32. So the
planner considers whole-node sets (every subset for a homelab, node prefixes by compute for bigger pools),
each also without its slowest precision class, and each as many cards as the job may take or as few as it
must; it ranks them by a quick throughput estimate and tunes the best few in full.
"""

from __future__ import annotations

from itertools import combinations

from orchestrator.inventory import Card
from orchestrator.planner.step_time import card_tflops

MAX_NODES_ENUMERATED = 8  # 255 node subsets; beyond that, node prefixes ordered by compute
PRECISION_CLASSES = ((8, 0), (7, 0))  # bf16-capable, fp16-capable: dropping the cards below one changes the group's precision


def candidate_groups(eligible: list[Card], lo: int, hi: int, precision_of) -> list[tuple[Card, ...]]:
    """Distinct card sets of size lo..hi worth planning, each sorted fastest first. `precision_of(cards)` is
    the precision those cards would run together."""
    by_node: dict[str, list[Card]] = {}
    for card in eligible:
        by_node.setdefault(card.node, []).append(card)
    node_rate = {n: sum(card_tflops(c, precision_of(cards)) for c in cards) for n, cards in by_node.items()}
    nodes = sorted(by_node, key=lambda n: -node_rate[n])
    if len(nodes) <= MAX_NODES_ENUMERATED:
        node_sets = [s for k in range(1, len(nodes) + 1) for s in combinations(nodes, k)]
    else:
        node_sets = [tuple(nodes[:k]) for k in range(1, len(nodes) + 1)]
    seen, groups = set(), []
    for node_set in node_sets:
        cards = [c for n in node_set for c in by_node[n]]
        variants = [cards] + [[c for c in cards if c.compute_capability >= floor] for floor in PRECISION_CLASSES]
        for variant in variants:
            if not variant:
                continue
            precision = precision_of(variant)
            fastest = sorted(variant, key=lambda c: (-card_tflops(c, precision), c.card_id))
            # every card the job may take, or only as few as it must: with no collective at all, one card can
            # beat several; in between, more cards only add compute at almost the same communication cost
            for group in (tuple(fastest[:hi]), tuple(fastest[:max(lo, 1)])):
                key = frozenset(c.card_id for c in group)
                if len(group) >= lo and key not in seen:
                    seen.add(key)
                    groups.append(group)
    return groups
