"""Tests for flywheel.stages.pairs: best-vs-worst DPO pairs and SPIN pairs, on hand-made frames."""

from __future__ import annotations

import pandas as pd
import pytest

from flywheel.catalog import stable_id
from flywheel.config import PairsConfig
from flywheel.stages.judging import JUDGMENT_COLUMNS
from flywheel.stages.pairs import (
    PAIR_COLUMNS,
    Standing,
    allowed_chars,
    best_and_worst,
    build_pairs,
    consistent_wins,
    length_bounds,
    spin_pairs,
    standings,
)
from flywheel.stages.sampling import SAMPLE_COLUMNS

SALT = "fp-pairs"


# ------------------------------------------------------------------ builders


def cfg(**kw) -> PairsConfig:
    base = {"min_margin": 1.0, "min_verifier_margin": 0.01, "require_agreement": True,
            "max_length_ratio": 0.0}
    base.update(kw)
    return PairsConfig(**base)


def smp(sid: str, pid: str, text: str | None = None, *, greedy: bool = False,
        idx: int = 0) -> dict:
    return {"sample_id": sid, "prompt_id": pid, "model_version": "model-r0-abc",
            "idx": -1 if greedy else idx, "greedy": greedy,
            "text": text if text is not None else f"answer {sid}", "finish_reason": "stop",
            "prompt_tokens": 7, "completion_tokens": 3, "temperature": 0.7, "top_p": 0.9,
            "max_new_tokens": 32, "seed": 0}


def samples_df(*rows: dict) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=SAMPLE_COLUMNS)


def ver(jid: str, sid: str, pid: str, passed: bool, k: int = 0) -> dict:
    return {"judgment_id": jid, "type": "verifier", "prompt_id": pid, "sample_id": sid, "k": k,
            "judge": "max_words@1", "method": "verifier", "raw": "detail", "parsed": True,
            "score": 1.0 if passed else 0.0, "verdict": "pass" if passed else "fail"}


def pt(jid: str, sid: str, pid: str, score: float | None, *, parsed: bool = True,
       k: int = 0) -> dict:
    return {"judgment_id": jid, "type": "pointwise", "prompt_id": pid, "sample_id": sid, "k": k,
            "judge": "model-r0-abc", "method": "text", "raw": f"Score: {score}",
            "parsed": parsed, "error": None if parsed else "no 'Score: <n>' line found",
            "score": score}


def pw(jid: str, cid: str, pid: str, a: str, b: str, swapped: bool, verdict: str | None, *,
       parsed: bool = True) -> dict:
    winner = {"A": a, "B": b}.get(verdict) if parsed else None
    return {"judgment_id": jid, "type": "pairwise", "prompt_id": pid, "sample_a": a,
            "sample_b": b, "comparison_id": cid, "swapped": swapped, "k": 0,
            "judge": "model-r0-abc", "method": "text", "raw": f"[[{verdict}]]",
            "parsed": parsed, "verdict": verdict if parsed else None, "winner": winner}


def judgments_df(*rows: dict) -> pd.DataFrame:
    df = pd.DataFrame(list(rows), columns=JUDGMENT_COLUMNS)
    df["parsed"] = df["parsed"].astype(bool)
    return df


def both_orders(prefix: str, pid: str, a: str, b: str, first: str | None,
                second: str | None) -> list[dict]:
    """The comparison (a, b): `first` is the verdict with a shown first, `second` swapped."""
    cid = f"c_{prefix}"
    return [pw(f"{prefix}_ab", cid, pid, a, b, False, first),
            pw(f"{prefix}_ba", cid, pid, b, a, True, second)]


# ------------------------------------------------------------------ verifier-decided


def test_verifier_decides_with_pass_fraction_margin() -> None:
    s = samples_df(smp("s_a", "p1"), smp("s_b", "p1"))
    j = judgments_df(
        ver("v_a0", "s_a", "p1", True, 0), ver("v_a1", "s_a", "p1", False, 1),
        ver("v_b0", "s_b", "p1", True, 0), ver("v_b1", "s_b", "p1", True, 1),
        # the LLM prefers s_a, but the verifiers rank first
        pt("j_a", "s_a", "p1", 5.0), pt("j_b", "s_b", "p1", 1.0),
    )
    out = build_pairs(s, j, cfg(), SALT)
    assert list(out.columns) == PAIR_COLUMNS
    assert len(out) == 1
    row = out.iloc[0]
    assert row.prompt_id == "p1"
    assert (row.chosen_id, row.rejected_id) == ("s_b", "s_a")
    assert (row.chosen_text, row.rejected_text) == ("answer s_b", "answer s_a")
    assert row.rule == "verifier"
    assert row.margin == pytest.approx(0.5)
    assert (row.chosen_score, row.rejected_score) == (1.0, 0.5)
    assert row.min_margin == 0.01
    assert list(row.judgment_ids) == ["v_b0", "v_b1", "j_b", "v_a0", "v_a1", "j_a"]
    assert row.pair_id == "pr_" + stable_id(SALT, "s_b", "s_a")


def test_verifier_picks_highest_and_lowest_of_three() -> None:
    s = samples_df(smp("s_a", "p1"), smp("s_b", "p1"), smp("s_c", "p1"))
    j = judgments_df(ver("v_a", "s_a", "p1", True), ver("v_b", "s_b", "p1", False),
                     ver("v_c", "s_c", "p1", True),
                     pt("j_a", "s_a", "p1", 2.0), pt("j_b", "s_b", "p1", 5.0),
                     pt("j_c", "s_c", "p1", 4.0))
    [row] = build_pairs(s, j, cfg(), SALT).itertuples()
    # verifier ties between s_a and s_c are broken by the LLM score (s_c: 4 > 2)
    assert (row.chosen_id, row.rejected_id, row.rule, row.margin) == ("s_c", "s_b", "verifier",
                                                                      1.0)


def test_verifier_margin_below_minimum_falls_back_to_llm() -> None:
    s = samples_df(smp("s_a", "p1"), smp("s_b", "p1"))
    j = judgments_df(ver("v_a0", "s_a", "p1", True, 0), ver("v_a1", "s_a", "p1", False, 1),
                     ver("v_b0", "s_b", "p1", True, 0), ver("v_b1", "s_b", "p1", True, 1),
                     pt("j_a", "s_a", "p1", 1.0), pt("j_b", "s_b", "p1", 4.0))
    [row] = build_pairs(s, j, cfg(min_verifier_margin=0.6), SALT).itertuples()
    assert (row.chosen_id, row.rejected_id, row.rule) == ("s_b", "s_a", "llm")
    assert row.margin == pytest.approx(3.0)
    assert (row.chosen_score, row.rejected_score, row.min_margin) == (4.0, 1.0, 1.0)


# ------------------------------------------------------------------ verifier tie -> LLM


def _tied(score_a: list[float], score_b: list[float]) -> tuple[pd.DataFrame, pd.DataFrame]:
    s = samples_df(smp("s_a", "p1"), smp("s_b", "p1"))
    rows = [ver("v_a", "s_a", "p1", True), ver("v_b", "s_b", "p1", True)]
    rows += [pt(f"j_a{k}", "s_a", "p1", x, k=k) for k, x in enumerate(score_a)]
    rows += [pt(f"j_b{k}", "s_b", "p1", x, k=k) for k, x in enumerate(score_b)]
    return s, judgments_df(*rows)


def test_verifier_tie_llm_decides_with_mean_score() -> None:
    s, j = _tied([4.0, 5.0], [3.0])
    out = build_pairs(s, j, cfg(), SALT)
    assert len(out) == 1
    row = out.iloc[0]
    assert (row.chosen_id, row.rejected_id, row.rule) == ("s_a", "s_b", "llm")
    assert row.margin == pytest.approx(1.5)
    assert (row.chosen_score, row.rejected_score) == (4.5, 3.0)
    assert row.min_margin == 1.0
    assert list(row.judgment_ids) == ["v_a", "j_a0", "j_a1", "v_b", "j_b0"]


@pytest.mark.parametrize(("a", "b", "min_margin", "kept"), [
    ([4.0], [3.0], 1.0, True),    # margin == min_margin: kept
    ([3.5], [3.0], 1.0, False),   # 0.5 < 1.0: dropped
    ([3.5], [3.0], 0.5, True),
    ([3.0], [3.0], 0.0, False),   # a zero margin is never a preference
])
def test_llm_min_margin(a: list[float], b: list[float], min_margin: float, kept: bool) -> None:
    s, j = _tied(a, b)
    out = build_pairs(s, j, cfg(min_margin=min_margin), SALT)
    assert len(out) == (1 if kept else 0)


def test_no_constraints_means_llm_only() -> None:
    s = samples_df(smp("s_a", "p1"), smp("s_b", "p1"))
    j = judgments_df(pt("j_a", "s_a", "p1", 2.0), pt("j_b", "s_b", "p1", 5.0))
    [row] = build_pairs(s, j, cfg(), SALT).itertuples()
    assert (row.chosen_id, row.rejected_id, row.rule, row.margin) == ("s_b", "s_a", "llm", 3.0)


# ------------------------------------------------------------------ unparseable judgments


def test_unparsed_judgment_never_becomes_a_score() -> None:
    s = samples_df(smp("s_a", "p1"), smp("s_b", "p1"))
    j = judgments_df(pt("j_a", "s_a", "p1", 4.0), pt("j_b", "s_b", "p1", 2.0, k=0),
                     # an unparsed output carrying a score-like value must be ignored
                     pt("j_bad", "s_b", "p1", 5.0, parsed=False, k=1))
    [st_a, st_b] = standings(s, j)["p1"]
    assert st_b == Standing("s_b", None, 2.0, ("j_b",))
    assert st_a == Standing("s_a", None, 4.0, ("j_a",))
    [row] = build_pairs(s, j, cfg(), SALT).itertuples()
    assert (row.chosen_id, row.rejected_score, row.margin) == ("s_a", 2.0, 2.0)
    assert "j_bad" not in list(row.judgment_ids)


def test_sample_with_only_unparsed_judgment_gets_no_score() -> None:
    s = samples_df(smp("s_a", "p1"), smp("s_c", "p1"))
    j = judgments_df(pt("j_a", "s_a", "p1", 4.0),
                     pt("j_c", "s_c", "p1", 0.0, parsed=False))
    got = standings(s, j)["p1"]
    assert got == [Standing("s_a", None, 4.0, ("j_a",)), Standing("s_c", None, None, ())]
    assert best_and_worst(got) is None
    assert build_pairs(s, j, cfg(min_margin=0.0), SALT).empty


# ------------------------------------------------------------------ pairwise agreement


def _agreement_case(first: str | None, second: str | None, *, parsed_second: bool = True
                    ) -> tuple[pd.DataFrame, pd.DataFrame]:
    s = samples_df(smp("s_a", "p1"), smp("s_b", "p1"))
    pair = both_orders("ab", "p1", "s_a", "s_b", first, second)
    if not parsed_second:
        pair[1] = pw("ab_ba", "c_ab", "p1", "s_b", "s_a", True, None, parsed=False)
    j = judgments_df(pt("j_a", "s_a", "p1", 5.0), pt("j_b", "s_b", "p1", 2.0), *pair)
    return s, j


def test_agreement_in_both_orders_keeps_llm_pair() -> None:
    s, j = _agreement_case("A", "B")  # s_a wins shown first and shown second
    [row] = build_pairs(s, j, cfg(), SALT).itertuples()
    assert (row.chosen_id, row.rejected_id, row.rule) == ("s_a", "s_b", "llm+pairwise")
    assert row.margin == 3.0
    assert list(row.judgment_ids) == ["j_a", "j_b", "ab_ab", "ab_ba"]


@pytest.mark.parametrize(("first", "second", "parsed_second"), [
    ("A", "A", True),   # position bias: each order picks whichever is shown first
    ("B", "B", True),   # each order picks the one shown second
    ("C", "C", True),   # tie in both orders
    ("A", "C", True),   # agreement in one order only
    ("B", "A", True),   # both orders pick the worse sample
    ("A", None, False),  # the swapped order is unparseable
])
def test_disagreement_drops_llm_pair(first: str, second: str | None,
                                     parsed_second: bool) -> None:
    s, j = _agreement_case(first, second, parsed_second=parsed_second)
    assert build_pairs(s, j, cfg(require_agreement=True), SALT).empty
    [row] = build_pairs(s, j, cfg(require_agreement=False), SALT).itertuples()
    assert (row.chosen_id, row.rejected_id, row.rule) == ("s_a", "s_b", "llm")
    assert list(row.judgment_ids) == ["j_a", "j_b", "ab_ab", "ab_ba"]


def test_agreement_not_needed_for_verifier_decided_pair() -> None:
    s = samples_df(smp("s_a", "p1"), smp("s_b", "p1"))
    j = judgments_df(ver("v_a", "s_a", "p1", True), ver("v_b", "s_b", "p1", False),
                     *both_orders("ab", "p1", "s_a", "s_b", "A", "A"))
    [row] = build_pairs(s, j, cfg(require_agreement=True), SALT).itertuples()
    assert (row.chosen_id, row.rule, list(row.judgment_ids)) == ("s_a", "verifier",
                                                                 ["v_a", "v_b"])


# ------------------------------------------------------------------ length cap


@pytest.mark.parametrize(("ratio", "kept"), [(0.0, True), (2.0, False), (9.9, False),
                                             (10.0, True), (12.0, True)])
def test_max_length_ratio(ratio: float, kept: bool) -> None:
    s = samples_df(smp("s_a", "p1", "x" * 100), smp("s_b", "p1", "y" * 10))
    j = judgments_df(pt("j_a", "s_a", "p1", 5.0), pt("j_b", "s_b", "p1", 1.0))
    out = build_pairs(s, j, cfg(max_length_ratio=ratio), SALT)
    assert list(out.chosen_id) == (["s_a"] if kept else [])


def test_length_cap_does_not_drop_shorter_chosen() -> None:
    s = samples_df(smp("s_a", "p1", "x" * 10), smp("s_b", "p1", "y" * 100))
    j = judgments_df(pt("j_a", "s_a", "p1", 5.0), pt("j_b", "s_b", "p1", 1.0))
    assert list(build_pairs(s, j, cfg(max_length_ratio=2.0), SALT).chosen_id) == ["s_a"]


@pytest.mark.parametrize(("ratio", "kept"), [
    (0.0, True), (0.05, True), (0.1, True), (0.11, False), (0.5, False)])
def test_min_length_ratio_drops_much_shorter_chosen(ratio: float, kept: bool) -> None:
    s = samples_df(smp("s_a", "p1", "x" * 10), smp("s_b", "p1", "y" * 100))
    j = judgments_df(ver("j_a", "s_a", "p1", True), ver("j_b", "s_b", "p1", False))
    out = build_pairs(s, j, cfg(min_length_ratio=ratio), SALT)
    assert list(out.chosen_id) == (["s_a"] if kept else [])


TEN_WORDS = "one two three four five six seven eight nine ten."  # 50 characters


@pytest.mark.parametrize(("chosen", "bound", "kept"), [
    ("one two three.", {"type": "max_words", "n": 5}, True),  # 14 >= 0.5 * 50 * 5/10
    ("one two.", {"type": "max_words", "n": 5}, False),  # 8 < 12.5: shorter than asked
    ("one two.", {"type": "max_words", "n": 2}, True),  # 8 >= 0.5 * 50 * 2/10
    ("one two three.", {"type": "max_words", "n": 20}, False),  # the bound is not broken
    ("one two three.", {"type": "max_sentences", "n": 1}, False),  # 1 sentence: not broken
])
def test_min_length_ratio_allows_for_an_upper_length_bound(chosen: str, bound: dict,
                                                           kept: bool) -> None:
    s = samples_df(smp("s_a", "p1", chosen), smp("s_b", "p1", TEN_WORDS))
    j = judgments_df(ver("j_a", "s_a", "p1", True), ver("j_b", "s_b", "p1", False))
    out = build_pairs(s, j, cfg(min_length_ratio=0.5), SALT, bounds={"p1": (bound,)})
    assert list(out.chosen_id) == (["s_a"] if kept else [])


def test_allowed_chars_scales_by_the_tightest_broken_bound() -> None:
    text = "A b c. D e f. G h i. J k l."  # 12 words, 4 sentences, 27 characters
    assert allowed_chars(text) == 27
    assert allowed_chars(text, ({"type": "max_sentences", "n": 2},)) == 13.5
    assert allowed_chars(text, ({"type": "max_sentences", "n": 2},
                                {"type": "max_words", "n": 3})) == 27 * 3 / 12
    assert allowed_chars(text, ({"type": "max_words", "n": 12},)) == 27


def test_min_length_ratio_with_several_pairs_keeps_the_long_enough_pass() -> None:
    s = samples_df(smp("s_short", "p1", "x" * 10, idx=0), smp("s_long", "p1", "z" * 80, idx=1),
                   smp("s_fail", "p1", "y" * 100, idx=2))
    j = judgments_df(ver("j1", "s_short", "p1", True), ver("j2", "s_long", "p1", True),
                     ver("j3", "s_fail", "p1", False))
    out = build_pairs(s, j, cfg(min_length_ratio=0.5, per_prompt=3), SALT)
    assert list(zip(out.chosen_id, out.rejected_id)) == [("s_long", "s_fail")]
    both = build_pairs(s, j, cfg(per_prompt=3), SALT)
    assert sorted(both.chosen_id) == ["s_long", "s_short"]


def test_length_bounds_are_a_prompts_upper_length_constraints() -> None:
    prompts = pd.DataFrame({"prompt_id": ["p_words", "p_sent", "p_min", "p_low", "p_none"],
                            "constraints": [
                                '[{"type": "max_words", "n": 20}]',
                                [{"type": "lowercase"}, {"type": "max_sentences", "n": 2}],
                                '[{"type": "min_words", "n": 50}]', '[{"type": "lowercase"}]',
                                None]})
    assert length_bounds(prompts) == {"p_words": ({"type": "max_words", "n": 20},),
                                      "p_sent": ({"type": "max_sentences", "n": 2},)}


# ------------------------------------------------------------------ shape of the input


def test_single_sample_and_greedy_samples_give_no_pair() -> None:
    s = samples_df(smp("s_a", "p1"), smp("s_g", "p1", greedy=True),
                   smp("s_x", "p2"), smp("s_y", "p2"))
    j = judgments_df(pt("j_a", "s_a", "p1", 5.0), pt("j_g", "s_g", "p1", 0.0),
                     pt("j_x", "s_x", "p2", 4.0), pt("j_y", "s_y", "p2", 1.0))
    st = standings(s, j)
    assert [x.sample_id for x in st["p1"]] == ["s_a"]
    assert [x.sample_id for x in st["p2"]] == ["s_x", "s_y"]
    out = build_pairs(s, j, cfg(), SALT)
    assert list(out.prompt_id) == ["p2"]
    assert "s_g" not in set(out.chosen_id) | set(out.rejected_id)


def test_one_pair_per_prompt_sorted_by_prompt() -> None:
    s = samples_df(*(smp(f"s_{p}{i}", p) for p in ("p2", "p1") for i in range(3)))
    j = judgments_df(*(pt(f"j_{p}{i}", f"s_{p}{i}", p, float(i * 2))
                       for p in ("p2", "p1") for i in range(3)))
    out = build_pairs(s, j, cfg(), SALT)
    assert list(out.prompt_id) == ["p1", "p2"]
    assert list(out.chosen_id) == ["s_p12", "s_p22"]
    assert list(out.rejected_id) == ["s_p10", "s_p20"]
    assert list(out.margin) == [4.0, 4.0]


def test_no_samples_gives_empty_frame_with_columns() -> None:
    out = build_pairs(samples_df(), judgments_df(), cfg(), SALT)
    assert out.empty
    assert list(out.columns) == PAIR_COLUMNS


# ------------------------------------------------------------------ pairwise mode


def _round_robin_judgments() -> pd.DataFrame:
    return judgments_df(
        *both_orders("ab", "p1", "s_a", "s_b", "A", "B"),  # s_a wins both orders
        *both_orders("ac", "p1", "s_a", "s_c", "A", "B"),  # s_a wins both orders
        *both_orders("bc", "p1", "s_b", "s_c", "A", "B"),  # s_b wins both orders
    )


def test_consistent_wins_counts_only_wins_in_both_orders() -> None:
    j = judgments_df(*both_orders("ab", "p1", "s_a", "s_b", "A", "B"),
                     *both_orders("ac", "p1", "s_a", "s_c", "A", "A"),  # flip
                     *both_orders("bc", "p1", "s_b", "s_c", "C", "C"),  # tie
                     *both_orders("ad", "p1", "s_a", "s_d", "B", "A"))  # s_d consistently
    assert consistent_wins(j) == {"s_a": 1, "s_d": 1}


def test_pairwise_mode_ranks_by_consistent_wins() -> None:
    s = samples_df(smp("s_a", "p1"), smp("s_b", "p1"), smp("s_c", "p1"))
    j = _round_robin_judgments()
    assert [(x.sample_id, x.llm) for x in standings(s, j, "pairwise")["p1"]] == [
        ("s_a", 2.0), ("s_b", 1.0), ("s_c", 0.0)]
    [row] = build_pairs(s, j, cfg(), SALT, mode="pairwise").itertuples()
    assert (row.chosen_id, row.rejected_id, row.rule) == ("s_a", "s_c", "llm+pairwise")
    assert (row.chosen_score, row.rejected_score, row.margin) == (2.0, 0.0, 2.0)
    assert list(row.judgment_ids) == ["ac_ab", "ac_ba"]


def test_pairwise_mode_margin_below_minimum_dropped() -> None:
    s = samples_df(smp("s_a", "p1"), smp("s_b", "p1"), smp("s_c", "p1"))
    assert build_pairs(s, _round_robin_judgments(), cfg(min_margin=2.5), SALT,
                       mode="pairwise").empty


def test_the_judge_mode_is_given_not_guessed() -> None:
    """Wins in both orders are the LLM score in pairwise mode only: in hybrid mode the same
    judgments without pointwise scores leave nothing to rank (the pairwise judgments there only
    confirm a pointwise order), where guessing from the judgment types would rank by wins."""
    s = samples_df(smp("s_a", "p1"), smp("s_b", "p1"), smp("s_c", "p1"))
    j = _round_robin_judgments()
    assert [x.llm for x in standings(s, j, "hybrid")["p1"]] == [None, None, None]
    assert build_pairs(s, j, cfg(), SALT, mode="hybrid").empty
    assert len(build_pairs(s, j, cfg(), SALT, mode="pairwise")) == 1


def test_pointwise_scores_take_precedence_over_wins() -> None:
    s = samples_df(smp("s_a", "p1"), smp("s_b", "p1"))
    j = judgments_df(pt("j_a", "s_a", "p1", 1.0), pt("j_b", "s_b", "p1", 4.0),
                     *both_orders("ab", "p1", "s_a", "s_b", "A", "B"))
    st = standings(s, j, "hybrid")["p1"]
    assert [(x.sample_id, x.llm) for x in st] == [("s_a", 1.0), ("s_b", 4.0)]
    # the pointwise best (s_b) lost the pairwise comparison in both orders: dropped
    assert build_pairs(s, j, cfg(), SALT).empty


# ------------------------------------------------------------------ SPIN


def prompts_df(rows: list[tuple[str, str | None]]) -> pd.DataFrame:
    return pd.DataFrame([{"prompt_id": p, "text": f"question {p}", "gold": g}
                         for p, g in rows])


def test_spin_pairs() -> None:
    prompts = prompts_df([("p1", "The gold answer."), ("p2", None), ("p3", "Same text"),
                          ("p4", "")])
    s = samples_df(smp("g1", "p1", "My own answer.", greedy=True),
                   smp("s1", "p1", "A sampled answer."),
                   smp("g2", "p2", "Answer without gold.", greedy=True),
                   smp("g3", "p3", "  Same text\n", greedy=True),
                   smp("g4", "p4", "Empty gold.", greedy=True))
    out = spin_pairs(prompts, s, SALT)
    assert list(out.columns) == PAIR_COLUMNS
    assert len(out) == 1
    row = out.iloc[0]
    assert row.pair_id == "pr_" + stable_id(SALT, "gold", "g1")
    assert (row.prompt_id, row.chosen_id, row.rejected_id) == ("p1", "gold:p1", "g1")
    assert (row.chosen_text, row.rejected_text) == ("The gold answer.", "My own answer.")
    assert row.rule == "spin"
    assert row.chosen_score is None and row.rejected_score is None and row.margin is None
    assert row.min_margin is None
    assert list(row.judgment_ids) == []


def test_spin_pairs_sorted_by_prompt_and_ignore_candidates() -> None:
    prompts = prompts_df([("p2", "gold two"), ("p1", "gold one")])
    s = samples_df(smp("g2", "p2", "mine two", greedy=True), smp("x1", "p1", "sampled"),
                   smp("g1", "p1", "mine one", greedy=True))
    out = spin_pairs(prompts, s, SALT)
    assert list(out.prompt_id) == ["p1", "p2"]
    assert list(out.chosen_id) == ["gold:p1", "gold:p2"]
    assert list(out.rejected_id) == ["g1", "g2"]


# ------------------------------------------------------------------ ids


def test_pair_ids_stable_per_salt() -> None:
    s, j = _tied([5.0], [1.0])
    first = build_pairs(s, j, cfg(), "salt-1")
    again = build_pairs(s, j, cfg(), "salt-1")
    other = build_pairs(s, j, cfg(), "salt-2")
    assert list(first.pair_id) == list(again.pair_id) == ["pr_" + stable_id("salt-1", "s_a",
                                                                            "s_b")]
    assert list(other.pair_id) != list(first.pair_id)
    prompts = prompts_df([("p1", "gold")])
    g = samples_df(smp("g1", "p1", "mine", greedy=True))
    assert list(spin_pairs(prompts, g, "salt-1").pair_id) == list(
        spin_pairs(prompts, g, "salt-1").pair_id)
    assert list(spin_pairs(prompts, g, "salt-1").pair_id) != list(
        spin_pairs(prompts, g, "salt-2").pair_id)


def test_equal_verifier_results_prefer_a_finished_answer_as_chosen() -> None:
    # s_a and s_b both pass, s_c and s_d both fail: a finished answer is chosen, a truncated
    # one rejected, whatever the sample ids say
    rows = [smp(sid, "p1") for sid in ("s_a", "s_b", "s_c", "s_d")]
    rows[0]["finish_reason"] = "length"
    rows[3]["finish_reason"] = "length"
    s = samples_df(*rows)
    j = judgments_df(ver("v_a", "s_a", "p1", True), ver("v_b", "s_b", "p1", True),
                     ver("v_c", "s_c", "p1", False), ver("v_d", "s_d", "p1", False))
    p = build_pairs(s, j, cfg(), "salt")
    assert (p.chosen_id.iloc[0], p.rejected_id.iloc[0]) == ("s_b", "s_d")
    assert p.rule.iloc[0] == "verifier"
