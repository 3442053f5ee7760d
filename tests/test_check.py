"""Damaged catalogs, missing checkpoints and file-system errors: `flywheel check`, the check
before every write, `flywheel status` and one clear line instead of a traceback."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import duckdb
import pytest

from tests.conftest import ROOT, catalog_state, run_cli

TRAIN = ("--set", "pairs.min_margin=0", "--set", "pairs.require_agreement=false",
         "--set", "judge.verdict=logprobs")


def _iterate(ws: Path, model: Path, *extra: str, rounds: int = 1):
    return run_cli("iterate", "--rounds", str(rounds), "--no-prefect",
                   "--config", "configs/tiny.yaml", "--set", f"models.policy={model}",
                   "--set", f"workspace={ws}", *TRAIN, *extra, timeout=300)


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory) -> Path:
    """A workspace with one real round that trained a model (its checkpoint in ws/models)."""
    ws = tmp_path_factory.mktemp("check-ws")
    proc = _iterate(ws, tiny_model)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ws


def _round_checkpoint(ws: Path) -> tuple[str, Path]:
    con = duckdb.connect(str(ws / "flywheel.duckdb"), read_only=True)
    try:
        vid, path = con.execute("SELECT m.version_id, m.path FROM models m JOIN versions v "
                                "USING (version_id) WHERE v.round = 1").fetchone()
    finally:
        con.close()
    return vid, Path(path)


@contextlib.contextmanager
def _immutable(folder: Path):
    """Make `folder` unwritable even for root (the tests run as root in CI): chattr +i."""
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def _no_traceback(proc) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


# -- flywheel check ---------------------------------------------------------------------------
def test_check_passes_on_a_healthy_workspace(trained):
    proc = run_cli("check", "--catalog", str(trained / "flywheel.duckdb"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert "ok (" in proc.stderr and "2 model checkpoints" in proc.stderr


def test_check_names_a_deleted_checkpoint_and_status_flags_it(trained):
    vid, path = _round_checkpoint(trained)
    aside = path.with_name(path.name + ".aside")
    path.rename(aside)
    try:
        proc = run_cli("check", "--catalog", str(trained / "flywheel.duckdb"))
        assert proc.returncode == 1
        assert f"{vid} (round 1): checkpoint {path} is missing" in proc.stdout
        assert "restore it from a backup" in proc.stdout
        assert "1 problem(s)" in proc.stderr
        st = run_cli("status", "--catalog", str(trained / "flywheel.duckdb"), "--json")
        assert st.returncode == 0, st.stderr
        sections = json.loads(st.stdout)
        assert sections["workspace"][0]["checkpoints"].startswith(f"MISSING 1 of 2: {vid}")
        assert sections["missing checkpoints"] == [
            {"version_id": vid, "round": 1, "path": str(path)}]
    finally:
        aside.rename(path)
    assert run_cli("check", "--catalog", str(trained / "flywheel.duckdb")).returncode == 0


def test_check_names_a_changed_checkpoint(trained):
    vid, path = _round_checkpoint(trained)
    config = path / "config.json"
    original, stat = config.read_bytes(), config.stat()
    try:
        config.write_bytes(original.replace(b"}", b', "edited": true}', 1))
        proc = run_cli("check", "--catalog", str(trained / "flywheel.duckdb"), "--json")
        assert proc.returncode == 1
        problems = json.loads(proc.stdout)
        assert [p["where"] for p in problems] == [f"{vid} (round 1)"]
        assert "has changed since it was recorded" in problems[0]["problem"]
        # --no-hashes only looks for the folder
        assert run_cli("check", "--catalog", str(trained / "flywheel.duckdb"),
                       "--no-hashes").returncode == 0
    finally:
        config.write_bytes(original)
        os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_check_names_orphaned_rows_and_wrong_row_counts(trained, tmp_path):
    cat = tmp_path / "flywheel.duckdb"
    shutil.copy(trained / "flywheel.duckdb", cat)
    con = duckdb.connect(str(cat))
    con.execute("INSERT INTO pairs SELECT * REPLACE ('pairs-r9-gone' AS version_id) FROM pairs "
                "LIMIT 2")
    con.execute("UPDATE versions SET row_count = row_count + 5 WHERE kind = 'samples'")
    con.close()
    proc = run_cli("check", "--catalog", str(cat))
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert any("pairs: 2 row(s) of version pairs-r9-gone, which is not in `versions` "
               "(orphaned rows)" in line for line in lines), lines
    assert sum("row_count is" in line and "samples holds" in line for line in lines) == 1
    assert len(lines) == 2


# -- damaged catalogs: refused before any write, the file untouched -------------------------
def _damaged(kind: str, src: Path, dest: Path) -> None:
    if kind == "truncated":
        shutil.copy(src, dest)
        with dest.open("r+b") as fh:
            fh.truncate(dest.stat().st_size // 2)
    elif kind == "not-duckdb":
        dest.write_text("version_id,kind\nprompts-r0,prompts\n" * 1000)
    elif kind == "empty":
        dest.write_bytes(b"")


DAMAGE = {"truncated": "was cut short", "not-duckdb": "is not a DuckDB database",
          "empty": "is not a DuckDB database: empty (0 bytes)"}


@pytest.mark.badinput
@pytest.mark.parametrize("kind", list(DAMAGE))
def test_iterate_refuses_a_damaged_catalog(kind, trained, tiny_model, tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    cat = ws / "flywheel.duckdb"
    _damaged(kind, trained / "flywheel.duckdb", cat)
    before = catalog_state(cat)
    proc = _iterate(ws, tiny_model)
    assert proc.returncode == 2, proc.stderr[-2000:]
    _no_traceback(proc)
    assert f"the catalog {cat} is damaged: nothing was written to it" in proc.stderr
    assert DAMAGE[kind] in proc.stderr
    assert "restore it from a backup" in proc.stderr
    assert catalog_state(cat) == before
    assert not (ws / "models").exists()


@pytest.mark.badinput
def test_ingest_and_status_on_a_truncated_catalog(trained, tmp_path):
    cat = tmp_path / "flywheel.duckdb"
    _damaged("truncated", trained / "flywheel.duckdb", cat)
    before = catalog_state(cat)
    prompts = tmp_path / "new.jsonl"
    prompts.write_text('{"prompt": "Name three rivers in Asia."}\n')
    for args in (("ingest", str(prompts), "--catalog", str(cat)),
                 ("status", "--catalog", str(cat))):
        proc = run_cli(*args)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        _no_traceback(proc)
        assert str(cat) in proc.stderr and "restore it from a backup" in proc.stderr, args
        assert catalog_state(cat) == before
    proc = run_cli("check", "--catalog", str(cat))
    assert proc.returncode == 1
    assert "was cut short" in proc.stdout and "cannot be read in full" in proc.stdout
    assert catalog_state(cat) == before


# -- checkpoints the catalog names but that are gone ------------------------------------------
@pytest.mark.badinput
def test_continue_names_the_missing_round_checkpoint(trained, tiny_model):
    vid, path = _round_checkpoint(trained)
    aside = path.with_name(path.name + ".aside")
    path.rename(aside)
    try:
        before = catalog_state(trained / "flywheel.duckdb")
        proc = run_cli("iterate", "--continue", "--rounds", "1", "--no-prefect",
                       "--config", "configs/tiny.yaml", "--set", f"models.policy={tiny_model}",
                       "--set", f"workspace={trained}", *TRAIN, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        _no_traceback(proc)
        assert f"the checkpoint of model version {vid} (round 1) is missing: {path}" \
            in proc.stderr
        assert "restore the folder from a backup" in proc.stderr
        assert "setup-model" not in proc.stderr
        after = catalog_state(trained / "flywheel.duckdb")
        # only the run's own bookkeeping (its run row and events) may be added: no version
        assert after["rows"]["versions"] == before["rows"]["versions"]
        assert {t: n for t, n in after["rows"].items() if t not in ("runs", "run_events")} \
            == {t: n for t, n in before["rows"].items() if t not in ("runs", "run_events")}
    finally:
        aside.rename(path)


# -- file-system errors: one line, the path and the fix; --debug for the traceback ------------
@pytest.mark.badinput
def test_unwritable_workspace_is_one_line(tiny_model, tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    with _immutable(ws):
        proc = _iterate(ws, tiny_model)
    assert proc.returncode == 2
    _no_traceback(proc)
    assert str(ws / "flywheel.duckdb.lock") in proc.stderr
    assert "check its permissions" in proc.stderr and "--debug" in proc.stderr
    assert sorted(os.listdir(ws)) == []


@pytest.mark.badinput
def test_catalog_in_an_unwritable_folder_is_left_as_it_was(trained, tiny_model, tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copy(trained / "flywheel.duckdb", ws / "flywheel.duckdb")
    (ws / "flywheel.duckdb.lock").touch()
    before = catalog_state(ws / "flywheel.duckdb")
    with _immutable(ws):
        proc = _iterate(ws, tiny_model, rounds=2)
    assert proc.returncode == 2, proc.stderr[-2000:]
    _no_traceback(proc)
    assert f"cannot write the catalog {ws / 'flywheel.duckdb'}" in proc.stderr
    assert "check their permissions" in proc.stderr
    assert catalog_state(ws / "flywheel.duckdb") == before
    assert sorted(os.listdir(ws)) == ["flywheel.duckdb", "flywheel.duckdb.lock"]


@pytest.mark.badinput
def test_workspace_under_a_file_is_one_line(tiny_model, tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder\n")
    proc = _iterate(blocker / "ws", tiny_model)
    assert proc.returncode == 2
    _no_traceback(proc)
    assert str(blocker) in proc.stderr and "Not a directory" in proc.stderr
    assert "a file stands where a folder is expected" in proc.stderr
    assert blocker.read_text() == "a file, not a folder\n"


def test_debug_shows_the_traceback(tiny_model, tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("x")
    proc = run_cli("--debug", "iterate", "--rounds", "1", "--no-prefect",
                   "--config", "configs/tiny.yaml", "--set", f"models.policy={tiny_model}",
                   "--set", f"workspace={blocker / 'ws'}", timeout=300)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "NotADirectoryError" in proc.stderr
    assert ROOT.exists()
