"""One writer per workspace (issue 4, criterion 2): flywheel/runlock.py on its own, and the
acceptance test with real `flywheel iterate` processes: a second run on a busy workspace stops
at once naming the first; after the first is SIGKILLed, the next run takes the lock over and
finishes the rounds."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone

import pytest

from flywheel import runlock
from flywheel.errors import FlywheelError
from tests.crashkit import ROOT, connect, events, finish, iterate_args, problems, run, start

HOLD = """
import sys, time
from flywheel import runlock
runlock.acquire(sys.argv[1], sys.argv[2], "held by a test")
print("ready", flush=True)
time.sleep(600)
"""

PROBE = """
import sys
from flywheel import runlock
from flywheel.errors import FlywheelError
try:
    runlock.acquire(sys.argv[1], "probe")
except FlywheelError as exc:
    print("refused:", exc)
else:
    print("acquired")
"""


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "ws" / "flywheel.duckdb"
    yield path
    while runlock.lock_path(path).resolve().as_posix() in runlock._HELD:
        runlock.release(path)


@pytest.fixture
def holder_process(db):
    """Another process holding the lock of `db` as run `other-run`."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(db), "other-run"], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    proc.stdout.close()


def _probe(db) -> str:
    """What another process gets when it asks for the lock (it releases it on exit)."""
    out = subprocess.run([sys.executable, "-c", PROBE, str(db)], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_acquire_names_the_holder_and_release_clears_it(db):
    assert not runlock.is_locked(db)
    assert runlock.acquire(db, "run-a", "flywheel iterate --rounds 1") is None
    h = runlock.read_holder(db)
    assert (h.run_id, h.pid, h.host, h.command) == (
        "run-a", os.getpid(), socket.gethostname(), "flywheel iterate --rounds 1")
    started = datetime.strptime(h.started_at, "%Y-%m-%d %H:%M:%S UTC")
    assert abs((datetime.now(timezone.utc).replace(tzinfo=None) - started).total_seconds()) < 60
    assert runlock.is_locked(db)
    assert _probe(db).startswith("refused:")
    runlock.release(db)
    assert runlock.read_holder(db) is None and runlock.lock_path(db).read_text() == ""
    assert not runlock.is_locked(db)
    assert _probe(db) == "acquired"
    runlock.release(db)  # not held: nothing to do


def test_one_hold_per_process_and_held_names_the_run(db):
    """The lock is taken once per run (the CLI takes it; the flow inside finds it held and
    does not take it again): a second acquire in the same process is refused, naming the run,
    and `held` says who holds it here."""
    assert runlock.held(db) is None
    assert runlock.acquire(db, "run-a") is None
    assert runlock.held(db).holder.run_id == "run-a"
    with pytest.raises(FlywheelError, match="holds the lock of .* already \\(run run-a\\)"):
        runlock.acquire(db, "run-a")
    assert runlock.is_locked(db) and _probe(db).startswith("refused:")
    runlock.release(db)
    assert runlock.held(db) is None
    assert not runlock.is_locked(db) and _probe(db) == "acquired"


def test_a_lock_held_by_another_process_refuses_naming_it(db, holder_process):
    pid = holder_process.pid
    held = runlock.read_holder(db)
    assert held.run_id == "other-run" and held.pid == pid
    assert runlock.is_locked(db)
    with pytest.raises(FlywheelError) as err:
        runlock.acquire(db, "run-b")
    msg = str(err.value)
    assert "the workspace is in use" in msg
    for part in ("run other-run", f"pid {pid}", f"on {socket.gethostname()}",
                 f"started {held.started_at}", f"kill {pid}"):
        assert part in msg, part
    assert runlock.read_holder(db) == held  # the refused run wrote nothing


def test_the_lock_of_a_killed_holder_is_taken_over(db, holder_process):
    held = runlock.read_holder(db)
    holder_process.send_signal(signal.SIGKILL)
    holder_process.wait()
    assert not runlock.is_locked(db)  # the kernel dropped it; the file still names the dead run
    assert runlock.read_holder(db) == held
    assert runlock.acquire(db, "run-b") == held  # the dead holder, returned for the record
    assert runlock.read_holder(db).run_id == "run-b"
    assert runlock.held(db).stale == held  # what the run inside the CLI records as killed
    runlock.release(db)
    assert runlock.read_holder(db) is None


def test_a_stale_lock_file_is_taken_over(db):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = {"run_id": "dead-run", "pid": int(dead.stdout), "host": socket.gethostname(),
             "started_at": "2026-01-01 00:00:00 UTC", "command": "flywheel iterate"}
    runlock.lock_path(db).parent.mkdir(parents=True)
    runlock.lock_path(db).write_text(json.dumps(stale))
    got = runlock.acquire(db, "run-b")
    assert got == runlock.Holder(**stale)
    assert "dead-run" in got.describe() and f"pid {stale['pid']}" in got.describe()
    assert runlock.read_holder(db).run_id == "run-b"


def test_an_unreadable_lock_file_is_taken(db):
    runlock.lock_path(db).parent.mkdir(parents=True)
    runlock.lock_path(db).write_text("{not json")
    assert runlock.acquire(db, "run-b") is None
    assert runlock.read_holder(db).run_id == "run-b"


@pytest.mark.slow
def test_second_run_is_refused_and_the_next_takes_over_after_a_kill(tiny_model, tmp_path):
    ws = tmp_path / "ws"
    db = ws / "flywheel.duckdb"
    a, a_out = start(iterate_args(tiny_model, ws, rounds=1))
    try:
        deadline = time.monotonic() + 60
        while (held := runlock.read_holder(db)) is None or held.pid != a.pid:
            assert a.poll() is None and time.monotonic() < deadline, "A never took the lock"
            time.sleep(0.05)

        # B (with Prefect) on the same workspace: refused before Prefect starts, at once
        b = run(iterate_args(tiny_model, ws, rounds=1, prefect=True), timeout=60)
        assert a.poll() is None, "A ended before B was refused: the test proves nothing"
        assert b.returncode == 2, b.stderr[-2000:]
        assert b.wall_s < 5, f"B took {b.wall_s:.1f}s to be refused"
        assert "error: the workspace is in use" in b.stderr
        assert f"run {held.run_id} (pid {a.pid} on {held.host}" in b.stderr
        assert "temporary server" not in b.stderr  # refused before Prefect started
    finally:
        if a.poll() is None:
            a.send_signal(signal.SIGKILL)
        ra = finish(a, a_out, timeout=60)
    assert ra.returncode == -9
    assert not runlock.is_locked(db) and runlock.read_holder(db) == held

    c = run(iterate_args(tiny_model, ws, rounds=1))
    assert c.returncode == 0, c.stderr[-3000:]
    assert (f"the lock of run {held.run_id} (pid {a.pid}" in c.stderr
            and "was left by a process that no longer runs: taken over" in c.stderr)
    assert problems(ws, complete=True) == []
    with connect(ws) as con:
        rounds = con.execute("SELECT DISTINCT round FROM versions ORDER BY 1").fetchall()
        runs = con.execute("SELECT run_id FROM runs").fetchall()
        c_id = con.execute("SELECT run_id FROM run_events WHERE event = 'finish'").fetchall()
    assert rounds == [(0,), (1,)]
    assert len(c_id) == 1 and {r for (r,) in runs} <= {held.run_id, c_id[0][0]}  # B: nothing
    assert ("killed", None, None, json.dumps({"detected_by": c_id[0][0]})) in [
        (e, r, s, json.dumps(json.loads(d))) for e, r, s, d in events(ws, held.run_id)]
    assert runlock.read_holder(db) is None and not runlock.is_locked(db)
