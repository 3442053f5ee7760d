"""Several DPO pairs per prompt (`pairs.per_prompt`): across the verifier split, capped,
deduplicated, each kept by the rules of one pair; and the pairs stage's count, per constraint
type, of the prompts that ended with a pair."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from flywheel.config import PairsConfig
from flywheel.hashing import stable_id
from flywheel.stages.judging import JUDGMENT_COLUMNS
from flywheel.stages.pairs import PAIR_COLUMNS, build_pairs, pairs_by_type
from flywheel.stages.sampling import SAMPLE_COLUMNS

SALT = "fp-multi"


def smp(sid: str, pid: str = "p1", text: str | None = None, *, greedy: bool = False) -> dict:
    return {"sample_id": sid, "prompt_id": pid, "model_version": "m0", "idx": 0,
            "greedy": greedy, "text": text if text is not None else f"answer {sid}",
            "finish_reason": "stop", "prompt_tokens": 5, "completion_tokens": 3,
            "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 16, "seed": 0}


def ver(sid: str, passed: bool, pid: str = "p1", k: int = 0) -> dict:
    return {"judgment_id": f"v_{sid}_{k}", "type": "verifier", "prompt_id": pid,
            "sample_id": sid, "k": k, "judge": "lowercase@1", "method": "verifier",
            "raw": "", "parsed": True, "score": 1.0 if passed else 0.0,
            "verdict": "pass" if passed else "fail"}


def pt(sid: str, score: float, pid: str = "p1") -> dict:
    return {"judgment_id": f"j_{sid}", "type": "pointwise", "prompt_id": pid, "sample_id": sid,
            "k": 0, "judge": "m0", "method": "text", "raw": f"Score: {score}", "parsed": True,
            "score": score}


def both_orders(a: str, b: str, winner: str, pid: str = "p1") -> list[dict]:
    cid = "c_" + "_".join(sorted((a, b)))
    return [{"judgment_id": f"{cid}_{swapped}", "type": "pairwise", "prompt_id": pid,
             "sample_a": x, "sample_b": y, "comparison_id": cid, "swapped": swapped, "k": 0,
             "judge": "m0", "method": "text", "raw": "", "parsed": True,
             "verdict": "A" if winner == x else "B", "winner": winner}
            for x, y, swapped in ((a, b, False), (b, a, True))]


def frames(samples: list[dict], judgments: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    j = pd.DataFrame(judgments, columns=JUDGMENT_COLUMNS)
    j["parsed"] = j["parsed"].astype(bool)
    return pd.DataFrame(samples, columns=SAMPLE_COLUMNS), j


def cfg(per_prompt: int, **kw) -> PairsConfig:
    return PairsConfig(**{"min_margin": 1.0, "min_verifier_margin": 0.01,
                          "require_agreement": True, "max_length_ratio": 0.0,
                          "per_prompt": per_prompt, **kw})


def ids(out: pd.DataFrame) -> list[tuple[str, str]]:
    return list(zip(out.chosen_id, out.rejected_id))


def split_case() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Three passes (LLM scores 5, 4, 3) and three fails (2, 1, 0) of one prompt."""
    names = {"a": (True, 5.0), "b": (True, 4.0), "c": (True, 3.0), "x": (False, 2.0),
             "y": (False, 1.0), "z": (False, 0.0)}
    return frames([smp(f"s_{n}") for n in names],
                  [r for n, (ok, score) in names.items()
                   for r in (ver(f"s_{n}", ok), pt(f"s_{n}", score))])


def test_the_default_is_one_pair_best_against_worst():
    assert PairsConfig().per_prompt == 1
    s, j = split_case()
    out = build_pairs(s, j, PairsConfig(), SALT)
    assert ids(out) == [("s_a", "s_z")]
    assert build_pairs(s, j, cfg(1), SALT).equals(out)


def test_pairs_go_across_the_split_best_against_worst_first_in_the_judges_order():
    s, j = split_case()
    out = build_pairs(s, j, cfg(4), SALT)
    assert list(out.columns) == PAIR_COLUMNS
    # margin 1 for all: the judge's order decides, chosen highest first, rejected lowest first
    assert ids(out) == [("s_a", "s_z"), ("s_a", "s_y"), ("s_a", "s_x"), ("s_b", "s_z")]
    assert set(out.rule) == {"verifier"} and list(out.margin) == [1.0] * 4
    assert list(out.pair_id) == ["pr_" + stable_id(SALT, c, r) for c, r in ids(out)]
    assert list(out.judgment_ids[1]) == ["v_s_a_0", "j_s_a", "v_s_y_0", "j_s_y"]


def test_the_cap_is_every_pass_against_every_fail():
    s, j = split_case()
    out = build_pairs(s, j, cfg(50), SALT)
    assert len(out) == 9 and len(set(ids(out))) == 9
    assert set(out.chosen_id) == {"s_a", "s_b", "s_c"}
    assert set(out.rejected_id) == {"s_x", "s_y", "s_z"}


def test_the_same_texts_are_never_paired_twice():
    s, j = split_case()
    s.loc[s.sample_id == "s_b", "text"] = "answer s_a"  # two passes with the same text
    s.loc[s.sample_id == "s_y", "text"] = " answer s_z\n"  # same text up to white space
    out = build_pairs(s, j, cfg(50), SALT)
    pairs = list(zip(out.chosen_text.str.strip(), out.rejected_text.str.strip()))
    assert len(pairs) == len(set(pairs)) == 4  # {a/b, c} x {x, y/z}
    assert ids(out)[0] == ("s_a", "s_z")
    assert not {"s_b", "s_y"} & (set(out.chosen_id) | set(out.rejected_id))


def test_no_sample_is_chosen_in_one_pair_and_rejected_in_another():
    # pass fractions 1, 0.5, 0 over two constraints: the middle one could be either
    rows = [ver("s_a", True, k=0), ver("s_a", True, k=1), ver("s_m", True, k=0),
            ver("s_m", False, k=1), ver("s_z", False, k=0), ver("s_z", False, k=1)]
    s, j = frames([smp("s_a"), smp("s_m"), smp("s_z")], rows)
    out = build_pairs(s, j, cfg(5), SALT)
    assert ids(out) == [("s_a", "s_z"), ("s_a", "s_m")]
    assert list(out.margin) == [1.0, 0.5]
    assert not set(out.chosen_id) & set(out.rejected_id)


def test_each_pair_keeps_the_length_cap_and_the_margins():
    s, j = split_case()
    s.loc[s.sample_id == "s_z", "text"] = "no"  # every pass is over 3x as long as s_z
    out = build_pairs(s, j, cfg(3, max_length_ratio=3.0), SALT)
    assert ids(out) == [("s_a", "s_y"), ("s_a", "s_x"), ("s_b", "s_y")]
    assert build_pairs(s, j, cfg(3, min_verifier_margin=1.5, min_margin=9.0), SALT).empty


def test_llm_pairs_in_hybrid_mode_need_the_pairwise_judge():
    """Without constraints the LLM decides; in hybrid mode only best vs worst was compared in
    both orders, so with agreement required only that pair is kept; pointwise mode, where no
    comparison exists, keeps every pair over the margin."""
    scores = {"s_a": 9.0, "s_b": 6.0, "s_c": 3.0, "s_d": 0.0}
    s, j = frames([smp(sid) for sid in scores],
                  [pt(sid, v) for sid, v in scores.items()] + both_orders("s_a", "s_d", "s_a"))
    hybrid = build_pairs(s, j, cfg(3), SALT, mode="hybrid")
    assert ids(hybrid) == [("s_a", "s_d")] and list(hybrid.rule) == ["llm+pairwise"]
    loose = build_pairs(s, j, cfg(3, require_agreement=False), SALT, mode="hybrid")
    assert ids(loose) == [("s_a", "s_d"), ("s_a", "s_c"), ("s_b", "s_d")]
    assert list(loose.margin) == [9.0, 6.0, 6.0]
    s2, j2 = frames([smp(sid) for sid in scores], [pt(sid, v) for sid, v in scores.items()])
    assert ids(build_pairs(s2, j2, cfg(3), SALT, mode="pointwise")) == ids(loose)


def test_verifier_pairs_come_before_llm_pairs():
    # s_a and s_b pass, s_c fails; among the passes the LLM separates s_a from s_b
    s, j = frames([smp("s_a"), smp("s_b"), smp("s_c")],
                  [ver("s_a", True), ver("s_b", True), ver("s_c", False), pt("s_a", 5.0),
                   pt("s_b", 1.0), pt("s_c", 3.0)])
    out = build_pairs(s, j, cfg(5, require_agreement=False), SALT, mode="pointwise")
    # s_a over s_b is an LLM pair: it comes after both verifier pairs, and s_b, chosen
    # against s_c, is then never rejected
    assert ids(out) == [("s_a", "s_c"), ("s_b", "s_c")]
    assert list(out.rule) == ["verifier", "verifier"]


def test_several_pairs_are_deterministic_and_per_prompt():
    s, j = split_case()
    s2, j2 = frames([smp("t_a", "p0"), smp("t_b", "p0")],
                    [ver("t_a", True, "p0"), ver("t_b", False, "p0")])
    both_s, both_j = pd.concat([s, s2], ignore_index=True), pd.concat([j, j2],
                                                                       ignore_index=True)
    out = build_pairs(both_s, both_j, cfg(2), SALT)
    shuffled = build_pairs(both_s.sample(frac=1, random_state=3),
                           both_j.sample(frac=1, random_state=4), cfg(2), SALT)
    assert out.drop(columns="judgment_ids").equals(shuffled.drop(columns="judgment_ids"))
    assert [sorted(x) for x in out.judgment_ids] == [sorted(x) for x in shuffled.judgment_ids]
    assert ids(out) == [("t_a", "t_b"), ("s_a", "s_z"), ("s_a", "s_y")]
    assert list(out.prompt_id) == ["p0", "p1", "p1"]


# -- the per-type count of prompts that ended with a pair --------------------------------------
def prompts_df(rows: dict[str, list[dict]]) -> pd.DataFrame:
    return pd.DataFrame([{"prompt_id": pid, "text": pid, "constraints": json.dumps(c)}
                         for pid, c in rows.items()])


def test_pairs_by_type_counts_prompts_with_a_pair():
    prompts = prompts_df({"p1": [{"type": "lowercase"}],
                          "p2": [{"type": "lowercase"}, {"type": "max_words", "n": 5}],
                          "p3": [{"type": "max_words", "n": 9}], "p4": [],
                          "p9": [{"type": "no_commas"}]})  # not sampled: not counted
    s = pd.DataFrame([smp(f"s_{p}{i}", p) for p in ("p1", "p2", "p3", "p4") for i in (0, 1)]
                     + [smp("g_p3", "p3", greedy=True)], columns=SAMPLE_COLUMNS)
    pairs = pd.DataFrame([{"prompt_id": "p2"}, {"prompt_id": "p2"}, {"prompt_id": "p4"}],
                         columns=PAIR_COLUMNS)
    assert pairs_by_type(prompts, s, pairs) == {
        "(none)": {"prompts": 1, "with_pair": 1, "pairs": 1},
        "lowercase": {"prompts": 2, "with_pair": 1, "pairs": 2},
        "max_words": {"prompts": 2, "with_pair": 1, "pairs": 2}}
    assert pairs_by_type(prompts, s, pairs.iloc[:0]) == {
        "(none)": {"prompts": 1, "with_pair": 0, "pairs": 0},
        "lowercase": {"prompts": 2, "with_pair": 0, "pairs": 0},
        "max_words": {"prompts": 2, "with_pair": 0, "pairs": 0}}


@pytest.mark.parametrize("per_prompt", [1, 3])
def test_the_pairs_stage_records_prompts_with_a_pair_per_type(tmp_path, per_prompt):
    """Through `pipeline.build_pairs`: per_prompt enters the fingerprint only when not 1, and
    the version's params hold the per-type counts."""
    from flywheel import pipeline
    from flywheel.config import load_config
    from flywheel.stages.judging import verifier_judgments

    cfg_ = load_config(None, [f"workspace={tmp_path / 'ws'}", "progress=false",
                              f"pairs.per_prompt={per_prompt}"])
    ctx = pipeline.context(cfg_)
    cat = ctx.catalog
    cat.init()
    prompts = pd.DataFrame([
        {"prompt_id": "p_low", "text": "say hi", "gold": None,
         "constraints": json.dumps([{"type": "lowercase"}]), "category": None,
         "source": "seed", "source_ref": "x:1", "examples": [], "raw": None},
        {"prompt_id": "p_up", "text": "say yo", "gold": None,
         "constraints": json.dumps([{"type": "uppercase"}]), "category": None,
         "source": "seed", "source_ref": "x:2", "examples": [], "raw": None}])
    pv = cat.commit(kind="prompts", run_id="r", round=0, parents=[], params={}, fp="p" * 20,
                    tables={"prompts": prompts}).version_id
    s = pd.DataFrame([smp("s1", "p_low", "hi there"), smp("s2", "p_low", "Hi There"),
                      smp("s3", "p_low", "HI"), smp("s4", "p_up", "yo"),
                      smp("s5", "p_up", "Yo")], columns=SAMPLE_COLUMNS)
    sv = cat.commit(kind="samples", run_id="r", round=1, parents=[pv], params={},
                    fp="s" * 20, tables={"samples": s}).version_id
    j = pd.DataFrame(verifier_judgments(prompts, s, "salt"), columns=JUDGMENT_COLUMNS)
    jv = cat.commit(kind="judgments", run_id="r", round=1, parents=[sv], params={},
                    fp="j" * 20, tables={"judgments": j}).version_id
    v = pipeline.build_pairs(ctx, 1, jv, sv, [pv])
    params = cat.get(v).params
    assert ("per_prompt" in params) == (per_prompt != 1)
    rows = cat.rows("pairs", v)
    # s2 and s3 both fail: the id orders them, as for one pair (s2 is the worst)
    expected = {("s1", "s2")} if per_prompt == 1 else {("s1", "s2"), ("s1", "s3")}
    assert set(ids(rows)) == expected
    assert params["rules"] == {"verifier": len(expected)}
    assert params["by_type"] == {
        "lowercase": {"prompts": 1, "with_pair": 1, "pairs": len(expected)},
        "uppercase": {"prompts": 1, "with_pair": 0, "pairs": 0}}
