"""The phrase bank of the constraint library and varied phrasing in self-instruct.

Each constraint type has training phrasings (the first is its `describe`) and held-out transfer
phrasings; self-instruct writes a new prompt's instructions in a training phrasing only
(`prompts.phrasings: varied` draws one per prompt with the stage's rng; `one`, the default,
keeps each type's usual sentence), so no transfer phrasing ever reaches training.
"""

from __future__ import annotations

import itertools
import json
import random
import re

import pytest

from flywheel.config import PromptsConfig, config_from_dict, shaping
from flywheel.constraints import (
    CONSTRAINTS,
    PHRASINGS,
    describe_constraints,
    phrase_constraints,
    phrasings,
    renderings,
    rephrase,
    strip_instructions,
    verify,
)
from flywheel.errors import FlywheelError
from flywheel.stages.prompts import accept_tasks, constrained_prompt, task_text

#: parameters outside each type's `choices` too, as the eval file may use them
EXTRA = {"n": [1, 4, 12], "phrase": ["Good luck!", "In short"], "keyword": ["green"],
         "keys": [["a", "b", "c"]]}


def params_of(name: str) -> list[dict]:
    """Every combination of a type's choices, and a few values outside them."""
    ctype = CONSTRAINTS[name]
    names = list(ctype.params)
    if not names:
        return [{}]
    combos = [dict(zip(names, c)) for c in itertools.product(*(ctype.choices[p]
                                                               for p in names))]
    combos += [dict(zip(names, c)) for c in itertools.product(*(EXTRA[p] for p in names))]
    return combos


def constraints_of(name: str) -> list[dict]:
    return [{"type": name, **p} for p in params_of(name)]


ALL = [c for name in CONSTRAINTS for c in constraints_of(name)]


# -- the phrase bank --------------------------------------------------------------------------
def test_every_type_has_three_training_and_two_transfer_phrasings():
    assert set(PHRASINGS) == set(CONSTRAINTS)
    for name, book in PHRASINGS.items():
        assert len(book.training) >= 3, name
        assert len(book.transfer) >= 2, name
        assert phrasings(name) == book.training and phrasings(name, "transfer") == book.transfer


def test_the_first_training_phrasing_is_the_types_description_as_before():
    for c in ALL:
        params = {k: v for k, v in c.items() if k != "type"}
        assert renderings(c, "training")[0] == CONSTRAINTS[c["type"]].describe(**params)
    # today's sentences, unchanged (prompts made before the phrase bank keep their ids)
    assert describe_constraints([{"type": "max_words", "n": 20}]) == "Answer in at most 20 words."
    assert describe_constraints([{"type": "ends_with", "phrase": "Done."}]) == \
        'End your answer with the exact phrase "Done."'
    assert describe_constraints([{"type": "bullet_count", "n": 3}]) == \
        'Answer with exactly 3 bullet points, each starting with "- ".'
    assert describe_constraints([{"type": "max_sentences", "n": 1}]) == "Answer in one sentence."


@pytest.mark.parametrize("c", ALL, ids=lambda c: "-".join(map(str, c.values())))
def test_phrasings_are_distinct_sentences_and_the_splits_never_overlap(c):
    train, transfer = renderings(c, "training"), renderings(c, "transfer")
    assert len(train) == len(PHRASINGS[c["type"]].training)  # no two render the same
    assert len(transfer) == len(PHRASINGS[c["type"]].transfer)
    for text in train + transfer:
        assert text == text.strip() and text[-1] in '."', text
        assert "{" not in text and "  " not in text, text
    # no transfer sentence is, or is part of, a training sentence of any type, and back
    every_train = [t for other in ALL for t in renderings(other, "training")]
    every_transfer = [t for other in ALL for t in renderings(other, "transfer")]
    for t in transfer:
        assert not any(t in x for x in every_train), t
    for t in train:
        assert not any(t in x for x in every_transfer), t


def test_training_phrasings_say_answer_and_transfer_phrasings_say_response_or_reply():
    def words(t: str) -> str:  # the sentence without its quoted parameters
        return re.sub(r'"[^"]*"', "", t)

    for c in ALL:
        for t in renderings(c, "training"):
            assert re.search(r"\banswer\b", words(t), re.I), t
        for t in renderings(c, "transfer"):
            assert not re.search(r"\banswer\b", words(t), re.I), t
            assert re.search(r"\b(response|reply|return|output)\b", words(t), re.I), t


# the phrasings that restate the bound differently mean what the verifier checks
@pytest.mark.parametrize(("constraint", "index", "text", "passing", "failing"), [
    ({"type": "max_words", "n": 20}, 1, "Reply in fewer than 21 words.", 20, 21),
    ({"type": "min_words", "n": 10}, 1, "Reply with more than 9 words.", 10, 9),
])
def test_a_restated_bound_has_the_verifiers_meaning(constraint, index, text, passing, failing):
    assert renderings(constraint, "transfer")[index] == text
    assert verify(" ".join(["word"] * passing), [constraint])[0].passed
    assert not verify(" ".join(["word"] * failing), [constraint])[0].passed


def test_phrase_constraints_draws_one_phrasing_per_constraint_from_its_split():
    cons = [{"type": "max_words", "n": 20}, {"type": "lowercase"}]
    assert phrase_constraints(cons) == describe_constraints(cons)
    seen = {phrase_constraints(cons, random.Random(i)) for i in range(200)}
    options = {f"{a} {b}" for a in renderings(cons[0], "training")
               for b in renderings(cons[1], "training")}
    assert seen == options  # 3 x 3, every one drawn
    held = {phrase_constraints(cons, random.Random(i), split="transfer") for i in range(200)}
    assert held == {f"{a} {b}" for a in renderings(cons[0], "transfer")
                    for b in renderings(cons[1], "transfer")}
    with pytest.raises(ValueError, match="unknown phrasing split 'test'"):
        phrase_constraints(cons, split="test")
    with pytest.raises(FlywheelError, match="invalid constraints"):
        phrase_constraints([{"type": "max_words"}])


# -- stripping instructions back off ----------------------------------------------------------
@pytest.mark.parametrize("split", ["training", "transfer"])
def test_strip_instructions_takes_off_any_phrasing_of_either_split(split):
    task = "Explain how a rainbow forms."
    for c in ALL:
        for sentence in renderings(c, split):
            assert strip_instructions(f"{task} {sentence}", [c]) == task
            assert task_text(f"{task} {sentence}", [c]) == task


def test_strip_instructions_with_two_constraints_in_mixed_splits_and_a_text_left_alone():
    task = "Name two planets."
    cons = [{"type": "max_words", "n": 20}, {"type": "starts_with", "phrase": "Sure"}]
    text = f"{task} {renderings(cons[0], 'transfer')[1]} {renderings(cons[1], 'training')[2]}"
    assert strip_instructions(text, cons) == task
    # all or nothing, as before: a text that does not end with every instruction is unchanged
    assert strip_instructions(f"{task} Answer in at most 20 words.", cons) == \
        f"{task} Answer in at most 20 words."
    assert strip_instructions(task, cons) == task
    assert task_text(task, []) == task


# -- self-instruct ----------------------------------------------------------------------------
def pcfg(**kw) -> PromptsConfig:
    base = {"num_new": 1000, "min_chars": 5, "max_chars": 400, "dedupe_threshold": 1.01,
            "constraint_prob": 1.0, "max_constraints": 3, "constraint_types": []}
    return PromptsConfig(**{**base, **kw})


TASKS = [f"Explain topic number {i} to a child." for i in range(150)]


def test_varied_self_instruct_never_writes_a_transfer_phrasing():
    """Many seeded runs of the generator's prompt builder: every instruction is a training
    phrasing; none of the held-out transfer sentences (with the prompt's own parameters)
    occurs anywhere in a prompt."""
    used: dict[str, set[int]] = {}  # type -> indexes of the training phrasings used
    prompts = 0
    for seed in range(20):
        rows, stats = accept_tasks(TASKS, [[]] * len(TASKS), [], [], pcfg(phrasings="varied"),
                                   random.Random(seed), "m")
        assert stats == {"accepted": len(TASKS)}
        for text, cons in zip(rows.text, rows.constraints):
            cons = json.loads(cons)
            assert cons, text  # constraint_prob 1
            prompts += 1
            for c in cons:
                for held_out in renderings(c, "transfer"):
                    assert held_out not in text, (held_out, text)
            # the text is the task and one training phrasing per constraint, in order
            rest = text
            for c in reversed(cons):
                train = renderings(c, "training")
                match = max((t for t in train if rest.endswith(t)), key=len, default=None)
                assert match is not None, (c, text)
                used.setdefault(c["type"], set()).add(train.index(match))
                rest = rest[: -len(match)].rstrip()
            assert rest in TASKS
    assert prompts == 20 * len(TASKS)
    # varied: every training phrasing of every type was used
    for name in CONSTRAINTS:
        assert used[name] == set(range(len(PHRASINGS[name].training))), name


def test_one_phrasing_is_todays_prompt_and_varied_is_deterministic():
    cfg = pcfg(num_new=40, max_constraints=2)
    rows, _ = accept_tasks(TASKS[:40], [[]] * 40, [], [], cfg, random.Random(3), "m")
    for text, cons in zip(rows.text, rows.constraints):
        cons = json.loads(cons)
        assert text == f"{text[: text.index('.') + 1]} {describe_constraints(cons)}"
    varied = pcfg(num_new=40, max_constraints=2, phrasings="varied")
    a, _ = accept_tasks(TASKS[:40], [[]] * 40, [], [], varied, random.Random(3), "m")
    b, _ = accept_tasks(TASKS[:40], [[]] * 40, [], [], varied, random.Random(3), "m")
    assert list(a.text) == list(b.text)
    assert list(a.text) != list(rows.text)  # the draws differ from the usual sentences


def test_constrained_prompt_without_constraints_is_the_task():
    text, cons = constrained_prompt("Explain tides.", pcfg(constraint_prob=0.0),
                                    random.Random(0))
    assert (text, cons) == ("Explain tides.", [])


def test_the_phrasings_setting_defaults_to_one_and_enters_the_fingerprint_only_when_varied():
    assert PromptsConfig().phrasings == "one"
    assert "phrasings" not in shaping(PromptsConfig())
    assert shaping(PromptsConfig(phrasings="varied"))["phrasings"] == "varied"
    with pytest.raises(FlywheelError) as err:
        config_from_dict({"prompts": {"phrasings": "many"}})
    text = str(err.value) + " ".join(getattr(err.value, "details", []) or [])
    assert "prompts.phrasings" in text and "varied" in text


# -- rephrase (train.sft_rephrase) -----------------------------------------------------------
def test_rephrase_moves_each_instruction_along_its_training_phrasings():
    cons = [{"type": "max_words", "n": 20}, {"type": "ends_with", "phrase": "Done."}]
    text = "Explain a compass. " + describe_constraints(cons)
    words = [f(n=20) for f in phrasings("max_words")]
    ends = [f(phrase="Done.") for f in phrasings("ends_with")]
    assert rephrase(text, cons, 0) == text
    assert rephrase(text, cons, 1) == f"Explain a compass. {words[1]} {ends[1]}"
    assert rephrase(text, cons, 2) == f"Explain a compass. {words[2]} {ends[2]}"
    assert rephrase(text, cons, 3) == text  # three training phrasings: wraps around
    # from another phrasing, the shift counts from it
    assert rephrase(f"Explain a compass. {words[2]} {ends[1]}", cons, 1) == \
        f"Explain a compass. {words[0]} {ends[2]}"
    for shift in range(4):  # the task is kept, no transfer phrasing is ever written
        again = rephrase(text, cons, shift)
        assert strip_instructions(again, cons) == "Explain a compass."
        assert not any(t in again for c in cons for t in renderings(c, "transfer"))


def test_rephrase_of_text_without_its_instructions_is_none():
    cons = [{"type": "lowercase"}]
    assert rephrase("Explain a compass.", cons, 1) is None
    assert rephrase("Explain a compass.", [], 1) is None
    # a transfer phrasing is not a training one: nothing to move along
    transfer = "Explain a compass. " + phrasings("lowercase", "transfer")[0]()
    assert rephrase(transfer, cons, 1) is None
