"""`flywheel show / lineage / diff`, their output formats, and the views judge_stats,
pair_lineage and model_lineage, on a real 2-round catalog made with the tiny model."""

from __future__ import annotations

import csv
import io
import json

import pytest

from flywheel.catalog import Catalog
from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def _cli(catalog, *args):
    proc = run_cli(*args, "--catalog", str(catalog), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _version(cat, kind, round_):
    return cat.df("SELECT version_id FROM versions WHERE kind = ? AND round = ?",
                  [kind, round_]).version_id.item()


@pytest.fixture(scope="module")
def cat(tiny_catalog):
    return Catalog(tiny_catalog)


@pytest.fixture(scope="module")
def pair(cat):
    """One round-1 pair with its ids, judgments and model, straight from the tables."""
    p = cat.df("SELECT * FROM pairs WHERE version_id = ? ORDER BY pair_id LIMIT 1",
               [_version(cat, "pairs", 1)]).iloc[0]
    judg = cat.df("SELECT judgment_id FROM judgments WHERE sample_id IN (?, ?) "
                  "OR sample_a IN (?, ?) OR sample_b IN (?, ?)",
                  [p.chosen_id, p.rejected_id] * 3).judgment_id.tolist()
    return {"pair_id": p.pair_id, "prompt_id": p.prompt_id, "chosen_id": p.chosen_id,
            "rejected_id": p.rejected_id, "judgment_ids": sorted(judg),
            "model": _version(cat, "model", 1), "pairs_version": p.version_id}


def test_show_prints_header_and_rows(cat, tiny_catalog):
    v = _version(cat, "pairs", 1)
    out = json.loads(_cli(tiny_catalog, "show", v, "--json"))
    head = out["version"][0]
    assert head["version_id"] == v and head["kind"] == "pairs" and head["round"] == 1
    assert head["row_count"] == len(out["rows"]) == len(cat.rows("pairs", v))
    assert _version(cat, "judgments", 1) in head["parents"]
    assert {r["pair_id"] for r in out["rows"]} == set(cat.rows("pairs", v).pair_id)
    limited = json.loads(_cli(tiny_catalog, "show", v, "--json", "--limit", "1"))
    assert len(limited["rows"]) == 1
    table = _cli(tiny_catalog, "show", v)
    assert "== version" in table and "== rows" in table and v in table


def test_show_unknown_version_exits_2(tiny_catalog):
    proc = run_cli("show", "pairs-r9-nope", "--catalog", str(tiny_catalog), timeout=120)
    assert proc.returncode == 2
    assert "pairs-r9-nope" in proc.stderr and "flywheel versions" in proc.stderr


def test_lineage_of_a_pair(pair, tiny_catalog):
    out = json.loads(_cli(tiny_catalog, "lineage", pair["pair_id"], "--json"))
    assert [r["pair_id"] for r in out["pair"]] == [pair["pair_id"]]
    assert [r["prompt_id"] for r in out["prompt"]] == [pair["prompt_id"]]
    roles = {r["sample_id"]: r["role"] for r in out["samples"]}
    assert roles == {pair["chosen_id"]: "chosen", pair["rejected_id"]: "rejected"}
    assert sorted(r["judgment_id"] for r in out["judgments"]) == pair["judgment_ids"]
    assert all("rationale" in r for r in out["judgments"])
    assert [r["model_version"] for r in out["models"]] == [pair["model"]]
    text = _cli(tiny_catalog, "lineage", pair["pair_id"])
    for needle in (pair["prompt_id"], pair["chosen_id"], pair["rejected_id"], pair["model"],
                   *pair["judgment_ids"]):
        assert needle in text


def test_lineage_of_generated_prompt_reaches_its_seed_examples(cat, tiny_catalog):
    g = cat.df("SELECT prompt_id, examples FROM prompts WHERE source = 'self-instruct' "
               "AND len(examples) > 0 LIMIT 1").iloc[0]
    out = json.loads(_cli(tiny_catalog, "lineage", g.prompt_id, "--json"))
    assert [r["prompt_id"] for r in out["prompt"]] == [g.prompt_id]
    assert set(g.examples) <= {r["prompt_id"] for r in out["example prompts"]}
    n_samples = cat.df("SELECT count(DISTINCT sample_id) AS n FROM samples WHERE prompt_id = ?",
                       [g.prompt_id]).n.item()
    assert len(out["samples"]) == n_samples


def test_lineage_of_sample_judgment_and_model(pair, cat, tiny_catalog):
    for rid in (pair["chosen_id"], pair["judgment_ids"][0]):
        out = json.loads(_cli(tiny_catalog, "lineage", rid, "--json"))
        assert [r["prompt_id"] for r in out["prompt"]] == [pair["prompt_id"]]
        assert pair["pair_id"] in [r["pair_id"] for r in out["pairs"]]
        assert pair["model"] in [r["model_version"] for r in out["models"]]
    out = json.loads(_cli(tiny_catalog, "lineage", pair["model"], "--json"))
    ancestors = {r["version_id"] for r in out["ancestors"]}
    assert {pair["pairs_version"], _version(cat, "prompts", 0),
            _version(cat, "samples", 1)} <= ancestors
    assert _version(cat, "model", 2) in {r["version_id"] for r in out["descendants"]}
    proc = run_cli("lineage", "pr_nope", "--catalog", str(tiny_catalog), timeout=120)
    assert proc.returncode == 2 and "pr_nope" in proc.stderr


def test_diff_of_round_pairs(cat, tiny_catalog):
    v1, v2 = _version(cat, "pairs", 1), _version(cat, "pairs", 2)
    a, b = set(cat.rows("pairs", v1).pair_id), set(cat.rows("pairs", v2).pair_id)
    out = json.loads(_cli(tiny_catalog, "diff", v1, v2, "--json"))
    s = out["summary"][0]
    assert (s["rows_v1"], s["rows_v2"]) == (len(a), len(b))
    assert (s["added"], s["removed"], s["common"]) == (len(b - a), len(a - b), len(a & b))
    assert {r["pair_id"] for r in out["added"]} == b - a
    assert {r["pair_id"] for r in out["removed"]} == a - b
    assert s["flipped"] == len(out["flipped"])
    lengths = {(r["version"], r["column"]): r for r in out["lengths"]}
    chosen = cat.rows("pairs", v1).chosen_text.str.len()
    assert lengths[("v1", "chosen_text")]["mean_chars"] == pytest.approx(chosen.mean(), abs=0.01)
    # a diff with itself: nothing added or removed
    same = json.loads(_cli(tiny_catalog, "diff", v1, v1, "--json"))["summary"][0]
    assert (same["added"], same["removed"], same["common"]) == (0, 0, len(a))


def test_diff_of_judgments_and_kind_mismatch(cat, tiny_catalog):
    v1, v2 = _version(cat, "judgments", 1), _version(cat, "judgments", 2)
    out = json.loads(_cli(tiny_catalog, "diff", v1, v2, "--json"))
    scored = cat.df("SELECT count(*) AS n FROM judgments WHERE version_id = ? AND parsed "
                    "AND score IS NOT NULL", [v1]).n.item()
    assert sum(r["v1"] for r in out["histogram"]) == scored
    assert {r["type"] for r in out["scores"]} >= {"pointwise", "verifier"}
    proc = run_cli("diff", v1, _version(cat, "pairs", 1), "--catalog", str(tiny_catalog),
                   timeout=120)
    assert proc.returncode == 2 and "same kind" in proc.stderr


@pytest.mark.parametrize("command", ["show", "lineage", "diff"])
def test_every_output_format_parses(command, cat, pair, tiny_catalog):
    args = {"show": ["show", _version(cat, "samples", 1)],
            "lineage": ["lineage", pair["pair_id"]],
            "diff": ["diff", _version(cat, "pairs", 1), _version(cat, "pairs", 2)]}[command]
    as_json = json.loads(_cli(tiny_catalog, *args, "--json"))
    n = sum(len(v) for v in as_json.values())
    lines = [json.loads(line) for line in _cli(tiny_catalog, *args, "--nl").splitlines()]
    assert len(lines) == n and all("section" in r for r in lines)
    rows = list(csv.DictReader(io.StringIO(_cli(tiny_catalog, *args, "--csv"))))
    assert len(rows) == n and {r["section"] for r in rows} == {r["section"] for r in lines}


def test_judge_stats_view(cat):
    df = cat.df("SELECT * FROM judge_stats")
    assert sorted(df["round"].unique()) == [1, 2]
    for col in ("parse_failure_rate", "order_flip_rate", "tie_rate"):
        vals = df[col].dropna()
        assert ((vals >= 0) & (vals <= 1)).all(), col
    assert df.order_flip_rate.notna().any()
    total = cat.df("SELECT count(*) AS n FROM judgments").n.item()
    assert df.judgments.sum() == total
    for hist in df.score_histogram.dropna():
        assert all(int(k) in range(0, 6) for k in json.loads(hist))
    assert (df.mean_chosen_chars > 0).all() and (df.mean_rejected_chars > 0).all()
    corr = df.score_length_corr.dropna()
    assert ((corr >= -1) & (corr <= 1)).all()


def test_pair_lineage_view(cat, pair):
    df = cat.df("SELECT * FROM pair_lineage")
    assert len(df) == cat.df("SELECT count(*) AS n FROM pairs").n.item()
    row = df[df.pair_id == pair["pair_id"]].iloc[0]
    assert row.prompt_id == pair["prompt_id"] and row.model_version == pair["model"]
    assert sorted(row.sample_judgment_ids) == pair["judgment_ids"]
    assert isinstance(row.prompt_text, str) and row.prompt_text


def test_model_lineage_view(cat):
    df = cat.df("SELECT * FROM model_lineage ORDER BY round")
    assert list(df["round"]) == [0, 1, 2]
    r1 = df[df["round"] == 1].iloc[0]
    assert r1.start_model == _version(cat, "model", 0)
    assert r1.pairs_version == _version(cat, "pairs", 1)
    assert r1.samples_version == _version(cat, "samples", 1)
    assert r1.prompts_version == _version(cat, "prompts", 1)
    assert r1.eval_version == _version(cat, "eval", 1)
    rl = cat.df("SELECT * FROM round_lineage")
    merged = df.merge(rl, on="model_version", suffixes=("", "_rl"))
    assert len(merged) == 2
    for col in ("pairs_version", "judgments_version", "samples_version", "prompts_version",
                "start_model"):
        assert (merged[col] == merged[col + "_rl"]).all(), col
