"""`flywheel sql` reaches the catalog and nothing else: every read-only connection
(Catalog.read, so `sql`, `versions`, `summary`, `status` and the inspect commands) runs with
file system, network and extension access off and its configuration locked. Tested on the
connection itself (as if the statement filter of `flywheel sql` were bypassed) and through
the real CLI: exit 2, a message naming the path or statement and what to do, the catalog's
bytes unchanged and no file created."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from flywheel.catalog import Catalog
from tests.conftest import ROOT, catalog_state, run_cli, two_rounds_of_prompts

SECRET = "top-secret-line"


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A workspace: a catalog with two prompts versions, and files next to it that no query
    may read (a CSV, a JSON file, a Parquet file, a text file)."""
    ws = tmp_path_factory.mktemp("sandbox-ws")
    two_rounds_of_prompts(ws / "flywheel.duckdb")
    (ws / "secret.csv").write_text(f"a,b\n{SECRET},2\n")
    (ws / "secret.json").write_text(json.dumps({"a": SECRET}) + "\n")
    (ws / "secret.txt").write_text(SECRET + "\n")
    pd.DataFrame({"a": [SECRET]}).to_parquet(ws / "secret.parquet")
    return ws


def _files(ws: Path) -> list[str]:
    return sorted(str(p.relative_to(ws)) for p in ws.rglob("*"))


# -- the connection ---------------------------------------------------------------------
def test_every_read_connection_has_the_sandbox_settings(ws):
    with Catalog(ws / "flywheel.duckdb").read() as con:
        got = {k: con.execute(f"SELECT current_setting('{k}')").fetchone()[0]
               for k in Catalog.READ_CONFIG}
        allowed = con.execute("SELECT current_setting('allowed_directories')").fetchone()[0]
    assert got == {"enable_external_access": False, "autoinstall_known_extensions": False,
                   "autoload_known_extensions": False, "allow_community_extensions": False,
                   "allow_persistent_secrets": False, "temp_directory": "",
                   "lock_configuration": True}
    assert allowed == []  # no folder is reachable, not even a temporary one


#: Statements that must fail on the read-only connection itself, and a word of DuckDB's error.
CONNECTION_ATTACKS = [
    ("SELECT * FROM read_text('/etc/passwd')", "disabled by configuration"),
    ("SELECT * FROM read_text('{ws}/secret.txt')", "disabled by configuration"),
    ("SELECT * FROM read_blob('{ws}/secret.txt')", "disabled by configuration"),
    ("SELECT * FROM read_csv('{ws}/secret.csv')", "disabled by configuration"),
    ("SELECT * FROM read_csv_auto('{ws}/secret.csv')", "disabled by configuration"),
    ("SELECT * FROM '{ws}/secret.csv'", "disabled by configuration"),
    ("SELECT * FROM read_json('{ws}/secret.json')", "disabled by configuration"),
    ("SELECT * FROM read_ndjson('{ws}/secret.json')", "disabled by configuration"),
    ("SELECT * FROM read_parquet('{ws}/secret.parquet')", "disabled by configuration"),
    ("SELECT * FROM parquet_metadata('{ws}/secret.parquet')", "disabled by configuration"),
    ("SELECT * FROM parquet_schema('{ws}/secret.parquet')", "disabled by configuration"),
    ("SELECT * FROM sniff_csv('{ws}/secret.csv')", "disabled by configuration"),
    ("SELECT * FROM glob('{ws}/*')", "disabled by configuration"),
    ("SELECT * FROM glob('/root/*')", "disabled by configuration"),
    ("SELECT * FROM query_table('{ws}/secret.csv')", "disabled by configuration"),
    ("SELECT * FROM query('SELECT * FROM read_text(''{ws}/secret.txt'')')",
     "disabled by configuration"),
    ("SELECT * FROM read_parquet('https://example.com/x.parquet')", "disabled by configuration"),
    ("SELECT * FROM read_text('file://{ws}/secret.txt')", "disabled by configuration"),
    ("SELECT * FROM read_csv('s3://bucket/x.csv')", "disabled by configuration"),
    ("COPY (SELECT 1) TO '{ws}/out.csv'", "disabled by configuration"),
    ("COPY versions TO '{ws}/flywheel.duckdb.tmp/out.csv'", "disabled by configuration"),
    ("COPY (SELECT 1) TO '{ws}/flywheel.duckdb.wal'", "LocalFileSystem has been disabled"),
    ("EXPORT DATABASE '{ws}/exported'", "disabled by configuration"),
    ("ATTACH '{ws}/other.duckdb' AS other", "disabled by configuration"),
    ("INSTALL httpfs", "disabled by configuration"),
    ("LOAD httpfs", "disabled through configuration"),
    ("LOAD '{ws}/x.duckdb_extension'", "disabled through configuration"),
    ("SET enable_external_access = true", "configuration has been locked"),
    ("RESET enable_external_access", "configuration has been locked"),
    ("SET lock_configuration = false", "configuration has been locked"),
    ("SET autoinstall_known_extensions = true", "configuration has been locked"),
    ("SET allow_persistent_secrets = true", "configuration has been locked"),
    ("SET temp_directory = '{ws}/tmp'", "configuration has been locked"),
    ("SET profiling_output = '{ws}/profile.json'", "configuration has been locked"),
    ("PRAGMA enable_profiling", "configuration has been locked"),
    ("SELECT getenv('HOME')", "does not exist"),
    ("CREATE PERSISTENT SECRET s (TYPE http)", "ersistent secrets are disabled"),
    ("SELECT * FROM df", "does not exist"),  # a pandas frame in the caller: not reachable
]


@pytest.mark.parametrize("query, error", CONNECTION_ATTACKS)
def test_the_connection_itself_refuses_what_lies_outside_the_catalog(ws, query, error):
    (ws / "flywheel.duckdb.tmp").mkdir(exist_ok=True)  # the folder DuckDB would spill into
    db = ws / "flywheel.duckdb"
    before, files = catalog_state(db), _files(ws)
    df = pd.DataFrame({"a": [SECRET]})  # noqa: F841 (what `FROM df` would find)
    with Catalog(db).read() as con:
        with pytest.raises(duckdb.Error) as err:
            con.execute(query.format(ws=ws)).fetchall()
        assert con.execute("SELECT current_setting('enable_external_access')").fetchone() \
            == (False,)
    assert error in str(err.value)
    assert SECRET not in str(err.value)
    assert catalog_state(db) == before
    assert _files(ws) == files


def test_the_pipelines_own_reads_work_with_the_sandbox(ws):
    cat = Catalog(ws / "flywheel.duckdb")
    versions = cat.df("SELECT version_id, kind, round FROM versions ORDER BY round")
    assert list(versions["round"]) == [0, 1]
    v0, v1 = versions.version_id
    assert sorted(cat.rows("prompts", [v0, v1]).text) == ["again", "hello", "hello", "world"]
    assert cat.find("0" * 20).version_id == v0 and cat.find("9" * 20) is None
    assert cat.get(v1).round == 1
    with cat.read() as con:  # every view reads (json, list and window functions included)
        views = [r[0] for r in con.execute(
            "SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()]
        for view in views:
            con.execute(f"SELECT * FROM {view}").fetchall()
        # cursors of one connection (flywheel lineage runs its lookups on them) keep it
        cur = con.cursor()
        assert cur.execute("SELECT count(*) FROM prompts").fetchone() == (4,)
        cur.close()
    assert {"round_summary", "judge_stats", "pair_lineage", "latest_versions"} <= set(views)


def test_every_read_command_opens_the_catalog_only_through_the_sandbox(ws, monkeypatch, capsys):
    """sql, versions, summary, show, lineage, diff and status: every DuckDB connection they
    open is the read-only one with READ_CONFIG."""
    from flywheel import catalog, cli

    db = ws / "flywheel.duckdb"
    calls = []
    real = duckdb.connect

    def connect(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(catalog.duckdb, "connect", connect)
    v0, v1 = Catalog(db).df("SELECT version_id FROM versions ORDER BY round").version_id
    calls.clear()
    for argv in (["sql", "SELECT count(*) FROM versions"], ["versions"], ["summary", "--json"],
                 ["show", v0], ["lineage", "p_hello"], ["lineage", v1], ["diff", v0, v1],
                 ["status"]):
        n = len(calls)
        assert cli.main([*argv, "--catalog", str(db)]) == 0, capsys.readouterr().err
        assert len(calls) > n, argv
    capsys.readouterr()
    # READ_CONFIG without its lock, which `read_connection` sets after turning the local file
    # system off
    opened = {k: v for k, v in Catalog.READ_CONFIG.items() if k != "lock_configuration"}
    assert all(args == (str(db),) and kwargs == {"read_only": True, "config": opened}
               for args, kwargs in calls), calls


def test_the_connection_stops_a_write_even_when_the_statement_filter_is_bypassed(
        ws, monkeypatch, capsys):
    """With `_refuse_writes` disabled, `flywheel sql` still writes no file and reads none."""
    from flywheel import cli

    monkeypatch.setattr(cli, "_refuse_writes", lambda query, source="": None)
    db = ws / "flywheel.duckdb"
    before, files = catalog_state(db), _files(ws)
    for query, path in ((f"COPY versions TO '{ws}/bypass.csv'", f"{ws}/bypass.csv"),
                        (f"SELECT * FROM read_text('{ws}/secret.txt')", f"{ws}/secret.txt"),
                        ("INSTALL httpfs", "an extension")):
        assert cli.main(["sql", query, "--catalog", str(db)]) == 2
        err = capsys.readouterr().err
        assert "reads the catalog and nothing else" in err and path in err, err
        assert SECRET not in err
    for query in ("SET enable_external_access = true", "DELETE FROM versions"):
        assert cli.main(["sql", query, "--catalog", str(db)]) == 2
        assert "query failed" in capsys.readouterr().err
    assert catalog_state(db) == before
    assert _files(ws) == files


# -- through the CLI ----------------------------------------------------------------------
#: Reads of something outside the catalog: (query, the path the message must name).
OUTSIDE = [
    ("SELECT * FROM read_text('/etc/passwd')", "/etc/passwd"),
    ("SELECT * FROM read_blob('{ws}/secret.txt')", "{ws}/secret.txt"),
    ("SELECT * FROM read_csv('{ws}/secret.csv')", "{ws}/secret.csv"),
    ("SELECT * FROM '{ws}/secret.csv'", "{ws}/secret.csv"),
    ("SELECT * FROM read_json_auto('{ws}/secret.json')", "{ws}/secret.json"),
    ("SELECT * FROM read_parquet('{ws}/secret.parquet')", "{ws}/secret.parquet"),
    ("SELECT * FROM parquet_metadata('{ws}/secret.parquet')", "{ws}/secret.parquet"),
    ("SELECT * FROM sniff_csv('{ws}/secret.csv')", "{ws}/secret.csv"),
    ("SELECT count(*) FROM glob('/root/*')", "/root/*"),
    ("SELECT * FROM query_table('{ws}/secret.csv')", "{ws}/secret.csv"),
    ("SELECT * FROM read_parquet('https://example.com/data.parquet')",
     "https://example.com/data.parquet"),
    ("WITH t AS (SELECT * FROM read_text('{ws}/secret.txt')) SELECT * FROM t",
     "{ws}/secret.txt"),
]


@pytest.mark.badinput
@pytest.mark.parametrize("query, path", OUTSIDE)
def test_sql_cannot_read_files_or_urls(ws, query, path):
    db = ws / "flywheel.duckdb"
    before, files = catalog_state(db), _files(ws)
    proc = run_cli("sql", query.format(ws=ws), "--catalog", str(db), timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{path.format(ws=ws)} is outside it" in proc.stderr
    assert "SHOW TABLES" in proc.stderr and "flywheel ingest" in proc.stderr  # the fix
    assert SECRET not in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert catalog_state(db) == before
    assert _files(ws) == files


#: Statements the filter refuses, naming what each is: writes hidden in EXPLAIN options,
#: behind a comment or in a PIVOT (parsed as one MULTI statement), a statement type the
#: Python client has no name for (UPDATE EXTENSIONS), and the statements that would install,
#: load or reconfigure anything.
REFUSED = [
    ("EXPLAIN (ANALYZE) COPY (SELECT 1) TO '{ws}/explained.csv'", "EXPLAIN COPY"),
    ("EXPLAIN (FORMAT json) DELETE FROM versions", "EXPLAIN DELETE"),
    ("/* note */ EXPLAIN ANALYZE DELETE FROM versions", "EXPLAIN DELETE"),
    ("UPDATE EXTENSIONS", "UPDATE EXTENSIONS"),
    ("SELECT 1; UPDATE EXTENSIONS (httpfs)", "UPDATE EXTENSIONS"),
    ("CREATE TABLE wide AS PIVOT versions ON kind", "CREATE"),
    ("COPY (PIVOT versions ON kind) TO '{ws}/pivot.csv'", "COPY"),
    ("WITH p AS (PIVOT versions ON kind) INSERT INTO runs SELECT 'r', now(), '{{}}', 'x'",
     "INSERT"),
    ("PIVOT versions ON kind; DROP TABLE versions", "DROP"),
    ("INSTALL httpfs", "INSTALL (LOAD)"),
    ("LOAD httpfs", "LOAD"),
    ("SET enable_external_access = true", "SET"),
    ("RESET enable_external_access", "RESET (SET)"),
    ("PRAGMA enable_profiling", "PRAGMA"),
    ("EXPORT DATABASE '{ws}/exported'", "EXPORT"),
    ("CREATE SECRET s (TYPE http)", "CREATE"),
]


@pytest.mark.badinput
@pytest.mark.parametrize("query, kind", REFUSED)
def test_sql_refuses_writes_hidden_in_explain_pivot_and_unknown_types(ws, query, kind):
    db = ws / "flywheel.duckdb"
    before, files = catalog_state(db), _files(ws)
    proc = run_cli("sql", query.format(ws=ws), "--catalog", str(db), timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"read-only: {kind} is not allowed" in proc.stderr, proc.stderr
    assert "use SELECT" in proc.stderr and "nothing was run" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert catalog_state(db) == before
    assert _files(ws) == files


@pytest.mark.badinput
@pytest.mark.parametrize("query", [";", " ; ;\n", "-- only a comment", "/* nothing */", "",
                                   "   "])
def test_sql_with_no_statement_says_so(ws, query):
    db = ws / "flywheel.duckdb"
    before = catalog_state(db)
    proc = run_cli("sql", query, "--catalog", str(db), timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "empty query: the query holds no SQL statement" in proc.stderr
    assert 'flywheel sql "SELECT * FROM round_summary"' in proc.stderr  # the fix
    assert "NoneType" not in proc.stderr
    assert catalog_state(db) == before


@pytest.mark.badinput
def test_sql_with_no_statement_on_stdin_says_so(ws):
    db = ws / "flywheel.duckdb"
    before = catalog_state(db)
    proc = subprocess.run([sys.executable, "-m", "flywheel.cli", "sql", "-", "--catalog",
                           str(db)], input="-- nothing here\n;\n", capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "empty query: stdin holds no SQL statement" in proc.stderr
    assert "SELECT * FROM round_summary" in proc.stderr
    assert catalog_state(db) == before


@pytest.mark.badinput
@pytest.mark.parametrize("args, message, fix", [
    (["SELECT * FROM versions WHERE round = $r"], "not provided", "-p NAME VALUE"),
    (["SELECT 1 AS a", "-p", "k", "v"], "mismatch", "no -p the query does not use"),
    (["SELECT $k AS a", "-p", "$k", "v"], "$k", "NAME without the $"),
    (["SELECT $k AS a; SELECT 2", "-p", "k", "v"], "only supported for the last statement",
     "parameters work in a query of one statement"),
    (["SELECT * FROM no_such_table"], "no_such_table", 'flywheel sql "SHOW TABLES"'),
    (["SELEC 1"], "syntax error", "fix the SQL at the position shown"),
    (["SELECT * FROM st_read('x.shp')"], "st_read needs DuckDB's spatial extension",
     "built-in functions"),
])
def test_sql_errors_say_what_to_do(ws, args, message, fix):
    db = ws / "flywheel.duckdb"
    before = catalog_state(db)
    proc = run_cli("sql", *args, "--catalog", str(db), timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and fix in proc.stderr, proc.stderr
    assert catalog_state(db) == before


@pytest.mark.parametrize("query, expected", [
    ("PIVOT versions ON kind USING count(*) GROUP BY round ORDER BY round",
     [{"round": 0, "prompts": 1}, {"round": 1, "prompts": 1}]),
    ("PIVOT (SELECT round, text FROM prompts JOIN versions USING (version_id)) ON text "
     "USING count(*) GROUP BY round ORDER BY round",
     [{"round": 0, "again": 0, "hello": 1, "world": 1},
      {"round": 1, "again": 1, "hello": 1, "world": 0}]),
    ("WITH p AS (PIVOT versions ON round USING count(*) GROUP BY kind) SELECT * FROM p",
     [{"kind": "prompts", "0": 1, "1": 1}]),
    ("SELECT kind, n FROM (UNPIVOT (SELECT kind, row_count FROM versions WHERE round = 0) "
     "ON row_count INTO NAME col VALUE n)", [{"kind": "prompts", "n": 2}]),
    ("FROM (PIVOT versions ON kind USING count(*) GROUP BY round) ORDER BY round",
     [{"round": 0, "prompts": 1}, {"round": 1, "prompts": 1}]),
    ("VALUES (1, 'a')", [{"col0": 1, "col1": "a"}]),
    ("TABLE versions", None),
    ("SELECT 1 AS a; PIVOT versions ON kind USING count(*) GROUP BY round ORDER BY round",
     [{"round": 0, "prompts": 1}, {"round": 1, "prompts": 1}]),
])
def test_sql_runs_pivot_unpivot_and_the_other_reads(ws, query, expected):
    db = ws / "flywheel.duckdb"
    before = catalog_state(db)
    proc = run_cli("sql", query, "--catalog", str(db), "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    if expected is None:
        assert len(got) == 2 and {r["kind"] for r in got} == {"prompts"}
    else:
        assert got == expected
    assert catalog_state(db) == before


@pytest.mark.parametrize("query", ["EXPLAIN PIVOT versions ON kind",
                                   "DESCRIBE (PIVOT versions ON kind)",
                                   "SUMMARIZE (PIVOT versions ON kind)"])
def test_sql_describes_and_explains_a_pivot(ws, query):
    proc = run_cli("sql", query, "--catalog", str(ws / "flywheel.duckdb"), "--json",
                   timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert rows and ("prompts" in json.dumps(rows) or "physical_plan" in json.dumps(rows))


def test_sql_help_says_what_it_guarantees():
    proc = run_cli("sql", "--help", timeout=120)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for phrase in ("reaches that file and nothing else", "File system and network access is off",
                   "extensions are neither installed nor loaded", "configuration is locked",
                   "PIVOT / UNPIVOT", "runs nothing and writes nothing"):
        assert phrase in text, phrase


def test_the_statement_filter_classifies_without_opening_anything():
    from flywheel.cli import _lead, _refuse_writes
    from flywheel.errors import FlywheelError

    assert _lead("WITH a AS (SELECT 1), b(x) AS MATERIALIZED (SELECT 2) INSERT INTO t "
                 "SELECT 1")[0] == "INSERT"
    assert _lead("WITH RECURSIVE r(n) USING KEY (n) AS (SELECT 1) SELECT * FROM r")[0] \
        == "SELECT"
    assert _lead("/* c */ ((PIVOT t ON a))")[0] == "PIVOT"
    for ok in ("PIVOT t ON a", "UNPIVOT t ON a INTO NAME n VALUE v", "SELECT * FROM (PIVOT t "
               "ON a)", "EXPLAIN ANALYZE PIVOT t ON a", "EXPLAIN (FORMAT json) SELECT 1"):
        _refuse_writes(ok)
    for bad in ("INSERT INTO t PIVOT t ON a", "EXPLAIN (ANALYZE) INSERT INTO t SELECT 1",
                "UPDATE t SET a = (SELECT 1 FROM (PIVOT t ON a))", "CALL x()"):
        with pytest.raises(FlywheelError, match="read-only"):
            _refuse_writes(bad)
