"""All catalog SQL lives in flywheel/catalog/: a scan of the code outside it finds none, and
each named query of flywheel.catalog.queries answers with the rows of a small catalog built
here by hand (two rounds, a promoted and a rejected gate, two runs, a failure). Every command
finds the default workspace's catalog through flywheel.config.catalog_path."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from flywheel.catalog import KINDS, Catalog, queries
from flywheel.tables import TABLES, columns

ROOT = Path(__file__).resolve().parent.parent

# -- no SQL outside flywheel/catalog/ ------------------------------------------------------------
#: Stores that are not the catalog, with SQL of their own: the endpoint request cache is a
#: SQLite file of responses beside the catalog, never a version.
OWN_STORES = {"flywheel/backends/cache.py"}
#: The code scanned: the package (but its catalog and the other stores) and the Prefect flows.
SCANNED = [p for p in sorted([*ROOT.glob("flywheel/**/*.py"), *ROOT.glob("flows/**/*.py")])
           if "catalog" not in p.relative_to(ROOT).parts[:2]
           and p.relative_to(ROOT).as_posix() not in OWN_STORES]

#: Calls that run SQL text: DuckDB's connection / relation methods and Catalog.df. `.df()`
#: without arguments turns a result into a DataFrame and runs nothing.
SQL_CALLS = {"execute", "executemany", "sql", "query", "df", "fetchall", "fetchone"}
#: Keywords that start a statement.
SQL_START = re.compile(r"^\s*\(?\s*(SELECT|INSERT|UPDATE|DELETE|CREATE|DROP|ALTER|WITH|COPY|"
                       r"ATTACH|DETACH|PRAGMA|SET|FROM|DESCRIBE|SUMMARIZE|EXPLAIN|PIVOT|"
                       r"UNPIVOT|BEGIN|COMMIT|ROLLBACK|CHECKPOINT|EXPORT|IMPORT|INSTALL|LOAD|"
                       r"USE|VALUES)\b")
#: A statement inside a longer string: SELECT ... FROM <table>, INSERT INTO, CREATE TABLE ...
SQL_INSIDE = re.compile(r"\bSELECT\b.*?\bFROM\s+[A-Za-z_(]|\bINSERT\s+INTO\b|"
                        r"\b(CREATE|DROP|ALTER)\s+(OR\s+REPLACE\s+)?(TABLE|VIEW|INDEX)\b|"
                        r"\bDELETE\s+FROM\b|\bUPDATE\s+\w+\s+SET\b", re.S)

#: (file, function or module-level name) where SQL text outside the catalog is allowed: the
#: `flywheel sql` path alone. `cmd_sql` runs the user's query; the sandbox that refuses what
#: is not a read names statement types (SELECT, EXPLAIN, UPDATE EXTENSIONS, ...).
ALLOWED = {("flywheel/cli.py", name): why for name, why in {
    "cmd_sql": "runs the user's query on the sandboxed read connection",
    "_READ_TYPES": "the statement types `flywheel sql` runs",
    "_READ_LEADS": "the keywords a read statement starts with",
    "_lead": "finds a statement's leading keyword",
    "_statement_kind": "names a refused statement",
    "_refused": "names a refused statement",
    "_extract": "names a statement DuckDB's client cannot type",
}.items()}
#: Arguments whose strings are shown to people (argparse texts).
TEXT_KEYWORDS = {"help", "description", "epilog", "usage"}


def _text(node: ast.AST) -> str | None:
    """The text of a string constant, or of an f-string's literal parts; else None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    return None


def sql_outside_catalog(source: str, name: str) -> list[str]:
    """`name:line (where): what` for each piece of SQL in `source`: a call that runs SQL
    (SQL_CALLS with arguments) or a string that is SQL (it starts with a statement's keyword,
    or holds SELECT ... FROM, INSERT INTO, CREATE TABLE, ...). Not counted: docstrings, the
    texts of argparse options and parsers (TEXT_KEYWORDS), strings that show a `flywheel sql`
    command to the user, and what is in the functions and names of ALLOWED."""
    tree = ast.parse(source)
    found: list[str] = []
    skip: set[int] = set()

    def visit(node: ast.AST, scope: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scope = node.name
            body = node.body
            if body and isinstance(body[0], ast.Expr) and _text(body[0].value) is not None:
                skip.add(id(body[0].value))
        elif scope == "<module>" and isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            scope = ",".join(t.id for t in targets if isinstance(t, ast.Name)) or scope
        if (name, scope) in ALLOWED:
            return
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg in TEXT_KEYWORDS:
                    skip.update(id(n) for n in ast.walk(kw.value))
            func = node.func
            if (isinstance(func, ast.Attribute) and func.attr in SQL_CALLS
                    and (node.args or node.keywords)):
                found.append(f"{name}:{node.lineno} ({scope}): .{func.attr}(...) runs SQL")
        text = _text(node)
        if text is not None and id(node) not in skip:
            if "flywheel sql" not in text and (SQL_START.match(text)
                                               or SQL_INSIDE.search(text)):
                first = text.strip().splitlines()[0][:60] if text.strip() else ""
                found.append(f"{name}:{node.lineno} ({scope}): SQL text {first!r}")
            return  # an f-string's parts are not strings of their own
        for child in ast.iter_child_nodes(node):
            visit(child, scope)

    for stmt in tree.body:  # the module docstring
        if isinstance(stmt, ast.Expr) and _text(stmt.value) is not None:
            skip.add(id(stmt.value))
        break
    visit(tree, "<module>")
    return found


def test_no_sql_outside_the_catalog_package():
    """Every query the commands and the pipeline run is a named function of
    flywheel.catalog.queries (or the catalog's own schema and writes); `flywheel sql` alone
    runs SQL elsewhere: the user's."""
    names = {p.relative_to(ROOT).as_posix() for p in SCANNED}
    assert {"flywheel/pipeline.py", "flywheel/cli.py", "flywheel/cli_status.py",
            "flywheel/cli_inspect.py", "flywheel/cli_data.py", "flywheel/cli_check.py",
            "flywheel/report.py", "flows/iterate.py"} <= names
    assert not any(n.startswith("flywheel/catalog/") for n in names)
    found = [f for p in SCANNED
             for f in sql_outside_catalog(p.read_text(), p.relative_to(ROOT).as_posix())]
    assert found == [], "SQL outside flywheel/catalog/ (a query belongs in " \
                        "flywheel/catalog/queries.py as a named function, the schema in " \
                        "flywheel/catalog/schema.py):\n" + "\n".join(found)


@pytest.mark.parametrize("code, what", [
    ('def f(cat, sql):\n    return cat.df(sql)\n', ".df(...) runs SQL"),
    ('def f(con, sql):\n    return con.execute(sql).fetchall()\n', ".execute(...) runs SQL"),
    ('def f(con):\n    con.sql(q)\n', ".sql(...) runs SQL"),
    ('Q = """\nWITH x AS (SELECT 1)\nSELECT * FROM x\n"""\n', "SQL text 'WITH x AS"),
    ('def f(t):\n    return f"SELECT * FROM {t} WHERE version_id = ?"\n',
     "SQL text 'SELECT * FROM {} WHERE"),
    ('X = ("a list of prompts: " "SELECT prompt_id FROM prompts")\n', "SQL text 'a list"),
    ('def f(con):\n    return g("INSERT INTO versions VALUES (1)")\n', "SQL text 'INSERT"),
])
def test_the_scan_finds_sql(code, what):
    found = sql_outside_catalog(code, "x.py")
    assert len(found) == 1 and what in found[0], found


def test_the_scan_leaves_help_texts_and_the_sql_command_alone():
    code = '''"""Module doc: SELECT * FROM versions."""
def cmd_sql(args, con, query):
    """Runs SELECT * FROM anything the user gives."""
    return con.execute(query).df()
_READ_TYPES = ("SELECT", "EXPLAIN")
def _parser(sub):
    sub.add_parser("sql", help="SELECT * FROM versions", epilog="WITH a AS (SELECT 1)")
HINT = "query it with SELECT (or WITH ... SELECT, FROM ..., PIVOT)"
EXAMPLE = 'flywheel sql "SELECT * FROM versions WHERE kind = $k"'
'''
    assert sql_outside_catalog(code, "flywheel/cli.py") == []
    # the same call and names anywhere else are found
    found = sql_outside_catalog(code, "flywheel/cli_status.py")
    assert [f.split(": ", 1)[1] for f in found] == [
        ".execute(...) runs SQL", "SQL text 'SELECT'", "SQL text 'EXPLAIN'"], found


# -- a small catalog of two rounds ---------------------------------------------------------
_FILL = {"VARCHAR": "", "INTEGER": 0, "BIGINT": 0, "BOOLEAN": False, "DOUBLE": 0.0,
         "JSON": "{}"}


def _rows(table: str, rows: list[dict]) -> pd.DataFrame:
    """Rows of `table` (without version_id): the columns not given are NULL, or a filler
    where the column is NOT NULL."""
    out = []
    for r in rows:
        full = {}
        for col, typ, _ in TABLES[table]:
            if col == "version_id":
                continue
            if col in r:
                full[col] = r[col]
            elif "NOT NULL" in typ:
                kind = typ.split()[0]
                full[col] = [] if kind.endswith("[]") else _FILL[kind]
            else:
                full[col] = None
        out.append(full)
    return pd.DataFrame(out, columns=columns(table))


def build_two_rounds(path: Path, models: Path) -> dict:
    """A catalog of two hand-made rounds; returns the version ids by name.

    Run `run-a` makes: seed prompts (p_s1, p_s2), two ingested prompts versions, the base
    model and its eval (round 0, pass rate 0.5); round 1 (prompts p_1a, p_1b made from the
    seeds, 4 samples and a greedy one, 4 parsed pointwise judgments scoring 8 / 4 and one
    unparsed, 2 pairs, model-1 with train loss 0.5 and win rate 0.75, promoted) and round 2
    (prompt p_2a made from p_1a, 2 samples, 2 judgments, 1 pair, model-2 with train loss 0.25
    and win rate 0.25, rejected: the policy stays model-1); then it fails in round 3's
    samples stage with `boom`. Run `run-b` starts later and finishes. Model-2's checkpoint
    folder does not exist."""
    cat = Catalog(path)
    cat.init()
    v: dict[str, str] = {}

    def commit(name, kind, round_, parents, tables, params=None):
        fp = (name * 20)[:20]
        v[name] = cat.commit(kind=kind, run_id="run-a", round=round_, parents=parents,
                             params=params or {"name": name}, fp=fp,
                             tables={t: _rows(t, rows) for t, rows in tables.items()}
                             ).version_id
        return v[name]

    cat.record_run("run-a", {}, "flywheel iterate --rounds 3")
    cat.event("run-a", "start")
    commit("seeds", "prompts", 0, [], {"prompts": [
        {"prompt_id": f"p_s{i}", "text": f"seed {i}", "source": "seed"} for i in (1, 2)]})
    for i in (1, 2):
        commit(f"ingest{i}", "prompts", 0, [], {"prompts": [
            {"prompt_id": f"p_i{i}", "text": f"ingested {i}", "source": "ingest"}]},
            params={"source": "ingest", "name": f"file{i}"})
    (models / "base").mkdir(parents=True)
    (models / "round1").mkdir()
    commit("base", "model", 0, [], {"models": [
        {"path": str(models / "base"), "content_hash": "hash-base", "method": "base"}]})
    commit("eval0", "eval", 0, [v["base"]], {
        "evals": [{"model_version": v["base"], "n_prompts": 2, "pass_rate": 0.5}],
        "eval_items": [{"prompt_id": p, "model_version": v["base"], "text": f"answer {p}",
                        "finish_reason": "stop", "checks": "[]", "pass_fraction": 0.5}
                       for p in ("p_s1", "p_s2")]})
    plan = {1: (["p_1a", "p_1b"], ["p_s1", "p_s2"], 0.5, 0.75, 0.6),
            2: (["p_2a"], ["p_1a"], 0.25, 0.25, 0.4)}
    policy, baseline, gate = v["base"], v["eval0"], None
    for r, (prompts, examples, loss, win, passed) in plan.items():
        cat.event("run-a", "stage", round=r, stage="prompts")
        commit(f"prompts{r}", "prompts", r, [v["seeds"]], {"prompts": [
            {"prompt_id": p, "text": f"text of {p}", "source": "self-instruct",
             "examples": examples} for p in prompts]})
        samples = [{"sample_id": f"s_{p[2:]}{i}", "prompt_id": p, "model_version": policy,
                    "idx": i, "text": f"answer {i} to {p}"} for p in prompts for i in (0, 1)]
        if r == 1:
            samples.append({"sample_id": "s_1a_greedy", "prompt_id": "p_1a", "greedy": True,
                            "idx": -1, "model_version": policy, "text": "greedy"})
        commit(f"samples{r}", "samples", r, [v[f"prompts{r}"], policy], {"samples": samples})
        judged = [{"judgment_id": f"j_{s['sample_id'][2:]}", "type": "pointwise",
                   "prompt_id": s["prompt_id"], "sample_id": s["sample_id"], "judge": "judge",
                   "method": "text", "raw": "x", "parsed": True,
                   "score": 8.0 if s["idx"] == 0 else 4.0}
                  for s in samples if s["idx"] >= 0]
        if r == 1:
            judged.append({"judgment_id": "j_unparsed", "type": "pointwise", "prompt_id": "p_1b",
                           "sample_id": "s_1b0", "k": 1, "judge": "judge", "method": "text",
                           "raw": "?", "parsed": False, "error": "no score"})
        commit(f"judgments{r}", "judgments", r, [v[f"samples{r}"]], {"judgments": judged})
        commit(f"pairs{r}", "pairs", r, [v[f"judgments{r}"], v[f"samples{r}"]], {"pairs": [
            {"pair_id": f"pr_{p[2:]}", "prompt_id": p, "chosen_id": f"s_{p[2:]}0",
             "rejected_id": f"s_{p[2:]}1", "chosen_text": f"answer 0 to {p}",
             "rejected_text": f"answer 1 to {p}", "margin": 4.0, "rule": "llm",
             "judgment_ids": [f"j_{p[2:]}0", f"j_{p[2:]}1"]} for p in prompts]})
        commit(f"model{r}", "model", r, [v[f"pairs{r}"], policy], {"models": [
            {"path": str(models / f"round{r}"), "content_hash": f"hash-{r}",
             "base_version": policy, "method": "dpo", "train_pairs": len(prompts),
             "metrics": json.dumps({"train_loss": loss})}]})
        commit(f"eval{r}", "eval", r, [v[f"model{r}"], baseline], {
            "evals": [{"model_version": v[f"model{r}"], "baseline_version": policy,
                       "n_prompts": 2, "win_rate": win, "ci_low": win - 0.2,
                       "ci_high": win + 0.2, "pass_rate": passed}],
            "eval_items": [{"prompt_id": p, "model_version": v[f"model{r}"],
                            "text": f"round {r} answer", "finish_reason": "stop",
                            "checks": "[]", "pass_fraction": passed}
                           for p in ("p_s1", "p_s2")]})
        promoted = r == 1
        commit(f"gate{r}", "gate", r, [v[f"eval{r}"]] + ([gate] if gate else []), {"gates": [
            {"model_version": v[f"model{r}"], "eval_version": v[f"eval{r}"],
             "promoted": promoted, "reason": f"win rate {win:.0%} vs 50%",
             "statistic": "point", "value": win, "threshold": 0.5,
             "policy_version": v[f"model{r}"] if promoted else policy,
             "policy_eval": v[f"eval{r}"] if promoted else baseline}]})
        gate = v[f"gate{r}"]
        if promoted:
            policy, baseline = v[f"model{r}"], v[f"eval{r}"]
        cat.event("run-a", "round", round=r, stage="gate", version_id=gate)
    cat.event("run-a", "stage", round=3, stage="samples")
    cat.event("run-a", "fail", detail={"error": "boom"})
    cat.record_run("run-b", {}, "flywheel iterate --rounds 1 --continue")
    cat.event("run-b", "start")
    cat.event("run-b", "finish")
    return v


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two-rounds")
    v = build_two_rounds(tmp / "flywheel.duckdb", tmp / "models")
    return Catalog(tmp / "flywheel.duckdb"), v


@pytest.fixture(params=["catalog", "connection"])
def src(request, built):
    """The catalog, or an open read connection to it: every query takes either."""
    cat, _ = built
    if request.param == "catalog":
        yield cat
    else:
        with cat.read() as con:
            yield con


@pytest.fixture
def v(built):
    return built[1]


# -- versions -------------------------------------------------------------------------------------
def test_versions_by_kind_and_round(src, v):
    every = queries.versions(src)
    assert len(every) == 19
    assert list(every.columns) == ["version_id", "kind", "round", "parents", "row_count",
                                   "created_at", "params"]
    assert list(every["round"]) == sorted(every["round"])
    gates = queries.versions(src, kind="gate")
    assert list(gates.version_id) == [v["gate1"], v["gate2"]]
    assert list(queries.versions(src, kind="prompts", round=0).version_id) == [
        v["seeds"], v["ingest1"], v["ingest2"]]
    assert list(queries.versions(src, round=2).kind) == [
        "prompts", "samples", "judgments", "pairs", "model", "eval", "gate"]
    assert queries.versions(src, kind="model", round=5).empty


def test_kinds_held_in_the_given_order(src):
    held = queries.kinds_held(src, KINDS)
    assert [(k, lo, hi) for k, lo, hi in zip(held.kind, held.lo, held.hi)] == [
        ("prompts", 0, 2), ("samples", 1, 2), ("judgments", 1, 2), ("pairs", 1, 2),
        ("model", 0, 2), ("eval", 0, 2), ("gate", 1, 2)]
    assert list(queries.kinds_held(src, ["gate", "eval"]).kind)[:2] == ["gate", "eval"]


def test_one_version(src, v):
    assert queries.kind_and_round(src, v["eval1"]) == ("eval", 1)
    assert queries.kind_and_round(src, "eval-r9-none") is None
    assert queries.version_ids(src) == sorted(v.values())
    head = queries.version_header(src, v["pairs1"])
    assert list(head.columns) == ["version_id", "kind", "round", "run_id", "parents",
                                  "row_count", "params", "fingerprint", "created_at"]
    assert (head.kind[0], head.row_count[0], list(head.parents[0])) == (
        "pairs", 2, [v["judgments1"], v["samples1"]])
    assert "fingerprint" not in queries.version_header(src, v["pairs1"], brief=True)
    assert queries.version_header(src, "nope").empty


def test_version_rows_and_eval_items(src, v):
    samples = queries.version_rows(src, "samples", v["samples1"])
    assert sorted(samples.sample_id) == ["s_1a0", "s_1a1", "s_1a_greedy", "s_1b0", "s_1b1"]
    assert len(queries.version_rows(src, "samples", v["samples1"], limit=2)) == 2
    assert queries.version_rows(src, "samples", v["samples1"], limit=0).empty
    assert list(queries.version_rows(src, "model", v["model1"]).content_hash) == ["hash-1"]
    items = queries.eval_items(src, v["eval0"])
    assert sorted(items.prompt_id) == ["p_s1", "p_s2"]
    assert len(queries.eval_items(src, v["eval0"], limit=1)) == 1


def test_version_tree(src, v):
    tree = queries.version_tree(src, v["pairs1"])
    up = tree[tree.direction == "ancestor"]
    assert dict(zip(up.version_id, up.depth)) == {
        v["judgments1"]: 1, v["samples1"]: 1, v["prompts1"]: 2, v["base"]: 2, v["seeds"]: 3}
    down = tree[tree.direction == "descendant"]
    depth = dict(zip(down.version_id, down.depth))
    assert depth[v["model1"]] == 1 and depth[v["eval1"]] == 2 and depth[v["gate2"]] == 4
    assert v["pairs2"] in depth and v["prompts2"] not in depth


# -- the lineage of a row -------------------------------------------------------------------------
def test_row_lookups(src, v):
    assert list(queries.pairs_by_id(src, "pr_1a").chosen_id) == ["s_1a0"]
    assert queries.pairs_by_id(src, "pr_none").empty
    assert list(queries.judgments_by_id(src, "j_1b1").score) == [4.0]
    assert list(queries.pairs_with_judgment(src, "j_1b1").pair_id) == ["pr_1b"]
    assert queries.prompts_of_sample(src, "s_2a1") == ["p_2a"]
    assert queries.prompts_of_sample(src, "s_none") == []
    assert list(queries.pairs_of_sample(src, "s_2a1").pair_id) == ["pr_2a"]
    assert queries.has_prompt(src, "p_i2") and not queries.has_prompt(src, "p_none")
    assert queries.samples_of_prompt(src, "p_1a") == ["s_1a0", "s_1a1", "s_1a_greedy"]
    assert list(queries.pairs_of_prompt(src, "p_1b").pair_id) == ["pr_1b"]
    prompts = queries.prompts_by_id(src, ["p_s2", "p_1a", "p_none"])
    assert list(prompts.prompt_id) == ["p_1a", "p_s2"]
    assert list(prompts.columns) == [c.strip() for c in queries.PROMPT_COLS.split(",")]
    assert queries.prompts_by_id(src, []).empty
    samples = queries.samples_by_id(src, ["s_1b1", "s_1a_greedy", "s_1a0"])
    assert list(samples.sample_id) == ["s_1a_greedy", "s_1a0", "s_1b1"]  # prompt, idx


def test_example_prompts_level_by_level_and_all_the_way(src):
    prompt = queries.prompts_by_id(src, ["p_2a"])
    one, more = queries.example_prompts(src, prompt, 1)
    assert (list(one.prompt_id), list(one.used_by), list(one.depth), more) == (
        ["p_1a"], ["p_2a"], [1], True)
    two, more = queries.example_prompts(src, prompt, 2)
    assert list(zip(two.depth, two.prompt_id, two.used_by)) == [
        (1, "p_1a", "p_2a"), (2, "p_s1", "p_1a"), (2, "p_s2", "p_1a")]
    assert more is False
    every, more = queries.example_prompts(src, prompt, None)
    assert list(zip(every.depth, every.prompt_id)) == list(zip(two.depth, two.prompt_id))
    assert more is False
    none, more = queries.example_prompts(src, prompt, 0)
    assert none.empty and more is True
    assert list(none.columns) == ["depth", "used_by", "prompt_id", "version_id", "source",
                                  "text", "examples"]


def test_judgments_of_samples_and_named_ones(src):
    df = queries.judgments_of_samples(src, ["p_1a"], ["s_1a0", "s_1a1"], [])
    assert list(df.judgment_id) == ["j_1a0", "j_1a1"]
    # a named judgment of another prompt is looked up as well
    df = queries.judgments_of_samples(src, ["p_1a"], ["s_1a0"], ["j_unparsed"])
    assert sorted(df.judgment_id) == ["j_1a0", "j_unparsed"]
    assert queries.judgments_of_samples(src, [], [], []).empty


def test_models_trained_on(src, v):
    df = queries.models_trained_on(src, [v["pairs1"], v["pairs2"]])
    assert list(df.model_version) == [v["model1"], v["model2"]]
    assert [list(t) for t in df.trained_on] == [[v["pairs1"]], [v["pairs2"]]]
    assert list(df.base_version) == [v["base"], v["model1"]]
    assert queries.models_trained_on(src, []).empty


# -- status and the round summary ----------------------------------------------------------
def test_runs_newest_first_with_their_last_event(src):
    runs = queries.runs(src)
    assert list(runs.run_id) == ["run-b", "run-a"]
    b, a = runs.to_dict("records")
    assert (b["last_event"], b["versions_made"], b["command"]) == (
        "finish", 0, "flywheel iterate --rounds 1 --continue")
    assert (a["last_event"], a["stage_round"], a["stage"], a["last_round"],
            a["versions_made"]) == ("fail", 3, "samples", 2, 19)
    assert json.loads(a["detail"]) == {"error": "boom"}
    failure = queries.last_failure(src).to_dict("records")
    assert [(f["run_id"], f["event"], f["round"], f["stage"], f["error"])
            for f in failure] == [("run-a", "fail", 3, "samples", "boom")]
    assert queries.run_count(src) == 2


def test_gates_models_and_checkpoints(src, v, built):
    rounds = queries.gate_rounds(src, [v["eval1"], v["eval2"]])
    assert list(rounds["round"]) == [1, 2]
    assert list(rounds.promoted) == [True, False]
    assert list(rounds.next_policy) == [v["model1"], v["model1"]]
    assert list(rounds.gate_version) == [v["gate1"], v["gate2"]]
    assert list(queries.gate_rounds(src, [v["eval2"]]).eval_version) == [v["eval2"]]
    assert queries.gate_rounds(src, []).empty
    assert queries.base_model(src) == v["base"]
    models = built[0].path.parent / "models"
    assert queries.model_path(src, v["model1"]) == str(models / "round1")
    assert queries.model_path(src, "model-r9-none") is None
    assert queries.model_count(src) == 3
    ck = queries.model_checkpoints(src)
    assert list(zip(ck.version_id, ck["round"], ck.content_hash)) == [
        (v["base"], 0, "hash-base"), (v["model1"], 1, "hash-1"), (v["model2"], 2, "hash-2")]


def test_lineage_of_evals_through_the_gates(src, v):
    assert queries.latest_eval(src) == v["eval2"]
    assert queries.gated_evals(src, v["eval2"]) == [v["eval1"], v["eval2"]]
    assert queries.gated_evals(src, v["eval1"]) == [v["eval1"]]
    assert queries.gated_evals(src, v["eval0"]) == []  # round 0 has no gate


def test_round_summary_and_gate_decisions(src, v):
    df = queries.round_summary(src, [v["eval2"], v["eval1"]])
    got = df[["round", "prompts_added", "samples", "mean_judge_score", "parse_failures",
              "judge_outputs", "pairs", "train_loss", "win_rate", "pass_rate",
              "base_pass_rate"]].to_dict("records")
    assert got == [
        {"round": 1, "prompts_added": 2, "samples": 4, "mean_judge_score": 6.0,
         "parse_failures": 1, "judge_outputs": 5, "pairs": 2, "train_loss": 0.5,
         "win_rate": 0.75, "pass_rate": 0.6, "base_pass_rate": 0.5},
        {"round": 2, "prompts_added": 1, "samples": 2, "mean_judge_score": 6.0,
         "parse_failures": 0, "judge_outputs": 2, "pairs": 1, "train_loss": 0.25,
         "win_rate": 0.25, "pass_rate": 0.4, "base_pass_rate": 0.5}]
    assert list(df.pass_rate_delta.round(6)) == [0.1, -0.1]
    assert queries.round_summary(src, []).empty
    gates = queries.gate_decisions(src, [v["eval1"], v["eval2"]]).sort_values("eval_version")
    assert list(zip(gates.eval_version, gates.promoted, gates.reason)) == [
        (v["eval1"], True, "win rate 75% vs 50%"), (v["eval2"], False, "win rate 25% vs 50%")]


def test_summary_and_status_read_through_the_queries(built, v):
    from flywheel import report
    from flywheel.cli_status import status

    cat, _ = built
    rows = report.summary_rows(cat)
    assert [(r["round"], r["gate"], r["ci"]) for r in rows] == [
        (1, "promoted", "55%–95%"), (2, "rejected", "5%–45%")]
    assert [r["round"] for r in report.summary_rows(cat, last_eval=v["eval1"])] == [1]
    sections = status(str(cat.path))
    ws = sections["workspace"].to_dict("records")[0]
    assert (ws["current_policy"], ws["rounds"], ws["promoted"], ws["rejected"], ws["runs"]) \
        == (v["model1"], 2, 1, 1, 2)
    assert ws["policy_path"].endswith("round1")
    assert ws["checkpoints"].startswith(f"MISSING 1 of 3: {v['model2']}")
    assert list(sections["runs"].state) == ["finished", "failed"]
    assert list(sections["rounds"].decision) == ["promoted", "rejected"]
    assert list(sections["last failure"].error) == ["boom"]


# -- check, export, ingest, the pipeline ---------------------------------------------------
def test_table_scans_of_check(built, v):
    cat, _ = built
    assert {"versions", "runs", "run_events", "prompts", "samples", "judgments", "pairs",
            "models", "evals", "eval_items", "gates"} <= queries.table_names(cat)
    assert "round_summary" not in queries.table_names(cat)  # a view
    with cat.read() as con:
        assert queries.scan_table(con, "samples") == 5 + 2
        assert queries.scan_table(con, "run_events") == 7 + 2
        assert queries.rows_per_version(con, "pairs") == sorted(
            [(v["pairs1"], 2), (v["pairs2"], 1)])
        facts = {vid: (kind, n, list(parents))
                 for vid, kind, n, parents in queries.version_facts(con)}
    assert len(facts) == 19
    assert facts[v["model2"]] == ("model", 1, [v["pairs2"], v["model1"]])


def test_prompt_texts_and_catalog_prompts(src, v):
    df = queries.prompt_texts(src, ["p_s1", "p_1a", "p_none"])
    assert sorted(zip(df.prompt_id, df.text)) == [("p_1a", "text of p_1a"),
                                                  ("p_s1", "seed 1")]
    df = queries.prompt_texts(src, ["p_s1", "p_1a"], [v["seeds"]])
    assert list(df.prompt_id) == ["p_s1"]
    every = queries.catalog_prompts(src)
    assert list(every.columns) == ["prompt_id", "text", "constraints"]
    assert sorted(every.prompt_id) == ["p_1a", "p_1b", "p_2a", "p_i1", "p_i2", "p_s1", "p_s2"]


def test_pipeline_queries(src, v):
    assert queries.ingested_prompt_versions(src) == [v["ingest1"], v["ingest2"]]
    old = queries.earlier_eval_answers(src, v["eval0"], "hash-base")
    assert sorted(old.prompt_id) == ["p_s1", "p_s2"]
    assert list(old.columns) == ["version_id", *columns("eval_items")]  # i.*
    assert queries.earlier_eval_answers(src, v["eval0"], "hash-1").empty
    assert queries.earlier_eval_answers(src, v["eval1"], "hash-1").shape[0] == 2


def test_in_list():
    assert queries.in_list("prompt_id", []) == ("false", [])
    assert queries.in_list("p.prompt_id", iter(["a", "b"])) == ("p.prompt_id IN (?, ?)",
                                                                 ["a", "b"])


# -- the default catalog: <workspace>/flywheel.duckdb of the workspace `data` --------------
READ_COMMANDS = {"sql": ["SELECT count(*) AS n FROM versions"], "versions": [], "summary": [],
                 "status": [], "show": ["V"], "lineage": ["V"], "diff": ["V", "V"],
                 "export": ["V"], "check": []}


@pytest.mark.parametrize("command", sorted(READ_COMMANDS))
def test_every_read_command_names_its_default_catalog(command, capsys):
    from flywheel.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--catalog PATH the catalog file (default <workspace>/flywheel.duckdb of the " \
           "default workspace: data/flywheel.duckdb)" in text


def test_ingest_names_its_default_catalog(capsys):
    from flywheel.cli import main

    with pytest.raises(SystemExit):
        main(["ingest", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--catalog PATH the catalog file (default <workspace>/flywheel.duckdb: the " \
           "config's catalog, data/flywheel.duckdb unless the config sets workspace or " \
           "catalog)" in text


def test_read_commands_find_the_default_workspace_catalog(built, v, tmp_path, monkeypatch,
                                                          capsys):
    """Without --catalog each command reads data/flywheel.duckdb of the current folder."""
    import shutil

    from flywheel.cli import main

    (tmp_path / "data").mkdir()
    shutil.copy(built[0].path, tmp_path / "data" / "flywheel.duckdb")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["versions", "--kind", "gate", "--json"]) == 0
    assert [r["version_id"] for r in json.loads(capsys.readouterr().out)] == [
        v["gate1"], v["gate2"]]
    assert main(["sql", "SELECT count(*) AS n FROM versions", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"n": 19}]
    assert main(["summary", "--json"]) == 0
    assert [r["round"] for r in json.loads(capsys.readouterr().out)] == [1, 2]
    assert main(["status", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["workspace"][0]["catalog"] == str(Path("data") / "flywheel.duckdb")
    assert main(["show", v["pairs2"], "--json"]) == 0
    assert [r["pair_id"] for r in json.loads(capsys.readouterr().out)["rows"]] == ["pr_2a"]
    assert main(["lineage", "pr_2a", "--json"]) == 0
    assert [r["model_version"] for r in json.loads(capsys.readouterr().out)["models"]] == [
        v["model2"]]
    assert main(["diff", v["pairs1"], v["pairs2"], "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"][0]
    assert (summary["added"], summary["removed"]) == (1, 2)
    assert main(["export", v["pairs2"], "-f", "jsonl", "-o", "p.jsonl"]) == 0
    assert [json.loads(x)["pair_id"] for x in (tmp_path / "p.jsonl").read_text().splitlines()] \
        == ["pr_2a"]
    assert "wrote 1 rows" in capsys.readouterr().out
    assert main(["check", "--no-hashes", "--json"]) == 1  # model-2's checkpoint is missing
    out = capsys.readouterr()
    assert [p["what"] for p in json.loads(out.out)] == ["checkpoint"]
    assert f"{Path('data') / 'flywheel.duckdb'}: 1 problem(s)" in out.err


def test_without_a_catalog_the_default_path_is_named(tmp_path, monkeypatch, capsys):
    from flywheel.cli import main

    monkeypatch.chdir(tmp_path)
    for args in (["versions"], ["summary"], ["status"], ["sql", "SELECT 1"],
                 ["show", "x"], ["export", "x"]):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert f"error: no catalog at {Path('data') / 'flywheel.duckdb'}" in err, (args, err)
    assert not (tmp_path / "data").exists()
