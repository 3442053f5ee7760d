"""The numbers behind `flywheel report`'s figures (flywheel/htmlreport.py draws them): each a
named function of an open read-only connection and the `Data` read so far, every aggregation in
DuckDB SQL over the newest lineage's versions (never millions of rows in Python)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Data:
    """Everything the figures draw, aggregated in SQL: small frames keyed by round."""

    rounds: list[int]
    lineage: Any  # DataFrame: round, eval_version, model/pairs/judgments/samples versions
    evals: Any  # DataFrame: round, version_id, params (splits), win rate, CI, gate decision
    tables: set[str] = field(default_factory=set)  # the catalog's tables
    extra: dict[str, Any] = field(default_factory=dict)  # QUERIES' frames, or their futures

    def get(self, key: str):
        """One of QUERIES' frames, waiting for it where it is still being read."""
        value = self.extra[key]
        return value.result() if hasattr(value, "result") else value


def _df(con, sql: str, params=()):
    return con.execute(sql, list(params)).df()


def _in(values) -> tuple[str, list]:
    values = list(values)
    if not values:
        return "(NULL)", []
    return "(" + ", ".join("?" * len(values)) + ")", values


def lineage_evals(con) -> list[str]:
    """The eval versions of the newest lineage, oldest first, round 0's included: rounds are
    followed through their gates (as `flywheel summary` does), else through each eval's parent
    eval; a catalog with only round 0 gives its newest round-0 eval."""
    from flywheel.catalog import queries

    last = queries.latest_eval(con)
    chain: list[str] = []
    if last is not None:
        gated = queries.gated_evals(con, last)
        chain = gated or _parent_chain(con, last)
    # round 0: follow the first round's eval back through its eval parents
    start = chain[0] if chain else None
    base = _parent_chain(con, start, to_round0=True)[0] if start else None
    if base is None:
        df = _df(con, "SELECT version_id FROM versions WHERE kind = 'eval' AND round = 0 "
                      "ORDER BY created_at DESC LIMIT 1")
        base = df.version_id.iloc[0] if len(df) else None
    return ([base] if base else []) + chain


def _parent_chain(con, eval_version: str, to_round0: bool = False) -> list[str]:
    """Eval versions from `eval_version` back through the eval among each one's parents:
    oldest first; with `to_round0`, only the round-0 eval it ends at ([None] if none)."""
    facts = {vid: (rnd, list(par)) for vid, rnd, par in con.execute(
        "SELECT version_id, round, parents FROM versions WHERE kind = 'eval'").fetchall()}
    chain, current, seen = [], eval_version, set()
    while current in facts and current not in seen:
        seen.add(current)
        rnd, parents = facts[current]
        if rnd < 1:
            return [current] if to_round0 else chain[::-1]
        chain.append(current)
        current = next((p for p in parents if p in facts), None)
    return [None] if to_round0 else chain[::-1]


def collect(con) -> Data:
    """Read every figure's numbers from an open read-only connection, one query after the
    other (`write_report` runs QUERIES in a second thread instead)."""
    data = collect_base(con)
    for key, fn in QUERIES:
        data.extra[key] = fn(con, data)
    return data


def collect_base(con) -> Data:
    """The rounds, the lineage's eval versions (with their gates) and the versions of each
    round they rest on: what every query of QUERIES starts from."""
    import pandas as pd

    from flywheel.catalog import queries

    names = queries.table_names(con)
    rounds_row = con.execute("SELECT min(round), max(round) FROM versions").fetchone()
    rounds = list(range(0, int(rounds_row[1]) + 1)) if rounds_row[1] is not None else []
    evals = lineage_evals(con)
    sql, params = _in(evals)
    ev = _df(con, f"""
        SELECT v.round, v.version_id, v.run_id, v.params, e.model_version, e.n_prompts,
               e.win_rate, e.ci_low, e.ci_high, e.wins, e.losses, e.ties, e.pass_rate,
               e.pass_by_type
        FROM versions v JOIN evals e USING (version_id)
        WHERE v.version_id IN {sql} ORDER BY v.round, v.created_at""", params)
    gates = _df(con, f"""SELECT eval_version AS version_id, promoted, reason, statistic,
                             value AS gate_value, threshold
                         FROM gates WHERE eval_version IN {sql}""", params) \
        if "gates" in names else pd.DataFrame(columns=["version_id", "promoted", "reason",
                                                       "statistic", "gate_value", "threshold"])
    gates = gates.drop_duplicates("version_id", keep="last")
    ev = ev.merge(gates, on="version_id", how="left")
    ev["config_min_win_rate"] = [_config_threshold(con, r) for r in ev.run_id]
    ev["params"] = [p if isinstance(p, dict) else json.loads(p) for p in ev.params]
    lineage = _df(con, f"""
        SELECT round, eval_version, model_version, pairs_version, judgments_version,
               samples_version, prompts_version, run_id
        FROM round_lineage WHERE eval_version IN {sql} ORDER BY round""", params)
    return Data(rounds=rounds, lineage=lineage, evals=ev, tables=names)


def _config_threshold(con, run_id: str) -> float | None:
    """eval.min_win_rate of the run that made a version (its `runs.config`), or None."""
    row = con.execute("SELECT json_extract(config, '$.eval.min_win_rate') FROM runs "
                      "WHERE run_id = ?", [run_id]).fetchone()
    try:
        return float(json.loads(row[0])) if row and row[0] is not None else None
    except (TypeError, ValueError):
        return None


def _round_of(lineage, column: str) -> dict[str, int]:
    return {v: int(r) for v, r in zip(lineage[column], lineage["round"]) if v is not None}


def _judge_consistency(con, data: Data):
    """Per round: LLM judge outputs, parse failures, order-flip rate (comparisons judged in
    both orders whose verdicts name different winners), first-position win share (decided
    pairwise verdicts won by the answer shown first) and tie rate. Comparisons and winners are
    grouped by the hash of their ids (64 bits: no collision among millions; faster)."""
    rounds = _round_of(data.lineage, "judgments_version")
    sql, params = _in(rounds)
    df = _df(con, f"""
        WITH j AS (SELECT version_id, type, parsed, comparison_id, winner, sample_a
                   FROM judgments WHERE version_id IN {sql} AND type <> 'verifier'),
        cmp AS (SELECT version_id, hash(comparison_id) AS c, count(*) AS n,
                       min(hash(coalesce(winner, 'tie'))) <> max(hash(coalesce(winner, 'tie')))
                           AS flipped
                FROM j WHERE type = 'pairwise' AND parsed GROUP BY ALL),
        flips AS (SELECT version_id, avg(CASE WHEN flipped THEN 1.0 ELSE 0.0 END) AS flip_rate,
                         count(*) AS comparisons
                  FROM cmp WHERE n = 2 GROUP BY version_id),
        agg AS (SELECT version_id, count(*) AS outputs,
                       avg(CASE WHEN parsed THEN 0.0 ELSE 1.0 END) AS parse_failure_rate,
                       count(*) FILTER (WHERE NOT parsed) AS parse_failures,
                       avg(CASE WHEN winner IS NULL THEN 1.0 ELSE 0.0 END)
                           FILTER (WHERE type = 'pairwise' AND parsed) AS tie_rate,
                       avg(CASE WHEN winner = sample_a THEN 1.0 ELSE 0.0 END)
                           FILTER (WHERE type = 'pairwise' AND parsed AND winner IS NOT NULL)
                           AS first_win_share
                FROM j GROUP BY version_id)
        SELECT agg.*, flips.flip_rate, coalesce(flips.comparisons, 0) AS comparisons
        FROM agg LEFT JOIN flips USING (version_id)""", params)
    df["round"] = [rounds[v] for v in df.version_id]
    return df.sort_values("round")


def _lengths(con, data: Data):
    """Per round: mean answer length (characters) of the sampled answers."""
    rounds = _round_of(data.lineage, "samples_version")
    sql, params = _in(rounds)
    df = _df(con, f"""SELECT version_id, avg(length(text)) AS mean_chars, count(*) AS n
                      FROM samples WHERE version_id IN {sql} AND NOT greedy
                      GROUP BY version_id""", params)
    df["round"] = [rounds[v] for v in df.version_id]
    return df.sort_values("round")


#: answer-length bins of the length-bias figure
LENGTH_BINS = 8


def _length_bias(con, data: Data):
    """(bins, longer): per round and answer-length bin (equal widths up to the 98th percentile
    of the lineage's judged lengths; the last bin takes the rest) the mean pointwise score and
    count; and per round the share of decided pairwise verdicts (of two answers of different
    length) won by the longer answer, 0.5 = no length bias. Length here is the answer's
    completion tokens (`samples.completion_tokens`: no text is read). One query: the lengths
    are read once and joined by the hash of the answer's id (64 bits: no collision among
    millions)."""
    import pandas as pd

    rounds = _round_of(data.lineage, "judgments_version")
    samples = [v for v in data.lineage.samples_version if v is not None]
    js, jp = _in(rounds)
    ss, sp = _in(samples)
    df = _df(con, f"""
        WITH len AS MATERIALIZED (SELECT hash(sample_id) AS h, completion_tokens AS chars
                                  FROM samples WHERE version_id IN {ss}),
        j AS MATERIALIZED (SELECT version_id, type, hash(sample_id) AS s, hash(sample_a) AS a,
                                  hash(sample_b) AS b, winner = sample_a AS first_won, score
                           FROM judgments WHERE version_id IN {js} AND parsed
                             AND ((type = 'pointwise' AND score IS NOT NULL)
                                  OR (type = 'pairwise' AND winner IS NOT NULL))),
        x AS (SELECT j.version_id, j.score, len.chars FROM j JOIN len ON len.h = j.s
              WHERE j.type = 'pointwise'),
        w AS (SELECT greatest(1, ceil(approx_quantile(chars, 0.98) / {LENGTH_BINS})) AS width
              FROM x)
        SELECT 'bin' AS part, x.version_id,
               least(floor(x.chars / w.width), {LENGTH_BINS - 1}) AS bin,
               any_value(w.width) AS width, avg(x.score) AS value, count(*) AS n
        FROM x, w GROUP BY ALL
        UNION ALL
        SELECT 'longer', j.version_id, NULL, NULL,
               avg(CASE WHEN (la.chars > lb.chars) = j.first_won THEN 1.0 ELSE 0.0 END),
               count(*)
        FROM j JOIN len la ON la.h = j.a JOIN len lb ON lb.h = j.b
        WHERE j.type = 'pairwise' AND la.chars <> lb.chars GROUP BY j.version_id""",
             sp + jp)
    df["round"] = [rounds[v] for v in df.version_id]
    bins = df[df.part == "bin"].rename(columns={"value": "mean_score"})
    longer = df[df.part == "longer"].rename(columns={"value": "longer_win_share"})
    return (bins.sort_values(["round", "bin"]).reset_index(drop=True),
            pd.DataFrame(longer[["version_id", "round", "longer_win_share", "n"]])
            .sort_values("round").reset_index(drop=True))


def _scores(con, data: Data):
    """Per round: counts of pointwise judge scores (rounded to 0.1)."""
    rounds = _round_of(data.lineage, "judgments_version")
    sql, params = _in(rounds)
    df = _df(con, f"""SELECT version_id, round(score, 1) AS score, count(*) AS n
                      FROM judgments WHERE version_id IN {sql} AND type = 'pointwise'
                        AND parsed AND score IS NOT NULL GROUP BY ALL""", params)
    df["round"] = [rounds[v] for v in df.version_id]
    return df


def _pairs(con, data: Data):
    """Per round and rule: pairs."""
    rounds = _round_of(data.lineage, "pairs_version")
    sql, params = _in(rounds)
    df = _df(con, f"""SELECT version_id, rule, count(*) AS n FROM pairs
                      WHERE version_id IN {sql} GROUP BY ALL""", params)
    df["round"] = [rounds[v] for v in df.version_id]
    return df


def _train_metrics(con, data: Data):
    """Per round: the model version's final training metrics (models.metrics)."""
    rounds = _round_of(data.lineage, "model_version")
    sql, params = _in(rounds)
    df = _df(con, f"""SELECT version_id,
                             TRY_CAST(json_extract(metrics, '$.train_loss') AS DOUBLE) AS loss
                      FROM models WHERE version_id IN {sql}""", params)
    df["round"] = [rounds[v] for v in df.version_id]
    return df.sort_values("round")


#: the stage order of the time figure (version kinds)
STAGES = ("prompts", "samples", "judgments", "canary", "pairs", "model", "eval", "gate")


def _stage_times(con, data: Data):
    """Per round and stage: seconds from the stage's `stage` event to its version's commit
    (what `flywheel status` and bench/gpu_check.py show), for the lineage's versions and
    round 0's."""
    lineage, evals = data.lineage, data.evals
    ids = set(evals.version_id)
    for col in ("prompts_version", "samples_version", "judgments_version", "pairs_version",
                "model_version"):
        ids |= {v for v in lineage[col] if v is not None}
    judged = {v for v in lineage.judgments_version if v is not None}
    ids |= {v for v, parents in con.execute(
        "SELECT version_id, parents FROM versions WHERE kind = 'canary'").fetchall()
        if judged & set(parents)}  # the canary set judged by the round's judge
    if "gates" in data.tables:
        sql, params = _in(evals.version_id)
        ids |= set(_df(con, f"SELECT version_id FROM gates WHERE eval_version IN {sql}",
                       params).version_id)
    sql, params = _in(ids)
    return _df(con, f"""
        SELECT v.round, v.kind AS stage, v.version_id,
               (epoch_us(any_value(v.created_at)) - epoch_us(max(e.event_at))) / 1e6
                   AS seconds
        FROM versions v JOIN run_events e
          ON e.run_id = v.run_id AND e.round = v.round AND e.stage = v.kind
             AND e.event = 'stage' AND e.event_at <= v.created_at
        WHERE v.version_id IN {sql} OR (v.round = 0 AND v.kind IN ('prompts', 'model'))
        GROUP BY v.round, v.kind, v.version_id ORDER BY v.round""", params)


def _train_curves(con, data: Data):
    """Per-step training metrics (`queries.train_curves`), or None for a catalog without
    them."""
    return _optional(con, data, "train_steps", "train_curves")


def _canary(con, data: Data):
    """The judge on the canary set per round (`queries.canary_by_round`), or None for a
    catalog without canary judgments."""
    return _optional(con, data, "canary_judgments", "canary_by_round")


def _optional(con, data: Data, table: str, function: str):
    """A query function of flywheel.catalog.queries that a newer catalog answers; None (the
    figure says why) when the function or its table is absent."""
    from flywheel.catalog import queries

    fn = getattr(queries, function, None)
    if fn is None or table not in data.tables:
        return None
    try:
        return fn(con)
    except Exception as exc:  # a table the function needs is missing from this catalog
        duckdb = __import__("duckdb")
        if isinstance(exc, duckdb.CatalogException):
            return None
        raise


#: what the figures read besides `collect_base`, in the order they are drawn
QUERIES = [("judge", _judge_consistency), ("lengths", _lengths), ("length_bias", _length_bias),
           ("scores", _scores), ("pairs", _pairs),
           ("train", _train_curves), ("train_metrics", _train_metrics),
           ("stages", _stage_times), ("canary", _canary)]
