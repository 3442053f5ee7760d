"""The README's SQL examples run against a real 2-round catalog and say what they promise; and
the catalog can be read while a round is writing it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow

KINDS = {"prompts", "samples", "judgments", "pairs", "model", "eval", "gate"}

_COMMAND = re.compile(r'flywheel sql "((?:[^"\\]|\\.)*)"((?:[ \t]+-p[ \t]+\S+[ \t]+\S+)*)')


def readme_sql_commands() -> list[tuple[str, dict]]:
    """Every `flywheel sql "..."` in the bash blocks of README's "The catalog: inspect with SQL"
    section: (query, {param: value}), with the shell's `\\$` / `\\"` escapes undone."""
    text = (ROOT / "README.md").read_text()
    start = text.index("## The catalog: inspect with SQL")
    end = text.index("\n## ", start + 1)
    blocks = re.findall(r"```bash\n(.*?)```", text[start:end], flags=re.S)
    commands = []
    for block in blocks:
        for m in _COMMAND.finditer(block):
            query = re.sub(r"\\([$\"\\`])", r"\1", m.group(1))
            params = dict(re.findall(r"-p\s+(\S+)\s+(\S+)", m.group(2)))
            commands.append((query, params))
    return commands


def _rate(value) -> bool:
    return value is None or 0.0 <= value <= 1.0


def check_kinds_per_round(rows):
    for rnd in (1, 2):
        assert {r["kind"] for r in rows if r["round"] == rnd} >= KINDS, rnd
    assert all(r["versions"] >= 1 for r in rows)


def check_round_summary(rows):
    assert {1, 2} <= {r["round"] for r in rows}
    for r in rows:
        assert r["order_flip_rate"] is not None and 0.0 <= r["order_flip_rate"] <= 1.0
        assert _rate(r["win_rate"]) and _rate(r["pass_rate"]) and _rate(r["base_pass_rate"])


def check_pairs_join(rows):
    assert rows
    for r in rows:
        assert r["chosen"].strip() and r["rejected"].strip() and r["prompt"].strip()
        assert r["pair_id"].startswith("pr_")


def check_both_orders(rows):
    assert rows
    for r in rows:
        assert r["first_order"] is not None and r["swapped_order"] is not None
        assert isinstance(r["consistent"], bool)


def check_samples_per_round(rows):
    assert {r["round"] for r in rows} >= {1, 2}
    for r in rows:
        assert r["model_version"].startswith("model-r"), r


def check_pass_by_type(rows):
    assert rows
    for r in rows:
        assert r["constraint_type"] and 0.0 <= r["pass_rate"] <= 1.0


def check_example_prompts(rows):
    assert rows
    assert all(r["generated"] and r["example"] for r in rows)


def check_round_two_pairs(rows):
    assert rows
    assert all(r["version_id"].startswith("pairs-r2-") for r in rows)


def check_gates(rows):
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert r["promoted"] is True and r["threshold"] == 0.0  # the gate is off by default
        assert r["next_policy"].startswith(f"model-r{r['round']}-")
        assert "every model is promoted" in r["reason"]


def check_migrations(rows):
    """A catalog made by this release records every migration, in order, with its version."""
    from flywheel.catalog.migrations import MIGRATIONS

    assert [r["name"] for r in rows] == [m.name for m in MIGRATIONS]
    assert {r["flywheel_version"] for r in rows} == {"0.1.0"}


#: A distinctive piece of each README query -> what its result must satisfy.
CHECKS = {
    "count(*) AS versions FROM versions": check_kinds_per_round,
    "FROM round_summary": check_round_summary,
    "c.text AS chosen": check_pairs_join,
    "AS swapped_order": check_both_orders,
    "s.model_version": check_samples_per_round,
    "AS constraint_type": check_pass_by_type,
    "AS example": check_example_prompts,
    "v.round = $r": check_round_two_pairs,
    "FROM gates g": check_gates,
    "FROM migrations": check_migrations,
}


def test_every_sql_example_of_the_readme_is_checked():
    queries = [q for q, _ in readme_sql_commands()]
    assert len(queries) == len(CHECKS) == 10, queries
    for key in CHECKS:
        assert sum(key in q for q in queries) == 1, key


@pytest.mark.parametrize("key", list(CHECKS))
def test_readme_sql_example_runs(tiny_catalog, key):
    (query, params), = [(q, p) for q, p in readme_sql_commands() if key in q]
    args = [a for name, value in params.items() for a in ("-p", name, value)]
    proc = run_cli("sql", query, *args, "--catalog", str(tiny_catalog), "--json", timeout=60)
    assert proc.returncode == 0, proc.stderr
    CHECKS[key](json.loads(proc.stdout))


def test_catalog_is_readable_while_a_round_runs(tiny_model, tmp_path):
    ws = tmp_path / "ws"
    db = ws / "flywheel.duckdb"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = (tmp_path / "iterate.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flywheel.cli", "iterate", "--rounds", "2", "--no-prefect",
         "--config", "configs/tiny.yaml", "--set", f"models.policy={tiny_model}",
         "--set", f"workspace={ws}", "--set", "sampling.prompts_per_round=8"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not db.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert db.is_file(), (tmp_path / "iterate.log").read_text()[-3000:]
        reads = 0
        while proc.poll() is None and reads < 6:
            t0 = time.monotonic()
            read = run_cli("sql", "SELECT count(*) AS n FROM versions", "--catalog", str(db),
                           "--json", timeout=60)
            took = time.monotonic() - t0
            assert read.returncode == 0, read.stderr
            assert took < 10, f"a read took {took:.1f}s"
            assert json.loads(read.stdout)[0]["n"] >= 0
            reads += 1
        assert proc.wait(timeout=900) == 0, (tmp_path / "iterate.log").read_text()[-3000:]
        assert reads >= 3, f"iterate finished after only {reads} reads"
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()

