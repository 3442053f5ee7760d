"""The end-of-round summary: one row of the `round_summary` view, as a terminal table and as
markdown (the Prefect artifact)."""

from __future__ import annotations

import math

from flywheel.catalog import Catalog, queries

#: (column of round_summary, header, formatter)
COLUMNS = [
    ("round", "round", "{:.0f}"),
    ("prompts_added", "prompts +", "{:.0f}"),
    ("samples", "samples", "{:.0f}"),
    ("mean_judge_score", "judge score", "{:.2f}"),
    ("parse_failures", "parse fail", "{:.0f}"),
    ("order_flip_rate", "order flips", "{:.0%}"),
    ("verifier_pass_rate", "verifier pass", "{:.0%}"),
    ("pairs", "pairs", "{:.0f}"),
    ("train_loss", "train loss", "{:.3f}"),
    ("win_rate", "win rate", "{:.0%}"),
    ("ci", "95% CI", "{}"),
    ("pass_rate", "held-out pass", "{:.1%}"),
    ("base_pass_rate", "round 0 pass", "{:.1%}"),
    ("gate", "gate", "{}"),
]


def lineage_evals(catalog: Catalog, last_eval: str | None = None) -> list[str]:
    """The eval versions of one lineage, newest last: `last_eval` (default: the newest eval)
    and the rounds before it, back to round 1. Rounds are followed through their gates, so a
    rejected round is in the list; rounds without gates follow each eval's baseline."""
    if last_eval is None:
        last_eval = queries.latest_eval(catalog)
        if last_eval is None:
            return []
    gated = queries.gated_evals(catalog, last_eval)
    if gated:
        return gated
    # Data, not schema: rounds made before the promotion gate existed (flywheel before
    # run_events and gates) have no gate version. Their catalog has the gates table (migration
    # 0002 adds it, empty; a reader of an unmigrated one is told to run `flywheel migrate`),
    # so the lineage of such rounds is followed through each eval's parent eval instead.
    chain, current = [], last_eval
    while current:
        v = catalog.get(current)
        if v.round < 1:
            break
        chain.append(current)
        current = next((p for p in v.parents if catalog.get(p).kind == "eval"), None)
    return chain[::-1]


def summary_rows(catalog: Catalog, last_eval: str | None = None) -> list[dict]:
    """round_summary rows of one lineage (see `lineage_evals`), with a formatted CI column and
    the gate's decision (promoted / rejected)."""
    evals = lineage_evals(catalog, last_eval)
    df = queries.round_summary(catalog, evals)
    gates = queries.gate_decisions(catalog, evals)
    decided = {e: (bool(p), r) for e, p, r in zip(gates.eval_version, gates.promoted,
                                                   gates.reason)}
    rows = []
    for r in df.to_dict("records"):
        lo, hi = r.get("ci_low"), r.get("ci_high")
        r["ci"] = "" if _missing(lo) else f"{lo:.0%}–{hi:.0%}"
        promoted, reason = decided.get(r["eval_version"], (None, None))
        r["gate"] = "" if promoted is None else ("promoted" if promoted else "rejected")
        r["gate_reason"] = reason
        rows.append(r)
    return rows


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _fmt(value, spec: str) -> str:
    if _missing(value) or value == "":
        return "–"
    return spec.format(value)


def table_cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    headers = [h for _, h, _ in COLUMNS]
    return headers, [[_fmt(r.get(c), f) for c, _, f in COLUMNS] for r in rows]


def markdown(rows: list[dict]) -> str:
    """The summary as a markdown table."""
    headers, cells = table_cells(rows)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines)


def print_table(rows: list[dict], title: str = "flywheel rounds") -> None:
    """The summary as a rich table on stderr."""
    from rich.console import Console
    from rich.table import Table

    headers, cells = table_cells(rows)
    table = Table(title=title)
    for h in headers:
        table.add_column(h, justify="right")
    for c in cells:
        table.add_row(*c)
    console = Console(stderr=True)
    if not console.is_terminal:
        console = Console(stderr=True, width=200)
    console.print(table)
