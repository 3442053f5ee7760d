"""`flywheel check`: is the catalog whole? (registered into `flywheel`'s parser by flywheel.cli)

It reads, never writes: the file is readable in full (every row of every table), every row
belongs to a version that exists and is of the table's kind, every version's `row_count`
matches its rows and its parents exist, and every model version's checkpoint exists with the
content hash the catalog recorded. Exit 0 when all holds, 1 with the list of problems.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flywheel.errors import FlywheelError

_RAW = argparse.RawDescriptionHelpFormatter


def register(sub: argparse._SubParsersAction) -> dict:
    """Add `check` to `sub`; return {command name: function(args) -> int}."""
    from flywheel.cli_inspect import add_catalog_arg, add_output_args

    ch = sub.add_parser(
        "check", help="verify the catalog: readable, no orphaned rows, row counts, checkpoints",
        description="Verify a catalog without changing it: DuckDB can read every row of every "
                    "table; every row's version exists and is of the table's kind; every "
                    "version's row_count matches its rows and its parents exist; every model "
                    "version's checkpoint exists and still has the content hash the catalog "
                    "recorded (this reads every weight file). Exit 0 when all holds, 1 with "
                    "one line per problem.",
        epilog="example:\n  flywheel check\n  flywheel check --catalog /mnt/runs/exp1/"
               "flywheel.duckdb --json\n  flywheel check --no-hashes   (skip re-hashing "
               "checkpoints)", formatter_class=_RAW)
    add_catalog_arg(ch)
    ch.add_argument("--no-hashes", action="store_true",
                    help="check that checkpoints exist, without re-hashing their files")
    add_output_args(ch, sections=False)
    return {"check": cmd_check}


def missing_checkpoints(cat) -> list[tuple[str, int, str]]:
    """(version_id, round, path) of every model version whose checkpoint folder is gone."""
    from flywheel.catalog import queries

    df = queries.model_checkpoints(cat)
    return [(vid, int(r), p) for vid, r, p in zip(df.version_id, df["round"], df.path)
            if not Path(p).is_dir()]


def check(catalog_path: str | Path, *, hashes: bool = True) -> tuple[list[dict], dict]:
    """The problems found (dicts with `what`, `where`, `problem`) and what was checked."""
    import duckdb

    from flywheel.catalog import TABLES, damage, queries, read_connection

    path = Path(catalog_path)
    if not path.is_file():
        raise FlywheelError(f"no catalog at {path}",
                            details=["pass --catalog PATH, or run `flywheel iterate` first"])
    problems: list[dict] = []

    def problem(what: str, where: str, text: str) -> None:
        problems.append({"what": what, "where": where, "problem": text})

    for text in damage(path):
        problem("file", str(path), text)
    try:
        con = read_connection(path)
    except duckdb.Error as exc:
        problem("file", str(path), f"DuckDB cannot open it: {exc}")
        return problems, {}
    stats = {"tables": 0, "rows": 0, "versions": 0, "models": 0}
    try:
        tables = queries.table_names(con)
        if "versions" not in tables:
            problem("file", str(path), "no `versions` table: not a flywheel catalog")
            return problems, stats
        readable = set()
        for table in sorted(tables):
            try:  # reads (and checksums) every column of every row
                n = queries.scan_table(con, table)
            except duckdb.Error as exc:
                problem("table", table, f"cannot be read in full: {exc}")
                continue
            readable.add(table)
            stats["tables"] += 1
            stats["rows"] += n
        if "versions" not in readable:
            return problems, stats
        versions = queries.version_facts(con)
        stats["versions"] = len(versions)
        known = {vid: kind for vid, kind, _, _ in versions}
        row_tables = {table: kind for kind, table in TABLES.items()}
        row_tables["eval_items"] = "eval"
        counts: dict[str, int] = {}
        for table, kind in row_tables.items():
            if table not in readable:
                continue
            for vid, n in queries.rows_per_version(con, table):
                if vid not in known:
                    problem("rows", table, f"{n} row(s) of version {vid}, which is not in "
                                           "`versions` (orphaned rows)")
                elif known[vid] != kind:
                    problem("rows", table, f"{n} row(s) of version {vid}, a {known[vid]} "
                                           f"version, in the table of {kind} rows")
                elif table == TABLES[kind]:
                    counts[vid] = n
        for vid, kind, row_count, parents in versions:
            if TABLES.get(kind) in readable and counts.get(vid, 0) != row_count:
                problem("version", vid, f"row_count is {row_count} but {TABLES[kind]} holds "
                                        f"{counts.get(vid, 0)} row(s) of it")
            for parent in parents or []:
                if parent not in known:
                    problem("version", vid, f"parent {parent} is not in `versions`")
        if "models" in readable:
            problems += _checkpoints(con, hashes, stats)
    finally:
        con.close()
    return problems, stats


def _checkpoints(con, hashes: bool, stats: dict) -> list[dict]:
    from flywheel.catalog import queries
    from flywheel.modelprep import model_hash

    out, seen = [], {}
    rows = queries.model_checkpoints(con)
    for vid, round_, path, recorded in zip(rows.version_id, rows["round"], rows.path,
                                           rows.content_hash):
        stats["models"] += 1
        where = f"{vid} (round {round_})"
        if not Path(path).is_dir():
            out.append({"what": "checkpoint", "where": where,
                        "problem": f"checkpoint {path} is missing (deleted or moved): restore "
                                   "it from a backup; runs that need this model cannot go on"})
            continue
        if not hashes:
            continue
        if path not in seen:
            try:
                seen[path] = model_hash(path, fresh=True)
            except (OSError, FlywheelError) as exc:
                seen[path] = f"unreadable: {exc}"
        if seen[path] != recorded:
            out.append({"what": "checkpoint", "where": where,
                        "problem": f"checkpoint {path} has changed since it was recorded "
                                   f"(content hash {seen[path]}, recorded {recorded}): its "
                                   "files were modified or replaced; restore the original"})
    return out


def cmd_check(args) -> int:
    import sys

    import pandas as pd

    from flywheel.cli_inspect import print_frame
    from flywheel.config import catalog_path

    path = catalog_path(catalog=args.catalog)
    problems, stats = check(path, hashes=not args.no_hashes)
    if args.fmt != "table":
        print_frame(pd.DataFrame(problems, columns=["what", "where", "problem"]), args.fmt)
    else:
        for p in problems:
            print(f"{p['what']:<10} {p['where']}: {p['problem']}")
    checked = (f"{stats.get('tables', 0)} tables, {stats.get('rows', 0):,} rows, "
               f"{stats.get('versions', 0)} versions, {stats.get('models', 0)} model checkpoints"
               + (" (existence only)" if args.no_hashes else ""))
    from flywheel.cli_cache import describe

    # the request cache of the catalog's workspace: its size, never a problem
    print(describe(Path(path).parent / ".flywheel" / "requests.sqlite3") +
          " (not a version; `flywheel cache clear --workspace DIR` empties it)", file=sys.stderr)
    if problems:
        print(f"{path}: {len(problems)} problem(s) ({checked} checked)", file=sys.stderr)
        return 1
    print(f"{path}: ok ({checked} checked)", file=sys.stderr)
    return 0
