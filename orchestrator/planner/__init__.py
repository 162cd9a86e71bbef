"""The planner: a job spec, model facts and a cluster snapshot in; a plan out. Pure: no Ray, no torch.

    filter cards (filters.py) -> one software build -> candidate card groups (groups.py), ranked by a quick
    throughput estimate -> for the best few, tune (tuning.py): enumerate ZeRO stage / offload / checkpointing
    settings -> filter by host RAM -> score each: per-card micro-batches within each card's memory (memory.py,
    split.py) and step time (step_time.py) -> the fastest plan (plan.py), with every card left out and why;
    or, when nothing fits, what would.
"""

from __future__ import annotations

from dataclasses import replace

from orchestrator.errors import InputError, ZeromixError
from orchestrator.inventory import Card, ClusterSnapshot
from orchestrator.jobspec import JobSpec
from orchestrator.model_facts import ModelFacts
from orchestrator.planner import outer, step_time
from orchestrator.planner.filters import DEFAULT_FILTERS
from orchestrator.planner.groups import candidate_groups
from orchestrator.planner.memory import GIB, ZeroSetting
from orchestrator.planner.plan import Plan, RankPlan, Rejection
from orchestrator.planner.precision import precision_for, resolve_precision
from orchestrator.planner.split import step_lower_bound
from orchestrator.planner.tuning import HOST_RAM_RESERVED, Group, PlanInput, fits, host_bytes, host_ram_ok, quick_tokens_per_s, training_shape, tune

__all__ = ["HOST_RAM_RESERVED", "NoPlacement", "Plan", "RankPlan", "Rejection", "lora_targets", "make_plan", "on_the_same_cards", "precision_for",
           "resolve_precision", "step_time", "suggestions"]
FULLY_TUNED_GROUPS = 8  # candidate groups tuned in full, best quick estimate first
MOST_GROUPS_TRIED = 32  # ... or more, while none of them fits


class NoPlacement(ZeromixError):
    """Nothing fits. The message lists why each card was left out and what would help."""


def make_plan(job: JobSpec, facts: ModelFacts, snapshot: ClusterSnapshot, total_steps: int, filters=DEFAULT_FILTERS,
              suggest: bool = True, groups_seen: dict | None = None, tuned: dict | None = None) -> Plan:
    """The fastest plan for the job on these cards. `suggest`: when nothing fits, plan variants of the job
    to say what would. `groups_seen`: a dict a caller that plans many jobs on one cluster keeps (the scheduler's
    throughput table): the candidate groups depend only on the eligible cards, the job's card bounds and its
    precision, so jobs alike in those share one enumeration. `tuned`: a dict such a caller keeps per job shape
    (every field the planner reads but the name and steps) on one cluster: a group's tuning depends only on its
    cards, so the plans of that shape on other sets of free cards reuse it."""
    trainable = _trainable(job, facts)
    ctx = PlanInput(job, facts, snapshot, trainable, lora_targets(job, facts), total_steps)
    rejected: dict[str, Rejection] = {}
    eligible: list[Card] = []
    for card in snapshot.cards:
        verdict = next((v for v in (f.check(job, card) for f in filters) if not v.ok), None)
        if verdict:
            rejected[card.card_id] = Rejection(card.card_id, card.short_name, verdict.reason)
        else:
            eligible.append(card)
    eligible = _one_build(eligible, rejected)

    lo, hi = job.gpus.bounds
    hi = min(hi or len(eligible), job.global_batch_size)
    key = (frozenset(c.card_id for c in eligible), lo, hi, job.precision)
    seen = groups_seen if groups_seen is not None else {}
    if key not in seen:  # by card id: a job's memory caps give its cards other capacities, not other groups
        seen[key] = [[c.card_id for c in g] for g in candidate_groups(eligible, lo, hi, lambda lowest: precision_for(job.precision, lowest))]
    card = {c.card_id: c for c in eligible}
    groups = [Group(ctx, [card[i] for i in ids]) for ids in seen[key]]
    groups.sort(key=lambda g: -quick_tokens_per_s(g))
    best, misfits = None, {}
    for tried, group in enumerate(groups[:MOST_GROUPS_TRIED]):
        if best is not None and tried >= FULLY_TUNED_GROUPS:
            break
        # A group across boxes may run outer steps (outer.py): one too slow synchronously may still win that way, as
        # long as its compute alone (no collective at all) beats the best so far; so it is tuned without that bound
        across = job.sync.mode != "synchronous" and len({c.node for c in group.cards}) > 1
        bounded = best is not None and not (across and step_lower_bound(job.global_batch_size, group.plain_s, (0.0,) * group.world) < best.step.step_s)
        plan, dropped = _fit(group, lo, best.step.step_s if bounded else None, tuned if tuned is not None else {})
        plan = outer.choose(ctx, plan) if plan and across else plan
        if plan and (best is None or plan.step.tokens_per_s > best.step.tokens_per_s):
            best, misfits = plan, dropped
    if best is None:
        raise NoPlacement(_no_placement_message(ctx, lo, eligible, rejected, groups, suggest))
    chosen = {r.card.card_id for r in best.ranks}
    for card in eligible:
        if card.card_id not in chosen:
            rejected[card.card_id] = misfits.get(card.card_id) or _left_out(ctx, best, card, hi)
    ordered = tuple(rejected[c.card_id] for c in snapshot.cards if c.card_id in rejected)
    return replace(best, rejected=ordered)


def on_the_same_cards(job: JobSpec, facts: ModelFacts, snapshot: ClusterSnapshot, plan: Plan) -> Plan | str:
    """A variant of a job planned on exactly the cards of `plan` (for `zeromix plan` to show, e.g., what LoRA with a
    16-bit base would need where QLoRA runs): its plan, or in a few words why it does not fit there."""
    chosen = {r.card.card_id for r in plan.ranks}
    only = ClusterSnapshot(tuple(replace(n, cards=tuple(c for c in n.cards if c.card_id in chosen)) for n in snapshot.nodes
                                 if any(c.card_id in chosen for c in n.cards)))
    pinned = job.model_copy(update={"gpus": job.gpus.model_copy(update={"count": len(chosen), "models": None})})
    try:
        return make_plan(pinned, facts, only, plan.total_steps, suggest=False)
    except NoPlacement:
        return "no ZeRO/offload/checkpointing setting holds it on these cards (estimate)"


def lora_targets(job: JobSpec, facts: ModelFacts) -> tuple[str, ...]:
    """The modules LoRA adapts: the spec's, or PEFT's default for the architecture. Nothing for a full fine-tune."""
    if not job.adapters:
        return ()
    return tuple(job.lora_config.target_modules or facts.default_lora_targets)


def _trainable(job: JobSpec, facts: ModelFacts) -> int:
    if not job.adapters:
        return facts.n_params
    targets = lora_targets(job, facts)
    trainable = facts.lora_params(job.lora_config.r, list(targets))
    if trainable == 0:
        raise InputError("job", "lora.target_modules", list(targets),
                         f"name linear layers of this {facts.model_type} model: {', '.join(facts.lora_targets())}")
    return trainable


def _one_build(cards: list[Card], rejected: dict[str, Rejection]) -> list[Card]:
    """One job runs one torch/NCCL build on all its nodes (NCCL versions must match across ranks). Keep the
    build with the most compute behind it; the cards of other builds are left out, saying why."""
    builds: dict[str, float] = {}
    for card in cards:
        if card.software:
            builds[card.software.build] = builds.get(card.software.build, 0.0) + card.spec.fp32_tflops
    if len(builds) <= 1:
        return cards
    chosen = max(builds, key=lambda b: (builds[b], b))
    kept = []
    for card in cards:
        if card.software and card.software.build != chosen:
            rejected[card.card_id] = Rejection(card.card_id, card.short_name, f"{card.node} runs {card.software.build}, the job's "
                                               f"other nodes {chosen}: a job needs one torch/NCCL build on every node; install the same build there")
        else:
            kept.append(card)
    return kept


def _fit(group: Group, lo: int, to_beat: float | None, tuned: dict) -> tuple[Plan | None, dict[str, Rejection]]:
    """Tune the group (None when it cannot beat `to_beat` seconds a step); while nothing fits, drop its smallest
    card (the likeliest misfit) and try again."""
    dropped: dict[str, Rejection] = {}
    while True:
        plan = _tune_once(group, to_beat, tuned)
        if plan or (to_beat is not None and fits(group)):
            return plan, dropped
        smallest = min(group.cards, key=lambda c: (c.vram_mib, c.card_id))
        dropped[smallest.card_id] = Rejection(smallest.card_id, smallest.short_name,
                                              "the model does not fit on it beside the others in any ZeRO/offload setting (estimate)")
        rest = [c for c in group.cards if c is not smallest]
        if len(rest) < max(lo, 1):
            return None, dropped
        group = Group(group.given, rest)



def _tune_once(group: Group, to_beat: float | None, tuned: dict) -> Plan | None:
    """`tune`, remembered by the group's cards. A plan it found under a bound is the group's best (every setting that
    could beat it was scored), so it answers any bound; "none under b" answers any bound up to b."""
    key = tuple(c.card_id for c in group.cards)
    if key in tuned:
        bound, plan = tuned[key]
        if plan is not None:
            if to_beat is not None and plan.step.step_s >= to_beat:
                return None
            asking = group.given
            return plan if (plan.job_name, plan.total_steps) == (asking.job.name, asking.total_steps) else \
                replace(plan, job_name=asking.job.name, total_steps=asking.total_steps)
        if to_beat is not None and bound is not None and to_beat <= bound:
            return None
    plan = tune(group, to_beat)
    tuned[key] = (to_beat, plan)
    return plan


def _left_out(ctx: PlanInput, plan: Plan, card: Card, hi: int) -> Rejection:
    chosen = [r.card for r in plan.ranks]
    if len(chosen) >= hi:
        return Rejection(card.card_id, card.short_name, f"the job takes at most {hi} card(s) (gpus, global_batch_size); faster ones were chosen")
    with_plan = tune(Group(ctx, [*chosen, card]))
    if with_plan is None:
        return Rejection(card.card_id, card.short_name, "with it the model fits in no ZeRO/offload setting on every card of the group (estimate)")
    without, with_it = plan.step.tokens_per_s, with_plan.step.tokens_per_s
    why = []
    if resolve_precision(ctx.job.precision, [*chosen, card]) != plan.precision:
        why.append(f"it would force {resolve_precision(ctx.job.precision, [*chosen, card])} on every card")
    if card.node not in {c.node for c in chosen}:
        why.append(f"its node's {ctx.snapshot.node(card.node).link_gbit_per_s:g} Gbit/s link would carry every step's collectives")
    slowest = min(chosen + [card], key=lambda c: step_time.card_tflops(c, with_plan.precision))
    if slowest is card and with_plan.grad_accum > 1:
        why.append(f"it must take at least one sample in each of {with_plan.grad_accum} micro-steps")
    because = f" ({'; '.join(why)})" if why else ""
    return Rejection(card.card_id, card.short_name, f"faster without it{because}: about {without:,.0f} vs {with_it:,.0f} tokens/s with it (estimate)")


def _no_placement_message(ctx: PlanInput, lo: int, eligible: list[Card], rejected: dict[str, Rejection], groups, suggest: bool) -> str:
    job = ctx.job
    reasons = "; ".join(f"{r.card_id} ({r.card}): {r.reason}" for r in rejected.values()) or "no card was rejected by a filter"
    if not groups:
        reasons += f". {len(eligible)} card(s) eligible, the job needs {lo}"
    else:
        reasons += ". The model does not fit in any ZeRO/offload/checkpointing setting on the eligible cards (estimate)"
    if eligible and job.deepspeed.offload != "none":
        shape = training_shape(ctx, "bf16", True)
        need = host_bytes(shape, (ZeroSetting(3, True, False),) * len(eligible), eligible)
        short = [f"{n} needs about {b / GIB:.0f} GiB, has {ctx.snapshot.node(n).ram_gb:g} GB" for n, b in need.items()
                 if not host_ram_ok(ctx.snapshot, {n: b})]
        if short:
            reasons += f"; offloading the optimizer needs more host RAM than there is ({'; '.join(short)}; estimate)"
    fixes = []
    if len(eligible) < lo:
        fixes.append(f"lower gpus.{'count' if job.gpus.count else 'min'} (needs {lo}, {len(eligible)} eligible) or free more cards")
    fixes += suggestions(ctx) if suggest else []
    return f"no placement for job {job.name!r}: {reasons}. To fix: {', or '.join(fixes) or 'add cards with more memory'}."


def suggestions(ctx: PlanInput) -> list[str]:
    """Changes to the job that would make it fit on the same cards, each checked by planning it."""
    job = ctx.job
    tries: list[tuple[str, JobSpec]] = []
    if job.deepspeed.offload != "auto":
        tries.append(("allow deepspeed.offload: auto", job.model_copy(update={"deepspeed": job.deepspeed.model_copy(update={"offload": "auto"})})))
    if job.deepspeed.activation_checkpointing is False:
        tries.append(("allow deepspeed.activation_checkpointing: auto",
                      job.model_copy(update={"deepspeed": job.deepspeed.model_copy(update={"activation_checkpointing": "auto"})})))
    if job.method == "full":
        tries.append(("use method: lora", job.model_copy(update={"method": "lora"})))
    if job.method != "qlora" and job.model.init == "pretrained":
        tries.append(("use method: qlora (a 4-bit base)", job.model_copy(update={"method": "qlora"})))
    seq = job.seq_len // 2
    while seq >= 64:
        tries.append((f"shorten seq_len to {seq} (now {job.seq_len})", job.model_copy(update={"seq_len": seq})))
        seq //= 2
    found = []
    for text, variant in tries:
        if text.startswith("shorten") and any(f.startswith("shorten") for f in found):
            continue  # the longest sequence that fits is the useful one
        try:
            plan = make_plan(variant, ctx.facts, ctx.snapshot, ctx.total_steps, suggest=False)
        except (NoPlacement, InputError):  # it does not fit either, or is not a valid job for this model
            continue
        found.append(f"{text} ({plan.settings} on {', '.join(r.card.card_id for r in plan.ranks)})")
    try:  # more cards: would the job fit if every card had a twin beside it?
        plan = make_plan(job, ctx.facts, _with_twins(ctx.snapshot), ctx.total_steps, suggest=False)
        found.append(f"add cards: it fits on {len(plan.ranks)} ({plan.settings}: "
                      f"{', '.join(sorted({r.card.short_name for r in plan.ranks}))})")
    except NoPlacement:
        pass
    return found


def _with_twins(snapshot: ClusterSnapshot) -> ClusterSnapshot:
    """The same cluster with a second copy of every card in its node: for 'would more cards help?'."""
    def twin(node):
        copies = tuple(replace(c, facts=replace(c.facts, index=c.index + len(node.cards), uuid=None), held_by=None) for c in node.cards)
        return replace(node, cards=node.cards + copies)

    return ClusterSnapshot(tuple(twin(n) for n in snapshot.nodes))
