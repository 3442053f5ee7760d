"""The canary set: comparisons with a known right answer, judged every round in both orders by
the round's judge (flywheel.stages.canary, pipeline.canary); judge drift in judge_stats and
queries.canary_by_round. No model is loaded: a scripted judge whose verdicts degrade."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from flywheel import pipeline
from flywheel.backends import Generation
from flywheel.catalog import Catalog, queries
from flywheel.config import load_config, shaping
from flywheel.constraints import verify
from flywheel.errors import FlywheelError
from flywheel.stages.canary import load_canary
from flywheel.stages.judging import JUDGMENT_COLUMNS
from tests.conftest import ROOT

CANARY = ROOT / "data" / "canary.jsonl"
_ANSWER = re.compile(r"\[The Start of Assistant ([AB])'s Answer\]\n(.*?)\n"
                     r"\[The End of Assistant \1's Answer\]", re.S)


# -- the shipped set ------------------------------------------------------------------------------
def test_the_shipped_canary_set_is_valid_and_its_verifier_items_are_decided_by_verifiers():
    items = load_canary(CANARY)
    assert len(items) == 12 and len({it["id"] for it in items}) == 12
    assert [it["kind"] for it in items].count("verifier") == 7
    assert [it["kind"] for it in items].count("broken") == 5
    for it in items:
        if it["kind"] == "verifier":
            assert all(r.passed for r in verify(it["good"], it["constraints"])), it["id"]
            assert not any(r.passed for r in verify(it["bad"], it["constraints"])), it["id"]
        else:
            assert "constraints" not in it and it["good"] != it["bad"]


def test_the_canary_file_is_on_by_default_and_not_in_the_judgments_fingerprint():
    cfg = load_config(None, [])
    assert cfg.judge.canary_file == "data/canary.jsonl"
    assert "canary_file" not in shaping(cfg.judge)
    assert shaping(cfg.judge) == shaping(load_config(None, ["judge.canary_file="]).judge)


@pytest.mark.parametrize(("line", "problem"), [
    ('{"id": "x", "prompt": "p", "good": "g", "bad": "b", "kind": "gold"}',
     "kind 'gold' is not one of: verifier, broken"),
    ('{"id": "x", "prompt": "p", "good": "", "kind": "broken"}',
     "missing or empty text field(s): good, bad"),
    ('{"id": "x", "prompt": "p", "good": "A b", "bad": "X Y", "kind": "verifier", '
     '"constraints": [{"type": "lowercase"}]}',
     "the good answer fails its constraints"),
    ('{"id": "x", "prompt": "p", "good": "a", "bad": "b", "kind": "verifier"}',
     'a verifier item needs "constraints" (a non-empty list)'),
    ('{"id": "x", "prompt": "p", "good": "a", "bad": "b", "kind": "verifier", '
     '"constraints": [{"type": "nope"}]}', "unknown constraint type 'nope'"),
    ("[1, 2]", "not a JSON object"),
])
def test_a_bad_canary_line_is_an_error_naming_file_line_and_why(tmp_path, line, problem):
    path = tmp_path / "canary.jsonl"
    path.write_text('{"id": "ok", "prompt": "p", "good": "g", "bad": "b", "kind": "broken"}\n'
                    + line + "\n")
    with pytest.raises(FlywheelError) as err:
        load_canary(path)
    assert str(err.value).startswith(f"judge.canary_file {path} is not a valid canary set")
    assert len(err.value.details) == 2
    assert err.value.details[0].startswith(f"{path}:2: ")
    assert problem in err.value.details[0]
    assert "judge.canary_file to ''" in err.value.details[1]


def test_a_duplicate_id_and_a_missing_file_are_errors(tmp_path):
    path = tmp_path / "canary.jsonl"
    row = '{"id": "x", "prompt": "p", "good": "g", "bad": "b", "kind": "broken"}\n'
    path.write_text(row + row)
    with pytest.raises(FlywheelError) as err:
        load_canary(path)
    assert err.value.details[0] == f"{path}:2: id 'x' is used twice"
    with pytest.raises(FlywheelError, match=r"judge.canary_file: cannot read .*nowhere.jsonl"):
        load_canary(tmp_path / "nowhere.jsonl")


# -- a judge that degrades ------------------------------------------------------------------------
class Degrading:
    """A judge scripted per checkpoint: m1 is right, m2 right on every other canary item (wrong
    on the others, in both orders), m3 always says the first answer (position bias)."""

    def __init__(self, items: list[dict]):
        self.good = {it["good"]: i for i, it in enumerate(items)}
        self.calls: list[tuple[str, int]] = []

    def verdict(self, model: str, content: str) -> str:
        shown = dict(_ANSWER.findall(content))
        good = "A" if shown["A"] in self.good else "B"
        bad = "B" if good == "A" else "A"
        index = self.good[shown[good]]
        name = Path(model).name
        if name == "m1":
            return good
        if name == "m2":
            return good if index % 2 == 0 else bad
        return "A"

    def generate(self, model, conversations, n=1, **kw):
        self.calls.append((Path(model).name, len(conversations)))
        return [[Generation(f"One answer is better. [[{self.verdict(model, c[-1]['content'])}]]",
                            "stop", 10, 10)] for c in conversations]


def _workspace(tmp_path: Path, canary: Path = CANARY):
    cfg = load_config(None, [f"workspace={tmp_path / 'ws'}", f"judge.canary_file={canary}",
                             "progress=false"])
    cat = Catalog(cfg.catalog_path())
    cat.init()
    ctx = pipeline.Context(cfg=cfg, run_id="run-1", catalog=cat, log=lambda m: None)
    return cfg, cat, ctx


def _round(cat: Catalog, tmp_path: Path, r: int) -> tuple[str, str]:
    """A model version (the round's policy, judging itself) and a judgments version of it."""
    path = tmp_path / f"m{r}"
    path.mkdir(exist_ok=True)
    model = cat.commit(kind="model", run_id="run-1", round=r - 1, parents=[],
                       params={"round": r - 1}, fp=f"fp-model-{r}",
                       tables={"models": pd.DataFrame([{
                           "path": str(path), "content_hash": f"h{r}", "base_version": None,
                           "method": "base", "train_pairs": 0, "metrics": "{}"}])}).version_id
    row = dict.fromkeys(JUDGMENT_COLUMNS)
    row.update(judgment_id=f"j{r}", type="pointwise", prompt_id="p", sample_id="s", k=0,
               judge=model, method="text", raw="Score: 4", parsed=True, score=4.0)
    judgments = cat.commit(kind="judgments", run_id="run-1", round=r, parents=[model],
                           params={"round": r}, fp=f"fp-judgments-{r}",
                           tables={"judgments": pd.DataFrame([row])}).version_id
    return model, judgments


def test_a_degrading_judge_shows_its_drift_in_judge_stats_and_canary_by_round(tmp_path):
    _, cat, ctx = _workspace(tmp_path)
    items = load_canary(CANARY)
    judge = ctx._backend = Degrading(items)
    made = {}
    for r in (1, 2, 3):
        model, judgments = _round(cat, tmp_path, r)
        made[r] = (model, pipeline.canary(ctx, r, judgments, model))
    assert judge.calls == [("m1", 24), ("m2", 24), ("m3", 24)]  # both orders, one batch
    for r, (model, version) in made.items():
        v = cat.get(version)
        assert (v.kind, v.round, v.row_count) == ("canary", r, 24)
        assert v.parents == [f"judgments-r{r}-{cat.get(v.parents[0]).fingerprint[:10]}"]
        assert v.params["judge"] == model and v.params["judge_hash"] == f"h{r}"
    rows = cat.rows("canary", made[3][1])
    assert set(rows.judge) == {made[3][0]} and rows.parsed.all()
    assert sorted(rows.canary_id.unique()) == sorted(it["id"] for it in items)
    assert {k: sorted(g) for k, g in rows.groupby("canary_id").order_ab} == {
        it["id"]: [False, True] for it in items}
    # position bias: the first answer wins, so the good one wins exactly when shown first
    assert (rows.winner == rows.order_ab.map({True: "good", False: "bad"})).all()
    assert (rows.correct == rows.order_ab).all()
    assert set(rows.rationale) == {"One answer is better."}

    stats = cat.df("SELECT round, judge, judgments, canary_accuracy, canary_flip_rate, "
                   "canary_judgments FROM judge_stats ORDER BY round")
    assert list(stats["round"]) == [1, 2, 3]
    assert list(stats.judge) == [made[r][0] for r in (1, 2, 3)]
    assert list(stats.judgments) == [1, 1, 1]
    assert list(stats.canary_accuracy) == [1.0, 0.5, 0.5]
    assert list(stats.canary_flip_rate) == [0.0, 0.0, 1.0]
    assert list(stats.canary_judgments) == [24, 24, 24]

    by_round = queries.canary_by_round(cat)
    assert list(by_round.columns) == queries.CANARY_COLUMNS
    assert list(by_round["round"]) == [1, 2, 3]
    assert list(by_round.canary_accuracy) == [1.0, 0.5, 0.5]
    assert list(by_round.canary_flip_rate) == [0.0, 0.0, 1.0]
    assert list(by_round["items"]) == [12, 12, 12]
    with cat.read() as con:  # an open connection works the same
        assert queries.canary_by_round(con).equals(by_round)

    # judged again with the same judge and file: reused, not asked again
    assert pipeline.canary(ctx, 2, cat.get(made[2][1]).parents[0], made[2][0]) == made[2][1]
    assert len(judge.calls) == 3


def test_ties_count_half_and_unparsed_verdicts_count_wrong_and_do_not_flip(tmp_path):
    _, cat, ctx = _workspace(tmp_path)
    canary = tmp_path / "canary.jsonl"
    canary.write_text("".join(json.dumps(it) + "\n" for it in load_canary(CANARY)[:3]))
    ctx.cfg = load_config(None, [f"workspace={tmp_path / 'ws'}",
                                 f"judge.canary_file={canary}", "progress=false"])
    replies = iter(["tie [[C]]", "no verdict here", "[[A]]",    # shown good first
                    "tie [[C]]", "[[A]]", "[[A]]"])             # shown bad first
    ctx._backend = type("B", (), {"generate": lambda self, m, convs, n=1, **kw: [
        [Generation(next(replies), "stop", 1, 1)] for _ in convs]})()
    model, judgments = _round(cat, tmp_path, 1)
    version = pipeline.canary(ctx, 1, judgments, model)
    rows = cat.rows("canary", version).sort_values(["canary_id", "order_ab"])
    assert list(rows.winner.fillna("-")) == ["-", "-", "bad", "-", "bad", "good"]
    assert list(rows.parsed) == [True, True, True, False, True, True]
    assert "no [[A]]/[[B]]/[[C]] verdict found" in rows.rationale.iloc[3]
    # accuracy: (0.5 + 0.5 + 0 + 0 + 0 + 1) / 6; flips: item 1 tie/tie no, item 2 unparsed
    # (not counted), item 3 bad/good yes -> 1 of 2
    stats = cat.df("SELECT canary_accuracy, canary_flip_rate FROM judge_stats")
    assert stats.canary_accuracy.item() == pytest.approx(2 / 6)
    assert stats.canary_flip_rate.item() == 0.5
    by_round = queries.canary_by_round(cat)
    assert by_round.canary_accuracy.item() == pytest.approx(2 / 6)
    assert by_round.canary_flip_rate.item() == 0.5 and by_round["items"].item() == 3


def test_a_changed_canary_file_is_judged_again_and_an_empty_one_judges_nothing(tmp_path):
    _, cat, ctx = _workspace(tmp_path)
    ctx._backend = judge = Degrading(load_canary(CANARY))
    model, judgments = _round(cat, tmp_path, 1)
    first = pipeline.canary(ctx, 1, judgments, model)
    copy = tmp_path / "canary.jsonl"
    copy.write_text(CANARY.read_text().splitlines()[0] + "\n")
    ctx.cfg = load_config(None, [f"workspace={tmp_path / 'ws'}",
                                 f"judge.canary_file={copy}", "progress=false"])
    second = pipeline.canary(ctx, 1, judgments, model)
    assert second != first and cat.get(second).row_count == 2
    assert judge.calls == [("m1", 24), ("m1", 2)]
    ctx.cfg = load_config(None, [f"workspace={tmp_path / 'ws'}", "judge.canary_file=",
                                 "progress=false"])
    assert pipeline.canary(ctx, 1, judgments, model) == ""
    assert len(judge.calls) == 2


def test_canary_by_round_on_a_catalog_without_the_table_is_empty(tmp_path):
    import duckdb

    path = tmp_path / "old.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE versions (version_id VARCHAR)")
    with duckdb.connect(str(path), read_only=True) as con:
        assert queries.canary_by_round(con).empty
        assert list(queries.canary_by_round(con).columns) == queries.CANARY_COLUMNS
        assert list(queries.train_curves(con).columns) == queries.TRAIN_CURVE_COLUMNS
