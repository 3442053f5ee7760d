"""`flywheel migrate`: bring a catalog made by an earlier flywheel up to date (registered into
`flywheel`'s parser by flywheel.cli).

Every writer migrates the catalog before its first write anyway; this command does it on its
own (under the workspace lock, like `flywheel ingest`) and says what it did, and `--dry-run`
lists what it would do. The migrations are in flywheel.catalog.migrations.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flywheel.errors import FlywheelError

_RAW = argparse.RawDescriptionHelpFormatter


def register(sub: argparse._SubParsersAction) -> dict:
    """Add `migrate` to `sub`; return {command name: function(args) -> int}."""
    from flywheel.cli_inspect import CATALOG_HELP

    mg = sub.add_parser(
        "migrate", help="bring a catalog made by an earlier flywheel up to date",
        description="Apply the migrations the catalog lacks, in order, in one transaction, and "
                    "record them in its `migrations` table (name, time, flywheel version). "
                    "No row is removed and no id changes (what a migration updates, its line "
                    "says: 0005 re-fingerprints evals). A migration whose change the file "
                    "already has (a catalog made before migrations existed) is recorded "
                    "without running. The "
                    "views are recreated. Any writing command (`flywheel iterate`, `ingest`) "
                    "does the same before its first write; this one takes the workspace lock, "
                    "waiting up to --wait seconds while another writer holds it, and reports "
                    "what it did. If a migration fails, nothing is changed. A catalog written "
                    "by a newer flywheel is refused.",
        epilog="example:\n  flywheel migrate --dry-run\n"
               "  flywheel migrate --catalog /mnt/runs/exp1/flywheel.duckdb",
        formatter_class=_RAW)
    where = mg.add_mutually_exclusive_group()
    where.add_argument("--workspace", metavar="DIR",
                       help="the workspace whose catalog (DIR/flywheel.duckdb) to migrate")
    where.add_argument("--catalog", metavar="PATH", help=CATALOG_HELP)
    mg.add_argument("--dry-run", action="store_true",
                    help="list the pending migrations and change nothing (takes no lock)")
    mg.add_argument("--wait", type=float, default=30.0, metavar="SECONDS",
                    help="how long to wait for the workspace lock while another writer (a "
                         "`flywheel iterate` run, an ingest) holds it (default 30)")
    return {"migrate": cmd_migrate}


def cmd_migrate(args) -> int:
    from flywheel import runlock
    from flywheel.catalog import Catalog, new_run_id
    from flywheel.catalog.migrations import MIGRATIONS
    from flywheel.config import catalog_path

    if not args.wait >= 0:
        raise FlywheelError(f"--wait {args.wait}: give the seconds to wait for the workspace "
                            "lock, 0 or more")
    path = catalog_path(args.workspace or "data", args.catalog)
    _check_exists(path)
    cat = Catalog(path)
    docs = {m.name: m.doc for m in MIGRATIONS}
    width = max(len(n) for n in docs)
    if args.dry_run:
        todo = cat.pending()
        if not todo:
            print(f"{path} is up to date ({len(MIGRATIONS)} migrations): nothing to do")
            return 0
        print(f"{path}: {len(todo)} pending migration(s); nothing was changed")
        for m, present in todo:
            what = "record (the file has it)" if present else "apply"
            print(f"  {m.name:<{width}}  {what:<24}  {m.doc}")
        print(f"run `flywheel migrate --catalog {path}` to apply them (in one transaction)")
        return 0
    if runlock.is_locked(path):
        holder = runlock.read_holder(path)
        print(f"waiting up to {args.wait:g} s for the workspace lock of {path} (held by "
              f"{holder.describe() if holder else 'another process'})", file=sys.stderr)
    runlock.acquire(path, new_run_id(), "flywheel migrate", wait=args.wait,
                    retry="run the migration again later (--wait SECONDS waits longer)")
    try:
        out = cat.migrate()
    finally:
        runlock.release(path)
    if not out.changed:
        print(f"{path} is up to date ({len(MIGRATIONS)} migrations): nothing to do")
        return 0
    print(f"migrated {path}: {len(out.applied)} applied, {len(out.recorded)} recorded (the "
          "file already had them); views recreated")
    for m in MIGRATIONS:
        if m.name in out.applied or m.name in out.recorded:
            what = "applied" if m.name in out.applied else "recorded (the file had it)"
            print(f"  {m.name:<{width}}  {what:<26}  {m.doc}")
    return 0


def _check_exists(path: Path) -> None:
    """migrate works on an existing catalog file."""
    if path.is_dir():
        raise FlywheelError(f"{path} is a folder, not a catalog file",
                            details=[f"give the DuckDB file (--catalog {path / 'flywheel.duckdb'})"
                                     f" or the workspace (--workspace {path})"])
    if not path.is_file():
        raise FlywheelError(f"no catalog at {path}: nothing to migrate",
                            details=["pass --catalog PATH or --workspace DIR of an existing "
                                     "catalog; a new catalog is made up to date by the first "
                                     "`flywheel iterate` (or `flywheel ingest --create`)"])
