"""One full round with a tiny random model through the real CLI, real Prefect (its temporary
local server), real TRL training and a real DuckDB file; then resume and partial recompute."""

from __future__ import annotations

import json

import duckdb
import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def _args(tiny_model, ws, *extra):
    return ["iterate", "--rounds", "1", "--config", "configs/tiny.yaml",
            "--set", f"models.policy={tiny_model}", "--set", f"workspace={ws}",
            # random outputs: let continuous logprob scores decide so pairs (and training) exist
            "--set", "judge.verdict=logprobs", "--set", "pairs.min_margin=0",
            "--set", "pairs.require_agreement=false", *extra]


@pytest.fixture(scope="module")
def one_round(tiny_model, tmp_path_factory):
    ws = tmp_path_factory.mktemp("ws")
    proc = run_cli(*_args(tiny_model, ws))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tiny_model, ws, proc


def _con(ws):
    return duckdb.connect(str(ws / "flywheel.duckdb"), read_only=True)


def test_every_kind_has_a_version_for_round_one(one_round):
    _, ws, proc = one_round
    with _con(ws) as con:
        kinds = dict(con.execute(
            "SELECT kind, count(*) FROM versions WHERE round = 1 GROUP BY kind").fetchall())
        zero = dict(con.execute(
            "SELECT kind, count(*) FROM versions WHERE round = 0 GROUP BY kind").fetchall())
    assert kinds == {"prompts": 1, "samples": 1, "judgments": 1, "canary": 1, "pairs": 1,
                     "model": 1, "eval": 1, "gate": 1}
    assert zero == {"prompts": 1, "model": 1, "eval": 1}
    assert "Flow run" in proc.stderr  # it ran through Prefect


def test_samples_come_from_the_base_model_and_counts_match_config(one_round):
    _, ws, _ = one_round
    with _con(ws) as con:
        base = con.execute("SELECT version_id FROM versions WHERE kind='model' AND round=0"
                           ).fetchone()[0]
        rows = con.execute("SELECT DISTINCT model_version, count(*) OVER () FROM samples"
                           ).fetchall()
        per_prompt = con.execute("SELECT count(*) FROM samples GROUP BY prompt_id").fetchall()
    assert [r[0] for r in rows] == [base]
    assert rows[0][1] == 4 * 2  # prompts_per_round x n
    assert {n for (n,) in per_prompt} == {2}


def test_pairwise_comparisons_are_judged_in_both_orders(one_round):
    _, ws, _ = one_round
    with _con(ws) as con:
        comps = con.execute("""
            SELECT comparison_id, count(*), count(DISTINCT a.swapped),
                   bool_and(a.sample_a = b.sample_b AND a.sample_b = b.sample_a)
            FROM judgments a JOIN judgments b USING (comparison_id)
            WHERE a.type = 'pairwise' AND NOT a.swapped AND b.swapped
            GROUP BY comparison_id""").fetchall()
        n_pairwise = con.execute(
            "SELECT count(*) FROM judgments WHERE type='pairwise'").fetchone()[0]
    assert comps, "hybrid mode judges each prompt's best-vs-worst pair"
    assert n_pairwise == 2 * len(comps)
    assert all(c[1] == 1 and c[3] for c in comps)


def test_every_pair_joins_back_to_samples_judgments_and_prompt(one_round):
    _, ws, _ = one_round
    with _con(ws) as con:
        pairs = con.execute("SELECT count(*) FROM pairs").fetchone()[0]
        joined = con.execute("""
            SELECT count(DISTINCT p.pair_id) FROM pairs p
            JOIN samples c ON c.sample_id = p.chosen_id
            JOIN samples r ON r.sample_id = p.rejected_id
            JOIN prompts q ON q.prompt_id = p.prompt_id
            JOIN judgments j ON list_contains(p.judgment_ids, j.judgment_id)
            WHERE j.sample_id IN (p.chosen_id, p.rejected_id)""").fetchone()[0]
        model = con.execute("SELECT method, train_pairs, metrics FROM models m "
                            "JOIN versions v USING (version_id) WHERE v.round = 1").fetchone()
    assert pairs > 0 and joined == pairs
    assert model[0] == "dpo" and model[1] == pairs
    assert json.loads(model[2])["train_loss"] is not None


def test_round_summary_reports_flip_rate_and_eval(one_round):
    _, ws, _ = one_round
    with _con(ws) as con:
        row = con.execute("SELECT order_flip_rate, comparisons, samples, pairs, win_rate, "
                          "pass_rate, base_pass_rate FROM round_summary WHERE round = 1"
                          ).fetchone()
    flip, comparisons, samples, pairs, win, pass_rate, base = row
    assert 0.0 <= flip <= 1.0 and comparisons > 0
    assert samples == 8 and pairs > 0
    assert 0.0 <= win <= 1.0 and pass_rate is not None and base is not None


def test_rerun_recomputes_nothing(one_round):
    tiny_model, ws, _ = one_round
    with _con(ws) as con:
        before = con.execute("SELECT version_id FROM versions ORDER BY 1").fetchall()
    proc = run_cli(*_args(tiny_model, ws))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert " made " not in proc.stderr
    assert proc.stderr.count("reused") >= 9
    with _con(ws) as con:
        assert con.execute("SELECT version_id FROM versions ORDER BY 1").fetchall() == before


def test_changing_one_setting_recomputes_that_stage_and_later_only(one_round):
    tiny_model, ws, _ = one_round
    proc = run_cli(*_args(tiny_model, ws, "--set", "pairs.max_length_ratio=50"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    made = {line.split("·")[1].split()[0] for line in proc.stderr.splitlines()
            if " made " in line and "·" in line}
    reused = {line.split("·")[1].split()[0] for line in proc.stderr.splitlines()
              if " reused " in line and "·" in line}
    assert made == {"pairs", "model", "eval", "gate"}
    assert {"prompts", "samples", "judgments"} <= reused


def test_spin_round_pairs_gold_against_own_greedy_answer(tiny_model, tmp_path):
    proc = run_cli("iterate", "--rounds", "1", "--no-prefect", "--config", "configs/tiny.yaml",
                   "--set", f"models.policy={tiny_model}", "--set", f"workspace={tmp_path}",
                   "--set", "train.method=spin", "--set", "prompts.num_new=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with _con(tmp_path) as con:
        gold = con.execute("SELECT count(*) FROM prompts WHERE gold IS NOT NULL").fetchone()[0]
        greedy = con.execute("SELECT count(*), bool_and(idx = -1 AND temperature = 0) "
                             "FROM samples WHERE greedy").fetchone()
        pairs = con.execute("""
            SELECT count(*), bool_and(p.rule = 'spin' AND p.chosen_id = 'gold:' || p.prompt_id
                                      AND p.chosen_text = q.gold AND p.rejected_text = s.text)
            FROM pairs p JOIN prompts q USING (prompt_id)
            JOIN samples s ON s.sample_id = p.rejected_id AND s.greedy""").fetchone()
        model = con.execute("SELECT method, train_pairs FROM models JOIN versions "
                            "USING (version_id) WHERE round = 1").fetchone()
        new_prompts = con.execute("SELECT row_count FROM versions WHERE kind = 'prompts' "
                                  "AND round = 1").fetchone()[0]
    assert greedy == (gold, True)
    assert pairs[0] == gold and pairs[1]
    assert model == ("spin", gold)
    assert new_prompts == 0
