"""Named, ordered migrations: what brings a catalog made by an earlier flywheel up to date.

Each migration has a name (`NNNN_what`, applied in that order), the change it makes to a
connection, and a test of whether the file already has that change. The catalog's
`migrations` table records the ones a file has (name, when, the flywheel version that
recorded it).

Every writer (`Catalog.init()`, `commit`, `record_run`, `event`, so `flywheel iterate`,
`ingest`, `migrate`) brings its file up to date before its first write: one read of the
`migrations` table per Catalog object when nothing is pending; else the pending migrations,
in ONE transaction of their own, before the write's. A pending migration whose change the
file already has is recorded without running it: that is how a catalog made before
migrations existed (no `migrations` table) is taken over, and how a new file is made (its
`0001_base` creates the whole schema of this release, so every later migration finds its
change there). A migration that fails, or a process killed half-way, leaves the file as it
was: the transaction is rolled back, nothing of it is stored (`FLYWHEEL_FAULT=migrate:<name>`
kills the process right after migration <name>, inside that transaction: see flywheel.faults).

Views hold no data and are recreated, all of them, at the end of every run of migrations. A
change to a view is therefore a migration too (with nothing to do: `views_changed`), so that
existing catalogs get it; `VIEWS_SHA256` below is the digest of `schema.VIEWS` as of the
latest such migration, and a test fails when the views change without one.

A file whose `migrations` table names a migration this flywheel does not know was written by a
newer flywheel: it is refused for writing (reading works).

Readers never migrate: a read of a table or view an older file lacks says which command
migrates it (`Catalog.read()`, `outdated()`).

Adding a migration: append a `Migration` to `MIGRATIONS` with the next number, a `present`
test that is true once its change is in the file (the change may already be there: see
above), and update `schema` (its tables come from `flywheel.tables`) so that a new catalog has
the same; `tests/test_migrations.py` checks that a migrated catalog equals a new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import duckdb

from flywheel import __version__, faults
from flywheel.catalog import refingerprint, schema
from flywheel.errors import FlywheelError

#: the table that records the migrations a catalog has
MIGRATIONS_TABLE = """CREATE TABLE IF NOT EXISTS migrations (
    name              VARCHAR PRIMARY KEY,
    applied_at        TIMESTAMP NOT NULL,
    flywheel_version  VARCHAR NOT NULL
);"""

#: sha256 of `schema.VIEWS` as of the latest migration that changed a view
#: (0006_train_steps_and_canary: judge_stats' canary columns); `views_sha256()` gives the
#: current one
VIEWS_SHA256 = "2a37154ed72eceb40d3acace522c831e6bc8dfd3f64907bf2302d34d8692acb2"


@dataclass(frozen=True)
class Migration:
    """One named change of the schema."""

    name: str
    doc: str  # one line: what it changes
    apply: Callable[[duckdb.DuckDBPyConnection], None] = field(repr=False)
    #: true when the file already has the change (then it is recorded, not applied)
    present: Callable[[duckdb.DuckDBPyConnection], bool] = field(repr=False)


def _tables(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {r[0] for r in con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
        "AND schema_name = 'main'").fetchall()}


def _indexes(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {r[0] for r in con.execute(
        "SELECT index_name FROM duckdb_indexes() WHERE database_name = current_database() "
        "AND schema_name = 'main'").fetchall()}


def _base(con: duckdb.DuckDBPyConnection) -> None:
    # only ever applied to a file without flywheel's tables: a new catalog gets the whole
    # schema of this release (views are created after the migrations)
    con.execute(schema.TABLES_SQL)
    con.execute(schema.INDEXES_SQL)


def _run_events_and_gates(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(schema.create_table("run_events"))
    con.execute(schema.create_table("gates"))


_LOOKUP_INDEXES = ("prompts_prompt_id", "samples_sample_id", "pairs_pair_id")
_OLD_JUDGMENT_INDEXES = ("judgments_sample_id", "judgments_sample_a", "judgments_sample_b")


def _lookup_indexes(con: duckdb.DuckDBPyConnection) -> None:
    for name in _LOOKUP_INDEXES:
        con.execute(schema.create_index(name))


def _judgments_prompt_index(con: duckdb.DuckDBPyConnection) -> None:
    for name in _OLD_JUDGMENT_INDEXES:
        con.execute(f"DROP INDEX IF EXISTS {name}")
    con.execute(schema.create_index("judgments_prompt_id"))


_TRAIN_STEPS_AND_CANARY = ("train_steps", "canary_judgments")


def _train_steps_and_canary(con: duckdb.DuckDBPyConnection) -> None:
    for name in _TRAIN_STEPS_AND_CANARY:
        con.execute(schema.create_table(name))


def views_changed(con: duckdb.DuckDBPyConnection) -> None:
    """The body of a migration that only changes views: nothing, as every run of migrations
    recreates the views. Such a migration reads
    `Migration("NNNN_view_x", "view x: what changed", views_changed, lambda con: False)`."""


#: Every migration, in the order they are applied. Never rename, reorder or remove one: the
#: names are what catalogs record.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "0001_base",
        "the tables of the first release (versions, runs, prompts ... eval_items); on a new "
        "file, the whole schema of this release",
        _base, lambda con: "versions" in _tables(con)),
    Migration(
        "0002_run_events_and_gates",
        "tables run_events (what `flywheel status` reads) and gates (the promotion decisions)",
        _run_events_and_gates, lambda con: {"run_events", "gates"} <= _tables(con)),
    Migration(
        "0003_lookup_indexes",
        "indexes prompts_prompt_id, samples_sample_id, pairs_pair_id (`flywheel lineage`)",
        _lookup_indexes, lambda con: set(_LOOKUP_INDEXES) <= _indexes(con)),
    Migration(
        "0004_judgments_prompt_index",
        "judgments indexed by prompt_id, instead of by sample_id, sample_a and sample_b",
        _judgments_prompt_index,
        lambda con: "judgments_prompt_id" in (idx := _indexes(con))
        and not idx & set(_OLD_JUDGMENT_INDEXES)),
    Migration(refingerprint.NAME, refingerprint.DOC, refingerprint.apply,
              refingerprint.present),
    Migration(
        "0006_train_steps_and_canary",
        "tables train_steps (every logged training step of a model version) and "
        "canary_judgments (the judge on the canary set each round); judge_stats gains "
        "canary_accuracy and canary_flip_rate",
        _train_steps_and_canary,
        lambda con: set(_TRAIN_STEPS_AND_CANARY) <= _tables(con)),
)

NAMES = tuple(m.name for m in MIGRATIONS)


@dataclass
class Outcome:
    """What one run of migrations did: the migrations it `applied`, and those it `recorded`
    because the file already had their change; both in order. Empty when up to date."""

    applied: list[str] = field(default_factory=list)
    recorded: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.applied or self.recorded)


def recorded(con: duckdb.DuckDBPyConnection) -> list[tuple] | None:
    """The rows of the `migrations` table (name, applied_at, flywheel_version) in order of
    name; None for a file without one (a new file, or one made before migrations)."""
    try:
        return con.execute("SELECT name, applied_at, flywheel_version FROM migrations "
                           "ORDER BY name").fetchall()
    except duckdb.CatalogException:
        return None


def refuse_newer(rows: list[tuple] | None, path: str | Path) -> None:
    """Raise if the file records a migration this flywheel does not know: a newer flywheel
    wrote it, and this one would write rows its schema does not expect."""
    unknown = [(n, v) for n, _, v in rows or () if n not in NAMES]
    if unknown:
        versions = sorted({v for _, v in unknown})
        raise FlywheelError(
            f"the catalog {path} was written by a newer flywheel ({', '.join(versions)}): "
            f"it has migration(s) {', '.join(n for n, _ in unknown)} that flywheel "
            f"{__version__} does not know; nothing was written to it",
            details=["upgrade flywheel to write to this catalog (pip install -U flywheel); "
                     "reading it works (`flywheel status`, `summary`, `sql`)",
                     "or point --catalog / --set workspace=DIR at another catalog"])


def pending(con: duckdb.DuckDBPyConnection, path: str | Path) -> list[tuple[Migration, bool]]:
    """The migrations the file lacks, in order, each with whether its change is already in
    the file (then it would be recorded, not applied). Reads only. A change an earlier pending
    migration would make is not seen here: `migrate` tests each one after the ones before."""
    rows = recorded(con)
    refuse_newer(rows, path)
    done = {r[0] for r in rows or ()}
    return [(m, m.present(con)) for m in MIGRATIONS if m.name not in done]


def migrate(con: duckdb.DuckDBPyConnection, path: str | Path) -> Outcome:
    """Bring the file of `con` (a read-write connection, outside any transaction) up to date,
    in one transaction; one read when it is. Raises FlywheelError, the file unchanged, when a
    migration fails or the file is from a newer flywheel."""
    rows = recorded(con)
    refuse_newer(rows, path)
    done = {r[0] for r in rows or ()}
    todo = [m for m in MIGRATIONS if m.name not in done]
    out = Outcome()
    if not todo:
        return out
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    current = "the migrations table"
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(MIGRATIONS_TABLE)
        for m in todo:
            current = m.name
            if m.present(con):
                out.recorded.append(m.name)
            else:
                m.apply(con)
                out.applied.append(m.name)
            faults.point(f"migrate:{m.name}")
            con.execute("INSERT INTO migrations VALUES (?, ?, ?)", [m.name, now, __version__])
        current = "recreating the views"
        con.execute(schema.VIEWS)
    except BaseException as exc:
        with contextlib.suppress(duckdb.Error):  # the error being raised matters more
            con.execute("ROLLBACK")
        if isinstance(exc, duckdb.Error):
            raise FlywheelError(
                f"cannot bring the catalog {path} up to date: {current} failed: "
                f"{str(exc).splitlines()[0]}",
                details=["nothing was changed: the catalog is as it was, and nothing else "
                         "was written",
                         f"`flywheel migrate --catalog {path} --dry-run` lists the pending "
                         "migrations; `flywheel check --catalog PATH` tells whether the file "
                         "is whole"]) from exc
        raise
    con.execute("COMMIT")  # a COMMIT that fails stores nothing (the caller names the cause)
    return out


def outdated(path: str | Path, name: str) -> FlywheelError:
    """The error for a reader that needs table or view `name`, which the file (made by an
    older flywheel) lacks: which command migrates it."""
    what = "view" if name in schema.VIEW_NAMES else "table"
    return FlywheelError(
        f"the catalog {path} was made by an older flywheel (it has no {name} {what}): run "
        f"`flywheel migrate --catalog {path}`",
        details=["that brings it up to date in one transaction, every row kept (--dry-run "
                 "lists what it would do); so does the first write of this flywheel "
                 "(`flywheel iterate`, `flywheel ingest`)"])


def views_sha256() -> str:
    """The digest VIEWS_SHA256 records: of `schema.VIEWS` without its comments and with its
    white space collapsed, so a comment or the layout does not count as a change."""
    text = " ".join(re.sub(r"--[^\n]*", " ", schema.VIEWS).split())
    return hashlib.sha256(text.encode()).hexdigest()
