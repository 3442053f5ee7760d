"""Tests for flywheel.constraints: verifiers, validation, descriptions and sampling."""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest

from flywheel.constraints import (
    CONSTRAINTS,
    VerifierResult,
    compatible,
    count_words,
    describe_constraints,
    pass_fraction,
    sample_constraints,
    validate_constraints,
    verify,
)
from flywheel.errors import FlywheelError

ALL_TYPES = {
    "max_words",
    "min_words",
    "lowercase",
    "uppercase",
    "ends_with",
    "starts_with",
    "contains_keyword",
    "excludes_keyword",
    "bullet_count",
    "json_keys",
    "no_commas",
    "max_sentences",
}


def one(response: str, constraint: dict) -> VerifierResult:
    """Verify a single constraint."""
    [result] = verify(response, [constraint])
    return result


# ------------------------------------------------------------------ registry


def test_registry_has_every_type_with_consistent_fields() -> None:
    assert set(CONSTRAINTS) == ALL_TYPES
    for name, ctype in CONSTRAINTS.items():
        assert ctype.name == name
        assert ctype.version == "1"
        assert set(ctype.choices) == set(ctype.params)
        for param, values in ctype.choices.items():
            assert values and all(isinstance(v, ctype.params[param]) for v in values)


def test_constraint_type_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        CONSTRAINTS["max_words"].version = "2"  # type: ignore[misc]


def test_check_returns_bool() -> None:
    assert CONSTRAINTS["max_words"].check("one two", n=2) is True
    assert CONSTRAINTS["max_words"].check("one two three", n=2) is False
    assert CONSTRAINTS["lowercase"].check("abc") is True


def test_verifier_result_fields() -> None:
    result = one("one two three", {"type": "max_words", "n": 2})
    assert result == VerifierResult("max_words", "max_words@1", False, "3 words > 2")
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.passed = True  # type: ignore[misc]


# ------------------------------------------------------------------ verifiers

CASES = [
    # (response, constraint, passed, detail)
    ("A short answer here.", {"type": "max_words", "n": 5}, True, "4 words <= 5"),
    ("one two three four five six", {"type": "max_words", "n": 5}, False, "6 words > 5"),
    ("one two three four five", {"type": "min_words", "n": 5}, True, "5 words >= 5"),
    ("Too short.", {"type": "min_words", "n": 5}, False, "2 words < 5"),
    ("all lowercase, 123!", {"type": "lowercase"}, True, "all letters lowercase"),
    ("Hello World", {"type": "lowercase"}, False, "uppercase letters found: H, W"),
    ("123 !!", {"type": "lowercase"}, False, "no letters"),
    ("ALL CAPS, 42!", {"type": "uppercase"}, True, "all letters uppercase"),
    ("ALL CAPs", {"type": "uppercase"}, False, "lowercase letters found: s"),
    ("", {"type": "uppercase"}, False, "no letters"),
    ("It works. Done.", {"type": "ends_with", "phrase": "Done."}, True, "ends with 'Done.'"),
    ("It works. Done.  \n\n", {"type": "ends_with", "phrase": "Done."}, True, "ends with 'Done.'"),
    (
        "It works. done.",
        {"type": "ends_with", "phrase": "Done."},
        False,
        "ends with 'It works. done.', not 'Done.'",
    ),
    ("  Sure, here it is.", {"type": "starts_with", "phrase": "Sure"}, True, "starts with 'Sure'"),
    (
        "sure, here it is.",
        {"type": "starts_with", "phrase": "Sure"},
        False,
        "starts with 'sure, here it ', not 'Sure'",
    ),
    (
        "This is a SIMPLE idea.",
        {"type": "contains_keyword", "keyword": "simple"},
        True,
        "'simple' found 1 time",
    ),
    (
        "Simple, simple.",
        {"type": "contains_keyword", "keyword": "simple"},
        True,
        "'simple' found 2 times",
    ),
    (
        "The simplest idea.",
        {"type": "contains_keyword", "keyword": "simple"},
        False,
        "'simple' not found",
    ),
    (
        "It is quite good.",
        {"type": "excludes_keyword", "keyword": "very"},
        True,
        "'very' not found",
    ),
    (
        "It is every bit good.",
        {"type": "excludes_keyword", "keyword": "very"},
        True,
        "'very' not found",
    ),
    (
        "It is Very good.",
        {"type": "excludes_keyword", "keyword": "very"},
        False,
        "'very' found 1 time",
    ),
    ("- one\n* two", {"type": "bullet_count", "n": 2}, True, "2 bullets == 2"),
    (
        "Intro:\n  - one\n\t* two\n    - three",
        {"type": "bullet_count", "n": 3},
        True,
        "3 bullets == 3",
    ),
    ("- one\n-two\n**bold**\n1. three", {"type": "bullet_count", "n": 2}, False, "1 bullet != 2"),
    (
        '{"answer": 7}',
        {"type": "json_keys", "keys": ["answer"]},
        True,
        "JSON object has keys: answer",
    ),
    (
        '```json\n{"name": "Bolt", "reason": "short"}\n```\n',
        {"type": "json_keys", "keys": ["name", "reason"]},
        True,
        "JSON object has keys: name, reason",
    ),
    (
        '```\n{"answer": 1}\n```',
        {"type": "json_keys", "keys": ["answer"]},
        True,
        "JSON object has keys: answer",
    ),
    (
        '{"name": "Bolt"}',
        {"type": "json_keys", "keys": ["name", "reason"]},
        False,
        "missing keys: reason",
    ),
    (
        '[{"answer": 7}]',
        {"type": "json_keys", "keys": ["answer"]},
        False,
        "JSON is an array, not an object",
    ),
    (
        '"answer"',
        {"type": "json_keys", "keys": ["answer"]},
        False,
        "JSON is a string, not an object",
    ),
    (
        'Here you go: {"answer": 7}',
        {"type": "json_keys", "keys": ["answer"]},
        False,
        "not valid JSON (Expecting value at line 1 column 1)",
    ),
    ("No commas here.", {"type": "no_commas"}, True, "no commas"),
    ("One, two, three.", {"type": "no_commas"}, False, "2 commas found"),
    ("One sentence only.", {"type": "max_sentences", "n": 1}, True, "1 sentence <= 1"),
    ("Pi is 3.14 roughly. Yes", {"type": "max_sentences", "n": 2}, True, "2 sentences <= 2"),
    ("First. Second! Third?", {"type": "max_sentences", "n": 2}, False, "3 sentences > 2"),
    ("Wait... what?! Really.", {"type": "max_sentences", "n": 3}, True, "3 sentences <= 3"),
]


@pytest.mark.parametrize(("response", "constraint", "passed", "detail"), CASES)
def test_verifier(response: str, constraint: dict, passed: bool, detail: str) -> None:
    result = one(response, constraint)
    assert (result.passed, result.detail) == (passed, detail)
    assert result.type == constraint["type"]
    assert result.verifier == f"{constraint['type']}@1"


def test_every_type_has_a_passing_and_failing_case() -> None:
    seen = {(c["type"], passed) for _, c, passed, _ in CASES}
    assert seen == {(t, p) for t in ALL_TYPES for p in (True, False)}


def test_contractions_count_as_one_word() -> None:
    assert count_words("don't") == 1
    assert count_words("Don't stop, it's fine!") == 4
    assert count_words("I can’t") == 2
    assert count_words("- item one\n- item two") == 4
    assert one("don't", {"type": "max_words", "n": 1}).passed


def test_ends_with_requires_exact_phrase() -> None:
    assert not one("That is all", {"type": "ends_with", "phrase": "That is all."}).passed
    assert one("Bye. That is all. \t", {"type": "ends_with", "phrase": "That is all."}).passed


def test_verify_returns_one_result_per_constraint_in_order() -> None:
    constraints = [{"type": "lowercase"}, {"type": "max_words", "n": 3}, {"type": "no_commas"}]
    results = verify("hello there, friend", constraints)
    assert [r.type for r in results] == ["lowercase", "max_words", "no_commas"]
    assert [r.passed for r in results] == [True, True, False]
    assert verify("anything", []) == []


def test_verify_rejects_invalid_constraints() -> None:
    with pytest.raises(
        FlywheelError, match="constraints\\[0\\].type: unknown constraint type 'nope'"
    ):
        verify("x", [{"type": "nope"}])


def test_pass_fraction() -> None:
    results = verify(
        "hello there, friend",
        [
            {"type": "lowercase"},
            {"type": "max_words", "n": 3},
            {"type": "no_commas"},
            {"type": "uppercase"},
        ],
    )
    assert pass_fraction(results) == 0.5
    assert pass_fraction([]) is None


# ------------------------------------------------------------------ descriptions


def test_describe_constraints() -> None:
    text = describe_constraints(
        [
            {"type": "max_words", "n": 20},
            {"type": "ends_with", "phrase": "Done."},
            {"type": "json_keys", "keys": ["name", "reason"]},
            {"type": "max_sentences", "n": 1},
        ]
    )
    assert text == (
        'Answer in at most 20 words. End your answer with the exact phrase "Done." '
        'Answer only with a JSON object that has the keys "name" and "reason". '
        "Answer in one sentence."
    )
    assert describe_constraints([]) == ""
    assert describe_constraints([{"type": "ends_with", "phrase": "Bye"}]) == (
        'End your answer with the exact phrase "Bye".'
    )


def test_every_choice_has_a_description() -> None:
    for name, ctype in CONSTRAINTS.items():
        for values in itertools.product(*ctype.choices.values()):
            sentence = ctype.describe(**dict(zip(ctype.params, values)))
            assert sentence and sentence[0].isupper(), name


# ------------------------------------------------------------------ validation

W = "seeds.jsonl line 12"
VALID_TYPES = ", ".join(sorted(ALL_TYPES))
VALID = f"valid types: {VALID_TYPES}"


def test_validate_accepts_valid_constraints() -> None:
    good = [
        {"type": "max_words", "n": 20},
        {"type": "lowercase"},
        {"type": "json_keys", "keys": ["a", "b"]},
        {"type": "ends_with", "phrase": "Done."},
    ]
    assert validate_constraints(good, W) == []
    assert validate_constraints([], W) == []


C0 = f"{W}: constraints[0]"
LIST_OF_STR = "expected a non-empty list of non-empty strings"


@pytest.mark.parametrize(
    ("constraints", "errors"),
    [
        ("max_words", [f"{W}: constraints: expected a list of objects, got str 'max_words'"]),
        (
            {"type": "lowercase"},
            [f"{W}: constraints: expected a list of objects, got object {{'type': 'lowercase'}}"],
        ),
        ([3], [f'{C0}: expected an object like {{"type": "max_words", "n": 20}}, got int 3']),
        ([{"n": 5}], [f'{C0}: missing "type" (valid types: {VALID_TYPES})']),
        ([{"type": 5}], [f"{C0}.type: expected str, got int 5 (valid types: {VALID_TYPES})"]),
        (
            [{"type": "lowercase"}, {"type": "max_chars", "n": 5}],
            [f"{W}: constraints[1].type: unknown constraint type 'max_chars' ({VALID})"],
        ),
        ([{"type": "max_words"}], [f"{C0}: missing parameter 'n' for max_words (expected: n)"]),
        (
            [{"type": "max_words", "n": 5, "m": 2}],
            [f"{C0}: unexpected parameter 'm' for max_words (expected: n)"],
        ),
        (
            [{"type": "lowercase", "n": 2}],
            [f"{C0}: unexpected parameter 'n' for lowercase (expected: no parameters)"],
        ),
        ([{"type": "max_words", "n": "5"}], [f"{C0}.n: expected int, got str '5'"]),
        ([{"type": "max_words", "n": True}], [f"{C0}.n: expected int, got bool True"]),
        ([{"type": "max_words", "n": 2.5}], [f"{C0}.n: expected int, got float 2.5"]),
        ([{"type": "max_words", "n": 0}], [f"{C0}.n: expected a positive int, got 0"]),
        ([{"type": "ends_with", "phrase": 5}], [f"{C0}.phrase: expected str, got int 5"]),
        (
            [{"type": "ends_with", "phrase": " "}],
            [f"{C0}.phrase: expected a non-empty string, got ''"],
        ),
        (
            [{"type": "json_keys", "keys": "answer"}],
            [f"{C0}.keys: expected list, got str 'answer'"],
        ),
        (
            [{"type": "json_keys", "keys": ["a", 1]}],
            [f"{C0}.keys: {LIST_OF_STR}, got list ['a', 1]"],
        ),
        ([{"type": "json_keys", "keys": []}], [f"{C0}.keys: {LIST_OF_STR}, got list []"]),
    ],
)
def test_validate_error_messages(constraints: object, errors: list[str]) -> None:
    assert validate_constraints(constraints, W) == errors


def test_validate_collects_all_errors() -> None:
    errors = validate_constraints(
        [{"type": "max_words", "n": "5", "x": 1}, "lowercase", {"type": "bogus"}], W
    )
    assert len(errors) == 4
    assert all(e.startswith(W + ": constraints[") for e in errors)


# ------------------------------------------------------------------ sampling


def _conflicts(constraints: list[dict]) -> list[tuple[dict, dict]]:
    """Pairs that must never be drawn together (checked independently of compatible())."""
    bad = []
    for a, b in itertools.permutations(constraints, 2):
        ta, tb = a["type"], b["type"]
        if (ta, tb) in {
            ("lowercase", "uppercase"),
            ("json_keys", "bullet_count"),
            ("json_keys", "max_sentences"),
            ("json_keys", "starts_with"),
            ("json_keys", "ends_with"),
            ("json_keys", "no_commas"),
        }:
            bad.append((a, b))
        if (
            ta in ("starts_with", "ends_with")
            and tb == "lowercase"
            and a["phrase"] != a["phrase"].lower()
        ):
            bad.append((a, b))
        if (
            ta in ("starts_with", "ends_with")
            and tb == "uppercase"
            and a["phrase"] != a["phrase"].upper()
        ):
            bad.append((a, b))
        if ta == "min_words" and tb == "max_words" and a["n"] >= b["n"]:
            bad.append((a, b))
        if ta == "contains_keyword" and tb == "excludes_keyword" and a["keyword"] == b["keyword"]:
            bad.append((a, b))
    return bad


def test_sample_is_deterministic_per_seed() -> None:
    for seed in range(20):
        assert sample_constraints(random.Random(seed), 3) == sample_constraints(
            random.Random(seed), 3
        )
    draws = {str(sample_constraints(random.Random(s), 2)) for s in range(20)}
    assert len(draws) > 5


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_sample_never_conflicts_and_always_validates(k: int) -> None:
    rng = random.Random(1234 + k)
    for _ in range(500):
        drawn = sample_constraints(rng, k)
        assert len(drawn) == k
        assert len({c["type"] for c in drawn}) == k
        assert validate_constraints(drawn, "sample") == []
        assert _conflicts(drawn) == [], drawn
        assert all(compatible(a, b) for a, b in itertools.combinations(drawn, 2))
        for c in drawn:
            ctype = CONSTRAINTS[c["type"]]
            assert all(c[p] in ctype.choices[p] for p in ctype.params)


def test_sample_respects_types() -> None:
    rng = random.Random(7)
    for _ in range(100):
        drawn = sample_constraints(rng, 2, ["max_words", "ends_with", "lowercase"])
        assert {c["type"] for c in drawn} <= {"max_words", "ends_with", "lowercase"}
    assert sample_constraints(rng, 0) == []


def test_sample_draws_every_type_eventually() -> None:
    rng = random.Random(0)
    seen = {c["type"] for _ in range(300) for c in sample_constraints(rng, 2)}
    assert seen == ALL_TYPES


def test_sample_errors() -> None:
    rng = random.Random(0)
    with pytest.raises(FlywheelError, match="unknown constraint type\\(s\\): nope"):
        sample_constraints(rng, 1, ["nope"])
    with pytest.raises(FlywheelError, match="cannot sample 3 constraints from 2 type"):
        sample_constraints(rng, 3, ["max_words", "lowercase"])
    with pytest.raises(FlywheelError, match="could not find 2 mutually compatible"):
        sample_constraints(rng, 2, ["lowercase", "uppercase"])


def test_sampled_copies_are_independent() -> None:
    drawn = sample_constraints(random.Random(3), 1, ["json_keys"])
    drawn[0]["keys"].append("extra")
    assert all("extra" not in keys for keys in CONSTRAINTS["json_keys"].choices["keys"])
