"""The catalog's tables, one list of columns each: what the schema creates and what the
stages fill (`columns("prompts")`, without `version_id`, which the catalog adds).

Pure data (the standard library only), so stages read their columns here without importing
the catalog.
"""

from __future__ import annotations

#: table -> [(column, DuckDB type and constraints, comment)], in the order of the columns
TABLES: dict[str, list[tuple[str, str, str]]] = {
    "versions": [
        ("version_id", "VARCHAR PRIMARY KEY", ""),
        ("kind", "VARCHAR NOT NULL", ""),
        ("run_id", "VARCHAR NOT NULL", ""),
        ("round", "INTEGER NOT NULL", ""),
        ("parents", "VARCHAR[] NOT NULL", ""),
        ("params", "JSON NOT NULL", ""),
        ("fingerprint", "VARCHAR NOT NULL", ""),
        ("row_count", "BIGINT NOT NULL", ""),
        ("created_at", "TIMESTAMP NOT NULL", ""),
    ],
    "runs": [
        ("run_id", "VARCHAR PRIMARY KEY", ""),
        ("started_at", "TIMESTAMP NOT NULL", ""),
        ("config", "JSON NOT NULL", ""),
        ("command", "VARCHAR", ""),
    ],
    "run_events": [
        ("run_id", "VARCHAR NOT NULL", ""),
        ("event_at", "TIMESTAMP NOT NULL", ""),
        ("event", "VARCHAR NOT NULL", "start | stage | made | round | finish | fail"),
        ("round", "INTEGER", ""),
        ("stage", "VARCHAR", "the version kind the event is about"),
        ("version_id", "VARCHAR", ""),
        ("detail", "JSON", "start: pid, host, command; fail: error"),
    ],
    "gates": [
        ("version_id", "VARCHAR NOT NULL", ""),
        ("model_version", "VARCHAR NOT NULL", "the candidate the round trained"),
        ("eval_version", "VARCHAR NOT NULL", "its eval against the current policy"),
        ("promoted", "BOOLEAN NOT NULL", ""),
        ("reason", "VARCHAR NOT NULL", ""),
        ("statistic", "VARCHAR NOT NULL", "point | ci_low | ci_high"),
        ("value", "DOUBLE", "the win-rate statistic compared"),
        ("threshold", "DOUBLE NOT NULL", "eval.min_win_rate"),
        ("policy_version", "VARCHAR NOT NULL", "the model the next round starts from"),
        ("policy_eval", "VARCHAR NOT NULL", "the eval holding that model's answers"),
    ],
    "prompts": [
        ("version_id", "VARCHAR NOT NULL", ""),
        ("prompt_id", "VARCHAR NOT NULL", ""),
        ("text", "VARCHAR NOT NULL", ""),
        ("gold", "VARCHAR", ""),
        ("constraints", "JSON NOT NULL", ""),
        ("category", "VARCHAR", ""),
        ("source", "VARCHAR NOT NULL", "seed | self-instruct | ingest"),
        ("source_ref", "VARCHAR", "file:line for seeds, generator model version otherwise"),
        ("examples", "VARCHAR[] NOT NULL", "prompt_ids of the few-shot examples it came from"),
        ("raw", "VARCHAR", "the generator's raw output (self-instruct)"),
    ],
    "samples": [
        ("version_id", "VARCHAR NOT NULL", ""),
        ("sample_id", "VARCHAR NOT NULL", ""),
        ("prompt_id", "VARCHAR NOT NULL", ""),
        ("model_version", "VARCHAR NOT NULL", ""),
        ("idx", "INTEGER NOT NULL", "candidate index; -1 for the SPIN greedy answer"),
        ("greedy", "BOOLEAN NOT NULL", ""),
        ("text", "VARCHAR NOT NULL", ""),
        ("finish_reason", "VARCHAR NOT NULL", "stop | length"),
        ("prompt_tokens", "INTEGER NOT NULL", ""),
        ("completion_tokens", "INTEGER NOT NULL", ""),
        ("temperature", "DOUBLE NOT NULL", ""),
        ("top_p", "DOUBLE NOT NULL", ""),
        ("max_new_tokens", "INTEGER NOT NULL", ""),
        ("seed", "BIGINT NOT NULL", ""),
    ],
    "judgments": [
        ("version_id", "VARCHAR NOT NULL", ""),
        ("judgment_id", "VARCHAR NOT NULL", ""),
        ("type", "VARCHAR NOT NULL", "pointwise | pairwise | verifier"),
        ("prompt_id", "VARCHAR NOT NULL", ""),
        ("sample_id", "VARCHAR", "pointwise / verifier: the judged sample"),
        ("sample_a", "VARCHAR", "pairwise: shown first"),
        ("sample_b", "VARCHAR", "pairwise: shown second"),
        ("comparison_id", "VARCHAR", "pairwise: the unordered comparison (same for both orders)"),
        ("swapped", "BOOLEAN", "pairwise: false = (first, second), true = order swapped"),
        ("k", "INTEGER NOT NULL", "judge sample index"),
        ("judge", "VARCHAR NOT NULL", "model version or verifier name@version"),
        ("judge_path", "VARCHAR", ""),
        ("judge_hash", "VARCHAR", ""),
        ("template_hash", "VARCHAR", ""),
        ("method", "VARCHAR NOT NULL", "text | logprobs | verifier"),
        ("raw", "VARCHAR NOT NULL", ""),
        ("rationale", "VARCHAR", ""),
        ("parsed", "BOOLEAN NOT NULL", ""),
        ("error", "VARCHAR", ""),
        ("score", "DOUBLE", "pointwise score, or 1/0 for a verifier"),
        ("verdict", "VARCHAR", "pairwise: A | B | C as shown; verifier: pass | fail"),
        ("winner", "VARCHAR", "pairwise: sample_id of the winner, NULL for a tie"),
        ("probs", "JSON", ""),
    ],
    "pairs": [
        ("version_id", "VARCHAR NOT NULL", ""),
        ("pair_id", "VARCHAR NOT NULL", ""),
        ("prompt_id", "VARCHAR NOT NULL", ""),
        ("chosen_id", "VARCHAR NOT NULL", "sample_id, or 'gold:<prompt_id>' for SPIN"),
        ("rejected_id", "VARCHAR NOT NULL", ""),
        ("chosen_text", "VARCHAR NOT NULL", ""),
        ("rejected_text", "VARCHAR NOT NULL", ""),
        ("chosen_score", "DOUBLE", ""),
        ("rejected_score", "DOUBLE", ""),
        ("margin", "DOUBLE", ""),
        ("rule", "VARCHAR NOT NULL", "verifier | llm | spin"),
        ("min_margin", "DOUBLE", ""),
        ("judgment_ids", "VARCHAR[] NOT NULL", ""),
    ],
    "models": [
        ("version_id", "VARCHAR NOT NULL", ""),
        ("path", "VARCHAR NOT NULL", ""),
        ("content_hash", "VARCHAR NOT NULL", ""),
        ("base_version", "VARCHAR", "the round's starting model"),
        ("method", "VARCHAR", "base | dpo | spin | unchanged"),
        ("train_pairs", "BIGINT", ""),
        ("metrics", "JSON NOT NULL", ""),
    ],
    "evals": [
        ("version_id", "VARCHAR NOT NULL", ""),
        ("model_version", "VARCHAR NOT NULL", ""),
        ("baseline_version", "VARCHAR", ""),
        ("n_prompts", "INTEGER NOT NULL", ""),
        ("wins", "INTEGER", ""),
        ("losses", "INTEGER", ""),
        ("ties", "INTEGER", ""),
        ("win_rate", "DOUBLE", ""),
        ("ci_low", "DOUBLE", ""),
        ("ci_high", "DOUBLE", ""),
        ("llm_flip_rate", "DOUBLE", ""),
        ("pass_rate", "DOUBLE", ""),
        ("pass_by_type", "JSON NOT NULL", ""),
    ],
    "eval_items": [
        ("version_id", "VARCHAR NOT NULL", ""),
        ("prompt_id", "VARCHAR NOT NULL", ""),
        ("model_version", "VARCHAR NOT NULL", ""),
        ("text", "VARCHAR NOT NULL", ""),
        ("finish_reason", "VARCHAR NOT NULL", ""),
        ("checks", "JSON NOT NULL", "verifier results for the prompt's constraints"),
        ("pass_fraction", "DOUBLE", ""),
        ("baseline_text", "VARCHAR", ""),
        ("verdict_ab", "VARCHAR", "LLM judge, new shown first"),
        ("verdict_ba", "VARCHAR", "LLM judge, baseline shown first"),
        ("outcome", "VARCHAR", "win | loss | tie (new vs baseline)"),
    ],
}


def columns(table: str) -> list[str]:
    """The columns a stage fills in `table`: all but `version_id`, in the table's order."""
    return [c for c, _, _ in TABLES[table] if c != "version_id"]


def create_table(table: str) -> str:
    """`CREATE TABLE IF NOT EXISTS` for one table, with each column's comment."""
    cols = TABLES[table]
    width = max(len(c) for c, _, _ in cols)
    body = "\n".join(f"    {c:<{width}} {t}{',' if i < len(cols) - 1 else ''}"
                     + (f"  -- {cm}" if cm else "") for i, (c, t, cm) in enumerate(cols))
    return f"CREATE TABLE IF NOT EXISTS {table} (\n{body}\n);"
