"""The CLI: bad input gets a clear error and writes nothing; light commands stay light."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from flywheel.catalog import Catalog
from tests.conftest import ROOT, run_cli


@pytest.fixture
def workspace(tmp_path):
    """A workspace whose catalog already holds one version (nothing may be lost)."""
    cat = Catalog(tmp_path / "flywheel.duckdb")
    cat.init()
    cat.commit(kind="prompts", run_id="r0", round=0, parents=[], params={"x": 1},
               fp="f" * 20, tables={"prompts": pd.DataFrame([{
                   "prompt_id": "p_1", "text": "hello", "gold": None, "constraints": "[]",
                   "category": None, "source": "seed", "source_ref": "x:1", "examples": [],
                   "raw": None}])})
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
        "heavy = [m for m in ('torch', 'transformers', 'prefect', 'trl', 'peft') "
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
