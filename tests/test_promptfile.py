"""Tests for flywheel.promptfile and the prompt files shipped in data/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flywheel.constraints import CONSTRAINTS, describe_constraints, verify
from flywheel.errors import FlywheelError
from flywheel.promptfile import load_prompt_file

DATA = Path(__file__).resolve().parent.parent / "data"
SEEDS = DATA / "seed_prompts.jsonl"
EVALS = DATA / "eval_prompts.jsonl"


def write(tmp_path: Path, lines: list[str], name: str = "prompts.jsonl") -> Path:
    """Write ``lines`` to a file under ``tmp_path`` and return its path."""
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def error_of(path: Path, **kwargs: bool) -> str:
    """The message of the FlywheelError raised when loading ``path``."""
    with pytest.raises(FlywheelError) as info:
        load_prompt_file(path, **kwargs)
    return str(info.value)


# ------------------------------------------------------------------ loading


def test_good_file_loads_and_normalises(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            json.dumps({"prompt": "  What is rain?  "}),
            "",
            "   ",
            json.dumps(
                {
                    "prompt": "Say hi. Answer in at most 5 words.",
                    "gold": "Hi there!",
                    "constraints": [{"type": "max_words", "n": 5}],
                    "category": "chat",
                    "id": "p2",
                }
            ),
            json.dumps({"prompt": "Define air.", "gold": None, "constraints": None}),
        ],
    )
    records = load_prompt_file(path)
    assert records == [
        {
            "prompt": "What is rain?",
            "gold": None,
            "constraints": [],
            "category": None,
            "id": None,
            "line": 1,
        },
        {
            "prompt": "Say hi. Answer in at most 5 words.",
            "gold": "Hi there!",
            "constraints": [{"type": "max_words", "n": 5}],
            "category": "chat",
            "id": "p2",
            "line": 4,
        },
        {
            "prompt": "Define air.",
            "gold": None,
            "constraints": [],
            "category": None,
            "id": None,
            "line": 5,
        },
    ]


def test_accepts_str_path_and_utf8_bom(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_text('\ufeff{"prompt": "Café?"}\n', encoding="utf-8")
    assert load_prompt_file(str(path))[0]["prompt"] == "Café?"


def test_missing_file_names_path_and_fix(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    message = error_of(path)
    assert f"prompt file not found: {path}" in message
    assert "check the path" in message and '{"prompt": "..."}' in message


def test_directory_is_rejected(tmp_path: Path) -> None:
    assert f"prompt file {tmp_path} is not a file" in error_of(tmp_path)


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"prompt": "caf\xe9"}\n')
    message = error_of(path)
    assert f"{path}: not UTF-8 text" in message and "save the file as UTF-8" in message


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, ['{"prompt": "ok"}', '{"prompt": "a" "b"}'])
    message = error_of(path)
    assert str(path) in message.splitlines()[0]
    assert (
        f"{path} line 2: not valid JSON (Expecting ',' delimiter at column 16) "
        "— each line must be one JSON object"
    ) in message


def test_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path, ["", "  "])
    assert error_of(path) == (
        f'{path} contains no prompts — add one JSON object per line, e.g. {{"prompt": "..."}}'
    )
    assert load_prompt_file(path, require_nonempty=False) == []


def test_line_that_is_not_an_object(tmp_path: Path) -> None:
    path = write(tmp_path, ['["prompt", "x"]', '"just text"'])
    message = error_of(path)
    assert f'{path} line 1: expected a JSON object like {{"prompt": "..."}}, got list' in message
    assert f'{path} line 2: expected a JSON object like {{"prompt": "..."}}, got str' in message


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"gold": "x"}', 'line 1: missing "prompt" — every line needs {"prompt": "..."}'),
        ('{"prompt": "   "}', "line 1: prompt is empty"),
        ('{"prompt": 42}', "line 1: prompt: expected str, got int"),
        (
            '{"prompt": "Hi", "answer": "x"}',
            "line 1: unknown key 'answer' (allowed keys: prompt, gold, constraints, category, "
            "id, split)",
        ),
        ('{"prompt": "Hi", "gold": 3}', "line 1: gold: expected str, got int"),
        ('{"prompt": "Hi", "category": ["a"]}', "line 1: category: expected str, got list"),
        ('{"prompt": "Hi", "id": 7}', "line 1: id: expected str, got int"),
        ('{"prompt": "Hi", "gold": ""}', "line 1: gold is empty — leave the key out instead"),
        (
            '{"prompt": "Hi", "constraints": {"type": "lowercase"}}',
            "line 1: constraints: expected a list of objects, got object",
        ),
        (
            '{"prompt": "Hi", "constraints": [{"type": "max_words", "n": "5"}]}',
            "line 1: constraints[0].n: expected int, got str '5'",
        ),
        (
            '{"prompt": "Hi", "constraints": [{"type": "shout"}]}',
            "line 1: constraints[0].type: unknown constraint type 'shout'",
        ),
    ],
)
def test_field_errors(tmp_path: Path, line: str, expected: str) -> None:
    path = write(tmp_path, [line])
    assert f"{path} {expected}" in error_of(path)


def test_all_errors_collected_in_one_message(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            '{"prompt": "fine"}',
            '{"prompt": "broken"',
            "",
            '{"gold": "no prompt"}',
            '{"prompt": "Hi", "colour": "red"}',
            '{"prompt": "Hi", "constraints": [{"type": "max_words"}]}',
            '{"prompt": "Dup", "id": "a"}',
            '{"prompt": "Dup again", "id": "a"}',
        ],
    )
    message = error_of(path)
    assert message.splitlines()[0] == f"prompt file {path} has 5 problems:"
    for fragment in [
        f"{path} line 2: not valid JSON",
        f'{path} line 4: missing "prompt"',
        f"{path} line 5: unknown key 'colour'",
        f"{path} line 6: constraints[0]: missing parameter 'n' for max_words (expected: n)",
        f"{path} line 8: id 'a' already used on line 7",
    ]:
        assert fragment in message
    assert "line 1" not in message


def test_at_most_twenty_errors_shown(tmp_path: Path) -> None:
    path = write(tmp_path, ["{bad"] * 25)
    message = error_of(path)
    assert message.splitlines()[0] == f"prompt file {path} has 25 problems:"
    assert message.count("not valid JSON") == 20
    assert f"{path} line 20:" in message and f"{path} line 21:" not in message
    assert message.endswith("and 5 more")


# ------------------------------------------------------------------ shipped data


def _grams(text: str) -> set[str]:
    """Character 3-grams of lower-cased, whitespace-normalised ``text``."""
    text = " ".join(text.lower().split())
    return {text[i : i + 3] for i in range(len(text) - 2)}


def _jaccard(a: str, b: str) -> float:
    """Character 3-gram Jaccard similarity."""
    ga, gb = _grams(a), _grams(b)
    return len(ga & gb) / len(ga | gb)


#: shipped JSONL files that are not prompt files (checked by their own loaders and tests)
NOT_PROMPT_FILES = {"canary.jsonl"}  # the judge's canary set: tests/test_canary.py


@pytest.mark.parametrize("path", sorted(p for p in DATA.glob("*.jsonl")
                                        if p.name not in NOT_PROMPT_FILES),
                         ids=lambda p: p.name)
def test_every_shipped_data_file_loads(path: Path) -> None:
    assert load_prompt_file(path)


def test_the_canary_set_is_not_a_prompt_file_and_loads_with_its_own_loader() -> None:
    from flywheel.stages.canary import load_canary

    assert len(load_canary(DATA / "canary.jsonl")) == 12


def test_shipped_counts_meet_minimums() -> None:
    seeds, evals = load_prompt_file(SEEDS), load_prompt_file(EVALS)
    assert len(seeds) >= 60
    assert sum(r["gold"] is not None for r in seeds) >= 24
    assert sum(bool(r["constraints"]) for r in seeds) >= 30
    assert len(evals) >= 40
    assert sum(bool(r["constraints"]) for r in evals) >= 34
    assert all(r["gold"] is None for r in evals)


def test_shipped_constraint_mix() -> None:
    for path in (SEEDS, EVALS):
        used = {c["type"] for r in load_prompt_file(path) for c in r["constraints"]}
        emphasised = {
            "max_words",
            "ends_with",
            "starts_with",
            "contains_keyword",
            "max_sentences",
            "lowercase",
            "bullet_count",
            "json_keys",
        }
        assert emphasised <= used <= set(CONSTRAINTS)


@pytest.mark.parametrize("path", [SEEDS, EVALS], ids=lambda p: p.name)
def test_instructions_are_stated_in_prompt_text(path: Path) -> None:
    for r in load_prompt_file(path):
        if r["constraints"] and r.get("split") != "transfer":
            assert r["prompt"].endswith(" " + describe_constraints(r["constraints"])), r["line"]


def test_seed_gold_answers_pass_their_constraints() -> None:
    for r in load_prompt_file(SEEDS):
        if r["gold"] is not None:
            failed = [x for x in verify(r["gold"], r["constraints"]) if not x.passed]
            assert failed == [], f"line {r['line']}: {failed}"


def test_ids_are_unique_across_seed_and_eval() -> None:
    ids = [r["id"] for path in (SEEDS, EVALS) for r in load_prompt_file(path)]
    assert None not in ids and len(ids) == len(set(ids))


def test_no_eval_prompt_is_a_near_duplicate_of_a_seed() -> None:
    seeds = [r["prompt"] for r in load_prompt_file(SEEDS)]
    for r in load_prompt_file(EVALS):
        worst = max(seeds, key=lambda s: _jaccard(r["prompt"], s))
        assert _jaccard(r["prompt"], worst) < 0.6, (r["prompt"], worst)
