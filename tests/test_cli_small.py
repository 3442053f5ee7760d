"""The read commands refuse what would silently print nothing or the wrong thing: a negative
--limit / --depth / --round, an unknown --kind, a --eval that is not a round's eval, a file
that is not a catalog. Each case runs the real CLI on a small catalog and checks the exit
code, that the message names the option, version or path and what to do, and that the
catalog is unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from flywheel.catalog import KINDS, Catalog
from tests.conftest import catalog_state, run_cli, two_rounds_of_prompts

V0, V1 = "prompts-r0-0000000000", "prompts-r1-1111111111"
E0 = "eval-r0-eeeeeeeeee"


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    """Two prompts versions (rounds 0 and 1) and round 0's eval of the base model."""
    path = tmp_path_factory.mktemp("small-ws") / "flywheel.duckdb"
    cat = two_rounds_of_prompts(path)
    cat.commit(kind="eval", run_id="r0", round=0, parents=[V0], params={}, fp="e" * 20,
               tables={"evals": pd.DataFrame([{
                   "model_version": "model-r0-x", "baseline_version": None, "n_prompts": 2,
                   "wins": None, "losses": None, "ties": None, "win_rate": None,
                   "ci_low": None, "ci_high": None, "llm_flip_rate": None, "pass_rate": 0.5,
                   "pass_by_type": "{}"}])})
    assert [v for v in cat.df("SELECT version_id FROM versions ORDER BY round, kind DESC")
            .version_id] == [V0, E0, V1]
    return path


#: (arguments, what the message must say: the option / version / path, and the fix)
BAD = [
    (["show", V0, "--limit", "-5"],
     ["argument --limit: must be 0 or more, not -5", "give --limit N with N >= 0"]),
    (["show", V0, "--limit", "five"],
     ["argument --limit: not a number: 'five'", "give --limit N"]),
    (["diff", V0, V1, "--limit", "-1"],
     ["argument --limit: must be 0 or more, not -1", "give --limit N with N >= 0"]),
    (["lineage", "p_hello", "--depth", "-2"],
     ["argument --depth: must be 0 or more, not -2", "give --depth N", "--depth all"]),
    (["lineage", "p_hello", "--depth", "deep"],
     ["argument --depth: not a number or `all`: 'deep'", "give --depth N"]),
    (["versions", "--kind", "bogus"],
     ["argument --kind: unknown kind 'bogus'", "give one of " + ", ".join(KINDS)]),
    (["versions", "--kind", "models"],
     ["unknown kind 'models' (did you mean 'model'?)", "give one of " + ", ".join(KINDS)]),
    (["versions", "--kind", "Pairs"],
     ["unknown kind 'Pairs' (did you mean 'pairs'?)", "give one of"]),
    (["versions", "--round", "-1"],
     ["argument --round: no round -1", "give --round 0 or more"]),
    (["versions", "--round", "one"],
     ["argument --round: not a round number: 'one'", "give 0 (the base model)"]),
    (["summary", "--eval", "nope"],
     ["--eval nope: no such version in {db}", "flywheel versions --kind eval"]),
    (["summary", "--eval", V0],
     [f"--eval {V0}: a prompts version, not an eval", "flywheel versions --kind eval"]),
    (["summary", "--eval", E0],
     [f"--eval {E0}: round 0's eval measures the base model",
      "give the eval of round 1 or later"]),
    (["show", "nope"], ["no version 'nope' in {db}", "flywheel versions"]),
    (["lineage", "nope"], ["no version or row 'nope'", "give a version id"]),
    (["diff", V0, E0], [f"cannot diff {V0!r} (prompts) with {E0!r} (eval)",
                        "give two versions of the same kind"]),
    (["diff", E0, E0], ["cannot diff eval versions", "diff works on: prompts"]),
]


@pytest.mark.badinput
@pytest.mark.parametrize("args, says", BAD, ids=lambda a: " ".join(a) if isinstance(
    a, list) and a and a[0] in ("show", "lineage", "diff", "versions", "summary") else None)
def test_read_commands_refuse_what_would_print_nothing(db, args, says):
    before = catalog_state(db)
    proc = run_cli(*args, "--catalog", str(db), timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    for text in says:
        assert text.format(db=db) in proc.stderr, (text, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert catalog_state(db) == before


READERS = [["sql", "SELECT 1"], ["versions"], ["summary"], ["show", V0], ["lineage", V0],
           ["diff", V0, V1], ["status"]]


@pytest.mark.badinput
@pytest.mark.parametrize("args", READERS, ids=lambda a: a[0])
def test_a_file_that_is_not_a_catalog_is_named_with_a_fix(tmp_path, args):
    bad = tmp_path / "notes.duckdb"
    bad.write_text("these are my notes, not a database\n")
    before = catalog_state(bad)
    proc = run_cli(*args, "--catalog", str(bad), timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"cannot open the catalog {bad}" in proc.stderr
    assert "check that --catalog names a catalog made by flywheel" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert catalog_state(bad) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.duckdb"]


@pytest.mark.badinput
@pytest.mark.parametrize("args", READERS, ids=lambda a: a[0])
def test_a_missing_catalog_is_named_and_not_created(tmp_path, args):
    missing = tmp_path / "ws" / "flywheel.duckdb"
    proc = run_cli(*args, "--catalog", str(missing), timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"no catalog at {missing}" in proc.stderr
    assert "run `flywheel iterate` first, or pass --catalog PATH" in proc.stderr
    assert catalog_state(missing) == {"exists": False}
    assert list(tmp_path.iterdir()) == []


def test_versions_that_match_nothing_say_what_the_catalog_holds(db):
    for args in (["--round", "7"], ["--kind", "gate"], ["--kind", "pairs", "--round", "0"]):
        proc = run_cli("versions", *args, "--catalog", str(db), "--json", timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == []
        asked = " ".join(args)
        assert f"note: no version matches {asked} in {db}; it holds: prompts (rounds 0–1), " \
               "eval (round 0)" in proc.stderr, proc.stderr
    proc = run_cli("versions", "--round", "1", "--catalog", str(db), "--json", timeout=120)
    assert [r["version_id"] for r in json.loads(proc.stdout)] == [V1]
    assert "note" not in proc.stderr


def test_versions_of_an_empty_catalog_and_summary_without_rounds_say_so(tmp_path, db):
    empty = tmp_path / "flywheel.duckdb"
    Catalog(empty).init()
    proc = run_cli("versions", "--catalog", str(empty), "--json", timeout=120)
    assert proc.returncode == 0 and json.loads(proc.stdout) == []
    assert f"note: {empty} holds no versions yet" in proc.stderr
    proc = run_cli("summary", "--catalog", str(db), "--json", timeout=120)
    assert proc.returncode == 0 and json.loads(proc.stdout) == []
    assert "holds no finished round yet" in proc.stderr and "flywheel iterate" in proc.stderr


def test_show_and_diff_take_a_zero_or_positive_limit(db):
    out = json.loads(run_cli("show", V1, "--limit", "0", "--catalog", str(db), "--json",
                             timeout=120).stdout)
    assert out["rows"] == [] and out["version"][0]["version_id"] == V1
    out = json.loads(run_cli("show", V1, "--limit", "1", "--catalog", str(db), "--json",
                             timeout=120).stdout)
    assert len(out["rows"]) == 1
    out = json.loads(run_cli("diff", V0, V1, "--limit", "0", "--catalog", str(db), "--json",
                             timeout=120).stdout)
    assert out["summary"][0]["added"] == 1 and out["added"] == [] and out["removed"] == []
