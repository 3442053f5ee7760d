"""The catalog's read queries, by name: every query a command or the pipeline runs.

Each function takes a `Catalog` (it opens a read-only connection for the one query) or an
open connection the caller already holds (a lineage's cursors, the commit transaction of
`flywheel ingest`, `flywheel check`'s connection), and returns a DataFrame or plain values.
The SQL is tuned: the comments beside a query say what was measured (EXPLAIN ANALYZE) before
its shape was chosen, so keep its shape when changing it.

The user's own queries (`flywheel sql`) are not here: they run as given, on the sandboxed
connection of `Catalog.read()`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import duckdb

from flywheel.catalog.store import TABLES, Catalog

if TYPE_CHECKING:
    import pandas as pd

#: Where a query runs: a Catalog (one read-only connection per query) or an open connection.
Source = Catalog | duckdb.DuckDBPyConnection


def _frame(src: Source, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()
           ) -> pd.DataFrame:
    """`sql` with `params` on `src`, as a DataFrame."""
    if isinstance(src, Catalog):
        return src.df(sql, params)
    return src.execute(sql, params if isinstance(params, Mapping) else list(params)).df()


def _limit(limit: int | None) -> str:
    """` LIMIT n` (an int, so nothing else reaches the SQL), or nothing for None."""
    return "" if limit is None else f" LIMIT {int(limit)}"


def in_list(column: str, values: Iterable[Any]) -> tuple[str, list]:
    """`column IN (?, ?, ...)` and its parameters: a literal list, which DuckDB answers with
    lookups in the ART index on `column` (for `IN (SELECT unnest(?))` or `= ANY(?)` it plans a
    join: 3× slower at 64 ids, a scan from a few thousand)."""
    values = list(values)
    if not values:
        return "false", []
    return f"{column} IN ({', '.join('?' * len(values))})", values


# -- tables -------------------------------------------------------------------------------
def table_names(src: Source) -> set[str]:
    """The names of the catalog's tables (not its views)."""
    df = _frame(src, "SELECT table_name FROM duckdb_tables() "
                     "WHERE database_name = current_database()")
    return set(df.table_name)


def scan_table(con: duckdb.DuckDBPyConnection, table: str) -> int:
    """The row count of `table`, reading every column of every row: hashing the whole row
    makes DuckDB read (and checksum) each one. Raises duckdb.Error where a part of the table
    cannot be read. `table` must be one of `table_names`."""
    return con.execute(f'SELECT count(*), min(hash(t)) FROM "{table}" t').fetchone()[0]


def rows_per_version(con: duckdb.DuckDBPyConnection, table: str) -> list[tuple[str, int]]:
    """(version_id, rows) of `table` (one of `table_names`), by version id."""
    return con.execute(f'SELECT version_id, count(*) FROM "{table}" '
                       "GROUP BY version_id ORDER BY version_id").fetchall()


# -- versions -----------------------------------------------------------------------------
def versions(src: Source, kind: str | None = None, round: int | None = None) -> pd.DataFrame:
    """The versions (of one kind, of one round), by round and creation time: version_id,
    kind, round, parents, row_count, created_at, params (`flywheel versions`)."""
    where, params = [], []
    if kind:
        where.append("kind = ?")
        params.append(kind)
    if round is not None:
        where.append("round = ?")
        params.append(round)
    sql = ("SELECT version_id, kind, round, parents, row_count, created_at, params FROM versions "
           + ("WHERE " + " AND ".join(where) if where else "") + " ORDER BY round, created_at")
    return _frame(src, sql, params)


def kinds_held(src: Source, kinds: Sequence[str]) -> pd.DataFrame:
    """Each kind the catalog holds versions of, with its first and last round (kind, lo, hi),
    in the order of `kinds` (kinds not in it last, by name)."""
    return _frame(src, "SELECT kind, min(round) AS lo, max(round) AS hi FROM versions "
                       "GROUP BY kind ORDER BY list_position(?, kind), kind", [list(kinds)])


def kind_and_round(src: Source, version_id: str) -> tuple[str, int] | None:
    """(kind, round) of a version, or None when there is none of that id."""
    df = _frame(src, "SELECT kind, round FROM versions WHERE version_id = ?", [version_id])
    return (df.kind.iloc[0], int(df["round"].iloc[0])) if len(df) else None


def version_ids(src: Source) -> list[str]:
    """Every version id, sorted."""
    return list(_frame(src, "SELECT version_id FROM versions ORDER BY version_id").version_id)


def version_header(src: Source, version_id: str, *, brief: bool = False) -> pd.DataFrame:
    """The `versions` row of one version (no rows when there is none): version_id, kind,
    round, run_id, parents, row_count, params, and (unless `brief`) fingerprint, created_at."""
    cols = "version_id, kind, round, run_id, parents, row_count, params"
    if not brief:
        cols += ", fingerprint, created_at"
    return _frame(src, f"SELECT {cols} FROM versions WHERE version_id = ?", [version_id])


def version_rows(src: Source, kind: str, version_id: str, limit: int | None = None
                 ) -> pd.DataFrame:
    """The rows of a version from the table of its kind (at most `limit`)."""
    return _frame(src, f"SELECT * FROM {TABLES[kind]} WHERE version_id = ?{_limit(limit)}",
                  [version_id])


def eval_items(src: Source, version_id: str, limit: int | None = None) -> pd.DataFrame:
    """The per-prompt items of an eval version (at most `limit`)."""
    return _frame(src, f"SELECT * FROM eval_items WHERE version_id = ?{_limit(limit)}",
                  [version_id])


#: Ancestors and descendants of a version, each at its nearest depth.
_VERSION_TREE = """
WITH RECURSIVE up(version_id, depth) AS (
    SELECT unnest(parents), 1 FROM versions WHERE version_id = $id
    UNION
    SELECT unnest(v.parents), up.depth + 1 FROM up JOIN versions v USING (version_id)),
down(version_id, depth) AS (
    SELECT version_id, 1 FROM versions WHERE list_contains(parents, $id)
    UNION
    SELECT v.version_id, down.depth + 1 FROM down
    JOIN versions v ON list_contains(v.parents, down.version_id))
SELECT d.direction, d.depth, v.version_id, v.kind, v.round, v.row_count, v.parents
FROM (SELECT 'ancestor' AS direction, min(depth) AS depth, version_id FROM up GROUP BY ALL
      UNION ALL
      SELECT 'descendant', min(depth), version_id FROM down GROUP BY ALL) d
JOIN versions v USING (version_id)
ORDER BY d.direction, d.depth, v.round, v.kind, v.version_id
"""


def version_tree(src: Source, version_id: str) -> pd.DataFrame:
    """direction (ancestor | descendant), depth, version_id, kind, round, row_count, parents
    of every version above and below `version_id`."""
    return _frame(src, _VERSION_TREE, {"id": version_id})


# -- the lineage of one row (`flywheel lineage p_... | s_... | j_... | pr_...`) ----------------
#: The columns of a prompt in a lineage.
PROMPT_COLS = ("prompt_id, version_id, source, category, text, gold, constraints, "
               "source_ref, examples")

_JUDGMENT_COLS = ("judgment_id, version_id, type, judge, method, sample_id, sample_a, sample_b, "
                  "swapped, k, parsed, error, score, verdict, winner, rationale")
_JUDGMENT_ORDER = "type, judge, sample_id, sample_a, swapped, k, judgment_id"


def pairs_by_id(src: Source, pair_id: str) -> pd.DataFrame:
    """Every row of pair `pair_id` (one per pairs version holding it)."""
    return _frame(src, "SELECT * FROM pairs WHERE pair_id = ?", [pair_id])


def judgments_by_id(src: Source, judgment_id: str) -> pd.DataFrame:
    """Every row of judgment `judgment_id`."""
    return _frame(src, "SELECT * FROM judgments WHERE judgment_id = ?", [judgment_id])


def pairs_with_judgment(src: Source, judgment_id: str) -> pd.DataFrame:
    """The pairs that rest on judgment `judgment_id`."""
    return _frame(src, "SELECT * FROM pairs WHERE list_contains(judgment_ids, ?)",
                  [judgment_id])


def prompts_of_sample(src: Source, sample_id: str) -> list[str]:
    """The prompt id of sample `sample_id` (once per samples version holding it); [] when
    there is no such sample."""
    return list(_frame(src, "SELECT prompt_id FROM samples WHERE sample_id = ?",
                       [sample_id]).prompt_id)


def pairs_of_sample(src: Source, sample_id: str) -> pd.DataFrame:
    """The pairs that chose or rejected sample `sample_id`."""
    return _frame(src, "SELECT * FROM pairs WHERE chosen_id = ? OR rejected_id = ?",
                  [sample_id, sample_id])


def has_prompt(src: Source, prompt_id: str) -> bool:
    """Whether any prompts version holds prompt `prompt_id`."""
    return len(_frame(src, "SELECT prompt_id FROM prompts WHERE prompt_id = ?",
                      [prompt_id])) > 0


def samples_of_prompt(src: Source, prompt_id: str) -> list[str]:
    """The sample ids of prompt `prompt_id`, sorted."""
    return list(_frame(src, "SELECT DISTINCT sample_id FROM samples WHERE "
                            "prompt_id = ? ORDER BY 1", [prompt_id])["sample_id"])


def pairs_of_prompt(src: Source, prompt_id: str) -> pd.DataFrame:
    """The pairs of prompt `prompt_id`."""
    return _frame(src, "SELECT * FROM pairs WHERE prompt_id = ?", [prompt_id])


def prompts_by_id(src: Source, prompt_ids: Sequence[str]) -> pd.DataFrame:
    """The prompts (PROMPT_COLS) of these ids, in every version holding them, by prompt id
    and version; index lookups."""
    cond, params = in_list("prompt_id", prompt_ids)
    return _frame(src, f"SELECT {PROMPT_COLS} FROM prompts WHERE {cond} "
                       "ORDER BY prompt_id, version_id", params)


def samples_by_id(src: Source, sample_ids: Sequence[str]) -> pd.DataFrame:
    """The samples of these ids (sample_id, version_id, prompt_id, model_version, idx, greedy,
    finish_reason, completion_tokens, temperature, text), by prompt, idx and id; index
    lookups."""
    cond, params = in_list("sample_id", sample_ids)
    return _frame(src, "SELECT sample_id, version_id, prompt_id, model_version, idx, greedy, "
                       "finish_reason, completion_tokens, temperature, text FROM samples "
                       f"WHERE {cond} ORDER BY prompt_id, idx, sample_id", params)


#: The whole walk back to the seeds (`--depth all`): one recursive query.
_EXAMPLES = """
WITH RECURSIVE ex(prompt_id, used_by, depth) AS (
    SELECT DISTINCT unnest(examples), prompt_id, 1 FROM prompts
    WHERE prompt_id IN (SELECT unnest($ids))
    UNION
    SELECT unnest(p.examples), p.prompt_id, ex.depth + 1 FROM ex
    JOIN prompts p ON p.prompt_id = ex.prompt_id)
SELECT ex.depth, ex.used_by, p.prompt_id, p.version_id, p.source, p.text, p.examples
FROM ex JOIN prompts p USING (prompt_id)
ORDER BY ex.depth, ex.used_by, p.prompt_id, p.version_id
"""


def example_prompts(src: Source, prompts: pd.DataFrame, depth: int | None
                    ) -> tuple[pd.DataFrame, bool]:
    """The few-shot example prompts behind the rows of `prompts` (prompt_id, examples):
    (depth, used_by, prompt_id, version_id, source, text, examples), ordered by depth, used_by,
    prompt_id, version_id; and whether a further level was left out. `depth` levels are
    looked up by id, one query per level; `depth` None is the whole walk (_EXAMPLES)."""
    import pandas as pd

    if depth is None:
        ids = list(dict.fromkeys(prompts["prompt_id"]))
        return _frame(src, _EXAMPLES, {"ids": ids}), False
    frames = []
    level = 0
    edges = {(e, pid) for pid, ex in zip(prompts["prompt_id"], prompts["examples"])
             for e in (ex if ex is not None else ()) if e is not None}
    while edges and level < depth:
        level += 1
        ids = sorted({e for e, _ in edges})
        cond, params = in_list("p.prompt_id", ids)
        used = sorted(edges)
        rows = _frame(src, "SELECT CAST(? AS INTEGER) AS depth, ex.used_by, p.prompt_id, "
                           "p.version_id, p.source, p.text, p.examples FROM prompts p JOIN "
                           "(SELECT unnest(CAST(? AS VARCHAR[])) AS prompt_id, "
                           "unnest(CAST(? AS VARCHAR[])) AS used_by) ex USING (prompt_id) "
                           f"WHERE {cond} ORDER BY ex.used_by, p.prompt_id, p.version_id",
                      [level, [e for e, _ in used], [u for _, u in used], *params])
        frames.append(rows)
        edges = {(e, pid) for pid, ex in zip(rows["prompt_id"], rows["examples"])
                 for e in (ex if ex is not None else ()) if e is not None}
    if not frames:  # the columns, no rows
        frames.append(_frame(src, "SELECT CAST(NULL AS INTEGER) AS depth, "
                                  "NULL::VARCHAR AS used_by, prompt_id, version_id, source, "
                                  "text, examples FROM prompts LIMIT 0"))
    out = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    return out, bool(edges)


def judgments_of_samples(src: Source, prompt_ids: Sequence[str], sample_ids: Sequence[str],
                         judgment_ids: Sequence[str]) -> pd.DataFrame:
    """Every judgment of the samples (as sample_id, sample_a or sample_b) and the judgments
    named by `judgment_ids`: one lookup in the index on judgments.prompt_id (a judgment
    carries the prompt of its samples; `prompt_ids` are the samples' prompts), filtered to the
    samples, not a scan of all judgments. A judgment id hashes its samples, so the named
    judgments are among those rows; ids that are not (rows edited by hand) are looked up as
    well, by a scan."""
    where, params = in_list("prompt_id", prompt_ids)
    cols = [in_list(col, sample_ids) for col in ("sample_id", "sample_a", "sample_b")]
    where += " AND (" + " OR ".join(c for c, _ in cols) + ")"
    params += [x for _, ps in cols for x in ps]
    df = _frame(src, f"SELECT {_JUDGMENT_COLS} FROM judgments WHERE {where} "
                     f"ORDER BY {_JUDGMENT_ORDER}", params)
    missing = sorted(set(judgment_ids) - set(df["judgment_id"]))
    if not missing:
        return df
    named, more = in_list("judgment_id", missing)
    return _frame(src, f"SELECT {_JUDGMENT_COLS} FROM judgments WHERE ({where}) OR {named} "
                       f"ORDER BY {_JUDGMENT_ORDER}", params + more)


def models_trained_on(src: Source, pair_versions: Sequence[str]) -> pd.DataFrame:
    """The model versions trained on any of these pairs versions: model_version, round,
    method, train_pairs, base_version, path, trained_on (those of the pairs versions among
    its parents)."""
    pair_versions = list(pair_versions)
    return _frame(src, "SELECT v.version_id AS model_version, v.round, m.method, m.train_pairs, "
                       "m.base_version, m.path, "
                       "list_filter(v.parents, lambda x: list_contains(?, x)) AS trained_on "
                       "FROM versions v JOIN models m USING (version_id) "
                       "WHERE v.kind = 'model' AND list_has_any(v.parents, ?) "
                       "ORDER BY v.round, v.version_id", [pair_versions, pair_versions])


# -- status -------------------------------------------------------------------------------
#: run_events -> a run's state. `interrupted`: stopped by SIGINT/SIGTERM (its `interrupted`
#: event names the round and stage it stopped in, of which nothing was committed). A run with
#: no end event is `running` while a live process holds the workspace lock under its id,
#: `killed` once a later run found its lock left behind, and `interrupted` otherwise (killed,
#: or stopped, with no later run yet).
_RUNS_SQL = """
WITH ev AS (SELECT *, row_number() OVER (PARTITION BY run_id ORDER BY event_at DESC,
                                          event DESC) AS rn
            FROM run_events),
last_stage AS (SELECT run_id, arg_max(round, event_at) AS round, arg_max(stage, event_at) AS stage
               FROM run_events WHERE event = 'stage' GROUP BY run_id),
made AS (SELECT run_id, count(*) AS versions_made FROM versions GROUP BY run_id),
rounds AS (SELECT run_id, max(round) AS last_round FROM run_events WHERE event = 'round'
           GROUP BY run_id)
SELECT r.run_id, r.started_at, e.event AS last_event, e.event_at AS last_event_at,
       CASE WHEN e.event = 'interrupted' THEN e.round ELSE ls.round END AS stage_round,
       CASE WHEN e.event = 'interrupted' THEN e.stage ELSE ls.stage END AS stage,
       coalesce(m.versions_made, 0) AS versions_made,
       rd.last_round, e.detail, r.command
FROM runs r
LEFT JOIN ev e ON e.run_id = r.run_id AND e.rn = 1
LEFT JOIN last_stage ls ON ls.run_id = r.run_id
LEFT JOIN made m ON m.run_id = r.run_id
LEFT JOIN rounds rd ON rd.run_id = r.run_id
ORDER BY r.started_at DESC
"""

_ROUNDS_SQL = """
SELECT v.round, g.promoted, g.model_version, g.eval_version, e.win_rate, e.ci_low, e.ci_high,
       e.pass_rate, g.statistic, g.threshold, g.policy_version AS next_policy, g.reason,
       v.version_id AS gate_version, v.run_id, v.created_at
FROM gates g JOIN versions v ON v.version_id = g.version_id
JOIN evals e ON e.version_id = g.eval_version
WHERE g.eval_version IN (SELECT unnest($evals))
ORDER BY v.round
"""

_FAILURE_SQL = """
SELECT e.run_id, e.event_at, e.event, coalesce(e.round, s.round) AS round,
       coalesce(e.stage, s.stage) AS stage,
       coalesce(e.detail->>'error', 'killed (SIGKILL, power loss or OOM): no error was '
                || 'recorded; the next run redid the stage') AS error
FROM run_events e
LEFT JOIN (SELECT run_id, arg_max(round, event_at) AS round, arg_max(stage, event_at) AS stage
           FROM run_events WHERE event = 'stage' GROUP BY run_id) s ON s.run_id = e.run_id
WHERE e.event IN ('fail', 'killed')
ORDER BY e.event_at DESC LIMIT 1
"""


def runs(src: Source) -> pd.DataFrame:
    """Every run, newest first, with its last event (last_event, last_event_at, detail), the
    round and stage it was last in (stage_round, stage), its last finished round
    (last_round), the versions it made and its command."""
    return _frame(src, _RUNS_SQL)


def gate_rounds(src: Source, evals: Sequence[str]) -> pd.DataFrame:
    """The gate decision of each round whose eval is in `evals`, by round: round, promoted,
    model_version, eval_version, win_rate, ci_low, ci_high, pass_rate, statistic, threshold,
    next_policy, reason, gate_version, run_id, created_at."""
    return _frame(src, _ROUNDS_SQL, {"evals": list(evals)})


def last_failure(src: Source) -> pd.DataFrame:
    """The newest `fail` or `killed` event (run_id, event_at, event, round, stage, error), or
    no rows."""
    return _frame(src, _FAILURE_SQL)


def base_model(src: Source) -> str | None:
    """The newest round-0 model version (the base model), or None."""
    df = _frame(src, "SELECT version_id FROM versions WHERE kind = 'model' AND round = 0 "
                     "ORDER BY created_at DESC LIMIT 1")
    return df.version_id.iloc[0] if len(df) else None


def model_path(src: Source, version_id: str) -> str | None:
    """The checkpoint folder of model version `version_id`, or None."""
    df = _frame(src, "SELECT path FROM models WHERE version_id = ?", [version_id])
    return df.path.iloc[0] if len(df) else None


def model_count(src: Source) -> int:
    """How many model versions the catalog holds."""
    return int(_frame(src, "SELECT count(*) AS n FROM models").n.iloc[0])


def run_count(src: Source) -> int:
    """How many runs the catalog records."""
    return int(_frame(src, "SELECT count(*) AS n FROM runs").n.iloc[0])


def model_checkpoints(src: Source) -> pd.DataFrame:
    """Every model version's checkpoint: version_id, round, path, content_hash, by round and
    creation time."""
    return _frame(src, "SELECT m.version_id, v.round, m.path, m.content_hash FROM models m "
                       "JOIN versions v USING (version_id) ORDER BY v.round, v.created_at")


def version_facts(con: duckdb.DuckDBPyConnection) -> list[tuple[str, str, int, list]]:
    """(version_id, kind, row_count, parents) of every version."""
    return con.execute("SELECT version_id, kind, row_count, parents FROM versions").fetchall()


# -- the round summary --------------------------------------------------------------------
def latest_eval(src: Source) -> str | None:
    """The newest eval version of round 1 or later, or None."""
    df = _frame(src, "SELECT version_id FROM versions WHERE kind = 'eval' AND round >= 1 "
                     "ORDER BY created_at DESC LIMIT 1")
    return df.version_id.iloc[0] if len(df) else None


def gated_evals(src: Source, last_eval: str) -> list[str]:
    """The evals of the rounds whose gates lead to the gate of `last_eval`, oldest first
    (`last_eval` last); [] when no gate judged `last_eval`. Each gate version has the previous
    round's gate among its parents."""
    df = _frame(src,
                "WITH RECURSIVE chain(gate, depth) AS ("
                "  SELECT version_id, 0 FROM gates WHERE eval_version = ?"
                "  UNION ALL SELECT p.version_id, c.depth + 1 FROM chain c"
                "  JOIN versions g ON g.version_id = c.gate"
                "  JOIN versions p ON p.kind = 'gate' AND list_contains(g.parents, p.version_id))"
                "SELECT g.eval_version FROM chain c JOIN gates g ON g.version_id = c.gate "
                "ORDER BY c.depth DESC", [last_eval])
    return list(dict.fromkeys(df.eval_version))


def round_summary(src: Source, evals: Sequence[str]) -> pd.DataFrame:
    """The `round_summary` rows of these eval versions, by round."""
    return _frame(src, "SELECT * FROM round_summary WHERE eval_version IN (SELECT unnest(?)) "
                       "ORDER BY round", [list(evals)])


def gate_decisions(src: Source, evals: Sequence[str]) -> pd.DataFrame:
    """eval_version, promoted, reason of the gates that judged these eval versions."""
    return _frame(src, "SELECT eval_version, promoted, reason FROM gates "
                       "WHERE eval_version IN (SELECT unnest(?))", [list(evals)])


# -- prompts: export and ingest -----------------------------------------------------------
def prompt_texts(src: Source, prompt_ids: Sequence[str], sources: Sequence[str] = ()
                 ) -> pd.DataFrame:
    """prompt_id, text of these prompts, from the prompts versions `sources` when given
    (else from any), by version id: a prompt held by several versions comes once per
    version."""
    sql = ("SELECT prompt_id, text FROM prompts WHERE prompt_id IN (SELECT unnest(?))"
           + (" AND version_id IN (SELECT unnest(?))" if sources else "")
           + " ORDER BY version_id")
    params = [list(prompt_ids)] + ([list(sources)] if sources else [])
    return _frame(src, sql, params)


def catalog_prompts(src: Source) -> pd.DataFrame:
    """prompt_id, text, constraints of every distinct prompt in the catalog (what new
    prompts are deduplicated against)."""
    return _frame(src, "SELECT DISTINCT prompt_id, text, constraints FROM prompts")


# -- the pipeline -------------------------------------------------------------------------
def ingested_prompt_versions(src: Source) -> list[str]:
    """Every prompts version `flywheel ingest` made, oldest first: the pool after the seeds."""
    df = _frame(src, "SELECT version_id FROM versions WHERE kind = 'prompts' "
                     "AND params->>'source' = 'ingest' ORDER BY created_at")
    return list(df.version_id)


def earlier_eval_answers(src: Source, eval_version: str, content_hash: str) -> pd.DataFrame:
    """The items of eval `eval_version` answered by a checkpoint of content hash
    `content_hash` (all its columns): an earlier eval of the same checkpoint, whose answers
    are reused."""
    return _frame(src, "SELECT i.* FROM eval_items i JOIN models m ON m.version_id = "
                       "i.model_version WHERE i.version_id = ? AND m.content_hash = ?",
                  [eval_version, content_hash])


# -- the report: judge drift and training curves --------------------------------------------
#: the columns of `canary_by_round` and `train_curves`
CANARY_COLUMNS = ["round", "judge", "canary_accuracy", "canary_flip_rate", "items"]
TRAIN_CURVE_COLUMNS = ["round", "version_id", "phase", "step", "epoch", "loss",
                       "reward_accuracy", "reward_margin", "learning_rate"]


def _empty_unless(src: Source, table: str, cols: list[str]) -> pd.DataFrame | None:
    """An empty frame of `cols` when the catalog (made by an older flywheel, not migrated)
    has no `table`; else None."""
    if table in table_names(src):
        return None
    import pandas as pd

    return pd.DataFrame(columns=cols)


def canary_by_round(src: Source) -> pd.DataFrame:
    """The judge on the canary set, per round and judge (round, judge, canary_accuracy,
    canary_flip_rate, items), by round: what `judge_stats` holds as canary_accuracy and
    canary_flip_rate, read from the small canary_judgments table alone. Accuracy counts a
    verdict for the good answer 1, a tie 0.5, one for the bad answer or an unparsed one 0;
    the flip rate is the share of items, of those with both orders parsed, whose two orders
    name different winners (NULL when none has); `items` counts the canary items judged."""
    empty = _empty_unless(src, "canary_judgments", CANARY_COLUMNS)
    if empty is not None:
        return empty
    return _frame(src, """
WITH item AS (SELECT round, judge, canary_id, count(*) FILTER (WHERE parsed) AS n_parsed,
                     count(DISTINCT coalesce(winner, 'tie')) FILTER (WHERE parsed) > 1
                         AS disagree,
                     avg(CASE WHEN correct THEN 1.0 WHEN parsed AND winner IS NULL THEN 0.5
                              ELSE 0.0 END) AS acc, count(*) AS n
              FROM canary_judgments GROUP BY ALL)
SELECT round, judge, sum(acc * n) / sum(n) AS canary_accuracy,
       avg(CASE WHEN disagree THEN 1.0 ELSE 0.0 END) FILTER (WHERE n_parsed = 2)
           AS canary_flip_rate,
       count(*) AS items
FROM item GROUP BY round, judge ORDER BY round, judge""")


def train_curves(src: Source) -> pd.DataFrame:
    """Every logged training step of every trained model version (round, version_id, phase,
    step, epoch, loss, reward_accuracy, reward_margin, learning_rate), by round, version,
    phase (the SFT step before DPO) and step. reward_* are NULL for SFT steps."""
    empty = _empty_unless(src, "train_steps", TRAIN_CURVE_COLUMNS)
    if empty is not None:
        return empty
    return _frame(src, """
SELECT v.round, t.version_id, t.phase, t.step, t.epoch, t.loss, t.reward_accuracy,
       t.reward_margin, t.learning_rate
FROM train_steps t JOIN versions v USING (version_id)
ORDER BY v.round, v.created_at, t.version_id, CASE t.phase WHEN 'sft' THEN 0 ELSE 1 END,
         t.step""")
