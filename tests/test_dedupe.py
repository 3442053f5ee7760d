"""Tests for prompt filtering, near-duplicate removal, seed rows and prompt selection."""

from __future__ import annotations

import json
import random
from collections import Counter

import pandas as pd
import pytest

from flywheel.catalog import prompt_id
from flywheel.config import PromptsConfig
from flywheel.constraints import CONSTRAINTS, describe_constraints
from flywheel.stages.prompts import (
    PROMPT_COLUMNS,
    NearDuplicateIndex,
    accept_tasks,
    filter_reason,
    jaccard,
    ngrams,
    seed_rows,
    task_text,
    task_texts,
)
from flywheel.stages.sampling import prompt_types, select_prompts

# ------------------------------------------------------------------ n-grams and Jaccard


def test_ngrams() -> None:
    assert ngrams("abcd") == {"abc", "bcd"}
    assert ngrams("ABCD") == {"abc", "bcd"}
    assert ngrams("  a   b  ") == {"a b"}  # shorter than n: the whole normalised text
    assert ngrams("ab") == {"ab"}
    assert ngrams("") == {""}
    assert ngrams("abcd", n=2) == {"ab", "bc", "cd"}


def test_jaccard() -> None:
    assert jaccard({"a", "b"}, {"b", "c"}) == pytest.approx(1 / 3)
    assert jaccard({"a"}, {"a"}) == 1.0
    assert jaccard({"a"}, {"b"}) == 0.0
    assert jaccard(set(), {"a"}) == 0.0
    assert jaccard(set(), set()) == 1.0


# ------------------------------------------------------------------ near-duplicate index

POOL_TEXT = "Write a poem about the sea."


def test_near_duplicate_index() -> None:
    index = NearDuplicateIndex(0.6)
    assert index.max_similarity(POOL_TEXT) == 0.0
    assert not index.is_duplicate(POOL_TEXT)
    index.add(POOL_TEXT)
    assert index.max_similarity(POOL_TEXT) == 1.0
    assert index.is_duplicate(POOL_TEXT)
    # case and whitespace variants are the same text
    assert index.max_similarity("  WRITE a Poem   about the\nsea. ") == 1.0
    # a rephrasing is a near-duplicate above the threshold
    assert index.max_similarity("Write a short poem about the sea.") == pytest.approx(0.75)
    assert index.is_duplicate("Write a short poem about the sea.")
    # an unrelated prompt is far below it
    assert index.max_similarity("List three prime numbers greater than ten.") < 0.1
    assert not index.is_duplicate("List three prime numbers greater than ten.")


def test_near_duplicate_threshold_is_inclusive() -> None:
    index = NearDuplicateIndex(0.75)
    index.add(POOL_TEXT)
    assert index.is_duplicate("Write a short poem about the sea.")  # similarity == 0.75
    assert not NearDuplicateIndex(0.76, [ngrams(POOL_TEXT)]).is_duplicate(
        "Write a short poem about the sea.")


def test_max_similarity_is_over_the_whole_pool() -> None:
    index = NearDuplicateIndex(0.6)
    index.add("List three prime numbers greater than ten.")
    index.add(POOL_TEXT)
    assert index.max_similarity(POOL_TEXT) == 1.0
    assert len(index.grams) == 2


# ------------------------------------------------------------------ filters


@pytest.mark.parametrize(("task", "reason"), [
    (None, "empty"),
    ("", "empty"),
    ("I'm sorry, but I cannot write a new task for you.", "refusal"),
    ("As an AI, I do not create tasks.", "refusal"),
    ("Say hi.", "too_short"),
    ("x" * 41, "too_long"),
    ("Explain why the sky is blue.", None),
    ("x" * 10, None),  # exactly min_chars
    ("x" * 40, None),  # exactly max_chars
])
def test_filter_reason(task: str | None, reason: str | None) -> None:
    assert filter_reason(task, min_chars=10, max_chars=40) == reason


# ------------------------------------------------------------------ accept_tasks


def pcfg(**kw) -> PromptsConfig:
    base = {"num_new": 10, "min_chars": 10, "max_chars": 120, "dedupe_threshold": 0.6,
            "constraint_prob": 0.0, "max_constraints": 1, "constraint_types": []}
    base.update(kw)
    return PromptsConfig(**base)


def test_accept_tasks_parses_filters_and_keeps_provenance() -> None:
    raw = ["Task: Explain how a rainbow forms.",
           "I'm sorry, I can't do that.",
           "Hi.",
           "",
           '"Describe the life cycle of a butterfly."']
    shots = [["p_1", "p_2"], ["p_3"], ["p_4"], ["p_5"], ["p_6", "p_7"]]
    rows, stats = accept_tasks(raw, shots, [], [], pcfg(), random.Random(0), "model-r1-abc")
    assert list(rows.columns) == PROMPT_COLUMNS
    assert list(rows.text) == ["Explain how a rainbow forms.",
                               "Describe the life cycle of a butterfly."]
    assert list(rows.prompt_id) == [prompt_id(t) for t in rows.text]
    assert [list(e) for e in rows.examples] == [["p_1", "p_2"], ["p_6", "p_7"]]
    assert list(rows.raw) == [raw[0], raw[4]]
    assert list(rows.source) == ["self-instruct"] * 2
    assert list(rows.source_ref) == ["model-r1-abc"] * 2
    assert list(rows.constraints) == ["[]", "[]"]
    assert rows.gold.isna().all() and rows.category.isna().all()
    assert stats == {"accepted": 2, "refusal": 1, "too_short": 1, "empty": 1}


def test_accept_tasks_num_new_cap_counts_surplus() -> None:
    raw = ["Explain how a rainbow forms.", "Describe the life cycle of a butterfly.",
           "List three prime numbers greater than ten.", "Hi."]
    rows, stats = accept_tasks(raw, [[]] * 4, [], [], pcfg(num_new=2), random.Random(0), "m")
    assert list(rows.text) == raw[:2]
    assert stats == {"accepted": 2, "surplus": 2}


def test_accept_tasks_rejects_near_duplicates_of_pool_blocked_and_batch() -> None:
    pool = ["Write a poem about the sea."]
    blocked = ["Explain how a rainbow forms in the sky."]
    raw = ["Write a short poem about the sea.",                 # near-duplicate of the pool
           "explain how a RAINBOW forms in the sky.",           # duplicate of an eval prompt
           "Describe the life cycle of a butterfly.",           # new
           "Describe the life-cycle of a butterfly!",           # duplicate of the line above
           "List three prime numbers greater than ten."]        # new
    rows, stats = accept_tasks(raw, [[]] * 5, pool, blocked, pcfg(), random.Random(0), "m")
    assert list(rows.text) == ["Describe the life cycle of a butterfly.",
                               "List three prime numbers greater than ten."]
    assert stats == {"near_duplicate": 3, "accepted": 2}


def test_accept_tasks_attaches_constraints() -> None:
    raw = ["Explain how a rainbow forms.", "Describe the life cycle of a butterfly."]
    cfg = pcfg(constraint_prob=1.0, max_constraints=1, constraint_types=["max_words"])
    rows, stats = accept_tasks(raw, [[], []], [], [], cfg, random.Random(3), "m")
    assert stats == {"accepted": 2}
    for task, r in zip(raw, rows.itertuples(), strict=True):
        cons = json.loads(r.constraints)
        assert len(cons) == 1
        assert cons[0]["type"] == "max_words"
        assert cons[0]["n"] in CONSTRAINTS["max_words"].choices["n"]
        assert r.text == task + " " + describe_constraints(cons)
        assert r.text.endswith(describe_constraints(cons))
        assert r.prompt_id == prompt_id(r.text)
        assert task_text(r.text, cons) == task


def test_accept_tasks_up_to_max_constraints() -> None:
    raw = ["Explain how a rainbow forms.", "Describe the life cycle of a butterfly.",
           "List three prime numbers greater than ten.", "Summarise the plot of Hamlet.",
           "Compare cats and dogs as pets."]
    cfg = pcfg(constraint_prob=1.0, max_constraints=2,
               constraint_types=["max_words", "lowercase", "no_commas"])
    rows, _ = accept_tasks(raw, [[]] * 5, [], [], cfg, random.Random(5), "m")
    counts = [len(json.loads(c)) for c in rows.constraints]
    assert len(counts) == 5
    assert set(counts) <= {1, 2}
    for r in rows.itertuples():
        assert {c["type"] for c in json.loads(r.constraints)} <= {"max_words", "lowercase",
                                                                  "no_commas"}


def test_accept_tasks_no_constraints_when_prob_zero() -> None:
    raw = ["Explain how a rainbow forms.", "Describe the life cycle of a butterfly."]
    rng = random.Random(3)
    state = rng.getstate()
    rows, _ = accept_tasks(raw, [[], []], [], [], pcfg(constraint_prob=0.0), rng, "m")
    assert list(rows.constraints) == ["[]", "[]"]
    assert list(rows.text) == raw
    assert rng.getstate() == state  # no randomness spent


def test_accept_tasks_deterministic_for_seed() -> None:
    raw = ["Explain how a rainbow forms.", "Describe the life cycle of a butterfly.",
           "List three prime numbers greater than ten."]
    cfg = pcfg(constraint_prob=0.5, max_constraints=2)
    a, sa = accept_tasks(raw, [["x"]] * 3, [], [], cfg, random.Random(11), "m")
    b, sb = accept_tasks(raw, [["x"]] * 3, [], [], cfg, random.Random(11), "m")
    pd.testing.assert_frame_equal(a, b)
    assert sa == sb


def test_copy_of_constrained_eval_task_is_rejected() -> None:
    cons = [{"type": "max_words", "n": 20}]
    eval_text = "Write a short poem about the sea. " + describe_constraints(cons)
    blocked = task_texts(pd.DataFrame({"text": [eval_text], "constraints": [json.dumps(cons)]}))
    assert blocked == ["Write a short poem about the sea."]
    rows, stats = accept_tasks(["Write a short poem about the sea."], [[]], [], blocked,
                               pcfg(), random.Random(0), "m")
    assert rows.empty
    assert stats == {"near_duplicate": 1}


# ------------------------------------------------------------------ task_text


def test_task_text_strips_constraint_sentence() -> None:
    cons = [{"type": "max_words", "n": 20}, {"type": "lowercase"}]
    text = "Explain how a rainbow forms. " + describe_constraints(cons)
    assert task_text(text, cons) == "Explain how a rainbow forms."
    assert task_text("Explain how a rainbow forms.", []) == "Explain how a rainbow forms."
    # a text that does not end with the description is left alone
    assert task_text("Explain how a rainbow forms.", cons) == "Explain how a rainbow forms."


# ------------------------------------------------------------------ seed rows


def test_seed_rows() -> None:
    records = [
        {"prompt": "Hello World", "gold": "Hi!", "constraints": [{"type": "lowercase"}],
         "category": "chat", "id": "s1", "line": 1},
        {"prompt": "  hello   world ", "gold": None, "constraints": [], "category": None,
         "id": "s2", "line": 2},
        {"prompt": "Name a colour.", "gold": None, "constraints": [], "category": None,
         "id": None, "line": 4},
    ]
    rows = seed_rows(records, "data/seeds.jsonl")
    assert list(rows.columns) == PROMPT_COLUMNS
    assert list(rows.text) == ["Hello World", "Name a colour."]
    assert list(rows.prompt_id) == [prompt_id("Hello World"), prompt_id("Name a colour.")]
    assert list(rows.source_ref) == ["data/seeds.jsonl:1", "data/seeds.jsonl:4"]
    assert list(rows.source) == ["seed", "seed"]
    assert rows.gold.iloc[0] == "Hi!" and pd.isna(rows.gold.iloc[1])
    assert list(rows.constraints) == ['[{"type": "lowercase"}]', "[]"]
    assert rows.category.iloc[0] == "chat" and pd.isna(rows.category.iloc[1])
    assert [list(e) for e in rows.examples] == [[], []]
    assert rows.raw.isna().all()


def test_seed_rows_empty() -> None:
    rows = seed_rows([], "seeds.jsonl")
    assert rows.empty and list(rows.columns) == PROMPT_COLUMNS


# ------------------------------------------------------------------ select_prompts


def pool_df(ids: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"prompt_id": ids, "text": [f"text {i}" for i in ids]})


POOL_IDS = ["p_c", "p_a", "p_e", "p_b", "p_d", "p_f"]


def test_select_prompts_new_first_then_seeded_draw() -> None:
    got = select_prompts(pool_df(POOL_IDS), ["p_f"], 3, seed=1)
    # rest sorted: p_a p_b p_c p_d p_e; Random(1).sample(range(5), 2) -> indices {0, 1}
    assert list(got.prompt_id) == ["p_f", "p_a", "p_b"]
    got = select_prompts(pool_df(POOL_IDS), ["p_f"], 3, seed=2)
    assert list(got.prompt_id) == ["p_f", "p_a", "p_e"]  # indices {0, 4}
    assert list(got.index) == [0, 1, 2]


def test_select_prompts_deterministic_and_seed_dependent() -> None:
    runs = {tuple(select_prompts(pool_df(POOL_IDS), [], 3, seed=s).prompt_id)
            for s in range(20)}
    assert len(runs) > 1
    assert list(select_prompts(pool_df(POOL_IDS), [], 3, seed=7).prompt_id) == list(
        select_prompts(pool_df(POOL_IDS), [], 3, seed=7).prompt_id)


def test_select_prompts_all() -> None:
    pool = pool_df(POOL_IDS + ["p_a"])  # a duplicate is dropped
    assert list(select_prompts(pool, ["p_f"], 0, seed=1).prompt_id) == POOL_IDS
    assert list(select_prompts(pool, ["p_f"], 6, seed=1).prompt_id) == POOL_IDS
    assert list(select_prompts(pool, ["p_f"], 100, seed=1).prompt_id) == POOL_IDS


def test_select_prompts_more_new_than_k() -> None:
    got = select_prompts(pool_df(POOL_IDS), ["p_e", "p_b", "p_d"], 2, seed=1)
    assert list(got.prompt_id) == ["p_e", "p_b"]  # pool order of the new prompts, capped


def test_select_prompts_new_ids_not_in_pool_are_ignored() -> None:
    got = select_prompts(pool_df(POOL_IDS), ["p_zz"], 2, seed=1)
    assert len(got) == 2
    assert "p_zz" not in set(got.prompt_id)


# ------------------------------------------------------------------ sampling.balance_types


def typed_pool() -> pd.DataFrame:
    """Twelve prompts: eight max_words only, two lowercase (one also max_words), one ends_with,
    one without constraints."""
    spec = ([[{"type": "max_words", "n": 10}]] * 8
            + [[{"type": "lowercase"}], [{"type": "lowercase"}, {"type": "max_words", "n": 5}],
               [{"type": "ends_with", "phrase": "Done."}], []])
    ids = [f"p_{i:02d}" for i in range(len(spec))]
    return pd.DataFrame({"prompt_id": ids, "text": [f"text {i}" for i in ids],
                         "constraints": [json.dumps(c) for c in spec]})


def _type_counts(chosen: pd.DataFrame) -> dict[str, int]:
    return dict(Counter(t for c in chosen.constraints for t in prompt_types(c)))


def test_balanced_draw_takes_the_rare_types_first() -> None:
    pool = typed_pool()
    for seed in range(10):
        got = select_prompts(pool, [], 4, seed=seed, balance=True)
        # one of each type before a second of any: the lowercase + max_words prompt counts
        # for both, so max_words may come only through it
        counts = _type_counts(got)
        assert counts["ends_with"] == 1 and counts["(none)"] == 1 and counts["lowercase"] >= 1
        assert counts.get("max_words", 0) <= 2, (seed, counts)
        assert len(set(got.prompt_id)) == 4
    # a plain draw of four from this pool is mostly max_words
    plain = [_type_counts(select_prompts(pool, [], 4, seed=s)) for s in range(10)]
    assert sum(c.get("ends_with", 0) for c in plain) < 10


def test_balanced_draw_counts_the_new_prompts_and_keeps_them_first() -> None:
    pool = typed_pool()
    new = ["p_09", "p_10"]  # lowercase + max_words, ends_with
    got = select_prompts(pool, new, 4, seed=3, balance=True)
    assert list(got.prompt_id[:2]) == new
    # after the new prompts, (none) is the type with none yet: the draw takes p_11
    assert "p_11" in set(got.prompt_id[2:])
    # a new lowercase prompt: the draw of two takes two of the types with none yet
    # (max_words, ends_with, (none)), never the other lowercase prompt
    seen = set()
    for seed in range(10):
        got = select_prompts(pool, ["p_08"], 3, seed=seed, balance=True)
        picks = [prompt_types(c) for c in got.constraints[1:]]
        assert len(picks) == 2 and picks[0] != picks[1] and ["lowercase"] not in picks
        assert "p_09" not in set(got.prompt_id), seed
        seen.add(tuple(got.prompt_id))
    assert len(seen) > 1


def test_balanced_draw_is_seeded_and_fills_k_when_types_run_out() -> None:
    pool = typed_pool()
    first = list(select_prompts(pool, [], 9, seed=5, balance=True).prompt_id)
    assert first == list(select_prompts(pool, [], 9, seed=5, balance=True).prompt_id)
    assert len(first) == 9 == len(set(first))  # the rare types are used up: max_words fills
    assert {tuple(select_prompts(pool, [], 5, seed=s, balance=True).prompt_id)
            for s in range(10)} != {tuple(first[:5])}


def test_prompt_types() -> None:
    assert prompt_types("[]") == ["(none)"] and prompt_types(None) == ["(none)"]
    assert prompt_types(json.dumps([{"type": "lowercase"}, {"type": "max_words", "n": 3},
                                    {"type": "lowercase"}])) == ["lowercase", "max_words"]
