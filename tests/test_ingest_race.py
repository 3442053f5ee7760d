"""`flywheel ingest` is a writer like any other: it takes the workspace lock (waiting a bounded
time, then refusing with the holder named) and dedupes inside its own commit transaction, so
two ingests at once never leave a prompt twice."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from flywheel import runlock
from flywheel.catalog import Catalog
from flywheel.errors import FlywheelError
from flywheel.promptfile import load_prompt_file
from flywheel.stages.prompts import seed_rows
from tests.conftest import ROOT, catalog_state, run_cli

SEEDS = ROOT / "data" / "seed_prompts.jsonl"

PROMPTS = [
    "How do I reset my home router to factory settings?",
    "Write a short thank-you note to a colleague who helped me move.",
    "Suggest three names for a small bakery that sells sourdough.",
    "Explain why the sky looks orange at sunset.",
    "List four ways to keep basil alive on a windowsill.",
    "Draft a polite reminder about an unpaid invoice.",
    "Compare renting and buying a bicycle for a summer visit.",
    "Give me a packing checklist for a rainy weekend hike.",
    "Translate 'good morning' into Spanish, French and German.",
]

HOLD = """
import sys, time
from flywheel import runlock
runlock.acquire(sys.argv[1], sys.argv[2], "held by a test")
print("ready", flush=True)
time.sleep(float(sys.argv[3]))
"""


@pytest.fixture
def ws(tmp_path) -> Path:
    """A workspace whose catalog holds the seed prompts, as `flywheel iterate` makes it."""
    cat = Catalog(tmp_path / "ws" / "flywheel.duckdb")
    cat.init()
    cat.commit(kind="prompts", run_id="r0", round=0, parents=[], params={"seed_file": "s"},
               fp="s" * 20, tables={"prompts": seed_rows(load_prompt_file(SEEDS), str(SEEDS))})
    return tmp_path / "ws"


def _jsonl(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def _ingest_proc(file: Path, ws: Path, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flywheel.cli", "ingest", str(file),
                             "--workspace", str(ws)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture
def holder(ws):
    """Start a process holding the workspace lock of `ws` as run `other-run` for `seconds`."""
    procs = []

    def start(seconds: float) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(ws / "flywheel.duckdb"),
                                 "other-run", str(seconds)], cwd=ROOT, stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip() == "ready"
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


@pytest.mark.parametrize("attempt", range(3))
def test_two_ingests_at_once_leave_no_duplicate(ws, tmp_path, attempt):
    """Two real `flywheel ingest` processes started together on one catalog, with files that
    overlap in three prompts: every prompt once, the union in total."""
    a = _jsonl(tmp_path / "a.jsonl", PROMPTS[:6])
    b = _jsonl(tmp_path / "b.jsonl", PROMPTS[3:])
    # run from a folder without the bundled model: prompts are measured in bytes, which keeps
    # the two processes' start-up short and their commits close together
    procs = [_ingest_proc(f, ws, tmp_path) for f in (a, b)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    added = sorted(int(out.split("added ")[1].split()[0]) for out, _ in outs)
    assert added == [3, 6]
    cat = Catalog(ws / "flywheel.duckdb")
    dupes = cat.df("SELECT prompt_id, count(*) AS n FROM prompts GROUP BY 1 HAVING n > 1")
    assert dupes.empty, dupes
    ingested = cat.df("SELECT text FROM prompts WHERE source = 'ingest'")
    assert sorted(ingested.text) == sorted(PROMPTS)


@pytest.mark.badinput
def test_ingest_refuses_a_lock_held_past_wait_naming_the_holder(ws, tmp_path, holder):
    f = _jsonl(tmp_path / "new.jsonl", PROMPTS[:2])
    hold = holder(600)
    state = catalog_state(ws / "flywheel.duckdb")
    proc = run_cli("ingest", str(f), "--workspace", str(ws), "--wait", "1", cwd=tmp_path,
                   timeout=300)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    err = proc.stderr
    assert "Traceback" not in err
    assert f"{ws / 'flywheel.duckdb'} is locked by run other-run (pid {hold.pid}" in err
    assert "held by a test" in err and "(waited 1 s)" in err
    assert f"kill {hold.pid}" in err and "--wait SECONDS waits longer" in err
    assert catalog_state(ws / "flywheel.duckdb") == state


def test_ingest_waits_for_a_lock_then_writes(ws, tmp_path, holder):
    f = _jsonl(tmp_path / "new.jsonl", PROMPTS[:2])
    hold = holder(600)
    proc = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "ingest", str(f),
                             "--workspace", str(ws), "--wait", "120"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    waiting = proc.stderr.readline()  # the ingest says it waits, and for whom ...
    hold.kill()                       # ... then the holder goes away
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, waiting + err
    assert waiting.startswith("waiting up to 120 s for the workspace lock")
    assert "held by run other-run" in waiting
    assert "added 2 prompts" in out
    assert not runlock.is_locked(ws / "flywheel.duckdb")


PROBE = """
import sys
from flywheel import runlock
try:
    runlock.acquire(sys.argv[1], "probe")
except Exception as exc:
    print(exc)
"""


def test_a_writer_is_refused_while_an_ingest_commits_naming_it(ws, monkeypatch):
    """While an ingest writes, another writer (a `flywheel iterate`) stops, naming it."""
    from flywheel import cli_data
    from flywheel.cli import main

    monkeypatch.chdir(ws.parent)  # no bundled model here: prompts are measured in bytes
    seen = []
    real = cli_data.dedupe_rows

    def probe(*a, **k):  # runs inside the ingest's commit
        seen.append(subprocess.run([sys.executable, "-c", PROBE, str(ws / "flywheel.duckdb")],
                                   cwd=ROOT, capture_output=True, text=True,
                                   timeout=120).stdout)
        return real(*a, **k)

    monkeypatch.setattr(cli_data, "dedupe_rows", probe)
    f = _jsonl(ws.parent / "one.jsonl", PROMPTS[:1])
    assert main(["ingest", str(f), "--workspace", str(ws)]) == 0
    assert "the workspace is in use" in seen[0] and f"flywheel ingest {f}" in seen[0]
    assert not runlock.is_locked(ws / "flywheel.duckdb")


def test_acquire_waits_a_bounded_time(ws, holder):
    db = ws / "flywheel.duckdb"
    holder(600)
    with pytest.raises(FlywheelError) as exc:
        runlock.acquire(db, "me", wait=0.5, retry="try later")
    assert "locked by run other-run" in str(exc.value) and "(waited 0.5 s)" in str(exc.value)
    assert "or try later" in str(exc.value)
    assert runlock.read_holder(db).run_id == "other-run"


def test_acquire_gets_the_lock_when_the_holder_lets_go(ws, holder):
    db = ws / "flywheel.duckdb"
    hold = holder(600)
    threading.Timer(1.0, hold.kill).start()
    try:
        stale = runlock.acquire(db, "me", wait=120)  # the killed holder's leftover
        assert stale is not None and stale.run_id == "other-run"
        assert runlock.read_holder(db).run_id == "me"
    finally:
        runlock.release(db)
