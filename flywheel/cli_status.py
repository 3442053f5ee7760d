"""`flywheel status`: where a workspace stands, read from the catalog and the lock file.

Sections: the workspace (catalog, lock holder, current policy, rounds), the runs (newest
first, with their state: running, finished, failed, killed or interrupted, and the stage they
were in), the rounds (each gate's decision: promoted or rejected, with the reason), and the
last failure with its stage and error.
"""

from __future__ import annotations

import argparse
import json

from flywheel.errors import FlywheelError

_RAW = argparse.RawDescriptionHelpFormatter

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


def register(sub: argparse._SubParsersAction) -> dict:
    """Add `status` to `sub`; return {command name: function(args) -> int}."""
    from flywheel.cli_inspect import add_output_args

    st = sub.add_parser(
        "status", help="runs, rounds, promoted and rejected models, the current policy, the "
                       "last failure",
        description="Where the workspace stands: who holds its lock, the current policy (the "
                    "last promoted model, which the next round starts from), each round's gate "
                    "decision (promoted or rejected, and why), the runs with their state "
                    "(running, finished, failed, killed, interrupted) and the stage each was "
                    "in, and the last failure with its stage and error. Read-only; works while "
                    "a run is going.",
        epilog="example:\n  flywheel status\n  flywheel status --json | jq .policy\n"
               "  flywheel status --catalog /mnt/runs/exp1/flywheel.duckdb",
        formatter_class=_RAW)
    st.add_argument("--catalog", default="data/flywheel.duckdb", help="the DuckDB file")
    st.add_argument("--runs", type=_count, default=10,
                    help="show the newest N runs (default 10)")
    add_output_args(st)
    return {"status": cmd_status}


def _count(text: str) -> int:
    """--runs N: a whole number, 0 or more."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count: give 0 or more, e.g. "
                                         "--runs 20")
    return n


def status(catalog_path: str, runs: int = 10) -> dict:
    """The status sections as DataFrames (and the workspace facts as a one-row frame)."""
    import pandas as pd

    from flywheel import report, runlock
    from flywheel.catalog import Catalog

    cat = Catalog(catalog_path)
    with cat.read() as con:
        tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    if "run_events" not in tables:
        raise FlywheelError(
            f"{catalog_path} was made by an older flywheel: it has no run events",
            details=["run `flywheel iterate` once with this version to add them"])
    locked = runlock.is_locked(catalog_path)
    holder = runlock.read_holder(catalog_path)
    run_df = cat.df(_RUNS_SQL).head(runs)
    run_df["state"] = [_state(e, rid, locked, holder)
                       for e, rid in zip(run_df.last_event, run_df.run_id)]
    run_df["error"] = [_error(e, d) for e, d in zip(run_df.last_event, run_df.detail)]
    run_df = run_df[["run_id", "state", "started_at", "last_event_at", "stage_round", "stage",
                     "last_round", "versions_made", "error", "command"]]
    evals = report.lineage_evals(cat)
    rounds = cat.df(_ROUNDS_SQL, {"evals": evals})
    rounds["decision"] = ["promoted" if p else "rejected" for p in rounds.promoted]
    rounds = rounds[["round", "decision", "model_version", "win_rate", "ci_low", "ci_high",
                     "pass_rate", "statistic", "threshold", "next_policy", "reason",
                     "eval_version", "run_id"]]
    base = cat.df("SELECT version_id FROM versions WHERE kind = 'model' AND round = 0 "
                  "ORDER BY created_at DESC LIMIT 1")
    policy = (rounds.next_policy.iloc[-1] if len(rounds)
              else (base.version_id.iloc[0] if len(base) else None))
    policy_path = None
    if policy:
        p = cat.df("SELECT path FROM models WHERE version_id = ?", [policy])
        policy_path = p.path.iloc[0] if len(p) else None
    failure = cat.df(_FAILURE_SQL)
    from flywheel.cli_check import missing_checkpoints

    missing = pd.DataFrame(missing_checkpoints(cat), columns=["version_id", "round", "path"])
    n_models = int(cat.df("SELECT count(*) AS n FROM models").n.iloc[0])
    workspace = pd.DataFrame([{
        "catalog": str(catalog_path),
        "lock": (f"held by {holder.describe()}" if locked and holder
                 else "free" + (f" (left by {holder.describe()}, no longer running)"
                                if holder else "")),
        "current_policy": policy, "policy_path": policy_path,
        "rounds": int(rounds["round"].max()) if len(rounds) else 0,
        "promoted": int((rounds.decision == "promoted").sum()),
        "rejected": int((rounds.decision == "rejected").sum()),
        "runs": int(cat.df("SELECT count(*) AS n FROM runs").n.iloc[0]),
        "checkpoints": (f"all {n_models} present" if missing.empty else
                        f"MISSING {len(missing)} of {n_models}: "
                        + ", ".join(missing.version_id)
                        + " (restore them from a backup; `flywheel check` for details)"),
    }])
    sections = {"workspace": workspace, "rounds": rounds, "runs": run_df,
                "last failure": failure}
    if not missing.empty:
        sections["missing checkpoints"] = missing
    return sections


def _state(last_event, run_id, locked, holder) -> str:
    if last_event == "finish":
        return "finished"
    if last_event == "fail":
        return "failed"
    if last_event == "killed":
        return "killed"
    if last_event == "interrupted":
        return "interrupted"
    if locked and holder is not None and holder.run_id == run_id:
        return "running"
    return "interrupted"


def _error(last_event, detail) -> str | None:
    if last_event != "fail" or detail is None:
        return None
    try:
        return json.loads(detail).get("error") if isinstance(detail, str) else detail.get("error")
    except (ValueError, AttributeError):
        return None


def cmd_status(args) -> int:
    from flywheel.cli_inspect import print_sections

    sections = status(args.catalog, args.runs)
    print_sections(sections, args.fmt, vertical=("workspace", "last failure"))
    return 0
