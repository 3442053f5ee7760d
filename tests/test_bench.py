"""Smoke test of the catalog benchmark (bench/catalog.py) at a tiny scale."""

from __future__ import annotations

import contextlib
import importlib.util
import io

from tests.conftest import ROOT


def _bench():
    spec = importlib.util.spec_from_file_location("flywheel_bench", ROOT / "bench" / "catalog.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_prints_all_four_measurements(tmp_path):
    bench = _bench()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert bench.main(["--scale", "0.001", "--rounds", "2", "--repeats", "1",
                           "--out", str(tmp_path)]) == 0
    out = buf.getvalue()
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| measurement | value | target | met? |")
    for name in ("bulk ingest", "`flywheel versions`", "one pair's lineage",
                 "round_summary"):
        assert any(name in line for line in table[1:]), name
    assert "round_summary` (2 rows)" in out  # one row per round
    assert any("--depth all" in line for line in table[1:])


def test_bench_breaks_down_a_missed_target(tmp_path):
    """Under a missed target the bench prints its parts: ingest by kind, and the lineage step
    by step on a fresh and a warm connection."""
    bench = _bench()
    info = bench.build(tmp_path / "b.duckdb", scale=0.001, rounds=2, log=lambda *a: None)
    missed = [{"key": key, "met": "**no**"} for key in ("ingest", "lineage", "round_summary")]
    out = bench.investigate(info, missed)
    assert "ingest by kind" in out and "judgments" in out
    assert "fresh" in out and "warm" in out and "open + close the catalog" in out
    assert "judgments (prompt_id index, filtered)" in out and "round_summary parts" in out
    # the floors the misses are explained by, measured in the same run
    floors = {line.split("[")[0].strip(): line.rsplit(None, 1)[1] for line in out.splitlines()
              if "judgments]" in line}
    assert set(floors) == {"Catalog.commit, fresh catalog (indexes, one transaction)",
                           "DuckDB alone: empty table, no index",
                           "DuckDB alone, uncompressed storage",
                           "pyarrow Parquet file (snappy; no catalog, no index)",
                           "pyarrow Parquet file (none; no catalog, no index)"}
    assert all(float(v.replace(",", "")) > 0 for v in floors.values())
    assert "[300 judgments]" in out  # one round at this scale: 50 prompts × 6
    start = [line for line in out.splitlines() if "floor: DuckDB start + close" in line]
    assert len(start) == 1 and float(start[0].split()[-1]) > 0
