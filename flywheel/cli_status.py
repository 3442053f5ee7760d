"""`flywheel status`: where a workspace stands, read from the catalog and the lock file.

Sections: the workspace (catalog, lock holder, current policy, rounds), the runs (newest
first, with their state: running, finished, failed, killed or interrupted, and the stage they
were in), the rounds (each gate's decision: promoted or rejected, with the reason), and the
last failure with its stage and error.
"""

from __future__ import annotations

import argparse
import json

_RAW = argparse.RawDescriptionHelpFormatter


def register(sub: argparse._SubParsersAction) -> dict:
    """Add `status` to `sub`; return {command name: function(args) -> int}."""
    from flywheel.cli_inspect import add_catalog_arg, add_output_args

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
    add_catalog_arg(st)
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
    from flywheel.catalog import Catalog, queries

    cat = Catalog(catalog_path)
    # a catalog older than run_events and gates (migration 0002): the first query of them
    # raises, through Catalog.read, the one-line error naming `flywheel migrate`
    locked = runlock.is_locked(catalog_path)
    holder = runlock.read_holder(catalog_path)
    run_df = queries.runs(cat).head(runs)
    run_df["state"] = [_state(e, rid, locked, holder)
                       for e, rid in zip(run_df.last_event, run_df.run_id)]
    run_df["error"] = [_error(e, d) for e, d in zip(run_df.last_event, run_df.detail)]
    run_df = run_df[["run_id", "state", "started_at", "last_event_at", "stage_round", "stage",
                     "last_round", "versions_made", "error", "command"]]
    evals = report.lineage_evals(cat)
    rounds = queries.gate_rounds(cat, evals)
    rounds["decision"] = ["promoted" if p else "rejected" for p in rounds.promoted]
    rounds = rounds[["round", "decision", "model_version", "win_rate", "ci_low", "ci_high",
                     "pass_rate", "statistic", "threshold", "next_policy", "reason",
                     "eval_version", "run_id"]]
    policy = rounds.next_policy.iloc[-1] if len(rounds) else queries.base_model(cat)
    policy_path = queries.model_path(cat, policy) if policy else None
    failure = queries.last_failure(cat)
    from flywheel.cli_check import missing_checkpoints

    missing = pd.DataFrame(missing_checkpoints(cat), columns=["version_id", "round", "path"])
    n_models = queries.model_count(cat)
    workspace = pd.DataFrame([{
        "catalog": str(catalog_path),
        "lock": (f"held by {holder.describe()}" if locked and holder
                 else "free" + (f" (left by {holder.describe()}, no longer running)"
                                if holder else "")),
        "current_policy": policy, "policy_path": policy_path,
        "rounds": int(rounds["round"].max()) if len(rounds) else 0,
        "promoted": int((rounds.decision == "promoted").sum()),
        "rejected": int((rounds.decision == "rejected").sum()),
        "runs": queries.run_count(cat),
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
    """A run's state from its last event (see queries.runs): `interrupted` is a run stopped by
    SIGINT/SIGTERM; a run with no end event is `running` while a live process holds the
    workspace lock under its id, `killed` once a later run found its lock left behind (that
    run records a `killed` event), and `interrupted` otherwise (killed, or stopped, with no
    later run yet)."""
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
    from flywheel.config import catalog_path

    sections = status(catalog_path(catalog=args.catalog), args.runs)
    print_sections(sections, args.fmt, vertical=("workspace", "last failure"))
    return 0
