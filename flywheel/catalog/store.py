"""The catalog: every dataset version flywheel makes, in one DuckDB file.

A *version* is the immutable output of one stage (prompts, samples, judgments, pairs, model,
eval). Its rows live in one table per kind and carry the `version_id`; the `versions` table
holds the version's parents, params and fingerprint. A stage commits its rows and its version
row in one transaction, so a crash never leaves a partial version, and a stage whose
fingerprint (kind + params + parents' fingerprints + code version) is already stored is found,
not recomputed.

The write connection is opened only for the length of a commit, so other processes can read
the file (`flywheel sql`) between commits. Before its first write a Catalog brings the file up
to date (flywheel.catalog.migrations); a read of a table or view an older file lacks says
which command migrates it.
"""

from __future__ import annotations

import contextlib
import json
import os
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
from flywheel.catalog import migrations, schema
from flywheel.catalog.schema import SCHEMA  # noqa: F401  (re-exported)
from flywheel.errors import FlywheelError
from flywheel.hashing import (  # noqa: F401  (re-exported)
    CODE_VERSION,
    fingerprint,
    normalise_text,
    prompt_id,
    stable_id,
)
from flywheel.tables import TABLES as _TABLE_COLUMNS

#: rows per row group in what a writer appends (see Catalog._connect)
ROW_GROUP_SIZE = 30_720

KINDS = ("prompts", "samples", "judgments", "canary", "pairs", "model", "eval", "gate")

#: The table that holds each kind's rows.
TABLES = {
    "prompts": "prompts",
    "samples": "samples",
    "judgments": "judgments",
    "canary": "canary_judgments",
    "pairs": "pairs",
    "model": "models",
    "eval": "evals",
    "gate": "gates",
}



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
        self._migrated = False  # see _migrate()

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
        except duckdb.CatalogException as exc:
            # a table or view of this release that the file (made by an older flywheel) lacks
            name = re.search(r"Table with name (\w+) does not exist", str(exc))
            if name and name.group(1) in (*TABLE_NAMES, *schema.VIEW_NAMES) \
                    and name.group(1) not in _names(con):
                raise migrations.outdated(self.path, name.group(1)) from exc
            raise
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
        """A read-write connection inside one transaction; rolled back on any error. The
        Catalog's first write brings the file up to date first (`_migrate`)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.verify()
        con = self._connect(read_only=False)
        try:
            self._migrate(con)
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
        """Create the catalog, or bring an existing one up to date (idempotent: one read
        when it is)."""
        if self._migrated and self.path.is_file():
            return
        self.migrate()

    def migrate(self) -> migrations.Outcome:
        """Apply the pending migrations in one transaction, creating the file if there is
        none (what `init()` and `flywheel migrate` run; the first write of a Catalog does the
        same), after checking that the writer can create its WAL beside the file. Returns
        what was applied and recorded (nothing when the file was up to date)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.verify()
        self._migrated = False
        con = self._connect(read_only=False)
        try:
            _check_wal(self.path)  # holding DuckDB's lock on the file: no writer is in it
            return self._migrate(con)
        finally:
            con.close()

    def _migrate(self, con: duckdb.DuckDBPyConnection) -> migrations.Outcome:
        """Bring the file of the write connection `con` up to date, once per Catalog object:
        its first write reads the `migrations` table, later ones trust it."""
        if self._migrated:
            return migrations.Outcome()
        try:
            out = migrations.migrate(con, self.path)
        except duckdb.Error as exc:  # the migrations' COMMIT: nothing of it was stored
            raise _storage_error(self.path, exc) from exc
        self._migrated = True
        return out

    def pending(self) -> list[tuple[migrations.Migration, bool]]:
        """The migrations the file lacks, each with whether the file already has its change
        (recorded, not applied, when migrating). Reads only; [] when up to date; raises for a
        file from a newer flywheel."""
        with self.read() as con:
            return migrations.pending(con, self.path)

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


def _check_wal(path: Path) -> None:
    """Raise unless `<path>.wal` can be created beside the catalog. DuckDB writes a small
    commit straight into the file but needs the WAL for a change of the schema (and for
    some commits): in a folder where it cannot be created (permissions, `chattr +i`, a
    read-only file system) a run would store its first rows and fail at a later commit. The
    caller holds DuckDB's lock on the file, so no writer has a WAL open; an existing one
    (being replayed) is left alone."""
    wal = Path(f"{path}.wal")
    try:
        fd = os.open(wal, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    except OSError as exc:
        raise FlywheelError(f"cannot write the catalog {path}: cannot create {wal.name} "
                            f"beside it ({exc.strerror}); nothing was written",
                            details=_lock_advice("permission denied", path)) from None
    os.close(fd)
    wal.unlink()


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


#: The catalog's tables (flywheel.tables), for telling a missing one from a typo.
TABLE_NAMES = tuple(_TABLE_COLUMNS)


def _names(con: duckdb.DuckDBPyConnection) -> set[str]:
    """The tables and views of the connection's catalog."""
    return {r[0] for r in con.execute(
        "SELECT table_name FROM information_schema.tables "
        "WHERE table_catalog = current_database()").fetchall()}


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
