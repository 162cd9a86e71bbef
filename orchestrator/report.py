"""`zeromix report JOB`: one self-contained HTML file for a finished job. The plan as a table; the loss
curve; each card's tokens/s over the run; each card's step split into compute, wait and communication; and
the plan's estimates beside what was measured (step time, memory). Plots are matplotlib PNGs embedded in the
page, so it opens offline and can be mailed.

Its data is the job's result file (<output_dir>/zeromix-result.json, written by the job driver): the plan,
and every step's figures for every card (workers/telemetry.StepStats).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from statistics import fmean

from orchestrator.errors import ZeromixError
from orchestrator.planner.memory import GIB

RESULT_FILE = "zeromix-result.json"  # orchestrator/job_driver.py writes it
REPORT_FILE = "report.html"


def load_result(output_dir: str | Path, job_id: str) -> dict:
    path = Path(output_dir) / RESULT_FILE
    if not path.is_file():
        raise ZeromixError(f"{job_id} has no result at {path}: a report needs a finished run (`zeromix queue --all` "
                           f"says how it ended, `zeromix logs {job_id}` why)")
    result = json.loads(path.read_text())
    if not result.get("history"):
        raise ZeromixError(f"{path} holds no per-step history (written by an older zeromix?): no report for {job_id}")
    return result


def _cards(result: dict) -> list[str]:
    return [f"{r['card']} {r['model']}" for r in result["ranks"]]


def figures(result: dict) -> dict[str, bytes]:
    """Every plot of the report as PNG bytes, by caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history, cards = result["history"], _cards(result)
    steps = [h["step"] for h in history]
    plots = {}

    def png(fig) -> bytes:
        buffer = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")  # legends below the axes included
        plt.close(fig)
        return buffer.getvalue()

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, [h["loss"] for h in history], marker="." if len(steps) < 50 else None)
    ax.set(xlabel="optimizer step", ylabel="mean token loss", title="Loss")
    plots["Loss per optimizer step (measured)"] = png(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for rank, card in enumerate(cards):
        ax.plot(steps, [h["tokens"][rank] / h["step_time_s"][rank] if h["step_time_s"][rank] else 0.0 for h in history], label=card)
    ax.set(xlabel="optimizer step", ylabel="tokens/s", title="Tokens/s per card")
    ax.legend(fontsize="small")
    plots["Tokens per second per card over the run (measured)"] = png(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for rank, card in enumerate(cards):
        ax.step(steps, [h["split"][rank] for h in history], where="post", label=card)
    ax.set(xlabel="optimizer step", ylabel="samples per micro-step", title="The split: each card's micro-batch")
    ax.legend(fontsize="small")
    plots["Each card's micro-batch over the run: the plan's, then as measured speeds corrected it"] = png(fig)

    fig, ax = plt.subplots(figsize=(7, 0.6 * len(cards) + 1.5))
    compute = [_mean(history, "compute_s", r) for r in range(len(cards))]
    wait = [_mean(history, "wait_s", r) for r in range(len(cards))]
    comm = [fmean([h["comm_s"] for h in history])] * len(cards)
    ax.barh(cards, compute, label="compute")
    ax.barh(cards, wait, left=compute, label="wait for slower cards")
    ax.barh(cards, comm, left=[c + w for c, w in zip(compute, wait)], label="communication")
    ax.invert_yaxis()
    ax.set(xlabel="seconds per optimizer step (mean)", title="Where each card's step goes")
    _legend_below(ax)
    plots["Compute, wait and communication per card (measured, mean over the run)"] = png(fig)

    plan_ranks = [result["plan"]["ranks"][r["rank"]] for r in result["ranks"]]  # (a box lost on the way has no figures)
    fig, (time_ax, memory_ax) = plt.subplots(1, 2, figsize=(10, 0.6 * len(cards) + 2))
    width = 0.4
    rows = range(len(cards))
    measured_step = [_mean(history, "step_time_s", r) for r in rows]
    time_ax.barh([i - width / 2 for i in rows], [result["plan"]["est_step_s"]] * len(cards), width, label="plan (estimate)")
    time_ax.barh([i + width / 2 for i in rows], measured_step, width, label=f"measured on {result['ranks'][0]['device']}")
    time_ax.set(yticks=list(rows), yticklabels=cards, xlabel="seconds per optimizer step", title="Step time")
    peak = [max(h["peak_memory_bytes"][r] or 0 for h in history) / GIB for r in rows]
    memory_ax.barh([i - width / 2 for i in rows], [r["est_mem_gib"] for r in plan_ranks], width, label="plan (estimate)")
    memory_ax.barh([i + width / 2 for i in rows], peak, width, label=f"measured peak ({_memory_source(result)})")
    memory_ax.set(yticks=list(rows), yticklabels=cards, xlabel="GiB", title="Memory per card")
    for ax in (time_ax, memory_ax):
        ax.invert_yaxis()
        _legend_below(ax)
    plots["The plan's estimates beside the measured step time and peak memory per card"] = png(fig)
    return plots


def _mean(history: list[dict], key: str, rank: int) -> float:
    """A card's mean figure over the steps it trained (with outer steps, a box that was lost has none for some)."""
    return fmean([h[key][rank] for h in history if h[key][rank] is not None] or [0.0])


def _legend_below(ax) -> None:
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=3, frameon=False)


def _memory_source(result: dict) -> str:
    return "process RSS on CPU" if result["ranks"][0]["device"] == "cpu" else "torch allocator"


def render(result: dict, plots: dict[str, bytes]) -> str:
    plan, ranks = result["plan"], result["ranks"]
    e = html.escape
    plan_rows = "".join(
        f"<tr><td>{i}</td><td>{e(p['card'])}</td><td>{e(p['model'])}</td><td>{p['micro_batch']}</td>"
        f"<td>{'on' if p['activation_checkpointing'] else 'off'}</td><td>{'optimizer' if p['offload_optimizer'] else 'none'}</td>"
        f"<td>{p['est_mem_gib']}</td><td>{p['rate_tflops']} ({e(p['rate_source'])})</td><td>{p['est_compute_s']}</td>"
        f"<td>{r['utilisation'] if r['utilisation'] is not None else '-'}</td></tr>"
        for i, p, r in ((r["rank"], plan["ranks"][r["rank"]], r) for r in ranks))
    images = "".join(f'<figure><img alt="{e(caption)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
                     f"<figcaption>{e(caption)}</figcaption></figure>" for caption, data in plots.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>zeromix report: {e(result['job_id'])}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:right}}th{{background:#f3f3f3}}figure{{margin:1.5em 0}}
img{{max-width:100%}}figcaption{{color:#555;font-size:.9em}}</style></head><body>
<h1>zeromix report: {e(result['job_id'])}</h1>
<p>{result['steps']} optimizer steps; loss {result['first_loss']:.4f} &rarr; {result['last_loss']:.4f};
{result['tokens_per_s']:,.0f} tokens/s and {result['step_time_s']:.4g} s per step measured on {e(ranks[0]['device'])};
the plan estimated {plan['est_step_s']:.3g} s per step and {plan['est_tokens_per_s']:,.0f} tokens/s for the planned cards.
Saved to {e(str(result['final_dir']))}.</p>
<h2>The plan</h2>
<p>ZeRO-{plan['zero_stage']}, {e(plan['precision'])}, offload {e(str(plan['offload']))}, activation checkpointing
{e(str(plan['activation_checkpointing']))}, {plan['grad_accum']} accumulation step(s), global batch {plan['global_batch']},
{plan['trainable_params']:,} of {plan['params']:,} parameters trained ({e(result.get('method', '?'))}; base: {e(result.get('base', '?'))}). Memory, rates and times are the planner's estimates;
utilisation (busy time over step time) is measured.</p>
<table><tr><th>rank</th><th>card</th><th>model</th><th>micro-batch</th><th>checkpointing</th><th>offload</th>
<th>est. GiB</th><th>TFLOPS (source)</th><th>est. compute s</th><th>utilisation</th></tr>{plan_rows}</table>
<h2>The run</h2>{_rebalances(result)}{images}
</body></html>
"""


def _rebalances(result: dict) -> str:
    changes = result.get("rebalances") or []
    if not changes:
        return "<p>The split stayed as planned: the measured speeds never said otherwise by more than 5% of a step.</p>"
    rows = "".join(f"<tr><td>{c['step']}</td><td>{c['old']}</td><td>{c['new']}</td>"
                   f"<td>{', '.join(f'{x:.3g}' for x in c['per_sample_s'])}</td><td>{html.escape(c['why'])}</td></tr>" for c in changes)
    return ("<p>The split was corrected from measured speeds (the same global batch and samples in every step):</p>"
            f"<table><tr><th>from step</th><th>old</th><th>new</th><th>s per sample (measured)</th><th>why</th></tr>{rows}</table>")


def write(result: dict, path: Path) -> Path:
    path.write_text(render(result, figures(result)) if result["history"] else _nothing_trained(result))
    return path


def _nothing_trained(result: dict) -> str:
    """A run resumed at its last step (its driver died after the final save) trained nothing: no figures."""
    e = html.escape
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>zeromix report: {e(result['job_id'])}</title></head>"
            f"<body><h1>zeromix report: {e(result['job_id'])}</h1><p>This run resumed from {e(str(result['resumed_from']))} at its last "
            f"step ({result['steps']}): nothing was left to train. The model is in {e(str(result['final_dir']))}; the figures of the "
            "steps are in the report of the run that trained them.</p></body></html>\n")
