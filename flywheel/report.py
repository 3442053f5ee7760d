"""The end-of-round summary: one row of the `round_summary` view, as a terminal table and as
markdown (the Prefect artifact), with each eval's two splits (in-distribution and transfer:
pass rates and mean answer lengths, overall and per constraint type) from the eval versions'
`splits` (see flywheel.stages.evaluate.split_report); a round whose eval has none shows –."""

from __future__ import annotations

import json
import math

from flywheel.catalog import Catalog, queries
from flywheel.constraints import CONSTRAINTS

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
    ("transfer_pass_rate", "transfer pass", "{:.1%}"),
    ("base_transfer_pass_rate", "round 0 transfer", "{:.1%}"),
    ("beyond_length_pass_rate", "pass w/o length types", "{:.1%}"),
    ("base_beyond_length_pass_rate", "round 0 w/o length", "{:.1%}"),
    ("answer_chars", "answer chars", "{:.0f}"),
    ("transfer_answer_chars", "transfer chars", "{:.0f}"),
    ("gate", "gate", "{}"),
]

#: the constraint types that bound an answer's length: shortening an answer passes (or fails)
#: them, so the length-controlled pass rate (`beyond_length`) leaves them out
LENGTH_TYPES = ("max_words", "max_sentences", "min_words")

#: the eval splits, as the eval versions' `splits` name them, and their short labels
IN_DISTRIBUTION, TRANSFER = "in_distribution", "transfer"



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
    return rows_of(catalog, lineage_evals(catalog, last_eval))


def rows_of(src, evals: list[str]) -> list[dict]:
    """The summary rows of these eval versions, read from `src` (a Catalog or an open
    connection): round_summary with the splits' columns, the pairs per type, a formatted CI
    column and the gate's decision."""
    df = queries.round_summary(src, evals)
    gates = queries.gate_decisions(src, evals)
    decided = {e: (bool(p), r) for e, p, r in zip(gates.eval_version, gates.promoted,
                                                   gates.reason)}
    splits = eval_splits(src) if len(df) else {}
    paired = pairs_by_type(src) if len(df) else {}
    rows = []
    for r in df.to_dict("records"):
        own, base = splits.get(r["eval_version"], (None, None))
        r.update(split_columns(own, base))
        r["pairs_by_type"] = paired.get(r["model_version"])
        lo, hi = r.get("ci_low"), r.get("ci_high")
        r["ci"] = "" if _missing(lo) else f"{lo:.0%}–{hi:.0%}"
        promoted, reason = decided.get(r["eval_version"], (None, None))
        r["gate"] = "" if promoted is None else ("promoted" if promoted else "rejected")
        r["gate_reason"] = reason
        rows.append(r)
    return rows


def eval_splits(catalog: Catalog) -> dict[str, tuple[dict | None, dict | None]]:
    """eval version -> (its `splits`, the `splits` of the round-0 eval its chain of baseline
    evals goes back to); None where a version has none (made before evals had splits)."""
    df = queries.versions(catalog, kind="eval")
    own, round_, parents = {}, {}, {}
    for vid, rnd, par, params in zip(df.version_id, df["round"], df.parents, df.params):
        params = params if isinstance(params, dict) else json.loads(params)
        own[vid], round_[vid], parents[vid] = params.get("splits"), int(rnd), list(par)
    out = {}
    for vid in own:
        current, seen = vid, set()
        while current is not None and round_[current] > 0 and current not in seen:
            seen.add(current)
            current = next((p for p in parents[current] if p in own), None)
        out[vid] = (own[vid], own[current] if current is not None else None)
    return out


def pairs_by_type(catalog: Catalog) -> dict[str, dict | None]:
    """model version -> the `by_type` of the pairs version of its round it was trained on
    (per constraint type: prompts sampled, prompts that ended with a pair, pairs); None where
    the pairs version has none (made before pairs were counted by type)."""
    pairs = queries.versions(catalog, kind="pairs")
    found = {}
    for vid, rnd, params in zip(pairs.version_id, pairs["round"], pairs.params):
        params = params if isinstance(params, dict) else json.loads(params)
        found[vid] = (int(rnd), params.get("by_type"))
    models = queries.versions(catalog, kind="model")
    out = {}
    for vid, rnd, parents in zip(models.version_id, models["round"], models.parents):
        own = [found[p][1] for p in parents if p in found and found[p][0] == int(rnd)]
        if own:
            out[vid] = own[0]
    return out


def beyond_length(by_type: dict | None) -> float | None:
    """The length-controlled pass rate: the share of constraint checks passed among the types
    that do not bound an answer's length (all but `LENGTH_TYPES`), from a split's `by_type` —
    what a round taught other than brevity. None without checks of such types."""
    if not by_type:
        return None
    checks = {t: v["checks"] for t, v in by_type.items() if t not in LENGTH_TYPES}
    total = sum(checks.values())
    if not total:
        return None
    return sum(by_type[t]["pass_rate"] * n for t, n in checks.items()) / total


def split_columns(splits: dict | None, base: dict | None) -> dict:
    """The summary's split columns of one eval: transfer pass rate (and round 0's), mean
    answer lengths of both splits, and the splits themselves (per type, for `by_type_rows`)."""
    def get(report: dict | None, split: str, key: str):
        return ((report or {}).get(split) or {}).get(key)

    return {"beyond_length_pass_rate": beyond_length(get(splits, IN_DISTRIBUTION, "by_type")),
            "base_beyond_length_pass_rate": beyond_length(get(base, IN_DISTRIBUTION, "by_type")),
            "transfer_pass_rate": get(splits, TRANSFER, "pass_rate"),
            "base_transfer_pass_rate": get(base, TRANSFER, "pass_rate"),
            "answer_chars": get(splits, IN_DISTRIBUTION, "mean_chars"),
            "transfer_answer_chars": get(splits, TRANSFER, "mean_chars"),
            "splits": splits, "base_splits": base}


#: (split, key of a type's numbers, header, formatter) of the per-type table
TYPE_COLUMNS = [
    (IN_DISTRIBUTION, "pass_rate", "held-out pass", "{:.0%}"),
    (TRANSFER, "pass_rate", "transfer pass", "{:.0%}"),
    (IN_DISTRIBUTION, "mean_chars", "answer chars", "{:.0f}"),
    (TRANSFER, "mean_chars", "transfer chars", "{:.0f}"),
]


def by_type_cells(row: dict) -> tuple[list[str], list[list[str]]]:
    """Per constraint type, round 0 → the row's round, for both splits: pass rate and mean
    answer length (of the answers to prompts with that type), and, where the round's pairs
    version counts them, the round's sampled prompts that ended with a pair; `eval prompts`
    is in-distribution/transfer prompts with the type. ([], []) without splits."""
    own, base = row.get("splits"), row.get("base_splits")
    paired = {t: v for t, v in (row.get("pairs_by_type") or {}).items() if t in CONSTRAINTS}
    if not own:
        return [], []
    types = sorted({t for rep in (own, base or {}) for split in rep.values()
                    for t in (split or {}).get("by_type", {})} | set(paired))
    n = _fmt(row.get("round"), "{:.0f}")
    headers = ["type", "eval prompts"] + [f"{h} (0 → {n})" for _, _, h, _ in TYPE_COLUMNS]
    if paired:
        headers.append(f"with a pair (round {n})")

    def value(report, split, t, key):
        return ((((report or {}).get(split) or {}).get("by_type") or {}).get(t) or {}).get(key)

    cells = []
    for t in types:
        prompts = "/".join(_fmt(value(own, s, t, "prompts") or 0, "{:.0f}")
                           for s in (IN_DISTRIBUTION, TRANSFER))
        cells.append([t, prompts] + [
            f"{_fmt(value(base, s, t, k), f)} → {_fmt(value(own, s, t, k), f)}"
            for s, k, _, f in TYPE_COLUMNS])
        if paired:
            p = paired.get(t)
            cells[-1].append(f"{p['with_pair']}/{p['prompts']}" if p else "–")
    return headers, cells


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _fmt(value, spec: str) -> str:
    if _missing(value) or value == "":
        return "–"
    return spec.format(value)


def table_cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    headers = [h for _, h, _ in COLUMNS]
    return headers, [[_fmt(r.get(c), f) for c, _, f in COLUMNS] for r in rows]


def _markdown_table(headers: list[str], cells: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(c) + " |" for c in cells]


def markdown(rows: list[dict]) -> str:
    """The summary as a markdown table; then, when the newest round's eval has splits, the
    per-type table of `by_type_cells`."""
    lines = _markdown_table(*table_cells(rows))
    headers, cells = by_type_cells(rows[-1]) if rows else ([], [])
    if headers:
        lines += ["", *_markdown_table(headers, cells)]
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
    headers, cells = by_type_cells(rows[-1]) if rows else ([], [])
    if headers:
        by_type = Table(title=f"{title}: per constraint type, in-distribution and transfer "
                              "splits")
        for h in headers:
            by_type.add_column(h, justify="left" if h == "type" else "right")
        for c in cells:
            by_type.add_row(*c)
        console.print(by_type)
