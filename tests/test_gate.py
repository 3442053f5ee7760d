"""The promotion gate, data mixing and the reference policy.

Unit tests decide the gate on hand-made eval rows; the slow tests run two real rounds of the
tiny model through the CLI: one whose gate rejects round 1 (the round-2 samples come from the
base model again, visible in the lineage), one that promotes and trains round 2 on the pairs of
rounds 1 and 2 against the base model as reference.
"""

from __future__ import annotations

import json

import duckdb
import pandas as pd
import pytest

from flywheel.catalog import Catalog
from flywheel.config import config_from_dict, load_config
from flywheel.errors import FlywheelError
from flywheel.pipeline import Context, gate
from tests.conftest import run_cli

EVAL = dict(n_prompts=20, pass_rate=0.5, pass_by_type="{}", llm_flip_rate=None)


def _ctx(tmp_path, **eval_settings) -> Context:
    cfg = load_config(None, [f"workspace={tmp_path}"]
                      + [f"eval.{k}={v}" for k, v in eval_settings.items()])
    cat = Catalog(cfg.catalog_path())
    cat.init()
    ctx = Context(cfg=cfg, run_id="run-1", catalog=cat, log=lambda m: None)
    for i in range(2):
        cat.commit(kind="model", run_id="run-1", round=i, parents=[], params={"i": i},
                   fp=f"fp-model-{i}", tables={"models": pd.DataFrame([{
                       "path": f"/m{i}", "content_hash": f"h{i}", "base_version": None,
                       "method": "base", "train_pairs": 0, "metrics": "{}"}])})
    return ctx


def _eval(ctx: Context, round_: int, wins: int, losses: int, ties: int, lo: float,
          hi: float) -> str:
    from flywheel.catalog import fingerprint

    models = ctx.catalog.df("SELECT version_id FROM versions WHERE kind = 'model' "
                            "ORDER BY round").version_id
    n = wins + losses + ties
    row = {"model_version": models[1], "baseline_version": models[0], "wins": wins,
           "losses": losses, "ties": ties, "win_rate": (wins + ties / 2) / n, "ci_low": lo,
           "ci_high": hi, **EVAL}
    v = ctx.catalog.commit(kind="eval", run_id="run-1", round=round_, parents=[models[1]],
                           params={"w": wins}, fp=fingerprint("eval", {"w": wins, "r": round_},
                                                              []),
                           tables={"evals": pd.DataFrame([row])})
    return v.version_id


def _decide(ctx, ev) -> dict:
    models = list(ctx.catalog.df("SELECT version_id FROM versions WHERE kind = 'model' "
                                 "ORDER BY round").version_id)
    g = gate(ctx, 1, models[1], ev, models[0], "eval-r0-base", None)
    return ctx.catalog.rows("gate", g).iloc[0].to_dict() | {"models": models}


@pytest.mark.parametrize("statistic, min_rate, promoted", [
    ("point", 0.5, True),     # 0.55 >= 0.5
    ("point", 0.6, False),    # 0.55 < 0.6
    ("ci_low", 0.5, False),   # 0.33 < 0.5: not clearly better
    ("ci_high", 0.5, True),   # 0.75 >= 0.5: not clearly worse
    ("ci_high", 0.8, False),
])
def test_gate_compares_the_chosen_statistic(tmp_path, statistic, min_rate, promoted):
    ctx = _ctx(tmp_path, min_win_rate=min_rate, gate_statistic=statistic)
    ev = _eval(ctx, 1, wins=9, losses=7, ties=4, lo=0.33, hi=0.75)  # win rate 0.55
    row = _decide(ctx, ev)
    value = {"point": 0.55, "ci_low": 0.33, "ci_high": 0.75}[statistic]
    assert row["promoted"] is promoted
    assert row["value"] == pytest.approx(value)
    assert row["threshold"] == min_rate and row["statistic"] == statistic
    old, new = row["models"]
    assert row["policy_version"] == (new if promoted else old)
    assert row["policy_eval"] == (ev if promoted else "eval-r0-base")
    sign = ">=" if promoted else "<"
    assert f"{value:.3f} {sign} eval.min_win_rate {min_rate:.3f}" in row["reason"]
    assert "wins 9, losses 7, ties 4" in row["reason"]
    assert (f"the next round starts from {old} again" in row["reason"]) is not promoted


def test_gate_off_promotes_every_model(tmp_path):
    ctx = _ctx(tmp_path)  # eval.min_win_rate defaults to 0
    row = _decide(ctx, _eval(ctx, 1, wins=0, losses=20, ties=0, lo=0.0, hi=0.16))
    assert row["promoted"] is True and "every model is promoted" in row["reason"]


def test_gate_decision_is_a_version_reused_by_fingerprint(tmp_path):
    ctx = _ctx(tmp_path, min_win_rate=0.5)
    ev = _eval(ctx, 1, wins=2, losses=10, ties=0, lo=0.05, hi=0.4)
    first = _decide(ctx, ev)
    again = _decide(ctx, ev)
    assert first["version_id"] == again["version_id"]
    assert ctx.catalog.df("SELECT count(*) AS n FROM gates").n[0] == 1
    v = ctx.catalog.get(first["version_id"])
    assert v.kind == "gate" and v.parents[:3] == [ev, *first["models"][::-1]]
    assert v.params["promoted"] is False


def test_gate_settings_are_validated():
    with pytest.raises(FlywheelError) as err:
        load_config(None, ["eval.min_win_rate=1.5", "eval.gate_statistic=median",
                           "train.data_mix=all", "train.reference=sft"])
    text = str(err.value) + "\n".join(err.value.details)
    for key in ("eval.min_win_rate", "eval.gate_statistic", "train.data_mix",
                "train.reference"):
        assert key in text, key


def test_gate_and_operational_settings_leave_fingerprints_alone():
    """The gate is its own version: its settings must not change the eval's fingerprint; nor
    must checkpoint_steps change the model's; data_mix/reference at their defaults are left out
    so models trained before they existed keep their ids."""
    from flywheel.config import shaping

    cfg = config_from_dict(load_config(None, []).to_dict())
    assert shaping(cfg.eval, "gate") == {"min_win_rate": 0.0, "statistic": "point"}
    assert not {"min_win_rate", "gate_statistic"} & set(shaping(cfg.eval))
    assert "checkpoint_steps" not in shaping(cfg.train)
    assert not {"data_mix", "reference"} & set(shaping(cfg.train))
    changed = config_from_dict({"train": {"data_mix": "current+previous", "reference": "base",
                                          "checkpoint_steps": 7}})
    assert shaping(changed.train)["data_mix"] == "current+previous"
    assert shaping(changed.train)["reference"] == "base"
    assert "checkpoint_steps" not in shaping(changed.train)


# -- real rounds ---------------------------------------------------------------------------
def _run(tiny_model, ws, *extra):
    proc = run_cli("iterate", "--rounds", "2", "--no-prefect", "--config", "configs/tiny.yaml",
                   "--set", f"models.policy={tiny_model}", "--set", f"workspace={ws}",
                   "--set", "judge.verdict=logprobs", "--set", "pairs.min_margin=0",
                   "--set", "pairs.require_agreement=false", *extra)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_rejected_round_leaves_the_policy_and_the_next_round_samples_from_it(tiny_model,
                                                                            tmp_path):
    """A gate the new model cannot clear: round 1 is rejected, round 2 starts from the base."""
    proc = _run(tiny_model, tmp_path, "--set", "eval.min_win_rate=0.95")
    assert "round 1 · gate      REJECTED: win rate" in proc.stderr
    with duckdb.connect(str(tmp_path / "flywheel.duckdb"), read_only=True) as con:
        base = con.execute("SELECT version_id FROM versions WHERE kind='model' AND round=0"
                           ).fetchone()[0]
        gates = con.execute("SELECT v.round, g.promoted, g.model_version, g.policy_version, "
                            "g.value, g.reason FROM gates g JOIN versions v USING (version_id) "
                            "ORDER BY v.round").fetchall()
        m1 = gates[0][2]
        r2_samples = con.execute(
            "SELECT DISTINCT s.model_version FROM samples s JOIN versions v USING (version_id) "
            "WHERE v.round = 2").fetchall()
        r2_parents = {k: p for k, p in con.execute(
            "SELECT kind, parents FROM versions WHERE round = 2").fetchall()}
        m2 = con.execute("SELECT base_version FROM models m JOIN versions v USING (version_id)"
                         " WHERE v.round = 2").fetchone()[0]
        e2 = con.execute("SELECT e.baseline_version FROM evals e JOIN versions v "
                         "USING (version_id) WHERE v.round = 2").fetchone()[0]
    assert [(r, p) for r, p, *_ in gates] == [(1, False), (2, False)]
    assert gates[0][3] == base and gates[0][4] < 0.95
    assert f"the next round starts from {base} again" in gates[0][5]
    # round 2 sampled, trained and was compared from the base model, not the rejected one
    assert r2_samples == [(base,)]
    assert base in r2_parents["samples"] and m1 not in r2_parents["samples"]
    assert m2 == base and e2 == base
    # status shows the decisions and the current policy
    st = run_cli("status", "--catalog", str(tmp_path / "flywheel.duckdb"), "--json")
    assert st.returncode == 0, st.stderr
    data = json.loads(st.stdout)
    ws = data["workspace"][0]
    assert ws["current_policy"] == base and ws["rejected"] == 2 and ws["promoted"] == 0
    assert [r["decision"] for r in data["rounds"]] == ["rejected", "rejected"]
    assert data["runs"][0]["state"] == "finished"


@pytest.mark.slow
def test_mixing_and_base_reference_are_recorded_and_in_the_lineage(tiny_model, tmp_path):
    _run(tiny_model, tmp_path, "--set", "train.data_mix=current+previous",
         "--set", "train.reference=base")
    with duckdb.connect(str(tmp_path / "flywheel.duckdb"), read_only=True) as con:
        ids = dict(con.execute("SELECT kind || round, version_id FROM versions").fetchall())
        params = {r: json.loads(p) for r, p in con.execute(
            "SELECT round, params FROM versions WHERE kind = 'model' AND round >= 1"
        ).fetchall()}
        parents = dict(con.execute("SELECT round, parents FROM versions "
                                   "WHERE kind = 'model'").fetchall())
        trained = dict(con.execute("SELECT v.round, m.train_pairs FROM models m "
                                   "JOIN versions v USING (version_id)").fetchall())
        pairs = dict(con.execute("SELECT v.round, count(*) FROM pairs p "
                                 "JOIN versions v USING (version_id) GROUP BY ALL").fetchall())
        lineage = con.execute("SELECT round, pairs_version FROM round_lineage ORDER BY round"
                              ).fetchall()
    base, m1 = ids["model0"], ids["model1"]
    assert params[1]["data_mix"] == "current+previous" and params[1]["reference"] == "base"
    assert params[1]["pairs_versions"] == [ids["pairs1"]]  # no previous round to mix in
    assert params[1]["reference_version"] == base
    assert params[2]["pairs_versions"] == [ids["pairs2"], ids["pairs1"]]
    assert params[2]["reference_version"] == base
    assert trained[2] == pairs[1] + pairs[2]
    # round 2: its own pairs, round 1's pairs and the base reference are parents; the round's
    # start model stays the last parent
    assert parents[2][:2] == [ids["pairs2"], ids["pairs1"]] and base in parents[2]
    assert parents[2][-1] == m1
    # one lineage row per round: the mixed-in pairs do not duplicate round 2
    assert lineage == [(1, ids["pairs1"]), (2, ids["pairs2"])]
