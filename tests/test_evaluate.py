"""Tests for flywheel.stages.evaluate: Wilson interval, outcomes, summary and pass rates."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from flywheel.constraints import verify
from flywheel.stages.evaluate import outcome, pass_rates, summarise, wilson

# ------------------------------------------------------------------ wilson


def test_wilson_known_values() -> None:
    lo, hi = wilson(0.5, 100)
    assert lo == pytest.approx(0.40383, abs=1e-5)
    assert hi == pytest.approx(0.59617, abs=1e-5)
    assert wilson(0.5, 100) == pytest.approx((0.404, 0.596), abs=1e-3)


def test_wilson_edges() -> None:
    assert wilson(0.0, 0) == (0.0, 1.0)
    lo, hi = wilson(0.0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12)
    assert hi == pytest.approx(0.27754, abs=1e-5)
    lo, hi = wilson(1.0, 10)
    assert (lo, hi) == (pytest.approx(0.72246, abs=1e-5), 1.0)
    lo, hi = wilson(0.8, 50)
    assert (lo, hi) == (pytest.approx(0.66963, abs=1e-5), pytest.approx(0.88756, abs=1e-5))


def test_wilson_narrows_with_n() -> None:
    widths = [hi - lo for lo, hi in (wilson(0.5, n) for n in (10, 100, 1000))]
    assert widths[0] > widths[1] > widths[2]


# ------------------------------------------------------------------ outcome


@pytest.mark.parametrize(("new", "base", "ab", "ba", "expected"), [
    # the verifiers decide whenever their pass fractions differ, whatever the judge says
    (1.0, 0.5, "B", "A", "win"),
    (0.0, 0.5, "A", "B", "loss"),
    (1.0, 0.0, None, None, "win"),
    # verifier tie (or no constraints): the judge must agree in both orders
    (1.0, 1.0, "A", "B", "win"),     # new shown first wins, new shown second wins
    (None, None, "A", "B", "win"),
    (0.5, 0.5, "B", "A", "loss"),    # baseline wins both orders
    (None, None, "B", "A", "loss"),
    (1.0, 1.0, "A", "A", "tie"),     # flip: position A both times
    (1.0, 1.0, "B", "B", "tie"),     # flip: position B both times
    (1.0, 1.0, "C", "C", "tie"),
    (1.0, 1.0, "A", "C", "tie"),
    (1.0, 1.0, None, None, "tie"),   # no judge
    (1.0, 1.0, "A", None, "tie"),    # one order unparsed
    (None, 0.5, "A", "B", "win"),    # one fraction missing: judge decides
    (0.5, None, "B", "A", "loss"),
])
def test_outcome(new, base, ab, ba, expected) -> None:
    assert outcome(new, base, ab, ba) == expected


# ------------------------------------------------------------------ summarise


def items(rows: list[tuple[str, str | None, str | None]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["outcome", "verdict_ab", "verdict_ba"])


def test_summarise_counts_and_flip_rate() -> None:
    df = items([
        ("win", None, None),    # verifier-decided, not judged
        ("win", "A", "B"),      # consistent
        ("loss", "B", "A"),     # consistent
        ("tie", "A", "A"),      # flip
        ("tie", "C", "C"),      # consistent tie
        ("tie", "C", "B"),      # flip
        ("loss", None, None),
        ("tie", "A", None),     # half-judged: not counted in the flip rate
    ])
    s = summarise(df)
    assert (s["wins"], s["losses"], s["ties"]) == (2, 2, 4)
    assert s["win_rate"] == pytest.approx((2 + 0.5 * 4) / 8)
    lo, hi = wilson(0.5, 8)
    assert (s["ci_low"], s["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
    assert s["llm_flip_rate"] == pytest.approx(2 / 5)


def test_summarise_all_wins_no_judge() -> None:
    s = summarise(items([("win", None, None)] * 4))
    assert (s["wins"], s["losses"], s["ties"], s["win_rate"]) == (4, 0, 0, 1.0)
    assert s["ci_high"] == 1.0
    assert s["ci_low"] == pytest.approx(wilson(1.0, 4)[0])
    assert s["llm_flip_rate"] is None


def test_summarise_empty() -> None:
    s = summarise(items([]))
    assert s == {"wins": 0, "losses": 0, "ties": 0, "win_rate": None, "ci_low": None,
                 "ci_high": None, "llm_flip_rate": None}


# ------------------------------------------------------------------ pass_rates


def checks(text: str, constraints: list[dict]) -> str:
    return json.dumps([r.__dict__ for r in verify(text, constraints)])


def test_pass_rates_overall_and_per_type() -> None:
    df = pd.DataFrame({"checks": [
        checks("one two three", [{"type": "max_words", "n": 3}, {"type": "lowercase"}]),
        checks("One two three four", [{"type": "max_words", "n": 3}, {"type": "lowercase"}]),
        checks("no commas here", [{"type": "no_commas"}, {"type": "max_words", "n": 10}]),
        checks("anything", []),
    ]})
    overall, by_type = pass_rates(df)
    assert overall == pytest.approx(4 / 6)
    assert by_type == {"lowercase": 0.5, "max_words": pytest.approx(2 / 3), "no_commas": 1.0}
    assert list(by_type) == ["lowercase", "max_words", "no_commas"]  # sorted


def test_pass_rates_hand_made_json() -> None:
    df = pd.DataFrame({"checks": [
        json.dumps([{"type": "a", "passed": True}, {"type": "b", "passed": False}]),
        json.dumps([{"type": "a", "passed": False}, {"type": "a", "passed": True}]),
    ]})
    overall, by_type = pass_rates(df)
    assert overall == 0.5
    assert by_type == {"a": pytest.approx(2 / 3), "b": 0.0}


def test_pass_rates_without_constraints() -> None:
    assert pass_rates(pd.DataFrame({"checks": ["[]", "[]"]})) == (None, {})
    assert pass_rates(pd.DataFrame({"checks": []})) == (None, {})
