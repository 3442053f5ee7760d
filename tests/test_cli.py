"""The CLI: bad input gets a clear error and writes nothing; light commands stay light."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flywheel.catalog import Catalog
from tests.conftest import ROOT, one_version_catalog, run_cli


@pytest.fixture
def workspace(tmp_path):
    """A workspace whose catalog already holds one version (nothing may be lost)."""
    one_version_catalog(tmp_path / "flywheel.duckdb")
    return tmp_path


def _catalog_state(ws):
    cat = Catalog(ws / "flywheel.duckdb")
    return cat.df("SELECT version_id, row_count FROM versions").to_dict("records"), \
        len(cat.df("SELECT * FROM prompts"))


def _iterate(ws, *extra):
    return run_cli("iterate", "--rounds", "1", "--no-prefect", "--set", f"workspace={ws}",
                   *extra, timeout=120)


def test_malformed_seed_line_names_file_and_line(workspace, tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"prompt": "What is rain?"}\n{"prompt": "broken",\n')
    before = _catalog_state(workspace)
    proc = _iterate(workspace, "--set", f"prompts.seed_file={seeds}")
    assert proc.returncode == 2
    assert f"{seeds} line 2" in proc.stderr and "not valid JSON" in proc.stderr
    assert "nothing was written" in proc.stderr
    assert _catalog_state(workspace) == before


def test_a_seed_file_with_transfer_lines_is_refused(workspace, tmp_path):
    """The transfer split is held out from training: a seed file may not carry its lines."""
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"prompt": "What is rain?"}\n'
                     '{"prompt": "Name a fish. Reply in lowercase.", "split": "transfer"}\n')
    before = _catalog_state(workspace)
    proc = _iterate(workspace, "--set", f"prompts.seed_file={seeds}")
    assert proc.returncode == 2, proc.stderr
    assert (f"{seeds} is the seed file (prompts.seed_file), but 1 line is marked "
            '"split": "transfer"') in proc.stderr
    assert f'{seeds} line 2: "split": "transfer"' in proc.stderr
    assert "move those lines to the eval file" in proc.stderr
    assert _catalog_state(workspace) == before


def test_empty_seed_file_is_refused(workspace, tmp_path):
    seeds = tmp_path / "empty.jsonl"
    seeds.write_text("\n")
    before = _catalog_state(workspace)
    proc = _iterate(workspace, "--set", f"prompts.seed_file={seeds}")
    assert proc.returncode == 2
    assert "contains no prompts" in proc.stderr and str(seeds) in proc.stderr
    assert _catalog_state(workspace) == before


def test_missing_model_path_is_refused(workspace):
    before = _catalog_state(workspace)
    proc = _iterate(workspace, "--set", "models.policy=/nonexistent/model")
    assert proc.returncode == 2
    assert "models.policy" in proc.stderr and "/nonexistent/model" in proc.stderr
    assert "flywheel setup-model" in proc.stderr
    assert _catalog_state(workspace) == before


def test_bad_config_lists_every_problem(workspace, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("sampling:\n  temprature: 0.5\n  n: four\njudge:\n  mode: best\n")
    before = _catalog_state(workspace)
    proc = _iterate(workspace, "--config", str(cfg))
    assert proc.returncode == 2
    err = proc.stderr
    assert "sampling.temprature: unknown key" in err and "did you mean 'sampling.temperature'" \
        in err
    assert "sampling.n: expected int, got str 'four'" in err
    assert "judge.mode" in err and "pointwise, pairwise, hybrid" in err
    assert "3 problems" in err
    assert _catalog_state(workspace) == before


def test_no_catalog_is_created_on_bad_input(tmp_path):
    proc = _iterate(tmp_path, "--set", "models.policy=/nope")
    assert proc.returncode == 2
    assert not (tmp_path / "flywheel.duckdb").exists()


def test_help_and_sql_do_not_import_heavy_libraries(workspace):
    code = (
        "import sys, contextlib, io\n"
        "from flywheel.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: main(['--help'])\n"
        "    except SystemExit: pass\n"
        f"    main(['sql', 'SELECT count(*) AS n FROM versions', '--catalog', "
        f"r'{workspace / 'flywheel.duckdb'}'])\n"
        "heavy = [m for m in ('torch', 'transformers', 'prefect', 'trl', 'peft', 'matplotlib') "
        "if m in sys.modules]\n"
        "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"


def test_sql_reads_with_named_params_and_refuses_writes(workspace):
    db = str(workspace / "flywheel.duckdb")
    proc = run_cli("sql", "SELECT kind, row_count FROM versions WHERE kind = $k", "-p", "k",
                   "prompts", "--catalog", db, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [{"kind": "prompts", "row_count": 1}]
    proc = run_cli("sql", "DELETE FROM versions", "--catalog", db)
    assert proc.returncode == 2 and "read-only" in proc.stderr
    assert _catalog_state(workspace)[0][0]["row_count"] == 1


def test_every_subcommand_has_help_with_an_example():
    for cmd in ("iterate", "setup-model", "sql", "versions", "summary", "config"):
        proc = run_cli(cmd, "--help")
        assert proc.returncode == 0
        assert "example" in proc.stdout, cmd


@pytest.mark.parametrize("query, kind", [
    ("DELETE FROM versions", "DELETE"),
    ("UPDATE versions SET row_count = 0", "UPDATE"),
    ("INSERT INTO runs SELECT * FROM runs", "INSERT"),
    ("DROP TABLE versions", "DROP"),
    ("CREATE TABLE t AS SELECT 1 AS a", "CREATE"),
    ("ATTACH '{tmp}/other.duckdb' AS other", "ATTACH"),
    ("COPY versions TO '{tmp}/x.csv'", "COPY"),
    ("COPY (SELECT 1) TO '{tmp}/x.csv'", "COPY"),
    ("WITH t AS (SELECT * FROM versions) INSERT INTO versions SELECT * FROM t", "INSERT"),
    ("SELECT 1; DROP TABLE versions", "DROP"),
    ("CHECKPOINT", "CHECKPOINT"),
    ("SET threads = 1", "SET"),
    ("EXPLAIN ANALYZE DELETE FROM versions", "DELETE"),
])
def test_sql_refuses_every_write(workspace, query, kind):
    db = workspace / "flywheel.duckdb"
    before = _catalog_state(workspace)
    files_before = sorted(p.name for p in workspace.iterdir())
    proc = run_cli("sql", query.format(tmp=workspace), "--catalog", str(db))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "read-only" in proc.stderr and kind in proc.stderr and "use SELECT" in proc.stderr
    assert _catalog_state(workspace) == before
    assert sorted(p.name for p in workspace.iterdir()) == files_before


def test_sql_allows_reads_of_every_form(workspace):
    db = str(workspace / "flywheel.duckdb")
    for query in ("WITH t AS (SELECT kind FROM versions) SELECT * FROM t", "FROM versions",
                  "DESCRIBE versions", "SHOW TABLES", "SUMMARIZE versions",
                  "EXPLAIN SELECT * FROM versions", "SELECT 1 AS a; SELECT 2 AS a"):
        proc = run_cli("sql", query, "--catalog", db, "--json")
        assert proc.returncode == 0, (query, proc.stderr)
        assert isinstance(json.loads(proc.stdout), list), query


def test_sql_reads_the_query_from_stdin(workspace):
    db = str(workspace / "flywheel.duckdb")
    proc = subprocess.run([sys.executable, "-m", "flywheel.cli", "sql", "-", "--catalog", db,
                           "--json"], input="SELECT count(*) AS n FROM versions\n",
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [{"n": 1}]
    proc = subprocess.run([sys.executable, "-m", "flywheel.cli", "sql", "-", "--catalog", db],
                          input="DROP TABLE versions", capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "DROP" in proc.stderr
    assert _catalog_state(workspace)[0][0]["row_count"] == 1


@pytest.mark.parametrize("command", [["sql", "SELECT kind, row_count FROM versions"],
                                     ["versions"]])
def test_read_commands_share_the_output_options(workspace, command):
    db = str(workspace / "flywheel.duckdb")
    as_json = run_cli(*command, "--catalog", db, "--json")
    assert as_json.returncode == 0, as_json.stderr
    records = json.loads(as_json.stdout)
    assert len(records) == 1 and records[0]["kind"] == "prompts"
    nl = run_cli(*command, "--catalog", db, "--nl")
    assert [json.loads(line) for line in nl.stdout.splitlines()] == records
    csv_out = run_cli(*command, "--catalog", db, "--csv")
    header, row = csv_out.stdout.strip().splitlines()
    assert header.split(",") == list(records[0])
    table = run_cli(*command, "--catalog", db)
    assert table.returncode == 0 and "prompts" in table.stdout
    both = run_cli(*command, "--catalog", db, "--json", "--csv")
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_versions_shows_lineage_columns_and_key_params(workspace):
    proc = run_cli("versions", "--catalog", str(workspace / "flywheel.duckdb"), "--json")
    assert proc.returncode == 0, proc.stderr
    (rec,) = json.loads(proc.stdout)
    assert list(rec) == ["version_id", "kind", "round", "parents", "row_count", "created_at",
                         "key_params"]
    assert rec["parents"] == [] and rec["row_count"] == 1


def test_key_params_pick_the_telling_keys_per_kind():
    from flywheel.cli import key_params

    assert key_params("samples", {"n": 4, "temperature": 1.0, "top_p": 0.9, "seed": 0,
                                  "max_new_tokens": 48}) == \
        "n=4 temperature=1.0 top_p=0.9 max_new_tokens=48"
    assert key_params("pairs", '{"method": "dpo", "min_margin": 1.0, "rules": {"verifier": 2}}') \
        == "method=dpo min_margin=1.0 rules=verifier:2"
    assert key_params("model", {"path": "models/SmolLM2-135M-Instruct"}) == \
        "path=SmolLM2-135M-Instruct"
    assert key_params("unknown", {"x": 1}) == "" and key_params("samples", None) == ""


def test_summary_machine_formats(workspace):
    proc = run_cli("summary", "--catalog", str(workspace / "flywheel.duckdb"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []  # no eval yet: no rounds


def test_a_locked_catalog_names_the_process_holding_it(workspace):
    from flywheel.errors import FlywheelError

    db = workspace / "flywheel.duckdb"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys, time\n"
         f"con = duckdb.connect(r'{db}')\nprint('ready', flush=True)\ntime.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(FlywheelError) as err:
            with Catalog(db, read_timeout=0.5).read():
                pass
        assert f"process {holder.pid} holds the lock" in str(err.value)
        assert "retry" in str(err.value)
    finally:
        holder.kill()
        holder.wait()
