"""The catalog: every dataset version flywheel makes, in one DuckDB file.

A *version* is the immutable output of one stage (prompts, samples, judgments, pairs, model,
eval). Its rows live in one table per kind and carry the `version_id`; the `versions` table
holds the version's parents, params and fingerprint. A stage commits its rows and its version
row in one transaction, so a crash never leaves a partial version, and a stage whose
fingerprint (kind + params + parents' fingerprints + code version) is already stored is found,
not recomputed.

The write connection is opened only for the length of a commit, so other processes can read
the file (`flywheel sql`) between commits.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb

from flywheel import faults
from flywheel.errors import FlywheelError
from flywheel.hashing import (  # noqa: F401  (re-exported)
    CODE_VERSION,
    fingerprint,
    normalise_text,
    prompt_id,
    stable_id,
)

#: rows per row group in what a writer appends (see Catalog._connect)
ROW_GROUP_SIZE = 30_720

KINDS = ("prompts", "samples", "judgments", "pairs", "model", "eval", "gate")

#: The table that holds each kind's rows.
TABLES = {
    "prompts": "prompts",
    "samples": "samples",
    "judgments": "judgments",
    "pairs": "pairs",
    "model": "models",
    "eval": "evals",
    "gate": "gates",
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    version_id   VARCHAR PRIMARY KEY,
    kind         VARCHAR NOT NULL,
    run_id       VARCHAR NOT NULL,
    round        INTEGER NOT NULL,
    parents      VARCHAR[] NOT NULL,
    params       JSON NOT NULL,
    fingerprint  VARCHAR NOT NULL,
    row_count    BIGINT NOT NULL,
    created_at   TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id       VARCHAR PRIMARY KEY,
    started_at   TIMESTAMP NOT NULL,
    config       JSON NOT NULL,
    command      VARCHAR
);
CREATE TABLE IF NOT EXISTS run_events (
    run_id       VARCHAR NOT NULL,
    event_at     TIMESTAMP NOT NULL,
    event        VARCHAR NOT NULL,   -- start | stage | made | round | finish | fail
    round        INTEGER,
    stage        VARCHAR,            -- the version kind the event is about
    version_id   VARCHAR,
    detail       JSON                -- start: pid, host, command; fail: error
);
CREATE TABLE IF NOT EXISTS gates (
    version_id      VARCHAR NOT NULL,
    model_version   VARCHAR NOT NULL,  -- the candidate the round trained
    eval_version    VARCHAR NOT NULL,  -- its eval against the current policy
    promoted        BOOLEAN NOT NULL,
    reason          VARCHAR NOT NULL,
    statistic       VARCHAR NOT NULL,  -- point | ci_low | ci_high
    value           DOUBLE,            -- the win-rate statistic compared
    threshold       DOUBLE NOT NULL,   -- eval.min_win_rate
    policy_version  VARCHAR NOT NULL,  -- the model the next round starts from
    policy_eval     VARCHAR NOT NULL   -- the eval holding that model's answers
);
CREATE TABLE IF NOT EXISTS prompts (
    version_id   VARCHAR NOT NULL,
    prompt_id    VARCHAR NOT NULL,
    text         VARCHAR NOT NULL,
    gold         VARCHAR,
    constraints  JSON NOT NULL,
    category     VARCHAR,
    source       VARCHAR NOT NULL,      -- seed | self-instruct | ingest
    source_ref   VARCHAR,               -- file:line for seeds, generator model version otherwise
    examples     VARCHAR[] NOT NULL,    -- prompt_ids of the few-shot examples it came from
    raw          VARCHAR                -- the generator's raw output (self-instruct)
);
CREATE TABLE IF NOT EXISTS samples (
    version_id        VARCHAR NOT NULL,
    sample_id         VARCHAR NOT NULL,
    prompt_id         VARCHAR NOT NULL,
    model_version     VARCHAR NOT NULL,
    idx               INTEGER NOT NULL,   -- candidate index; -1 for the SPIN greedy answer
    greedy            BOOLEAN NOT NULL,
    text              VARCHAR NOT NULL,
    finish_reason     VARCHAR NOT NULL,   -- stop | length
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    temperature       DOUBLE NOT NULL,
    top_p             DOUBLE NOT NULL,
    max_new_tokens    INTEGER NOT NULL,
    seed              BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS judgments (
    version_id     VARCHAR NOT NULL,
    judgment_id    VARCHAR NOT NULL,
    type           VARCHAR NOT NULL,   -- pointwise | pairwise | verifier
    prompt_id      VARCHAR NOT NULL,
    sample_id      VARCHAR,            -- pointwise / verifier: the judged sample
    sample_a       VARCHAR,            -- pairwise: shown first
    sample_b       VARCHAR,            -- pairwise: shown second
    comparison_id  VARCHAR,            -- pairwise: the unordered comparison (same for both orders)
    swapped        BOOLEAN,            -- pairwise: false = (first, second), true = order swapped
    k              INTEGER NOT NULL,   -- judge sample index
    judge          VARCHAR NOT NULL,   -- model version or verifier name@version
    judge_path     VARCHAR,
    judge_hash     VARCHAR,
    template_hash  VARCHAR,
    method         VARCHAR NOT NULL,   -- text | logprobs | verifier
    raw            VARCHAR NOT NULL,
    rationale      VARCHAR,
    parsed         BOOLEAN NOT NULL,
    error          VARCHAR,
    score          DOUBLE,             -- pointwise score, or 1/0 for a verifier
    verdict        VARCHAR,            -- pairwise: A | B | C as shown; verifier: pass | fail
    winner         VARCHAR,            -- pairwise: sample_id of the winner, NULL for a tie
    probs          JSON
);
CREATE TABLE IF NOT EXISTS pairs (
    version_id      VARCHAR NOT NULL,
    pair_id         VARCHAR NOT NULL,
    prompt_id       VARCHAR NOT NULL,
    chosen_id       VARCHAR NOT NULL,   -- sample_id, or 'gold:<prompt_id>' for SPIN
    rejected_id     VARCHAR NOT NULL,
    chosen_text     VARCHAR NOT NULL,
    rejected_text   VARCHAR NOT NULL,
    chosen_score    DOUBLE,
    rejected_score  DOUBLE,
    margin          DOUBLE,
    rule            VARCHAR NOT NULL,   -- verifier | llm | spin
    min_margin      DOUBLE,
    judgment_ids    VARCHAR[] NOT NULL
);
CREATE TABLE IF NOT EXISTS models (
    version_id     VARCHAR NOT NULL,
    path           VARCHAR NOT NULL,
    content_hash   VARCHAR NOT NULL,
    base_version   VARCHAR,            -- the round's starting model
    method         VARCHAR,            -- base | dpo | spin | unchanged
    train_pairs    BIGINT,
    metrics        JSON NOT NULL
);
CREATE TABLE IF NOT EXISTS evals (
    version_id      VARCHAR NOT NULL,
    model_version   VARCHAR NOT NULL,
    baseline_version VARCHAR,
    n_prompts       INTEGER NOT NULL,
    wins            INTEGER,
    losses          INTEGER,
    ties            INTEGER,
    win_rate        DOUBLE,
    ci_low          DOUBLE,
    ci_high         DOUBLE,
    llm_flip_rate   DOUBLE,
    pass_rate       DOUBLE,
    pass_by_type    JSON NOT NULL
);
CREATE TABLE IF NOT EXISTS eval_items (
    version_id      VARCHAR NOT NULL,
    prompt_id       VARCHAR NOT NULL,
    model_version   VARCHAR NOT NULL,
    text            VARCHAR NOT NULL,
    finish_reason   VARCHAR NOT NULL,
    checks          JSON NOT NULL,      -- verifier results for the prompt's constraints
    pass_fraction   DOUBLE,
    baseline_text   VARCHAR,
    verdict_ab      VARCHAR,            -- LLM judge, new shown first
    verdict_ba      VARCHAR,            -- LLM judge, baseline shown first
    outcome         VARCHAR             -- win | loss | tie (new vs baseline)
);
CREATE OR REPLACE VIEW latest_versions AS
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
-- per round and judge: parse failures, order flips, ties, score histogram, length bias
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
        GROUP BY j.round, j.judge)
SELECT agg.round, agg.judge, agg.types, agg.judgments, agg.parse_failure_rate,
       flips.flip_rate AS order_flip_rate, coalesce(flips.comparisons, 0) AS comparisons,
       agg.tie_rate, agg.mean_score, agg.score_histogram, agg.score_length_corr,
       plen.pairs, plen.chosen_chars AS mean_chosen_chars,
       plen.rejected_chars AS mean_rejected_chars
FROM agg
LEFT JOIN flips ON flips.round = agg.round AND flips.judge = agg.judge
LEFT JOIN plen ON plen.round = agg.round
ORDER BY agg.round, agg.judge;
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
-- lookups by id (`flywheel lineage`, pair_lineage): ART indexes, kept up to date by each INSERT
CREATE INDEX IF NOT EXISTS prompts_prompt_id ON prompts (prompt_id);
CREATE INDEX IF NOT EXISTS samples_sample_id ON samples (sample_id);
-- judgments by prompt (their samples' prompt): one index, where one per sample column
-- (sample_id, sample_a, sample_b, as older catalogs have) cost a quarter of the judgments'
-- commit time and a third of their space
DROP INDEX IF EXISTS judgments_sample_id;
DROP INDEX IF EXISTS judgments_sample_a;
DROP INDEX IF EXISTS judgments_sample_b;
CREATE INDEX IF NOT EXISTS judgments_prompt_id ON judgments (prompt_id);
CREATE INDEX IF NOT EXISTS pairs_pair_id ON pairs (pair_id);
"""


@dataclass(frozen=True)
class Version:
    """One row of the `versions` table."""

    version_id: str
    kind: str
    run_id: str
    round: int
    parents: list[str]
    params: dict
    fingerprint: str
    row_count: int
    created_at: datetime


class Catalog:
    """All persistence: open, commit a version atomically, look versions up, read rows."""

    def __init__(self, path: str | Path, *, lock_timeout: float = 30.0,
                 read_timeout: float = 10.0):
        self.path = Path(path)
        self.lock_timeout = lock_timeout  # how long a writer waits for the file lock
        self.read_timeout = min(read_timeout, lock_timeout)  # ... and a reader
        self._verified = False  # see verify()

    # -- connections ---------------------------------------------------------------------
    #: The settings of every read-only connection (`read()`, so `df`, `rows`, `find`, `get`,
    #: `flywheel sql` and the inspect commands): it reaches the catalog file and nothing else.
    #: No other file, folder, URL or extension: read_csv / read_text / read_blob / glob /
    #: COPY ... TO / ATTACH / INSTALL / LOAD fail with DuckDB's permission error. No persistent
    #: secret is read and nothing spills to a temporary folder (a query that needs more memory
    #: fails instead). `lock_configuration` comes last: from then on SET, RESET and PRAGMA
    #: cannot change any setting, so none of this can be turned back on from SQL.
    READ_CONFIG = {
        "enable_external_access": False,
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
        "allow_community_extensions": False,
        "allow_persistent_secrets": False,
        "temp_directory": "",
        "lock_configuration": True,
    }

    def _connect(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        """Open the file, retrying while another process holds DuckDB's lock on it (writers
        hold it only for one commit) for up to read_timeout (readers) / lock_timeout
        (writers) seconds."""
        deadline = time.monotonic() + (self.read_timeout if read_only else self.lock_timeout)
        # A writer checkpoints when it closes anyway: with a tiny WAL threshold DuckDB
        # checkpoints at COMMIT and skips writing the rows to the WAL first (bulk commits
        # ~10% faster), with the same all-or-nothing commit.
        # DuckDB's vacuum stays on (`max_vacuum_tasks`): it rewrites the part-filled row
        # groups where two commits meet (~10% of bulk commit time here), but without it every
        # small commit (a version, a run event) leaves a row group of its own, and the small
        # tables everything reads would grow a row group per commit.
        config = {} if read_only else {"wal_autocheckpoint": "1KB"}
        while True:
            try:
                if read_only:
                    return self._connect_read()
                # Row groups of 30,720 rows (a quarter of DuckDB's default; an ATTACH option,
                # not stored in the file): a commit of a few ten thousand rows is compressed
                # by several threads at COMMIT instead of one, and the vacuum where two commits
                # meet rewrites a few small row groups (bench: 128k -> 230k rows/s).
                con = duckdb.connect(config=config)
                try:
                    con.execute(f"ATTACH '{_sql_str(self.path)}' AS catalog "
                                f"(ROW_GROUP_SIZE {ROW_GROUP_SIZE})")
                    con.execute("USE catalog")
                except BaseException:
                    con.close()
                    raise
                return con
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                    raise FlywheelError(
                        f"cannot open the catalog {self.path}: {exc}",
                        details=_lock_advice(str(exc), self.path),
                    ) from exc
                time.sleep(0.2)

    def _connect_read(self) -> duckdb.DuckDBPyConnection:
        """The read-only connection, with READ_CONFIG; a file DuckDB cannot read as a
        database is a clear error (a lock is left to _connect, which waits for it)."""
        try:
            return read_connection(self.path)
        except duckdb.IOException as exc:
            if "lock" in str(exc).lower():
                raise
            raise FlywheelError(f"cannot open the catalog {self.path}: {exc}", details=[
                "check that --catalog names a catalog made by flywheel (a DuckDB file, "
                "<workspace>/flywheel.duckdb); a damaged one can be restored from a copy",
                "nothing was changed"]) from exc

    @contextmanager
    def read(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection that reaches the catalog and nothing else (READ_CONFIG);
        fails if the file does not exist."""
        if not self.path.is_file():
            raise FlywheelError(
                f"no catalog at {self.path}",
                details=["run `flywheel iterate` first, or pass --catalog PATH"],
            )
        con = self._connect(read_only=True)
        try:
            yield con
        finally:
            con.close()

    def verify(self) -> None:
        """Refuse to write to a file DuckDB cannot read: checked once per Catalog, before its
        first write connection (a read-write open of a damaged file rewrites its header).
        A missing file is fine (it is created); anything `damage()` finds raises, the file
        untouched."""
        if self._verified or not self.path.exists():
            return
        problems = damage(self.path)
        if problems:
            raise FlywheelError(
                f"the catalog {self.path} is damaged: nothing was written to it",
                details=[*problems,
                         "restore it from a backup (or a copy made before the damage); "
                         "`flywheel check --catalog PATH` lists what it can read",
                         "to start afresh instead, point --set workspace=DIR (or --catalog) "
                         "at a new location; flywheel never deletes or repairs the file"])
        self._verified = True

    @contextmanager
    def write(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-write connection inside one transaction; rolled back on any error."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.verify()
        con = self._connect(read_only=False)
        try:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException:
                with contextlib.suppress(duckdb.Error):  # the error being raised matters more
                    con.execute("ROLLBACK")
                raise
            try:
                con.execute("COMMIT")
            except duckdb.Error as exc:  # nothing of the transaction is in the file
                raise _storage_error(self.path, exc) from exc
        finally:
            con.close()

    def init(self) -> None:
        """Create the schema (idempotent)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.verify()
        con = self._connect(read_only=False)
        try:
            con.execute(SCHEMA)
        except duckdb.Error as exc:
            raise _storage_error(self.path, exc) from exc
        finally:
            con.close()

    # -- versions ------------------------------------------------------------------------
    def find(self, fp: str) -> Version | None:
        """The committed version with this fingerprint, if any."""
        if not self.path.is_file():
            return None
        with self.read() as con:
            row = con.execute(
                "SELECT * FROM versions WHERE fingerprint = ? ORDER BY created_at LIMIT 1", [fp]
            ).fetchall()
        return _version(row[0]) if row else None

    def get(self, version_id: str) -> Version:
        """A version by id; a clear error if there is none."""
        with self.read() as con:
            row = con.execute("SELECT * FROM versions WHERE version_id = ?",
                              [version_id]).fetchall()
        if not row:
            raise FlywheelError(f"no version {version_id!r} in {self.path}")
        return _version(row[0])

    def commit(
        self,
        *,
        kind: str,
        run_id: str,
        round: int,
        parents: Sequence[str],
        params: Mapping[str, Any],
        fp: str,
        tables: Mapping[str, Any] | Callable[[duckdb.DuckDBPyConnection], Mapping[str, Any]],
        row_count: int | None = None,
    ) -> Version:
        """Write a version and its rows in one transaction.

        `tables` maps table name -> pandas DataFrame of rows (without `version_id`, which is
        added); or it is a function that gets the open connection, inside the transaction,
        and returns that mapping: what it reads there no other writer can change before the
        rows are in (it runs before `params` is stored, so it may fill in `params`). If a
        version with the same fingerprint was committed meanwhile, that one is returned and
        nothing is written.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        version_id = f"{kind}-r{round}-{fp[:10]}"
        with self.write() as con:
            hit = con.execute("SELECT * FROM versions WHERE fingerprint = ?", [fp]).fetchall()
            if hit:
                return _version(hit[0])
            if callable(tables):
                tables = tables(con)
            main = tables.get(TABLES[kind])
            count = row_count if row_count is not None else (0 if main is None else len(main))
            for table, df in tables.items():
                if df is None or len(df) == 0:
                    continue
                _insert(con, table, version_id, df)
            faults.point(f"{kind}:commit")
            con.execute(
                "INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    version_id,
                    kind,
                    run_id,
                    round,
                    list(parents),
                    json.dumps(params, sort_keys=True, default=str),
                    fp,
                    count,
                    datetime.now(timezone.utc).replace(tzinfo=None),
                ],
            )
            # read back on this connection: reopening the file for `get` costs more than this
            row = con.execute("SELECT * FROM versions WHERE version_id = ?",
                              [version_id]).fetchall()
        return _version(row[0])

    def record_run(self, run_id: str, config: Mapping[str, Any], command: str) -> None:
        """Record one invocation of the loop."""
        with self.write() as con:
            con.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?)",
                [
                    run_id,
                    datetime.now(timezone.utc).replace(tzinfo=None),
                    json.dumps(config, default=str),
                    command,
                ],
            )

    def event(self, run_id: str, event: str, *, round: int | None = None,
              stage: str | None = None, version_id: str | None = None,
              detail: Mapping[str, Any] | None = None) -> None:
        """Append one event of a run (start, stage, made, round, finish, fail) to run_events:
        what `flywheel status` reads to say where a run is, or where it failed."""
        with self.write() as con:
            con.execute(
                "INSERT INTO run_events VALUES (?, ?, ?, ?, ?, ?, ?)",
                [run_id, datetime.now(timezone.utc).replace(tzinfo=None), event, round, stage,
                 version_id, json.dumps(detail or {}, default=str)],
            )

    # -- reading -------------------------------------------------------------------------
    def df(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()):
        """Run a read query and return a pandas DataFrame."""
        with self.read() as con:
            return con.execute(sql, params).df()

    def rows(self, kind: str, version_ids: str | Sequence[str]):
        """All rows of one or several versions of a kind, as a DataFrame."""
        ids = [version_ids] if isinstance(version_ids, str) else list(version_ids)
        return self.df(
            f"SELECT * FROM {TABLES[kind]} WHERE version_id IN (SELECT unnest(?))", [ids]
        )


def read_connection(path: str | Path) -> duckdb.DuckDBPyConnection:
    """A read-only connection to the catalog file that reaches nothing else: opened with
    Catalog.READ_CONFIG, then every local file-system access is turned off (the open file
    stays readable; DuckDB would otherwise still let `COPY ... TO` write the catalog's own
    `.wal` path, which it allows beside the database), then the configuration is locked."""
    config = {k: v for k, v in Catalog.READ_CONFIG.items() if k != "lock_configuration"}
    con = duckdb.connect(str(path), read_only=True, config=config)
    try:
        # a second connection in this process shares the first one's (locked) database
        if not con.execute("SELECT current_setting('lock_configuration')").fetchone()[0]:
            con.execute("SET disabled_filesystems = 'LocalFileSystem'")
            con.execute("SET lock_configuration = true")
        try:  # the catalog's own path is the one DuckDB would still allow
            con.execute("SELECT count(*) FROM glob(?)", [str(path)]).fetchall()
        except duckdb.PermissionException:
            pass
        else:
            raise FlywheelError(f"{path} is open in this process without the readers' "
                                "settings: close that connection first")
    except BaseException:
        con.close()
        raise
    return con


#: DuckDB's file layout: a 4 KiB main header (magic `DUCK` at byte 8), two 4 KiB database
#: headers, then fixed-size blocks.
_HEADER_BYTES = 3 * 4096
_MAGIC = b"DUCK"


def damage(path: str | Path) -> list[str]:
    """What keeps DuckDB from reading the catalog file in full, cheaply (no table scan): not
    a DuckDB file, cut short (a column segment lies past the end of the file), or a table
    whose storage metadata cannot be read. [] for a readable file. `flywheel check` adds a
    full scan of every row on top of this."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        return [f"{path}: cannot read it ({exc.strerror})"]
    if size < _HEADER_BYTES or head[8:12] != _MAGIC:
        what = "empty (0 bytes)" if size == 0 else f"{size:,} bytes without DuckDB's header"
        return [f"{path} is not a DuckDB database: {what}"]
    try:  # the readers' connection: two connections to one file in a process must agree
        con = read_connection(path)
    except duckdb.Error as exc:
        return [f"{path}: DuckDB cannot open it: {exc}"]
    problems, short = [], {}
    try:
        block_size = con.execute("SELECT block_size FROM pragma_database_size()").fetchone()[0]
        tables = [r[0] for r in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
            "ORDER BY 1").fetchall()]
        for table in tables:
            try:
                last = con.execute(
                    "SELECT max(block_id) FROM pragma_storage_info(?) WHERE persistent",
                    [table]).fetchone()[0]
            except duckdb.Error as exc:
                problems.append(f"table {table}: its storage cannot be read ({exc})")
                continue
            need = _HEADER_BYTES + (last + 1) * block_size if last is not None else 0
            if need > size:
                short[table] = need
    except duckdb.Error as exc:
        problems.append(f"{path}: DuckDB cannot read its tables: {exc}")
    finally:
        con.close()
    if short:
        problems.insert(0, (
            f"{path} ends at byte {size:,}, but the data of {len(short)} table(s) "
            f"({', '.join(sorted(short))}) reaches byte {max(short.values()):,}: the file was "
            "cut short (copied or restored incompletely, or the disk filled up)"))
    return problems


def _insert(con: duckdb.DuckDBPyConnection, table: str, version_id: str, df) -> None:
    """INSERT the rows of DataFrame `df` into `table`, with `version_id` added.

    The rows go through Arrow (strings and lists of strings are read without a Python object
    per value, and the frame is not copied); a frame Arrow cannot convert, or that it would
    convert to a nested type the pandas scan reads differently (dicts, structs), goes through
    DuckDB's pandas scan as before."""
    cols = ", ".join(f'"{c}"' for c in df.columns)
    rows = _arrow(df)
    con.register("_rows", df if rows is None else rows)
    try:
        con.execute(f'INSERT INTO {table} ("version_id", {cols}) SELECT ?, {cols} FROM _rows',
                    [version_id])
    finally:
        # in a transaction a failed INSERT aborted, unregistering fails too: keep the first error
        with contextlib.suppress(duckdb.Error):
            con.unregister("_rows")


def _arrow(df):
    """`df` as a pyarrow Table of flat columns and lists of flat values, else None."""
    import pyarrow as pa

    try:
        rows = pa.Table.from_pandas(df, preserve_index=False)
    except (pa.ArrowException, TypeError, ValueError):
        return None

    def flat(t) -> bool:
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            return flat(t.value_type)
        return not pa.types.is_nested(t) and not pa.types.is_dictionary(t)

    return rows if all(flat(f.type) for f in rows.schema) else None


def _storage_error(path: Path, exc: duckdb.Error) -> Exception:
    """A write DuckDB could not store, as a FlywheelError naming the file and the fix when
    the file system is the cause (permissions, a read-only or full disk); else `exc`."""
    low = str(exc).lower()
    if "no space left" in low or "disk is full" in low or "quota" in low:
        return FlywheelError(f"cannot write the catalog {path}: the disk is full; nothing of "
                             "this write was stored",
                             details=["free space (df -h) and run again: finished stages are "
                                      "reused"])
    advice = _lock_advice(str(exc), path)
    if "cannot open file" in low or "permission" in low or "read-only" in low \
            or "not permitted" in low:
        return FlywheelError(f"cannot write the catalog {path}: {exc}", details=advice)
    return exc


def _lock_advice(message: str, path: Path) -> list[str]:
    """What to do when the file stays locked: name the process holding it (DuckDB's message
    says `... is held in <program> (PID <n>)`)."""
    low = message.lower()
    if any(w in low for w in ("permission denied", "read-only file system",
                              "operation not permitted")):
        return [f"flywheel cannot write {path} or its folder (a writer also creates "
                f"{path.name}.wal beside it): check their permissions (ls -ld), or use a "
                "workspace you can write (--set workspace=DIR)"]
    if "lock" not in low:
        return [f"check that {path} is a flywheel catalog; `flywheel check --catalog "
                f"{path}` tells whether the file is whole"]
    pid = re.search(r"\(PID (\d+)\)", message)
    holder = f"process {pid.group(1)}" if pid else "another process"
    return [f"{holder} holds the lock on {path} (a running `flywheel iterate` holds it for "
            "each commit; any other program holds it while it has the file open)",
            "retry in a moment; if it stays locked, close the program holding it"
            + (f" (see `ps -p {pid.group(1)}`)" if pid else "")
            + ", or copy the file and query the copy with --catalog"]


def _sql_str(path: Path) -> str:
    return str(path).replace("'", "''")


def new_run_id() -> str:
    """A run id: UTC time plus a short random suffix."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def _version(row: tuple) -> Version:
    params = row[5] if isinstance(row[5], dict) else json.loads(row[5])
    return Version(
        version_id=row[0],
        kind=row[1],
        run_id=row[2],
        round=row[3],
        parents=list(row[4]),
        params=params,
        fingerprint=row[6],
        row_count=row[7],
        created_at=row[8],
    )
