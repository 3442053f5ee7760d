"""The catalog's fast paths return what the plain SQL they replaced returned.

`pair_lineage`, `round_summary` and `judge_stats` were rewritten for speed (index lookups
instead of scans, min <> max instead of count(DISTINCT)), `flywheel lineage` looks rows up by id
and bounds its example walk, and `Catalog.commit` inserts through Arrow. Each is compared here
with the reference (pre-optimisation) SQL or code, on a small synthetic catalog made by
bench/catalog.py plus the awkward rows it does not make.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import re
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from flywheel import cli_inspect as ci
from flywheel.catalog import SCHEMA, Catalog, fingerprint
from tests.conftest import ROOT

REF_PAIR_LINEAGE = """
WITH q AS (SELECT prompt_id, any_value(text) AS text, any_value(examples) AS examples
           FROM prompts GROUP BY prompt_id)
SELECT p.version_id AS pairs_version, v.round, p.pair_id, p.prompt_id, q.text AS prompt_text,
       q.examples AS example_prompt_ids, p.rule, p.margin, p.chosen_id, p.chosen_text,
       p.rejected_id, p.rejected_text, p.judgment_ids AS pair_judgment_ids,
       (SELECT list(j.judgment_id ORDER BY j.judgment_id) FROM judgments j
        WHERE j.sample_id IN (p.chosen_id, p.rejected_id)
           OR j.sample_a IN (p.chosen_id, p.rejected_id)
           OR j.sample_b IN (p.chosen_id, p.rejected_id)) AS sample_judgment_ids,
       mv.version_id AS model_version
FROM pairs p
JOIN versions v ON v.version_id = p.version_id
LEFT JOIN q ON q.prompt_id = p.prompt_id
LEFT JOIN versions mv ON mv.kind = 'model' AND list_contains(mv.parents, p.version_id)
"""

REF_EXAMPLES = """
WITH RECURSIVE ex(prompt_id, used_by, depth) AS (
    SELECT DISTINCT unnest(examples), prompt_id, 1 FROM prompts
    WHERE prompt_id IN (SELECT unnest($ids))
    UNION
    SELECT unnest(p.examples), p.prompt_id, ex.depth + 1 FROM ex
    JOIN prompts p ON p.prompt_id = ex.prompt_id)
SELECT ex.depth, ex.used_by, p.prompt_id, p.version_id, p.source, p.text, p.examples
FROM ex JOIN prompts p USING (prompt_id)
ORDER BY ex.depth, ex.used_by, p.prompt_id, p.version_id
"""

REF_JUDGMENTS = """
SELECT judgment_id, version_id, type, judge, method, sample_id, sample_a, sample_b, swapped, k,
       parsed, error, score, verdict, winner, rationale
FROM judgments
WHERE sample_id IN (SELECT unnest($s)) OR sample_a IN (SELECT unnest($s))
   OR sample_b IN (SELECT unnest($s)) OR judgment_id IN (SELECT unnest($j))
ORDER BY type, judge, sample_id, sample_a, swapped, k, judgment_id
"""


def _view_sql(name: str) -> str:
    """The body of view `name` in SCHEMA (up to the `;` that ends the statement)."""
    m = re.search(rf"CREATE OR REPLACE VIEW {name} AS\n(.*?);\n(CREATE|$)", SCHEMA, re.S)
    assert m, name
    return m.group(1)


def _count_distinct(sql: str) -> str:
    """The view with its flip test written back as count(DISTINCT ...) > 1."""
    ref, n = re.subn(r"min\(coalesce\((\w+\.)?winner, 'tie'\)\) <> max\(coalesce\((\w+\.)?winner, "
                     r"'tie'\)\) AS flipped",
                     lambda m: f"count(DISTINCT coalesce({m.group(1) or ''}winner, 'tie')) > 1 "
                               "AS flipped", sql)
    assert n == 1, "the flip test is not written as min <> max any more: update this test"
    return ref


def _bench():
    spec = importlib.util.spec_from_file_location("flywheel_bench", ROOT / "bench" / "catalog.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """3 synthetic rounds (a few thousand rows), plus a version of awkward pairs: a SPIN pair
    (gold chosen, no judgments), a pair naming a judgment of another sample, a pair whose
    samples were judged nowhere; and a prompt committed again in a second version."""
    path = tmp_path_factory.mktemp("perf-sql") / "bench.duckdb"
    with contextlib.redirect_stdout(io.StringIO()):
        info = _bench().build(path, scale=0.01, rounds=3, log=lambda *a: None)
    cat = Catalog(path)
    with cat.read() as con:
        p = con.execute("SELECT * FROM pairs WHERE pair_id = ?", [info["pair_id"]]).df().iloc[0]
        other = con.execute("SELECT judgment_id FROM judgments WHERE sample_id NOT IN (?, ?) "
                            "AND type = 'pointwise' LIMIT 1",
                            [p.chosen_id, p.rejected_id]).fetchall()[0][0]
        prompt = con.execute("SELECT * EXCLUDE (version_id) FROM prompts WHERE prompt_id = ? "
                             "LIMIT 1", [p.prompt_id]).df()
        v = con.execute("SELECT version_id, fingerprint FROM versions WHERE kind = 'judgments' "
                        "ORDER BY round DESC LIMIT 1").fetchall()[0]
    base = {"prompt_id": p.prompt_id, "chosen_text": "a", "rejected_text": "b",
            "chosen_score": None, "rejected_score": None, "margin": None, "min_margin": None}
    odd = pd.DataFrame([
        {**base, "pair_id": "pr_spin", "chosen_id": f"gold:{p.prompt_id}",
         "rejected_id": p.rejected_id, "rule": "spin", "judgment_ids": []},
        {**base, "pair_id": "pr_other", "chosen_id": p.chosen_id, "rejected_id": p.rejected_id,
         "rule": "llm", "judgment_ids": [*p.judgment_ids, other]},
        {**base, "pair_id": "pr_unjudged", "chosen_id": "s_nowhere1", "rejected_id": "s_nowhere2",
         "rule": "llm", "judgment_ids": []},
    ])
    for kind, params, parents, tables in (
            ("pairs", {"odd": 1}, [v[0]], {"pairs": odd}),
            ("prompts", {"again": 1}, [], {"prompts": prompt})):
        cat.commit(kind=kind, run_id="r", round=3, parents=parents, params=params,
                   fp=fingerprint(kind, params, [v[1]] if parents else []), tables=tables)
    return {"path": path, "pair_id": info["pair_id"], "first_pair_id": info["first_pair_id"],
            "other": other}


@pytest.fixture
def con(built):
    with Catalog(built["path"]).read() as c:
        yield c


def _close(x, y) -> bool:
    """Equal, floats to 1e-9 (DuckDB sums in parallel: the last bits vary run to run)."""
    if isinstance(x, float) and isinstance(y, (float, int)):
        return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_close(x[k], y[k]) for k in x)
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(_close(u, v) for u, v in zip(x, y))
    return x == y


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    def plain(df):
        return json.loads(json.dumps(ci._records(df.reset_index(drop=True)), default=str))
    assert list(a.columns) == list(b.columns)
    pa, pb = plain(a), plain(b)
    assert len(pa) == len(pb)
    for i, (x, y) in enumerate(zip(pa, pb)):
        assert _close(x, y), f"row {i}: {x} != {y}"


def test_pair_lineage_equals_reference(con):
    key = "ORDER BY pair_id, pairs_version, model_version"
    new = con.execute(f"SELECT * FROM pair_lineage {key}").df()
    ref = con.execute(f"SELECT * FROM ({REF_PAIR_LINEAGE}) {key}").df()
    assert len(new) == len(ref) > 300
    _same(new, ref)
    for pid in ("pr_spin", "pr_other", "pr_unjudged"):
        _same(con.execute("SELECT * FROM pair_lineage WHERE pair_id = ?", [pid]).df(),
              con.execute(f"SELECT * FROM ({REF_PAIR_LINEAGE}) WHERE pair_id = ?", [pid]).df())


def test_pair_lineage_of_one_pair_is_index_lookups(built):
    """`WHERE pair_id = ?` reads a handful of rows, not the tables (the plan shape that keeps
    the filter below DuckDB's flattened subqueries is easy to lose). A plain read-only
    connection: the catalog's readers lock their configuration, profiling included."""
    import duckdb

    con = duckdb.connect(str(built["path"]), read_only=True)
    sizes = dict(con.execute("SELECT 'judgments', count(*) FROM judgments UNION ALL "
                             "SELECT 'prompts', count(*) FROM prompts UNION ALL "
                             "SELECT 'pairs', count(*) FROM pairs").fetchall())
    assert min(sizes.values()) > 1000
    con.execute("PRAGMA enable_profiling = 'json'")
    out = Path(str(built["path"]) + ".profile.json")
    con.execute(f"PRAGMA profiling_output = '{out}'")
    try:
        row = con.execute("SELECT * FROM pair_lineage WHERE pair_id = ?",
                          [built["pair_id"]]).fetchall()
    finally:
        con.execute("PRAGMA disable_profiling")
        con.close()
    assert len(row) == 1
    scanned = json.loads(out.read_text())["query"]["total_rows_scanned"]
    assert scanned < 200, f"{scanned} rows scanned for one pair: a table is scanned"


def test_round_summary_and_judge_stats_equal_count_distinct(con):
    for name, key in (("round_summary", "ORDER BY eval_version"),
                      ("judge_stats", "ORDER BY round, judge")):
        new = con.execute(f"SELECT * FROM {name} {key}").df()
        ref = con.execute(f"SELECT * FROM ({_count_distinct(_view_sql(name))}) {key}").df()
        assert len(new) == len(ref) > 0
        _same(new, ref)
    flips = con.execute("SELECT order_flip_rate FROM round_summary").df().order_flip_rate
    assert (flips > 0).all()  # the bench's judgments flip 15% of comparisons


@pytest.mark.parametrize("which", ["pair_id", "first_pair_id", "pr_other", "pr_spin"])
def test_lineage_sections_equal_reference(con, built, which):
    rid = built.get(which, which)
    sections, more = ci._row_lineage(con, rid, None)
    assert more is False
    pr = sections["pair"].iloc[0]
    samples = [x for x in (pr.chosen_id, pr.rejected_id) if not x.startswith("gold:")]
    ref = con.execute(REF_JUDGMENTS, {"s": samples, "j": list(pr.judgment_ids)}).df()
    _same(sections["judgments"], ref)
    if which == "pr_other":
        assert built["other"] in set(sections["judgments"].judgment_id)
    ex = con.execute(REF_EXAMPLES, {"ids": [pr.prompt_id]}).df()
    _same(sections["example prompts"], ex)
    for depth in (0, 1, 2):
        part, more = ci._row_lineage(con, rid, depth)
        _same(part["example prompts"], ex[ex.depth <= depth])
        assert more == bool((ex.depth > depth).any())
    models = sections["models"]
    assert list(models.columns) == ["model_version", "round", "method", "train_pairs",
                                    "base_version", "path", "trained_on"]
    assert all(list(t) == [pr.version_id] for t in models.trained_on)


def test_lineage_cli_depth_option(built, capsys):
    from flywheel.cli import main

    path = str(built["path"])
    assert main(["lineage", built["pair_id"], "--catalog", path, "--json"]) == 0
    out = capsys.readouterr()
    shown = json.loads(out.out)["example prompts"]
    assert shown and {r["depth"] for r in shown} == {1}
    assert "--depth" in out.err  # round-3 prompts have examples further back
    assert main(["lineage", built["pair_id"], "--catalog", path, "--json", "--depth",
                 "all"]) == 0
    out = capsys.readouterr()
    assert max(r["depth"] for r in json.loads(out.out)["example prompts"]) > 1
    assert out.err == ""
    with pytest.raises(SystemExit):
        main(["lineage", built["pair_id"], "--catalog", path, "--depth", "-1"])
    assert "must be 0 or more, not -1" in capsys.readouterr().err


def _frames() -> dict[str, pd.DataFrame]:
    return {
        "prompts": pd.DataFrame({
            "prompt_id": ["p1", "p2", "p3"], "text": ["a", "b", "c"], "gold": [None] * 3,
            "constraints": ["[]", '[{"type": "x"}]', "[]"], "category": [None, "math", None],
            "source": ["seed"] * 3, "source_ref": ["f:1", None, "f:3"],
            "examples": [[], ["p1"], ["p1", "p2"]], "raw": [None] * 3}),
        "samples": pd.DataFrame({
            "sample_id": ["s1", "s2"], "prompt_id": ["p1", "p1"], "model_version": ["m", "m"],
            "idx": [0, -1], "greedy": [False, True], "text": ["x", "é ü 漢字"],
            "finish_reason": ["stop", "length"], "prompt_tokens": [1, 2],
            "completion_tokens": np.array([3, 4]), "temperature": [0, 0.7],
            "top_p": [1.0, 0.95], "max_new_tokens": [16, 16], "seed": [1, 2**40]}),
        "judgments": pd.DataFrame({
            "judgment_id": ["j1", "j2"], "type": ["pointwise", "pairwise"],
            "prompt_id": ["p1", "p1"], "sample_id": ["s1", None], "sample_a": [None, "s1"],
            "sample_b": [None, "s2"], "comparison_id": [None, "c"], "swapped": [None, False],
            "k": [0, 0], "judge": ["m", "m"], "judge_path": [None, "x"],
            "judge_hash": [None, None], "template_hash": ["t", "t"],
            "method": ["text", "logprobs"], "raw": ["r", "r2"], "rationale": [None, "why"],
            "parsed": [True, False], "error": [None, "e"], "score": [4.0, np.nan],
            "verdict": [None, "A"], "winner": [None, "s1"],
            "probs": [None, json.dumps({"A": 0.5})]}),
        "pairs": pd.DataFrame({
            "pair_id": ["pr1"], "prompt_id": ["p1"], "chosen_id": ["gold:p1"],
            "rejected_id": ["s1"], "chosen_text": ["a"], "rejected_text": ["b"],
            "chosen_score": [None], "rejected_score": [1], "margin": [np.nan], "rule": ["spin"],
            "min_margin": [None], "judgment_ids": [[]]}),
        "models": pd.DataFrame([{"path": "p", "content_hash": "h", "base_version": None,
                                 "method": "base", "train_pairs": None, "metrics": "{}"}]),
        "eval_items": pd.DataFrame({
            "prompt_id": ["p1"], "model_version": ["m"], "text": ["t"],
            "finish_reason": ["stop"], "checks": ["[]"], "pass_fraction": [None],
            "baseline_text": [None], "verdict_ab": [None], "verdict_ba": [None],
            "outcome": [None]}),
    }


@pytest.mark.parametrize("objects", [False, True], ids=["typed", "object-dtype"])
def test_commit_stores_what_the_pandas_scan_stored(tmp_path, objects):
    """Catalog.commit (Arrow) stores the same values as registering the frame (pandas scan)."""
    cat = Catalog(tmp_path / "c.duckdb")
    cat.init()
    frames = {t: (df.astype(object) if objects else df) for t, df in _frames().items()}
    kinds = {"prompts": "prompts", "samples": "samples", "judgments": "judgments",
             "pairs": "pairs", "models": "model", "eval_items": "eval"}
    for table, df in frames.items():
        v = cat.commit(kind=kinds[table], run_id="r", round=0, parents=[], params={"t": table},
                       fp=fingerprint(kinds[table], {"t": table}, []), tables={table: df})
        assert v.row_count == (len(df) if table != "eval_items" else 0)
    with duckdb.connect(str(cat.path)) as con:
        for table, df in frames.items():
            ref = df.copy()
            ref.insert(0, "version_id", "ref")
            con.register("_ref", ref)
            cols = ", ".join(f'"{c}"' for c in ref.columns)
            con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _ref")
            got = con.execute(f"SELECT * EXCLUDE (version_id) FROM {table} "
                              "WHERE version_id <> 'ref'").fetchall()
            want = con.execute(f"SELECT * EXCLUDE (version_id) FROM {table} "
                               "WHERE version_id = 'ref'").fetchall()
            assert got == want, table


def test_commit_falls_back_to_the_pandas_scan_for_objects_arrow_reads_differently(tmp_path):
    from flywheel.catalog import _arrow

    df = _frames()["judgments"]
    assert _arrow(df) is not None
    df["probs"] = [None, {"A": 0.5}]  # a dict: a struct to Arrow, JSON text to the pandas scan
    assert _arrow(df) is None
    cat = Catalog(tmp_path / "c.duckdb")
    cat.init()
    cat.commit(kind="judgments", run_id="r", round=0, parents=[], params={}, fp="f" * 20,
               tables={"judgments": df})
    probs = cat.df("SELECT probs FROM judgments ORDER BY judgment_id").probs.tolist()
    assert pd.isna(probs[0]) and json.loads(probs[1]) == {"A": 0.5}


def test_catalog_made_before_the_indexes_opens_and_gets_them(tmp_path, built):
    """An older catalog (old views; no indexes, or the per-sample-column judgment indexes) is
    upgraded by init: the indexes of this release and only those, its rows untouched."""
    old = tmp_path / "old.duckdb"
    shutil.copyfile(built["path"], old)
    with duckdb.connect(str(old)) as con:
        for (name,) in con.execute("SELECT index_name FROM duckdb_indexes()").fetchall():
            con.execute(f"DROP INDEX {name}")
        for col in ("sample_id", "sample_a", "sample_b"):  # what the previous release indexed
            con.execute(f"CREATE INDEX judgments_{col} ON judgments ({col})")
        con.execute(f"CREATE OR REPLACE VIEW pair_lineage AS {REF_PAIR_LINEAGE}")
        con.execute("DROP TABLE migrations")  # the previous release had none
        before = con.execute("SELECT count(*) FROM judgments").fetchall()
    cat = Catalog(old)
    assert len(cat.df("SELECT * FROM pair_lineage WHERE pair_id = ?", [built["pair_id"]])) == 1
    cat.init()
    with cat.read() as con:
        names = {r[0] for r in con.execute("SELECT index_name FROM duckdb_indexes()").fetchall()}
        assert names == {"judgments_prompt_id", "pairs_pair_id", "prompts_prompt_id",
                         "samples_sample_id"}
        assert con.execute("SELECT count(*) FROM judgments").fetchall() == before
