"""The catalog's schema: its tables (one list of columns each, in `flywheel.tables`), its
views and its indexes, as this release creates them.

`SCHEMA` is the whole of it, for a new catalog (`Catalog.init()` on an empty file, through
the migration `0001_base`). A catalog made by an earlier flywheel is brought to the same
schema by `flywheel.catalog.migrations`; a change here (a column, an index, a view) comes
with a migration there, and `tests/test_migrations.py` checks that a migrated catalog has
what a new one has.
"""

from __future__ import annotations

import re

from flywheel.tables import TABLES

#: The views, each after the views it reads. They hold no data: every run of migrations
#: (re)creates them all (see flywheel.catalog.migrations).
VIEWS = """CREATE OR REPLACE VIEW latest_versions AS
    SELECT * EXCLUDE (rn) FROM (
        SELECT *, row_number() OVER (PARTITION BY kind ORDER BY round DESC, created_at DESC) AS rn
        FROM versions) WHERE rn = 1;
CREATE OR REPLACE VIEW round_lineage AS
-- one row per round's eval version, with the versions of that round it rests on
SELECT e.version_id AS eval_version, e.round, e.run_id, e.created_at,
       ev.model_version, mo.parents[-1] AS start_model, pa.version_id AS pairs_version,
       ju.version_id AS judgments_version, sa.version_id AS samples_version,
       pr.version_id AS prompts_version
FROM versions e
JOIN evals ev ON ev.version_id = e.version_id
JOIN versions mo ON mo.version_id = ev.model_version
JOIN versions pa ON pa.kind = 'pairs' AND pa.round = mo.round
                 AND list_contains(mo.parents, pa.version_id)
JOIN versions ju ON ju.kind = 'judgments' AND list_contains(pa.parents, ju.version_id)
JOIN versions sa ON sa.kind = 'samples' AND list_contains(pa.parents, sa.version_id)
JOIN versions pr ON pr.kind = 'prompts' AND pr.round = e.round
                 AND list_contains(sa.parents, pr.version_id)
WHERE e.kind = 'eval' AND e.round >= 1;
CREATE OR REPLACE VIEW round_summary AS
WITH RECURSIVE chain(eval_version, v) AS (
    SELECT version_id, version_id FROM versions WHERE kind = 'eval'
    UNION ALL
    SELECT c.eval_version, y.version_id FROM chain c
    JOIN versions x ON x.version_id = c.v
    JOIN versions y ON y.kind = 'eval' AND list_contains(x.parents, y.version_id)),
base AS (SELECT c.eval_version, ev.pass_rate AS base_pass_rate FROM chain c
         JOIN versions v ON v.version_id = c.v AND v.round = 0
         JOIN evals ev ON ev.version_id = c.v),
jp AS (SELECT l.eval_version,
              avg(j.score) FILTER (WHERE j.type = 'pointwise' AND j.parsed) AS mean_judge_score,
              count(*) FILTER (WHERE j.type <> 'verifier' AND NOT j.parsed) AS parse_failures,
              count(*) FILTER (WHERE j.type <> 'verifier') AS judge_outputs,
              avg(j.score) FILTER (WHERE j.type = 'verifier') AS verifier_pass_rate
       FROM round_lineage l JOIN judgments j ON j.version_id = l.judgments_version
       GROUP BY l.eval_version),
-- flipped: the comparison's verdicts name different winners (a tie counts as a winner), as
-- min <> max: the same as count(DISTINCT ...) > 1 without a distinct set per comparison
cmp AS (SELECT l.eval_version, j.comparison_id, count(*) AS n,
               min(coalesce(j.winner, 'tie')) <> max(coalesce(j.winner, 'tie')) AS flipped
        FROM round_lineage l JOIN judgments j ON j.version_id = l.judgments_version
        WHERE j.type = 'pairwise' AND j.parsed GROUP BY ALL),
jf AS (SELECT eval_version, avg(CASE WHEN flipped THEN 1.0 ELSE 0.0 END) AS order_flip_rate,
              count(*) AS comparisons
       FROM cmp WHERE n = 2 GROUP BY eval_version)
SELECT l.round, pv.row_count AS prompts_added,
       (SELECT count(*) FROM samples s WHERE s.version_id = l.samples_version AND NOT s.greedy)
           AS samples,
       jp.mean_judge_score, jp.parse_failures, jp.judge_outputs, jf.order_flip_rate,
       coalesce(jf.comparisons, 0) AS comparisons, jp.verifier_pass_rate,
       prv.row_count AS pairs, l.model_version,
       TRY_CAST(json_extract(m.metrics, '$.train_loss') AS DOUBLE) AS train_loss,
       ev.win_rate, ev.ci_low, ev.ci_high, ev.pass_rate, base.base_pass_rate,
       ev.pass_rate - base.base_pass_rate AS pass_rate_delta,
       l.eval_version, l.run_id, l.created_at
FROM round_lineage l
JOIN versions pv ON pv.version_id = l.prompts_version
JOIN versions prv ON prv.version_id = l.pairs_version
JOIN evals ev ON ev.version_id = l.eval_version
JOIN models m ON m.version_id = l.model_version
LEFT JOIN jp ON jp.eval_version = l.eval_version
LEFT JOIN jf ON jf.eval_version = l.eval_version
LEFT JOIN base ON base.eval_version = l.eval_version
ORDER BY l.created_at;
CREATE OR REPLACE VIEW judge_stats AS
-- per round and judge: parse failures, order flips, ties, score histogram, length bias,
-- and the judge on the canary set (judge drift)
WITH j AS (SELECT v.round, j.* FROM judgments j JOIN versions v USING (version_id)),
slen AS (SELECT sample_id, any_value(length(text)) AS chars FROM samples GROUP BY sample_id),
cmp AS (SELECT round, judge, comparison_id, count(*) AS n,
               min(coalesce(winner, 'tie')) <> max(coalesce(winner, 'tie')) AS flipped
        FROM j WHERE type = 'pairwise' AND parsed GROUP BY ALL),
flips AS (SELECT round, judge, avg(CASE WHEN flipped THEN 1.0 ELSE 0.0 END) AS flip_rate,
                 count(*) AS comparisons
          FROM cmp WHERE n = 2 GROUP BY ALL),
plen AS (SELECT v.round, avg(length(p.chosen_text)) AS chosen_chars,
                avg(length(p.rejected_text)) AS rejected_chars, count(*) AS pairs
         FROM pairs p JOIN versions v USING (version_id) GROUP BY v.round),
agg AS (SELECT j.round, j.judge, list(DISTINCT j.type ORDER BY j.type) AS types,
               count(*) AS judgments,
               avg(CASE WHEN j.parsed THEN 0.0 ELSE 1.0 END) AS parse_failure_rate,
               avg(CASE WHEN j.winner IS NULL THEN 1.0 ELSE 0.0 END)
                   FILTER (WHERE j.type = 'pairwise' AND j.parsed) AS tie_rate,
               avg(j.score) FILTER (WHERE j.parsed AND j.score IS NOT NULL) AS mean_score,
               to_json(histogram(CAST(round(j.score) AS INTEGER))
                   FILTER (WHERE j.parsed AND j.score IS NOT NULL)) AS score_histogram,
               corr(j.score, slen.chars)
                   FILTER (WHERE j.type = 'pointwise' AND j.parsed) AS score_length_corr
        FROM j LEFT JOIN slen ON slen.sample_id = j.sample_id
        GROUP BY j.round, j.judge),
-- the canary set (known right answers, both orders): accuracy counts a correct verdict 1, a
-- tie 0.5, a wrong or unparsed one 0; an item flips when its two orders, both parsed, name
-- different winners (a tie counts as a winner)
citem AS (SELECT round, judge, canary_id,
                 count(*) FILTER (WHERE parsed) AS n_parsed,
                 count(DISTINCT coalesce(winner, 'tie')) FILTER (WHERE parsed) > 1 AS disagree
          FROM canary_judgments GROUP BY ALL),
canary AS (SELECT c.round, c.judge,
                  avg(CASE WHEN c.correct THEN 1.0 WHEN c.parsed AND c.winner IS NULL THEN 0.5
                           ELSE 0.0 END) AS canary_accuracy,
                  count(*) AS canary_judgments
           FROM canary_judgments c GROUP BY c.round, c.judge),
cflip AS (SELECT round, judge, avg(CASE WHEN disagree THEN 1.0 ELSE 0.0 END) AS flip_rate
          FROM citem WHERE n_parsed = 2 GROUP BY ALL),
keys AS (SELECT round, judge FROM agg UNION SELECT round, judge FROM canary)
SELECT k.round, k.judge, agg.types, coalesce(agg.judgments, 0) AS judgments,
       agg.parse_failure_rate,
       flips.flip_rate AS order_flip_rate, coalesce(flips.comparisons, 0) AS comparisons,
       agg.tie_rate, agg.mean_score, agg.score_histogram, agg.score_length_corr,
       plen.pairs, plen.chosen_chars AS mean_chosen_chars,
       plen.rejected_chars AS mean_rejected_chars,
       canary.canary_accuracy, cflip.flip_rate AS canary_flip_rate,
       coalesce(canary.canary_judgments, 0) AS canary_judgments
FROM keys k
LEFT JOIN agg ON agg.round = k.round AND agg.judge = k.judge
LEFT JOIN flips ON flips.round = k.round AND flips.judge = k.judge
LEFT JOIN plen ON plen.round = k.round
LEFT JOIN canary ON canary.round = k.round AND canary.judge = k.judge
LEFT JOIN cflip ON cflip.round = k.round AND cflip.judge = k.judge
ORDER BY k.round, k.judge;
CREATE OR REPLACE VIEW pair_lineage AS
-- one row per pair (per model trained on it): its prompt, both texts, the judgments of both
-- samples and the model version trained on the pair's version.
-- Shaped so that `WHERE pair_id = ?` is index lookups, not scans (check with EXPLAIN ANALYZE:
-- DuckDB flattens subqueries into joins, and of the shapes tried only this one kept the filter
-- on pairs): the judgments of both samples as one lookup on the indexed judgments.prompt_id
-- (a judgment carries its samples' prompt) filtered to the two samples, the prompt in a
-- lateral aggregate over the filtered pairs.
SELECT x.pairs_version, x.round, x.pair_id, x.prompt_id, q.text AS prompt_text,
       q.examples AS example_prompt_ids, x.rule, x.margin, x.chosen_id, x.chosen_text,
       x.rejected_id, x.rejected_text, x.pair_judgment_ids, x.sample_judgment_ids,
       x.model_version
FROM (SELECT p.version_id AS pairs_version, v.round, p.pair_id, p.prompt_id, p.rule, p.margin,
             p.chosen_id, p.chosen_text, p.rejected_id, p.rejected_text,
             p.judgment_ids AS pair_judgment_ids,
             (SELECT list(j.judgment_id ORDER BY j.judgment_id) FROM judgments j
              WHERE j.prompt_id = p.prompt_id
                AND (j.sample_id IN (p.chosen_id, p.rejected_id)
                     OR j.sample_a IN (p.chosen_id, p.rejected_id)
                     OR j.sample_b IN (p.chosen_id, p.rejected_id))) AS sample_judgment_ids,
             mv.version_id AS model_version
      FROM pairs p
      JOIN versions v ON v.version_id = p.version_id
      LEFT JOIN versions mv ON mv.kind = 'model' AND list_contains(mv.parents, p.version_id)) x
LEFT JOIN LATERAL (SELECT any_value(text) AS text, any_value(examples) AS examples
                   FROM prompts WHERE prompt_id = x.prompt_id) q ON true;
CREATE OR REPLACE VIEW model_lineage AS
-- each model version: its start model, the pairs it was trained on and the judgments, samples
-- and prompts versions those rest on (round_lineage's columns), and its eval if any
SELECT mo.version_id AS model_version, mo.round, mo.run_id, m.method, m.train_pairs,
       CASE WHEN pa.version_id IS NULL THEN NULL ELSE mo.parents[-1] END AS start_model,
       pa.version_id AS pairs_version, ju.version_id AS judgments_version,
       sa.version_id AS samples_version, pr.version_id AS prompts_version,
       (SELECT any_value(l.eval_version) FROM round_lineage l
        WHERE l.model_version = mo.version_id) AS eval_version,
       m.path, mo.created_at
FROM versions mo
JOIN models m ON m.version_id = mo.version_id
LEFT JOIN versions pa ON pa.kind = 'pairs' AND pa.round = mo.round
                      AND list_contains(mo.parents, pa.version_id)
LEFT JOIN versions ju ON ju.kind = 'judgments' AND list_contains(pa.parents, ju.version_id)
LEFT JOIN versions sa ON sa.kind = 'samples' AND list_contains(pa.parents, sa.version_id)
LEFT JOIN versions pr ON pr.kind = 'prompts' AND pr.round = mo.round
                      AND list_contains(sa.parents, pr.version_id)
WHERE mo.kind = 'model'
ORDER BY mo.round, mo.created_at;
"""

#: Indexes for lookups by id (`flywheel lineage`, pair_lineage): ART indexes, kept up to date by
#: each INSERT. name -> (table, column). Judgments are indexed by prompt (their samples'
#: prompt): one index, where one per sample column (sample_id, sample_a, sample_b, which
#: migration 0004_judgments_prompt_index replaces in older catalogs) cost a quarter of the
#: judgments' commit time and a third of their space.
INDEXES: dict[str, tuple[str, str]] = {
    "prompts_prompt_id": ("prompts", "prompt_id"),
    "samples_sample_id": ("samples", "sample_id"),
    "judgments_prompt_id": ("judgments", "prompt_id"),
    "pairs_pair_id": ("pairs", "pair_id"),
}


def create_table(table: str) -> str:
    """`CREATE TABLE IF NOT EXISTS` for one table of `flywheel.tables.TABLES`, with each
    column's comment."""
    cols = TABLES[table]
    width = max(len(c) for c, _, _ in cols)
    body = "\n".join(f"    {c:<{width}} {t}{',' if i < len(cols) - 1 else ''}"
                     + (f"  -- {cm}" if cm else "") for i, (c, t, cm) in enumerate(cols))
    return f"CREATE TABLE IF NOT EXISTS {table} (\n{body}\n);"


def create_index(name: str) -> str:
    """`CREATE INDEX IF NOT EXISTS` for one of INDEXES."""
    table, column = INDEXES[name]
    return f"CREATE INDEX IF NOT EXISTS {name} ON {table} ({column});"


#: Every table, in the order of `flywheel.tables.TABLES`.
TABLES_SQL = "\n".join(create_table(t) for t in TABLES) + "\n"
INDEXES_SQL = "\n".join(create_index(n) for n in INDEXES) + "\n"

#: The whole schema: the tables, then the views, then the indexes.
SCHEMA = TABLES_SQL + VIEWS + INDEXES_SQL

#: The views' names, in the order VIEWS creates them.
VIEW_NAMES = tuple(re.findall(r"^CREATE OR REPLACE VIEW (\w+) AS$", VIEWS, re.M))


def describe(con) -> dict:
    """What a catalog's schema is, as plain values to compare: every table's columns (name,
    type, nullable, default, in order), the constraints, the indexes and the views (DuckDB's
    text of each), of the connection's current database."""
    db = "database_name = current_database() AND schema_name = 'main'"
    cols: dict[str, list] = {}
    for t, c, ty, null, default in con.execute(
            f"SELECT table_name, column_name, data_type, is_nullable, column_default "
            f"FROM duckdb_columns() WHERE {db} AND NOT internal "
            f"AND table_name IN (SELECT table_name FROM duckdb_tables() WHERE {db}) "
            f"ORDER BY table_name, column_index").fetchall():
        cols.setdefault(t, []).append((c, ty, null, default))
    constraints = sorted(con.execute(
        f"SELECT table_name, constraint_type, constraint_column_names::VARCHAR "
        f"FROM duckdb_constraints() WHERE {db}").fetchall())
    indexes = dict(con.execute(
        f"SELECT index_name, sql FROM duckdb_indexes() WHERE {db}").fetchall())
    views = dict(con.execute(
        f"SELECT view_name, sql FROM duckdb_views() WHERE {db} AND NOT internal").fetchall())
    return {"tables": cols, "constraints": constraints, "indexes": indexes, "views": views}
