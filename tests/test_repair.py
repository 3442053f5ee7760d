"""Repairs (`pairs.repair`): answers rewritten by program so that they pass their constraints,
and the pairs they make where a prompt's candidates all fail."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from flywheel.config import PairsConfig, load_config, shaping
from flywheel.constraints import REPAIRS, repair, verify
from flywheel.errors import FlywheelError
from flywheel.stages.pairs import repair_pairs
from flywheel.stages.prompts import PROMPT_COLUMNS
from flywheel.stages.train import verified_passes
from tests.test_pairs import judgments_df, pt, samples_df, smp, ver

ANSWER = "The Sun is a star, and it is hot. It gives us light. Plants need it to grow."


@pytest.mark.parametrize("constraint,expected", [
    ({"type": "lowercase"}, "the sun is a star, and it is hot. it gives us light. plants need it "
                            "to grow."),
    ({"type": "uppercase"}, ANSWER.upper()),
    ({"type": "no_commas"}, ANSWER.replace(",", "")),
    ({"type": "ends_with", "phrase": "Done."}, ANSWER + " Done."),
    ({"type": "starts_with", "phrase": "Yes"}, "Yes " + ANSWER),
    ({"type": "max_sentences", "n": 2}, "The Sun is a star, and it is hot. It gives us light."),
    ({"type": "max_words", "n": 5}, "The Sun is a star."),
    ({"type": "bullet_count", "n": 2},
     "- The Sun is a star, and it is hot.\n- It gives us light."),
    ({"type": "json_keys", "keys": ["name", "reason"]},
     json.dumps({"name": "The Sun is a star, and it is hot.",
                 "reason": "It gives us light. Plants need it to grow."})),
    ({"type": "json_keys", "keys": ["answer"]}, json.dumps({"answer": ANSWER})),
    ({"type": "excludes_keyword", "keyword": "sun"},
     "The is a star, and it is hot. It gives us light. Plants need it to grow."),
])
def test_each_repair_makes_the_answer_pass(constraint, expected):
    fixed = repair(ANSWER, [constraint])
    assert fixed == expected
    assert [r.passed for r in verify(fixed, [constraint])] == [True]
    assert [r.passed for r in verify(ANSWER, [constraint])] == [False]


def test_no_repair_where_the_edit_would_need_new_content_or_constraints_conflict():
    assert set(REPAIRS) == {"json_keys", "bullet_count", "max_sentences", "max_words",
                            "excludes_keyword", "no_commas", "ends_with", "starts_with",
                            "lowercase", "uppercase"}
    assert repair(ANSWER, [{"type": "contains_keyword", "keyword": "moon"}]) is None
    assert repair("Two words.", [{"type": "min_words", "n": 10}]) is None
    # capitals everywhere, yet ending in "Done.": one repair undoes the other
    assert repair(ANSWER, [{"type": "uppercase"}, {"type": "ends_with", "phrase": "Done."}]) is None
    # three bullets from two sentences: no edit
    assert repair("One thing. Another.", [{"type": "bullet_count", "n": 3}]) is None
    assert repair("1 2 3", [{"type": "lowercase"}]) is None  # no letters to lower-case
    # an answer that already passes needs no repair: no pair from it
    assert repair("all lowercase.", [{"type": "lowercase"}]) is None


def test_repairs_keep_the_answers_own_structure():
    bullets = {"type": "bullet_count", "n": 3}
    # a numbered list becomes bullets, item by item (not cut at "1.")
    assert repair("1. Grapefruit\n2. Avian\n3. Sour cherries\n4. Figs", [bullets]) == (
        "- Grapefruit\n- Avian\n- Sour cherries")
    assert repair("Red\nGreen\nBlue", [bullets]) == "- Red\n- Green\n- Blue"
    # an answer cut off mid-sentence loses the unfinished tail before the closing phrase
    ends = {"type": "ends_with", "phrase": "Thank you."}
    assert repair("A filter cleans water. It holds carbon and advanced", [ends]) == (
        "A filter cleans water. Thank you.")
    assert repair("Cut short with no full stop", [ends]) == "Cut short with no full stop Thank you."


def test_several_constraints_are_repaired_together_and_types_can_be_limited():
    both = [{"type": "max_sentences", "n": 1}, {"type": "lowercase"}]
    assert repair(ANSWER, both) == "the sun is a star, and it is hot."
    assert repair(ANSWER, both, types=["lowercase"]) is None  # max_sentences not allowed
    assert repair(ANSWER, [{"type": "lowercase"}], types=["lowercase"]) == ANSWER.lower()


def _prompts(rows):
    return pd.DataFrame([{"prompt_id": pid, "text": f"prompt {pid}", "gold": None,
                          "constraints": json.dumps(c), "category": None, "source": "seed",
                          "source_ref": None, "examples": [], "raw": None}
                         for pid, c in rows], columns=PROMPT_COLUMNS)


def test_repair_pairs_only_where_every_candidate_fails():
    low = [{"type": "lowercase"}]
    prompts = _prompts([("p_fail", low), ("p_split", low), ("p_free", []),
                        ("p_kw", [{"type": "contains_keyword", "keyword": "moon"}])])
    samples = samples_df(
        smp("s1", "p_fail", "The Sun is hot.", idx=0), smp("s2", "p_fail", "Rain Falls.", idx=1),
        smp("s3", "p_split", "all lowercase.", idx=0), smp("s4", "p_split", "Not so.", idx=1),
        smp("s5", "p_free", "Anything.", idx=0), smp("s6", "p_kw", "No keyword.", idx=0),
        smp("g1", "p_fail", "Greedy Answer.", greedy=True))
    judgments = judgments_df(
        ver("j1", "s1", "p_fail", False), ver("j2", "s2", "p_fail", False),
        pt("j1p", "s1", "p_fail", 2.0), pt("j2p", "s2", "p_fail", 4.0),
        ver("j3", "s3", "p_split", True), ver("j4", "s4", "p_split", False),
        pt("j5p", "s5", "p_free", 3.0), ver("j6", "s6", "p_kw", False))
    rows = repair_pairs(prompts, samples, judgments, list(REPAIRS), "salt")
    # p_fail only: its best candidate by judge score (s2), lower-cased; p_split has a pass,
    # p_free no constraint, p_kw no repair for its type; the greedy answer is never used
    assert rows[["prompt_id", "chosen_id", "rejected_id", "chosen_text", "rejected_text",
                 "chosen_score", "rejected_score", "margin", "rule"]].to_dict("records") == [
        {"prompt_id": "p_fail", "chosen_id": "repair:s2", "rejected_id": "s2",
         "chosen_text": "rain falls.", "rejected_text": "Rain Falls.", "chosen_score": 1.0,
         "rejected_score": 0.0, "margin": 1.0, "rule": "repair"}]
    assert list(rows.judgment_ids.iloc[0]) == ["j2", "j2p"]
    again = repair_pairs(prompts, samples, judgments, list(REPAIRS), "salt")
    assert list(again.pair_id) == list(rows.pair_id)  # stable ids
    assert repair_pairs(prompts, samples, judgments, ["uppercase"], "salt").empty
    # the SFT step counts repaired answers among the verified passes
    assert verified_passes(rows).to_dict("records") == [
        {"prompt_id": "p_fail", "text": "rain falls."}]


def test_repair_pairs_follow_the_length_ratios():
    prompts = _prompts([("p_end", [{"type": "ends_with", "phrase": "That is all I can say."}]),
                        ("p_cut", [{"type": "max_words", "n": 3}])])
    samples = samples_df(smp("s1", "p_end", "Hi.", idx=0),
                         smp("s2", "p_cut", "One two three four five six seven.", idx=0))
    judgments = judgments_df(ver("j1", "s1", "p_end", False), ver("j2", "s2", "p_cut", False))
    every = repair_pairs(prompts, samples, judgments, list(REPAIRS), "salt")
    assert list(every.prompt_id) == ["p_cut", "p_end"]
    # the appended phrase makes p_end's repair 8x its answer; the cut one is shorter
    capped = repair_pairs(prompts, samples, judgments, list(REPAIRS), "salt",
                          cfg=PairsConfig(max_length_ratio=2.0, min_length_ratio=0.9))
    assert list(capped.prompt_id) == ["p_cut"]  # max_words bounds length: no floor there
    assert list(capped.chosen_text) == ["One two three."]


def test_the_setting_is_checked_and_off_by_default(tmp_path):
    cfg = load_config(None, [])
    assert cfg.pairs.repair == [] and "repair" not in shaping(cfg.pairs)
    on = load_config(None, ["pairs.repair=[lowercase, ends_with]"])
    assert on.pairs.repair == ["lowercase", "ends_with"]
    assert shaping(on.pairs)["repair"] == ["lowercase", "ends_with"]
    with pytest.raises(FlywheelError) as err:
        load_config(None, ["pairs.repair=[lowercase, min_words]"])
    assert "pairs.repair: no repair for 'min_words'; types with one: json_keys" in (
        str(err.value) + " ".join(err.value.details))


def test_the_pairs_stage_adds_repaired_pairs_and_lineage_shows_them(tmp_path, capsys):
    """Through `pipeline.build_pairs` on a real catalog: the repair pair next to the verifier
    pair, counted by rule and type, `repair` in the fingerprint only when set, and `flywheel
    lineage PAIR` showing the repaired answer as a chosen answer that is not a sample."""
    from flywheel import pipeline
    from flywheel.cli import main
    from flywheel.stages.judging import JUDGMENT_COLUMNS, verifier_judgments
    from flywheel.stages.sampling import SAMPLE_COLUMNS

    cfg_ = load_config(None, [f"workspace={tmp_path / 'ws'}", "progress=false",
                              "pairs.repair=[uppercase]"])
    ctx = pipeline.context(cfg_)
    cat = ctx.catalog
    cat.init()
    prompts = _prompts([("p_low", [{"type": "lowercase"}]), ("p_up", [{"type": "uppercase"}])])
    pv = cat.commit(kind="prompts", run_id="r", round=0, parents=[], params={}, fp="p" * 20,
                    tables={"prompts": prompts}).version_id
    s = pd.DataFrame([smp("s1", "p_low", "hi there"), smp("s2", "p_low", "Hi There"),
                      smp("s4", "p_up", "yo"), smp("s5", "p_up", "Yo")], columns=SAMPLE_COLUMNS)
    sv = cat.commit(kind="samples", run_id="r", round=1, parents=[pv], params={},
                    fp="s" * 20, tables={"samples": s}).version_id
    j = pd.DataFrame(verifier_judgments(prompts, s, "salt"), columns=JUDGMENT_COLUMNS)
    jv = cat.commit(kind="judgments", run_id="r", round=1, parents=[sv], params={},
                    fp="j" * 20, tables={"judgments": j}).version_id
    v = pipeline.build_pairs(ctx, 1, jv, sv, [pv])
    params = cat.get(v).params
    assert params["repair"] == ["uppercase"]
    assert params["rules"] == {"verifier": 1, "repair": 1}
    assert params["by_type"] == {
        "lowercase": {"prompts": 1, "with_pair": 1, "pairs": 1},
        "uppercase": {"prompts": 1, "with_pair": 1, "pairs": 1}}
    rows = cat.rows("pairs", v).sort_values("rule")
    fixed = rows[rows.rule == "repair"].iloc[0]
    # both fail; the tie is broken by sample id: s4 ("yo") is repaired
    assert (fixed.chosen_id, fixed.rejected_id, fixed.chosen_text, fixed.rejected_text) == (
        "repair:s4", "s4", "YO", "yo")
    capsys.readouterr()
    assert main(["lineage", fixed.pair_id, "--catalog", str(cfg_.catalog_path()),
                 "--json"]) == 0
    out = capsys.readouterr().out
    assert '"repair:s4"' in out and '"YO"' in out and '"model_version": "repair"' in out
