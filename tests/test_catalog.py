"""Tests for flywheel.catalog on a temporary DuckDB file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from flywheel.catalog import Catalog, fingerprint, prompt_id, stable_id
from flywheel.errors import FlywheelError
from flywheel.stages.judging import JUDGMENT_COLUMNS
from flywheel.stages.prompts import PROMPT_COLUMNS


@pytest.fixture(scope="module")
def empty_catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One initialised catalog file, copied for each test (init is the slow part)."""
    path = tmp_path_factory.mktemp("template") / "catalog.duckdb"
    Catalog(path).init()
    return path


@pytest.fixture
def cat(tmp_path: Path, empty_catalog: Path) -> Catalog:
    path = tmp_path / "sub" / "catalog.duckdb"
    path.parent.mkdir()
    shutil.copyfile(empty_catalog, path)
    return Catalog(path, lock_timeout=1.0)


def prompts(*texts: str) -> pd.DataFrame:
    return pd.DataFrame([{"prompt_id": prompt_id(t), "text": t, "gold": None,
                          "constraints": "[]", "category": None, "source": "seed",
                          "source_ref": f"seeds.jsonl:{i + 1}", "examples": [], "raw": None}
                         for i, t in enumerate(texts)], columns=PROMPT_COLUMNS)


def commit_prompts(cat: Catalog, fp: str, *texts: str, round_: int = 0,
                   parents: tuple[str, ...] = (), params: dict | None = None):
    return cat.commit(kind="prompts", run_id="run-1", round=round_, parents=list(parents),
                      params=params or {"seed_file": "seeds.jsonl"}, fp=fp,
                      tables={"prompts": prompts(*texts)})


def counts(cat: Catalog, *tables: str) -> tuple[int, ...]:
    """Row counts of `tables`, read over one connection."""
    sql = ", ".join(f"(SELECT count(*) FROM {t}) AS {t}" for t in tables)
    return tuple(int(x) for x in cat.df(f"SELECT {sql}").iloc[0])


# ------------------------------------------------------------------ ids and fingerprints


def test_prompt_id_normalises_case_and_whitespace() -> None:
    pid = prompt_id("Explain  the Sky.")
    assert pid == prompt_id("explain the sky.") == prompt_id("  EXPLAIN\tthe\nsky. ")
    assert pid.startswith("p_") and len(pid) == 18
    assert pid == "p_" + stable_id("explain the sky.")
    assert prompt_id("Explain the sky!") != pid
    assert prompt_id("Explain the sea.") != pid


def test_stable_id() -> None:
    assert stable_id("a", 1) == stable_id("a", 1)
    assert stable_id("a", 1) != stable_id("a", 2)
    assert stable_id("ab", "c") != stable_id("a", "bc")  # parts are separated
    assert len(stable_id("x")) == 16 and len(stable_id("x", length=8)) == 8


def test_fingerprint() -> None:
    fp = fingerprint("samples", {"n": 4, "temperature": 0.7}, ["fp1", "fp2"])
    assert len(fp) == 20
    assert fp == fingerprint("samples", {"temperature": 0.7, "n": 4}, ["fp1", "fp2"])
    assert fp != fingerprint("samples", {"n": 5, "temperature": 0.7}, ["fp1", "fp2"])
    assert fp != fingerprint("samples", {"n": 4, "temperature": 0.7}, ["fp1", "fp3"])
    assert fp != fingerprint("samples", {"n": 4, "temperature": 0.7}, ["fp1"])
    assert fp != fingerprint("judgments", {"n": 4, "temperature": 0.7}, ["fp1", "fp2"])
    nested = fingerprint("x", {"a": {"b": 1, "c": 2}}, [])
    assert nested == fingerprint("x", {"a": {"c": 2, "b": 1}}, [])


# ------------------------------------------------------------------ init, commit, find, get


def test_init_creates_parent_and_is_idempotent(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "new" / "dir" / "catalog.duckdb")
    cat.init()
    assert cat.path.is_file()
    commit_prompts(cat, "f" * 20, "One prompt.")
    cat.init()
    cat.init()
    assert counts(cat, "versions", "prompts") == (1, 1)
    tables = set(cat.df("SELECT table_name FROM information_schema.tables").table_name)
    assert {"versions", "runs", "prompts", "samples", "judgments", "pairs", "models", "evals",
            "eval_items", "latest_versions", "round_summary"} <= tables


def test_commit_writes_rows_and_version(cat: Catalog) -> None:
    params = {"seed_file": "seeds.jsonl", "nested": {"k": [1, 2]}, "x": 0.5}
    v = commit_prompts(cat, "abcdef0123456789abcd", "First prompt.", "Second prompt.",
                       round_=2, parents=("model-r0-x", "prompts-r0-y"), params=params)
    assert v.version_id == "prompts-r2-abcdef0123"
    assert (v.kind, v.run_id, v.round, v.row_count) == ("prompts", "run-1", 2, 2)
    assert v.parents == ["model-r0-x", "prompts-r0-y"]
    assert v.params == params
    assert v.fingerprint == "abcdef0123456789abcd"
    rows = cat.rows("prompts", v.version_id)
    assert list(rows.text) == ["First prompt.", "Second prompt."]
    assert set(rows.version_id) == {v.version_id}
    assert cat.get(v.version_id) == v
    stored = cat.df("SELECT params FROM versions").params[0]
    assert json.loads(stored) == params


def test_commit_row_count_override_and_extra_tables(cat: Catalog) -> None:
    ev = pd.DataFrame([{"model_version": "model-r0-x", "baseline_version": None, "n_prompts": 2,
                        "pass_rate": 0.5, "pass_by_type": "{}"}])
    items = pd.DataFrame([{"prompt_id": f"p{i}", "model_version": "model-r0-x", "text": "t",
                           "finish_reason": "stop", "checks": "[]"} for i in range(2)])
    v = cat.commit(kind="eval", run_id="r", round=0, parents=[], params={}, fp="e" * 20,
                   tables={"evals": ev, "eval_items": items})
    assert v.row_count == 1  # the kind's own table
    assert len(cat.rows("eval", v.version_id)) == 1
    assert counts(cat, "eval_items") == (2,)
    v2 = cat.commit(kind="prompts", run_id="r", round=0, parents=[], params={}, fp="g" * 20,
                    tables={"prompts": prompts("a b c")}, row_count=7)
    assert v2.row_count == 7


def test_commit_same_fingerprint_returns_first_version(cat: Catalog) -> None:
    first = commit_prompts(cat, "1" * 20, "Only once.")
    again = cat.commit(kind="prompts", run_id="run-2", round=5, parents=[], params={"other": 1},
                       fp="1" * 20, tables={"prompts": prompts("Only once.", "Extra.")})
    assert again == first
    assert counts(cat, "versions", "prompts") == (1, 1)


def test_commit_unknown_kind(cat: Catalog) -> None:
    with pytest.raises(ValueError, match="unknown kind 'bogus'"):
        cat.commit(kind="bogus", run_id="r", round=0, parents=[], params={}, fp="x" * 20,
                   tables={})


def test_commit_empty_tables(cat: Catalog) -> None:
    v = cat.commit(kind="pairs", run_id="r", round=1, parents=[], params={}, fp="p" * 20,
                   tables={"pairs": pd.DataFrame()})
    assert v.row_count == 0
    assert cat.rows("pairs", v.version_id).empty


def test_find(tmp_path: Path, cat: Catalog) -> None:
    assert Catalog(tmp_path / "missing.duckdb").find("0" * 20) is None
    assert cat.find("2" * 20) is None
    v = commit_prompts(cat, "2" * 20, "Find me.")
    assert cat.find("2" * 20) == v
    assert cat.find("3" * 20) is None


def test_get_unknown_version_names_it(cat: Catalog) -> None:
    with pytest.raises(FlywheelError, match="no version 'prompts-r9-nothere'"):
        cat.get("prompts-r9-nothere")


def test_read_missing_file_raises(tmp_path: Path) -> None:
    missing = Catalog(tmp_path / "nope.duckdb")
    with pytest.raises(FlywheelError, match="no catalog at"):
        with missing.read():
            pass
    with pytest.raises(FlywheelError):
        missing.get("anything")
    assert not (tmp_path / "nope.duckdb").exists()


# ------------------------------------------------------------------ atomicity


def test_failure_inside_write_leaves_nothing(cat: Catalog) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with cat.write() as con:
            con.execute("INSERT INTO prompts VALUES ('v1', 'p_1', 't', NULL, '[]', NULL, "
                        "'seed', NULL, [], NULL)")
            con.execute("INSERT INTO versions VALUES ('v1', 'prompts', 'r', 0, [], '{}', "
                        "'fp', 1, now()::TIMESTAMP)")
            assert con.execute("SELECT count(*) FROM prompts").fetchone()[0] == 1
            raise RuntimeError("boom")
    assert counts(cat, "prompts", "versions") == (0, 0)


def test_failing_commit_writes_no_rows_and_no_version(cat: Catalog) -> None:
    bad_samples = pd.DataFrame([{"sample_id": "s_1"}])  # NOT NULL columns missing
    # the INSERT's own error, naming the column (not "transaction is aborted" from cleanup)
    with pytest.raises(duckdb.ConstraintException,
                       match=r"NOT NULL constraint failed: samples\.prompt_id"):
        cat.commit(kind="samples", run_id="r", round=1, parents=[], params={}, fp="b" * 20,
                   tables={"prompts": prompts("Written first."), "samples": bad_samples})
    assert counts(cat, "prompts", "samples", "versions") == (0, 0, 0)
    assert cat.find("b" * 20) is None


# ------------------------------------------------------------------ reading


def test_rows_of_several_versions(cat: Catalog) -> None:
    a = commit_prompts(cat, "a" * 20, "Alpha one.", "Alpha two.")
    b = commit_prompts(cat, "b" * 20, "Beta one.")
    c = commit_prompts(cat, "c" * 20, "Gamma one.")
    both = cat.rows("prompts", [a.version_id, b.version_id])
    assert sorted(both.text) == ["Alpha one.", "Alpha two.", "Beta one."]
    assert set(both.version_id) == {a.version_id, b.version_id}
    assert list(cat.rows("prompts", c.version_id).text) == ["Gamma one."]
    assert cat.rows("prompts", []).empty
    assert cat.rows("prompts", ["prompts-r0-unknown"]).empty


def test_record_run(cat: Catalog) -> None:
    cat.record_run("run-xyz", {"seed": 3}, "flywheel iterate")
    runs = cat.df("SELECT * FROM runs")
    assert list(runs.run_id) == ["run-xyz"]
    assert json.loads(runs.config[0]) == {"seed": 3}
    assert runs.command[0] == "flywheel iterate"


def test_latest_versions_one_row_per_kind(cat: Catalog) -> None:
    commit_prompts(cat, "a" * 20, "Round zero.", round_=0)
    commit_prompts(cat, "b" * 20, "Round two.", round_=2)
    commit_prompts(cat, "c" * 20, "Round one.", round_=1)
    cat.commit(kind="pairs", run_id="r", round=1, parents=[], params={}, fp="d" * 20,
               tables={})
    latest = cat.df("SELECT kind, version_id, round FROM latest_versions ORDER BY kind")
    assert list(latest.kind) == ["pairs", "prompts"]
    assert list(latest.version_id) == ["pairs-r1-dddddddddd", "prompts-r2-bbbbbbbbbb"]


# ------------------------------------------------------------------ round_summary


def pairwise_row(jid: str, cid: str, a: str, b: str, swapped: bool, verdict: str) -> dict:
    row = dict.fromkeys(JUDGMENT_COLUMNS)
    row.update(judgment_id=jid, type="pairwise", prompt_id="p_1", sample_a=a, sample_b=b,
               comparison_id=cid, swapped=swapped, k=0, judge="model-r0-x", method="text",
               raw=f"[[{verdict}]]", rationale="", parsed=True, verdict=verdict,
               winner={"A": a, "B": b}.get(verdict))
    return row


def commit_lineage(cat: Catalog, judgments: pd.DataFrame, tag: str = "a",
                   pass_rate: float = 0.5) -> str:
    """prompts -> samples -> judgments -> pairs -> model -> eval for round 1 (and a round-0
    eval of the base model); returns the round-1 eval version id."""
    def commit(kind, rnd, parents, tables=None, n=None):
        return cat.commit(kind=kind, run_id="r", round=rnd, parents=parents, params={},
                          fp=(kind[:2] + str(rnd) + tag) * 5, tables=tables or {},
                          row_count=n).version_id

    base = commit("model", 0, [], {"models": pd.DataFrame([{
        "path": "m0", "content_hash": "h0", "method": "base", "metrics": "{}"}])})
    ev0 = commit("eval", 0, [base], {"evals": pd.DataFrame([{
        "model_version": base, "n_prompts": 4, "pass_rate": 0.25, "pass_by_type": "{}"}])})
    prompts = commit_prompts(cat, (tag * 20)[:20], f"A round one prompt {tag}.", round_=1)
    samples = commit("samples", 1, [prompts.version_id, base], n=0)
    judged = commit("judgments", 1, [samples, prompts.version_id, base],
                    {"judgments": judgments})
    pairs = commit("pairs", 1, [judged, samples, prompts.version_id], n=3)
    model = commit("model", 1, [pairs, prompts.version_id, base], {"models": pd.DataFrame([{
        "path": "m1", "content_hash": "h1" + tag, "method": "dpo",
        "metrics": json.dumps({"train_loss": 0.6})}])})
    return commit("eval", 1, [model, base, ev0], {"evals": pd.DataFrame([{
        "model_version": model, "baseline_version": base, "n_prompts": 4, "win_rate": 0.5,
        "pass_rate": pass_rate, "pass_by_type": "{}"}])})


def test_round_summary_order_flip_rate(cat: Catalog) -> None:
    commit_prompts(cat, "a" * 20, "A round one prompt.", round_=1)
    rows = [
        # consistent: s_1 wins shown first and shown second
        pairwise_row("j1", "c_1", "s_1", "s_2", False, "A"),
        pairwise_row("j2", "c_1", "s_2", "s_1", True, "B"),
        # flip: position A wins in both orders
        pairwise_row("j3", "c_2", "s_1", "s_3", False, "A"),
        pairwise_row("j4", "c_2", "s_3", "s_1", True, "A"),
    ]
    commit_lineage(cat, pd.DataFrame(rows, columns=JUDGMENT_COLUMNS))
    summary = cat.df("SELECT * FROM round_summary")
    assert list(summary["round"]) == [1]
    row = summary.iloc[0]
    assert row.order_flip_rate == 0.5
    assert row.comparisons == 2
    assert row.judge_outputs == 4
    assert row.parse_failures == 0
    assert row.prompts_added == 1 and row.pairs == 3 and row.train_loss == 0.6
    assert row.pass_rate == 0.5 and row.base_pass_rate == 0.25 and row.pass_rate_delta == 0.25


def test_round_summary_without_flips_or_ties(cat: Catalog) -> None:
    commit_prompts(cat, "a" * 20, "A round one prompt.", round_=1)
    rows = [pairwise_row("j1", "c_1", "s_1", "s_2", False, "C"),
            pairwise_row("j2", "c_1", "s_2", "s_1", True, "C")]
    commit_lineage(cat, pd.DataFrame(rows, columns=JUDGMENT_COLUMNS))
    row = cat.df("SELECT * FROM round_summary").iloc[0]
    assert row.order_flip_rate == 0.0  # a tie in both orders is consistent
    assert row.comparisons == 1


def test_round_summary_keeps_lineages_apart(cat: Catalog) -> None:
    from flywheel.report import lineage_evals, summary_rows

    a = commit_lineage(cat, pd.DataFrame([pairwise_row("j1", "c_1", "s_1", "s_2", False, "A"),
                                          pairwise_row("j2", "c_1", "s_2", "s_1", True, "A")],
                                         columns=JUDGMENT_COLUMNS), tag="a", pass_rate=0.5)
    b = commit_lineage(cat, pd.DataFrame([pairwise_row("k1", "c_9", "s_1", "s_2", False, "A"),
                                          pairwise_row("k2", "c_9", "s_2", "s_1", True, "B")],
                                         columns=JUDGMENT_COLUMNS), tag="b", pass_rate=0.75)
    summary = cat.df("SELECT eval_version, order_flip_rate, pass_rate FROM round_summary "
                     "ORDER BY eval_version")
    assert summary.to_dict("records") == [
        {"eval_version": a, "order_flip_rate": 1.0, "pass_rate": 0.5},
        {"eval_version": b, "order_flip_rate": 0.0, "pass_rate": 0.75}]
    assert lineage_evals(cat, a) == [a]
    assert [r["pass_rate"] for r in summary_rows(cat, a)] == [0.5]
    assert [r["pass_rate"] for r in summary_rows(cat)] == [0.75]  # the newest lineage


def test_writer_appends_small_row_groups_and_small_commits_share_one(tmp_path: Path) -> None:
    """A writer attaches the file with ROW_GROUP_SIZE (so a commit of a few ten thousand rows
    is compressed by several threads), and many one-row commits do not leave a row group each
    (DuckDB's vacuum merges them); a path with a quote works."""
    from flywheel.catalog import ROW_GROUP_SIZE

    cat = Catalog(tmp_path / "it's" / "c.duckdb")
    cat.init()
    n = 2 * ROW_GROUP_SIZE + 1000
    rows = pd.DataFrame({"prompt_id": [f"p_{i:08d}" for i in range(n)], "text": "t",
                         "constraints": "[]", "source": "seed",
                         "examples": [[] for _ in range(n)]})
    for k in range(2):
        cat.commit(kind="prompts", run_id="r", round=k, parents=[], params={"k": k},
                   fp=f"fp{k}" * 5, tables={"prompts": rows})
    for i in range(30):
        cat.event("r", "stage", round=i, stage="samples")

    def row_groups(con, table: str) -> list[int]:
        """Rows per row group of `table` (the validity segments of its first column)."""
        return [r[0] for r in con.execute(
            f"SELECT count FROM pragma_storage_info('{table}') WHERE column_id = 0 "
            "AND segment_type = 'VALIDITY' ORDER BY row_group_id").fetchall()]

    with cat.read() as con:
        groups, events = row_groups(con, "prompts"), row_groups(con, "run_events")
        assert con.execute("SELECT count(*) FROM prompts").fetchone()[0] == 2 * n
        assert con.execute("SELECT count(*) FROM run_events").fetchone()[0] == 30
    assert sum(groups) == 2 * n and max(groups) == ROW_GROUP_SIZE and len(groups) >= 5
    assert events == [30]
