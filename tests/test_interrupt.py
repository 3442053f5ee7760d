"""Ctrl-C and SIGTERM (issue 9): with and without Prefect, a signalled `flywheel iterate` stops
within 10 s, commits nothing of the stage in flight, records the run `interrupted` with its
round and stage, prints one line naming them and the command that resumes it (no traceback),
exits 130 (SIGINT) or 143 (SIGTERM), frees the workspace lock and leaves no process behind
(Prefect's temporary server included); running that command finishes the round and reuses
every version made before the signal.

The runs are real `flywheel iterate` processes on the tiny model. `FLYWHEEL_STALL=<point>`
(flywheel/faults.py) holds a run inside a given stage, as a long computation would, and the
signal goes to the run's whole process group, as a terminal's Ctrl-C does. The catalog may
change between the signal and the exit only by the run's `interrupted` event.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flywheel import interrupt, runlock
from flywheel.errors import Interrupted
from tests.conftest import ROOT, catalog_state, run_cli
from tests.crashkit import connect, events, iterate_args, problems, start, versions

#: A signal must end the run within this many seconds (the issue's bound).
STOP_WITHIN_S = 10


# -- driving a run --------------------------------------------------------------------------
def _wait_for(proc: subprocess.Popen, out: Path, text: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while text not in (out / "stderr").read_text():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before {text!r}:\n"
                        + (out / "stderr").read_text()[-3000:])
        if time.monotonic() > deadline:
            pytest.fail(f"no {text!r} within {timeout}s")
        time.sleep(0.1)


def _descendants(pid: int) -> set[int]:
    """The processes below `pid` (children, their children, ...), from /proc."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        kids = {c for c, pp in parent.items() if pp == p}
        todo.extend(kids - found)
        found |= kids
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited


def _session_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _cleanup(proc: subprocess.Popen, kids: set[int]) -> None:
    """End whatever a failed case left running."""
    for pid in kids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    if proc.poll() is None or _session_alive(proc.pid):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _gone(pids: set[int], pgid: int, within: float = 5) -> set[int]:
    """What of `pids` and of session `pgid` is still alive after up to `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        left = {p for p in pids if _alive(p)}
        if not left and not _session_alive(pgid):
            return set()
        time.sleep(0.1)
    return {p for p in pids if _alive(p)} | ({pgid} if _session_alive(pgid) else set())


def _row_counts(ws: Path) -> dict[str, int]:
    with connect(ws) as con:
        tables = [t for (t,) in con.execute(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_type = 'BASE TABLE'").fetchall()]
        return {t: con.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}


def _status(ws: Path) -> dict:
    proc = run_cli("status", "--catalog", str(ws / "flywheel.duckdb"), "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def _interrupt(args: list[str], stall: str | None, wait_text: str, sig: signal.Signals):
    """Start a run, wait for `wait_text` in its stderr, signal its process group; return
    (returncode, stderr, seconds from the signal to the exit, the processes it had started,
    what of them outlived it, the catalog's row counts at the signal or None)."""
    proc, out = start(args, stall=stall)
    kids: set[int] = set()
    try:
        _wait_for(proc, out, wait_text)
        ws = Path(next(a.split("=", 1)[1] for a in args if a.startswith("workspace=")))
        if "--no-prefect" not in args:  # Prefect's temporary server is a child of the run
            deadline = time.monotonic() + 60
            while not kids and time.monotonic() < deadline:
                kids = _descendants(proc.pid)
                time.sleep(0.05)
            assert kids, "Prefect's temporary server did not start"
        counts = _row_counts(ws) if (ws / "flywheel.duckdb").exists() else None
        kids |= _descendants(proc.pid)
        t0 = time.monotonic()
        os.killpg(proc.pid, sig)  # as a terminal's Ctrl-C: the whole foreground group
        try:
            proc.wait(timeout=300)
        finally:
            took = time.monotonic() - t0
        left = _gone(kids, proc.pid)
    finally:
        _cleanup(proc, kids)
        stderr = (out / "stderr").read_text()
        shutil.rmtree(out, ignore_errors=True)
    return proc.returncode, stderr, took, kids, left, counts


def _resume_line(stderr: str, sig: signal.Signals, where: str) -> list[str]:
    """The one line saying where the run stopped and how to resume; the resume command's
    arguments."""
    lines = [line for line in stderr.splitlines() if "resume with: " in line
             or "start it again with: " in line]
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith(f"interrupted by {sig.name} {where}"), lines[0]
    command = shlex.split(lines[0].split(" with: ", 1)[1])
    assert command[0] == "flywheel", lines[0]
    return command[1:]


# -- the cases ------------------------------------------------------------------------------
#: (prefect, signal, where the run is held, the stage that point is in: round, kind, extra args)
CASES = [
    pytest.param(False, signal.SIGINT, "samples:compute", 1, "samples", (),
                 id="plain-SIGINT-samples"),
    pytest.param(False, signal.SIGTERM, "train:step", 1, "model",
                 ("--set", "train.checkpoint_steps=1", "--continue"),
                 id="plain-SIGTERM-mid-training-continue"),
    pytest.param(True, signal.SIGINT, "judgments:compute", 1, "judgments", (),
                 id="prefect-SIGINT-judgments"),
    pytest.param(True, signal.SIGTERM, "gate:compute", 1, "gate", (),
                 id="prefect-SIGTERM-gate"),
]


@pytest.mark.badinput
@pytest.mark.parametrize("prefect,sig,point,round_,kind,extra", CASES)
def test_signal_stops_the_run_cleanly_and_the_same_command_resumes(
        tiny_model, tmp_path, prefect, sig, point, round_, kind, extra):
    ws = tmp_path / "ws"
    args = iterate_args(tiny_model, ws, *extra, rounds=1, prefect=prefect)
    rc, stderr, took, kids, left, at_signal = _interrupt(
        args, point, f"FLYWHEEL_STALL={point}: waiting", sig)

    assert rc == 128 + sig, stderr[-3000:]  # 130 for SIGINT, 143 for SIGTERM
    assert took < STOP_WITHIN_S, f"{took:.1f}s from the signal to the exit"
    assert "Traceback" not in stderr, stderr[-3000:]
    resume = _resume_line(stderr, sig, f"in round {round_} ({kind}): nothing of that stage "
                                       "was written")
    # the same command; after --continue, --rounds names the last round it asked for (here
    # round 1 of an empty workspace, and iterate_args puts --rounds first)
    assert resume == [a for a in args if a != "--continue"]
    assert not left, f"processes left running: {left}"
    if prefect:
        assert "Stopping temporary server" in stderr

    # nothing of the stage in flight, and nothing else but the run's `interrupted` event
    cat = ws / "flywheel.duckdb"
    made = versions(ws)
    assert not [v for v, (k, r, _) in made.items() if (k, r) == (kind, round_)], made
    assert problems(ws) == []
    assert _row_counts(ws) == {**at_signal, "run_events": at_signal["run_events"] + 1}
    assert not runlock.is_locked(cat)

    status = _status(ws)
    assert status["workspace"][0]["lock"].startswith("free"), status["workspace"]
    run = status["runs"][0]
    assert (run["state"], run["stage_round"], run["stage"]) == ("interrupted", round_, kind), run
    last = events(ws, run["run_id"])[-1]
    assert last[:3] == ("interrupted", round_, kind), last
    assert json.loads(last[3])["signal"] == sig.name

    # the resume line's command finishes the round, reusing every version made before
    proc = run_cli(*resume, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for version_id in made:
        assert f"reused  {version_id}" in proc.stderr, (version_id, proc.stderr[-3000:])
    assert problems(ws, complete=True) == []
    assert set(made) < set(versions(ws))
    if point == "train:step":  # the training stopped after its first checkpoint goes on
        assert "resuming training from" in proc.stderr, proc.stderr[-3000:]
    assert _status(ws)["runs"][0]["state"] == "finished"


@pytest.mark.badinput
def test_signal_while_prefect_starts_changes_nothing(tiny_model, tiny_catalog, tmp_path):
    """Ctrl-C during the temporary server's start-up (10-20 s): the run stops at once, before
    anything is recorded; the catalog is unchanged and the server is stopped."""
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copy(tiny_catalog, ws / "flywheel.duckdb")
    before = catalog_state(ws / "flywheel.duckdb")
    args = iterate_args(tiny_model, ws, rounds=3, prefect=True)
    rc, stderr, took, kids, left, _ = _interrupt(
        args, None, "Starting temporary server", signal.SIGINT)

    assert rc == 130, stderr[-3000:]
    assert took < STOP_WITHIN_S, f"{took:.1f}s from the signal to the exit"
    assert "Traceback" not in stderr, stderr[-3000:]
    resume = _resume_line(stderr, signal.SIGINT, "before the run started: nothing was written")
    assert resume == args
    assert kids and not left, f"processes left running: {left} of {kids}"
    assert catalog_state(ws / "flywheel.duckdb") == before
    assert not runlock.is_locked(ws / "flywheel.duckdb")


def test_a_sigkilled_prefect_run_leaves_no_server_behind(tiny_model, tmp_path):
    """SIGKILL cannot be handled, but Prefect's temporary server, in a session of its own,
    still dies with the run (PR_SET_PDEATHSIG): checked by pid, not by process group."""
    args = iterate_args(tiny_model, tmp_path / "ws", rounds=1, prefect=True)
    rc, stderr, _, kids, left, _ = _interrupt(
        args, "prompts:compute", "FLYWHEEL_STALL=prompts:compute: waiting", signal.SIGKILL)
    assert rc == -signal.SIGKILL, stderr[-3000:]
    assert kids and not left, f"processes left running: {left} of {kids}"


# -- in one process: where a stop request is honoured -----------------------------------------
@pytest.fixture(autouse=True)
def _no_stop_request_left():
    """No stop request leaks into the next test of this process."""
    interrupt.reset()
    yield
    interrupt.reset()


@pytest.fixture
def handlers():
    """flywheel's SIGINT/SIGTERM handlers in this process, restored afterwards."""
    saved = {s: signal.getsignal(s) for s in interrupt.SIGNALS}
    interrupt.install()
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
        interrupt.reset()


def _signal_self(sig: signal.Signals) -> None:
    os.kill(os.getpid(), sig)
    for _ in range(100):  # the handler runs at the next bytecode boundary of the main thread
        time.sleep(0.001)


def test_a_signal_raises_at_once_while_computing_and_waits_for_a_commit(handlers):
    with pytest.raises(Interrupted) as exc:
        with interrupt.computing():
            _signal_self(signal.SIGTERM)
            pytest.fail("the computation went on after SIGTERM")
    assert (exc.value.signum, exc.value.exit_code) == (signal.SIGTERM, 143)

    interrupt.reset()
    finished = False
    with interrupt.committing():
        _signal_self(signal.SIGINT)
        finished = True  # a commit is never cut short
    assert finished and interrupt.requested() == signal.SIGINT
    with pytest.raises(Interrupted):
        interrupt.check()  # ... and the run stops at the next check


def test_second_signal_stops_outside_a_stage(handlers):
    _signal_self(signal.SIGINT)  # the first outside a stage: noted, the run goes on
    assert interrupt.requested() == signal.SIGINT
    with pytest.raises(Interrupted):
        _signal_self(signal.SIGINT)


def test_a_stage_asked_to_stop_while_computing_commits_nothing(tmp_path):
    """A stop requested while a stage computes (a signal handled between two batches, or in
    a stage computed off the main thread) is honoured before the commit."""
    import pandas as pd

    from flywheel import pipeline
    from flywheel.catalog import Catalog

    cat = Catalog(tmp_path / "c.duckdb")
    cat.init()
    ctx = pipeline.Context(cfg=None, run_id="r1", catalog=cat, log=lambda m: None)
    rows = pd.DataFrame([{"prompt_id": "p1", "text": "hi", "source": "seed", "round": 1}])

    def compute(fp):
        interrupt.request(signal.SIGTERM)
        return {"prompts": rows}, {}

    with pytest.raises(Interrupted):
        pipeline._stage(ctx, "prompts", 1, {"x": 1}, [], compute, code="0.1.0+1")
    assert ctx.stage == (1, "prompts")
    with cat.read() as con:
        assert con.execute("SELECT count(*) FROM versions").fetchone()[0] == 0
        assert con.execute("SELECT count(*) FROM prompts").fetchone()[0] == 0


def test_generation_and_training_stop_between_batches_and_steps(tiny_model, tmp_path,
                                                                monkeypatch):
    """The long loops check for a stop: generation before each batch, training at each step
    (the model is neither merged nor saved)."""
    import pandas as pd

    from flywheel.backends.transformers import TransformersBackend
    from flywheel.config import TrainConfig
    from flywheel.stages import train

    backend = TransformersBackend(progress=False, batch_size=1)
    convs = [[{"role": "user", "content": f"say {i}"}] for i in range(3)]
    calls = []
    real_encode = backend._encode

    def encode(tok, items, prefixes=None):
        calls.append(len(items))
        if len(calls) == 2:
            interrupt.request(signal.SIGINT)  # arrives while the second batch is generated
        return real_encode(tok, items, prefixes)

    monkeypatch.setattr(backend, "_encode", encode)
    with pytest.raises(Interrupted):
        backend.generate(str(tiny_model), convs, max_new_tokens=2)
    assert calls == [1, 1]  # the third batch never started

    interrupt.reset()
    pairs = pd.DataFrame([{"prompt_id": f"p{i}", "chosen_text": "yes", "rejected_text": "no"}
                          for i in range(8)])
    text = {f"p{i}": f"question {i}" for i in range(8)}
    cfg = TrainConfig(batch_size=1, max_length=128, lora_r=2, lora_alpha=4)
    steps = []
    real_stop = train._stop_callback

    def stop_after_two():
        cb = real_stop()
        on_step_end = cb.on_step_end

        def step_end(args, state, control, **kw):
            steps.append(state.global_step)
            if state.global_step == 2:
                interrupt.request(signal.SIGTERM)
            return on_step_end(args, state, control, **kw)

        cb.on_step_end = step_end
        return cb

    monkeypatch.setattr(train, "_stop_callback", stop_after_two)
    out = tmp_path / "model"
    with pytest.raises(Interrupted):
        train.train_lora(str(tiny_model), pairs, text, cfg, out, seed=0, progress=False)
    interrupt.reset()
    assert steps == [1, 2]  # of 8
    assert not out.exists()


@pytest.mark.parametrize("argv,rounds,expected", [
    (["iterate", "--rounds", "3", "-c", "x y.yaml"], None,
     "flywheel iterate --rounds 3 -c 'x y.yaml'"),
    (["iterate", "--continue", "--rounds", "2", "--no-prefect"], 5,
     "flywheel iterate --rounds 5 --no-prefect"),
    (["iterate", "--rounds=2", "--cont", "--set", "seed=1"], 4,
     "flywheel iterate --rounds 4 --set seed=1"),
    (["iterate", "--continue"], 3, "flywheel iterate --rounds 3"),
])
def test_resume_command(argv, rounds, expected):
    """The same command; after `--continue`, `--rounds N` with the last round the interrupted
    run asked for (the same --continue command would do one round too many)."""
    from flywheel.cli import resume_command

    assert resume_command(argv, rounds) == expected


def test_continue_resume_names_the_last_round_asked_for():
    from flywheel.pipeline import Loop

    loop = Loop(pool=[], policy="m", policy_eval="e", base="m", round=3, new_rounds=1)
    # `--continue --rounds 2` over 2 rounds, interrupted in round 4: round 4 is the last
    assert loop.last_round(2, continue_=True) == 4
    assert loop.last_round(2, continue_=False) == 2


def test_a_third_signal_ends_the_process_at_once():
    """The way out when a stop hangs: the third signal is not handled (even in a commit)."""
    code = ("import os, signal, sys, time\n"
            "from flywheel import interrupt\n"
            "interrupt.install()\n"
            "with interrupt.deferred():\n"
            "    for _ in range(3):\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "        time.sleep(0.2)\n"
            "    print('survived', file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, proc.stderr)
    assert "survived" not in proc.stderr
