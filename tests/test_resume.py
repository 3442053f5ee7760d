"""Crash safety (issue 4, criterion 1): a run SIGKILLed at any point of any stage leaves no
partial version, and running the same command again finishes with exactly the versions an
uninterrupted run makes; a training killed midway resumes from its checkpoint.

Faults are injected with `FLYWHEEL_FAULT=<kind>:compute|<kind>:commit|train:step` (see
flywheel/faults.py). A fault fires at the first stage of its kind that computes, so the kills
are chained in one workspace: each run dies at the next point, and is at the same time the
re-run of the run before it (it takes over the dead run's lock, reuses what was committed and
redoes the killed stage). After each kill the catalog is checked against the reference run
(no version of the killed kind, no rows of an uncommitted version, nothing that the reference
does not hold), and the run after it finishes with exactly the reference's versions and rows.
One run of the chain uses Prefect; the others do not (Prefect adds ~10 s a run).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flywheel import runlock
from flywheel.stages.train import last_checkpoint
from tests.crashkit import (
    connect,
    events,
    iterate_args,
    problems,
    row_keys,
    run,
    versions,
)

#: Operational only: left out of the model's fingerprint, so the reference (default 50, no
#: checkpoint in a 2-step training) and these runs must agree on every version id.
CHECKPOINTS = ("--set", "train.checkpoint_steps=1")


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """Two uninterrupted rounds, default settings: the versions every re-run must end with."""
    ws = tmp_path_factory.mktemp("reference")
    res = run(iterate_args(tiny_model, ws, rounds=2))
    assert res.returncode == 0, res.stderr[-3000:]
    assert problems(ws, complete=True) == []
    return ws


def _upto(ws: Path, last_round: int) -> tuple[dict, dict]:
    """The reference's versions and row keys of rounds 0..last_round."""
    vs = {v: t for v, t in versions(ws).items() if t[1] <= last_round}
    keys = {table: {k for k in ks if k[0] in vs} for table, ks in row_keys(ws).items()}
    return vs, keys


def _kind(fault: str) -> str:
    return "model" if fault == "train:step" else fault.split(":")[0]


def _model_row(ws: Path, round_: int) -> tuple[str, dict]:
    with connect(ws) as con:
        h, metrics = con.execute(
            "SELECT m.content_hash, m.metrics FROM models m JOIN versions v USING (version_id) "
            "WHERE v.round = ?", [round_]).fetchone()
    return h, json.loads(metrics)


def _check_rerun(ws: Path, stderr: str, rerun_id: str, killed_id: str) -> None:
    """The run after a kill took the dead run's lock over and recorded its death."""
    assert f"run {killed_id} (pid" in stderr and "taken over" in stderr, stderr[-2000:]
    assert any(e == "killed" and json.loads(d)["detected_by"] == rerun_id
               for e, _, _, d in events(ws, killed_id)), events(ws, killed_id)
    start = [json.loads(d) for e, _, _, d in events(ws, rerun_id) if e == "start"]
    assert start and start[0]["took_over"] == killed_id


def _kill(ws: Path, model: Path, fault: str, round_: int, ref: tuple[dict, dict], *,
          rounds: int, prefect: bool = False, previous: tuple[str, str, int] | None = None,
          extra: tuple[str, ...] = ()) -> tuple[tuple[str, str, int], str]:
    """Run until `fault` kills the run in `round_`; check the catalog and the events; return
    (killed run id, kind, round) and the run's stderr."""
    kind = _kind(fault)
    res = run(iterate_args(model, ws, *CHECKPOINTS, *extra, rounds=rounds, prefect=prefect),
              fault=fault)
    tail = f"{fault}: rc {res.returncode}\n{res.stderr[-3000:]}"
    assert res.returncode == -9, tail
    assert f"FLYWHEEL_FAULT={fault}: killing process {res.pid}" in res.stderr, tail
    db = ws / "flywheel.duckdb"
    holder = runlock.read_holder(db)  # the dead run's lock file is left behind, unlocked
    assert holder is not None and holder.pid == res.pid, (holder, tail)
    assert not runlock.is_locked(db)
    run_id = holder.run_id
    if previous:  # this run was also the re-run of the one killed before it
        _check_rerun(ws, res.stderr, run_id, previous[0])
        redone = {(k, r) for k, r, _ in versions(ws).values()}
        assert previous[1:] == (kind, round_) or previous[1:] in redone, \
            f"{fault}: the re-run did not redo {previous[1]} of round {previous[2]}"
    last = events(ws, run_id)[-1]
    assert last[:3] == ("stage", round_, kind), (fault, events(ws, run_id))
    vs = versions(ws)
    assert not [v for v, (k, r, _) in vs.items() if k == kind and r == round_], (fault, vs)
    assert problems(ws) == [], fault
    ref_versions, ref_keys = ref
    assert {v: ref_versions.get(v) for v in vs} == vs, f"{fault}: versions differ from the " \
                                                          "reference"
    for table, keys in row_keys(ws).items():
        assert keys <= ref_keys[table], f"{fault}: {table} rows not in the reference"
    return (run_id, kind, round_), res.stderr


def _finish(ws: Path, model: Path, ref: tuple[dict, dict], killed: tuple[str, str, int], *,
            rounds: int, prefect: bool = False, extra: tuple[str, ...] = ()) -> str:
    """Run the same command without a fault: it finishes with the reference's versions."""
    res = run(iterate_args(model, ws, *CHECKPOINTS, *extra, rounds=rounds, prefect=prefect))
    assert res.returncode == 0, res.stderr[-3000:]
    db = ws / "flywheel.duckdb"
    assert runlock.read_holder(db) is None and not runlock.is_locked(db)
    with connect(ws) as con:
        run_id = con.execute("SELECT run_id FROM run_events WHERE event = 'finish' "
                             "ORDER BY event_at DESC LIMIT 1").fetchone()[0]
    assert run_id in res.stderr  # `done: ... (run <id>)`
    _check_rerun(ws, res.stderr, run_id, killed[0])
    assert problems(ws, complete=True) == []
    ref_versions, ref_keys = ref
    assert versions(ws) == ref_versions
    assert row_keys(ws) == ref_keys
    return res.stderr


#: (fault, the round it fires in, with Prefect): in the order a run reaches them, so each run
#: gets one stage further than the one before. Round 0 comes first (a fresh workspace).
ROUNDS_0_1 = [
    ("prompts:commit", 0, False),
    ("model:commit", 0, False),
    ("eval:compute", 0, False),
    ("eval:commit", 0, False),
    ("prompts:commit", 1, False),
    ("samples:compute", 1, True),   # killed inside a Prefect flow run
    ("samples:commit", 1, False),
    ("judgments:compute", 1, False),
    ("judgments:commit", 1, False),
    ("canary:compute", 1, False),
    ("canary:commit", 1, False),
    ("pairs:commit", 1, False),
    ("model:commit", 1, False),     # trained, killed while committing the model version
    ("train:step", 1, False),       # killed after the first training checkpoint
    ("eval:commit", 1, False),      # its re-run resumes training from that checkpoint
    ("gate:compute", 1, False),
    ("gate:commit", 1, False),
]


@pytest.mark.slow
def test_killed_at_every_stage_rerun_ends_with_the_reference_versions(tiny_model, reference,
                                                                       tmp_path):
    ws = tmp_path / "ws"
    ref = _upto(reference, 1)
    killed = None
    for fault, round_, prefect in ROUNDS_0_1:
        killed, stderr = _kill(ws, tiny_model, fault, round_, ref, rounds=1, prefect=prefect,
                               previous=killed)
        if fault == "train:step":
            work = list((ws / "models").glob("model-r1-*.work/checkpoint-1"))
            assert work, "training was killed before its first checkpoint was saved"
        if fault == "eval:commit" and round_ == 1:
            # the run killed here re-ran the training killed at train:step: from its checkpoint
            # and to the same weights and metrics as the uninterrupted training
            assert "resuming training from" in stderr and "checkpoint-1" in stderr
            h, metrics = _model_row(ws, 1)
            ref_h, ref_metrics = _model_row(reference, 1)
            assert h == ref_h
            assert metrics["steps"] == ref_metrics["steps"]
            assert metrics["losses"] == pytest.approx(ref_metrics["losses"])
            assert metrics["train_loss"] == pytest.approx(ref_metrics["train_loss"])
            assert not list((ws / "models").glob("*.work")), "checkpoints left behind"
    _finish(ws, tiny_model, ref, killed, rounds=1)

    # round 2, with `--continue --rounds 1` (one round more, what a scheduled deployment runs):
    # rounds 0 and 1 are reused, round 2 is killed twice; the same command then finishes round
    # 2, and only round 2 (the interrupted round counts as the one round asked for)
    ref = _upto(reference, 2)
    more = ("--continue",)
    killed, _ = _kill(ws, tiny_model, "judgments:commit", 2, ref, rounds=1, extra=more)
    killed, _ = _kill(ws, tiny_model, "train:step", 2, ref, rounds=1, extra=more,
                      previous=killed)
    stderr = _finish(ws, tiny_model, ref, killed, rounds=1, extra=more)
    assert "resuming training from" in stderr
    (h, metrics), (ref_h, ref_metrics) = _model_row(ws, 2), _model_row(reference, 2)
    assert h == ref_h and metrics["train_loss"] == pytest.approx(ref_metrics["train_loss"])


@pytest.mark.slow
def test_a_killed_prefect_run_leaves_no_process_behind(tiny_model, tmp_path):
    """Prefect's temporary server (a child of the CLI) dies with a SIGKILLed run."""
    res = run(iterate_args(tiny_model, tmp_path / "ws", prefect=True), fault="prompts:compute")
    assert res.returncode == -9, res.stderr[-2000:]
    assert not res.leftovers


def test_last_checkpoint_is_the_newest_complete_one(tmp_path):
    """A checkpoint counts once its trainer_state.json (written last) is whole: a kill while
    saving must not leave a checkpoint every re-run then fails to resume from."""
    assert last_checkpoint(tmp_path / "missing") is None
    for step, state in ((2, "{}"), (10, "{}"), (11, '{"global_step": 1'), (12, None)):
        c = tmp_path / f"checkpoint-{step}"
        c.mkdir()
        if state is not None:
            (c / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-x").mkdir()
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
