"""Helpers of the crash-safety tests (test_resume.py, test_lock.py): run `flywheel iterate` as a
process that can be SIGKILLed, and check a catalog for partial versions.

`run_cli` (conftest) waits for the end of the child's stdout and stderr; a SIGKILLed run with
Prefect leaves Prefect's temporary server (its child) running with those pipes open, so these
helpers write the output to files, start each run in its own session and end whatever of that
session outlives the run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import duckdb

from flywheel.catalog import TABLES

ROOT = Path(__file__).resolve().parent.parent

#: Random tiny-model outputs: let continuous logprob scores decide, so pairs (and training)
#: exist (the overrides of test_integration.py).
TINY = ("--set", "judge.verdict=logprobs", "--set", "pairs.min_margin=0",
        "--set", "pairs.require_agreement=false")

#: The kinds each round holds once it is complete.
ROUND_ZERO = {"prompts", "model", "eval"}
ROUND_KINDS = {"prompts", "samples", "judgments", "canary", "pairs", "model", "eval", "gate"}

#: Per table: the columns that identify a row (unique within the table).
ROW_KEYS = {"prompts": ("version_id", "prompt_id"), "samples": ("sample_id",),
            "judgments": ("judgment_id",), "pairs": ("pair_id",), "models": ("version_id",),
            "evals": ("version_id",), "gates": ("version_id",),
            "eval_items": ("version_id", "prompt_id"),
            "train_steps": ("version_id", "phase", "step"),
            "canary_judgments": ("version_id", "canary_id", "order_ab")}


def iterate_args(model: Path, ws: Path, *extra: str, rounds: int = 1,
                 prefect: bool = False) -> list[str]:
    return ["iterate", "--rounds", str(rounds), "--config", "configs/tiny.yaml",
            "--set", f"models.policy={model}", "--set", f"workspace={ws}", *TINY,
            *([] if prefect else ["--no-prefect"]), *extra]


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    pid: int
    wall_s: float
    leftovers: bool  # whether processes it started outlived it


def start(args: list[str], *, fault: str | None = None, stall: str | None = None
          ) -> tuple[subprocess.Popen, Path]:
    """Start `python -m flywheel.cli ARGS` in its own session (process group); output goes to
    files. `fault` kills it at that point (FLYWHEEL_FAULT), `stall` makes it wait there
    (FLYWHEEL_STALL)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    for key in ("FLYWHEEL_FAULT", "FLYWHEEL_STALL", "FLYWHEEL_DEBUG"):
        env.pop(key, None)
    if stall:
        env["FLYWHEEL_STALL"] = stall
    # every process the run starts inherits this mark, even one in a session of its own
    # (Prefect's temporary server is): leftovers are found by it
    env["FLYWHEEL_CRASHKIT_RUN"] = marker = uuid.uuid4().hex
    if fault:
        env["FLYWHEEL_FAULT"] = fault
    out = Path(tempfile.mkdtemp(prefix="flywheel-run-"))
    with open(out / "stdout", "w") as so, open(out / "stderr", "w") as se:
        proc = subprocess.Popen([sys.executable, "-m", "flywheel.cli", *args], cwd=ROOT,
                                stdout=so, stderr=se, env=env, start_new_session=True)
    proc.t0 = time.perf_counter()  # type: ignore[attr-defined]
    proc.marker = marker  # type: ignore[attr-defined]
    return proc, out


def _marked(marker: str) -> list[int]:
    """The live processes (zombies aside) whose environment holds the run's mark."""
    needle = f"FLYWHEEL_CRASHKIT_RUN={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0") \
                    and " Z " not in (entry / "stat").read_text().split(")", 1)[-1][:4]:
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _session_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def finish(proc: subprocess.Popen, out: Path, timeout: float = 600) -> Run:
    """Wait for the run, end what it left running in its session, return its output."""
    try:
        proc.wait(timeout=timeout)
    finally:
        wall = time.perf_counter() - proc.t0  # type: ignore[attr-defined]
        # children told to die with their parent (PR_SET_PDEATHSIG) take a moment to exit
        drain = time.monotonic() + 10
        marker = proc.marker  # type: ignore[attr-defined]
        while proc.poll() is not None and (_session_alive(proc.pid) or _marked(marker)) \
                and time.monotonic() < drain:
            time.sleep(0.1)
        leftovers = _session_alive(proc.pid) or bool(_marked(marker))
        for pid in _marked(marker):  # outside the run's session: killed one by one
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None or leftovers:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + 10
                while _session_alive(proc.pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
            proc.wait()
    res = Run(proc.returncode, (out / "stdout").read_text(), (out / "stderr").read_text(),
              proc.pid, wall, leftovers)
    shutil.rmtree(out, ignore_errors=True)
    return res


def run(args: list[str], *, fault: str | None = None, timeout: float = 600) -> Run:
    proc, out = start(args, fault=fault)
    return finish(proc, out, timeout)


# -- the catalog ------------------------------------------------------------------------------
def connect(ws: Path) -> duckdb.DuckDBPyConnection:
    return duckdb.connect(str(ws / "flywheel.duckdb"), read_only=True)


def versions(ws: Path) -> dict[str, tuple[str, int, int]]:
    """version_id -> (kind, round, row_count)."""
    with connect(ws) as con:
        rows = con.execute("SELECT version_id, kind, round, row_count FROM versions").fetchall()
    return {v: (k, r, n) for v, k, r, n in rows}


def row_keys(ws: Path) -> dict[str, set[tuple]]:
    """table -> the set of (version_id, row key) of every row."""
    out = {}
    with connect(ws) as con:
        for table, key in ROW_KEYS.items():
            cols = ", ".join(dict.fromkeys(("version_id", *key)))
            out[table] = set(con.execute(f"SELECT {cols} FROM {table}").fetchall())
    return out


def problems(ws: Path, *, complete: bool = False) -> list[str]:
    """What is wrong with the catalog: rows of a version that was never committed, a
    version whose row_count is not its rows, duplicate row ids, two versions of one kind in a
    round, an eval whose items are missing; with `complete`, a round missing a kind."""
    found = []
    with connect(ws) as con:
        tables = [t for (t,) in con.execute(  # every table of rows, including any added later
            "SELECT table_name FROM information_schema.columns c "
            "JOIN information_schema.tables USING (table_schema, table_name) "
            "WHERE column_name = 'version_id' AND table_type = 'BASE TABLE' "
            "AND table_name NOT IN ('versions', 'run_events')").fetchall()]
        assert set(ROW_KEYS) <= set(tables), tables
        for table in tables:
            orphans = con.execute(
                f"SELECT DISTINCT version_id FROM {table} "
                "WHERE version_id NOT IN (SELECT version_id FROM versions)").fetchall()
            if orphans:
                found.append(f"{table}: rows of uncommitted versions {sorted(orphans)}")
        for table in ROW_KEYS:
            key = ", ".join(ROW_KEYS[table])
            dups = con.execute(f"SELECT {key}, count(*) FROM {table} GROUP BY ALL "
                               "HAVING count(*) > 1 LIMIT 5").fetchall()
            if dups:
                found.append(f"{table}: duplicate ids {dups}")
        for kind, table in TABLES.items():
            wrong = con.execute(
                f"SELECT v.version_id, v.row_count, count(t.version_id) FROM versions v "
                f"LEFT JOIN {table} t USING (version_id) WHERE v.kind = ? "
                "GROUP BY ALL HAVING v.row_count <> count(t.version_id)", [kind]).fetchall()
            if wrong:
                found.append(f"{kind}: row_count <> rows in {table}: {wrong}")
        items = con.execute(
            "SELECT e.version_id, e.n_prompts, count(i.version_id) FROM evals e "
            "LEFT JOIN eval_items i USING (version_id) GROUP BY ALL "
            "HAVING e.n_prompts <> count(i.version_id)").fetchall()
        if items:
            found.append(f"eval_items missing: {items}")
        twice = con.execute("SELECT kind, round, count(*) FROM versions GROUP BY ALL "
                            "HAVING count(*) > 1").fetchall()
        if twice:
            found.append(f"several versions of one kind in a round: {twice}")
        if complete:
            kinds: dict[int, set[str]] = {}
            for k, r in con.execute("SELECT kind, round FROM versions").fetchall():
                kinds.setdefault(r, set()).add(k)
            for r, ks in sorted(kinds.items()):
                want = ROUND_ZERO if r == 0 else ROUND_KINDS
                if ks != want:
                    found.append(f"round {r} is incomplete: {sorted(ks)}")
            if sorted(kinds) != list(range(len(kinds))):
                found.append(f"rounds are not 0..n: {sorted(kinds)}")
    return found


def events(ws: Path, run_id: str) -> list[tuple]:
    """A run's events in order: (event, round, stage, detail)."""
    with connect(ws) as con:
        return con.execute("SELECT event, round, stage, detail FROM run_events "
                           "WHERE run_id = ? ORDER BY event_at, rowid", [run_id]).fetchall()
