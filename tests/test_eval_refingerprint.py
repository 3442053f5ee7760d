"""Migration 0005_eval_fingerprint_names_its_judge on a real catalog: evals and gates made
before the eval's fingerprint named its judge get the fingerprint the pipeline now computes,
ids unchanged, and the catalog is continued without recomputing anything."""

from __future__ import annotations

import json
import shutil

import duckdb

from flywheel.catalog import refingerprint
from flywheel.hashing import fingerprint
from tests.conftest import run_cli

TINY = ["--config", "configs/tiny.yaml", "--set", "judge.verdict=logprobs",
        "--set", "pairs.min_margin=0", "--set", "pairs.require_agreement=false"]


def _versions(path) -> dict[str, tuple[str, str, dict]]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        rows = con.execute("SELECT version_id, kind, fingerprint, params FROM versions"
                           ).fetchall()
    finally:
        con.close()
    return {v: (k, fp, json.loads(p)) for v, k, fp, p in rows}


def _age(path) -> None:
    """Make the catalog what the previous release wrote: evals without `judge_settings`, and
    the fingerprints of evals and gates computed that way (the previous release's formula),
    with the migration not yet recorded."""
    con = duckdb.connect(str(path))
    try:
        rows = con.execute("SELECT version_id, kind, parents, params, fingerprint FROM versions "
                           "ORDER BY created_at, version_id").fetchall()
        fps = {r[0]: r[4] for r in rows}
        for vid, kind, parents, params, _ in rows:
            if kind not in ("eval", "gate"):
                continue
            params = json.loads(params)
            params.pop("judge_settings", None)
            kept = {k: v for k, v in params.items() if k not in ("promoted", "splits")}
            fps[vid] = fingerprint(kind, kept, [fps[p] for p in parents], "0.1.0+1")
            con.execute("UPDATE versions SET params = ?, fingerprint = ? WHERE version_id = ?",
                        [json.dumps(params, sort_keys=True), fps[vid], vid])
        con.execute("DELETE FROM migrations WHERE name = ?", [refingerprint.NAME])
    finally:
        con.close()


def test_a_catalog_from_before_is_refingerprinted_and_continued_without_recomputing(
        tiny_model, tiny_catalog, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(tiny_catalog.parent, ws)
    db = ws / "flywheel.duckdb"
    made = _versions(db)
    judged = {v for v, (k, _, p) in made.items() if k == "eval" and "judge_settings" in p}
    assert len(judged) == 2  # rounds 1 and 2 compare; tiny.yaml's judge settings are changed
    assert made[sorted(judged)[0]][2]["judge_settings"] == {"samples": 1, "max_new_tokens": 8,
                                                             "verdict": "logprobs"}
    _age(db)
    aged = _versions(db)
    moved = {v for v in made if aged[v][1] != made[v][1]}
    assert moved == judged | {v for v, (k, _, _) in made.items() if k == "gate"}
    assert all(aged[v][1] == made[v][1] for v in made if made[v][0] not in ("eval", "gate"))

    proc = run_cli("migrate", "--catalog", str(db))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert refingerprint.NAME in proc.stdout + proc.stderr
    assert _versions(db) == made  # the fingerprints (and params) the pipeline computes

    proc = run_cli("iterate", "--rounds", "2", "--no-prefect", *TINY,
                   "--set", f"models.policy={tiny_model}", "--set", f"workspace={ws}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert " made " not in proc.stderr
    assert proc.stderr.count(" reused ") == 3 + 2 * 8  # round 0 (3) and two rounds of 8
    assert set(_versions(db)) == set(made)  # no version added


def test_the_migration_leaves_versions_of_an_older_formula_alone(tiny_catalog, tmp_path):
    """A version whose stored fingerprint is not the previous release's is not touched."""
    db = tmp_path / "flywheel.duckdb"
    shutil.copy(tiny_catalog, db)
    _age(db)
    con = duckdb.connect(str(db))
    try:
        con.execute("UPDATE versions SET fingerprint = 'older-formula' WHERE kind = 'gate' "
                    "AND round = 1")
        todo = {vid for vid, _, _ in refingerprint.changes(con)}
        kinds = dict(con.execute("SELECT version_id, kind || round FROM versions").fetchall())
    finally:
        con.close()
    # round 1's gate is left; round 2's gate rests on it (its parent fingerprint is the
    # stored one), so it is not the previous release's either; the evals are updated
    assert sorted(kinds[v] for v in todo) == ["eval1", "eval2"]
