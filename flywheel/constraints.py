"""Checkable constraints on responses, and their verifiers.

A prompt may carry constraints as data next to its text, e.g.
``[{"type": "max_words", "n": 20}, {"type": "lowercase"}]``. Each constraint
type has a plain Python verifier (``check``), a natural-language instruction
(``describe``) and parameter ``choices`` for synthesising new constrained prompts.

Each type is also worded in several phrasings (:data:`PHRASINGS`): TRAINING phrasings, the
first of which is ``describe``, for the prompts the loop trains on, and held-out TRANSFER
phrasings, used only by the eval's transfer split (see flywheel.promptfile);
:func:`phrase_constraints` writes instructions in one, :func:`strip_instructions` takes any of
them back off a prompt.

Counting conventions (shared by every verifier):

* Words: ``re.findall(r"\\b\\w+(?:['’]\\w+)*\\b", text)`` — runs of letters, digits
  or underscores; an apostrophe between word characters joins them, so
  "don't" is one word. Punctuation and markdown symbols never count.
* Sentences: the text is split after runs of ``.``, ``!`` or ``?`` that are
  followed by whitespace or the end of the text; pieces with at least one
  letter or digit count. "3.5 is small." is one sentence.
* Keywords: case-insensitive, whole word (not preceded or followed by a word
  character), so "simple" does not match "simplest".
* Bullets: lines that start, after optional whitespace, with "- " or "* ".
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flywheel.errors import FlywheelError

WORD_RE = re.compile(r"\b\w+(?:['’]\w+)*\b")
SENTENCE_SPLIT_RE = re.compile(r"[.!?]+(?=\s|$)")
BULLET_RE = re.compile(r"^\s*[-*] ")
FENCE_RE = re.compile(r"^```[ \t]*(?:json)?[ \t]*\n(.*?)\n?```$", re.DOTALL | re.IGNORECASE)

Evaluation = tuple[bool, str]


@dataclass(frozen=True)
class ConstraintType:
    """One kind of checkable constraint.

    ``check(response, **params) -> bool`` and ``describe(**params) -> str`` are
    the public interface; ``evaluate`` returns ``(passed, detail)`` and is what
    ``check`` and :func:`verify` are built on.
    """

    name: str
    version: str
    params: dict[str, type]
    check: Callable[..., bool]
    describe: Callable[..., str]
    choices: dict[str, list]
    evaluate: Callable[..., Evaluation] = field(repr=False, compare=False)

    @property
    def verifier(self) -> str:
        """Verifier id, ``name@version``."""
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class VerifierResult:
    """The outcome of checking one constraint against one response."""

    type: str
    verifier: str
    passed: bool
    detail: str


# ---------------------------------------------------------------- counting


def count_words(text: str) -> int:
    """Number of words in ``text`` (see module docstring)."""
    return len(WORD_RE.findall(text))


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``: pieces between terminators that contain a letter or digit."""
    return [p.strip() for p in SENTENCE_SPLIT_RE.split(text) if any(ch.isalnum() for ch in p)]


def _keyword_re(keyword: str) -> re.Pattern[str]:
    """Case-insensitive whole-word pattern for ``keyword``."""
    return re.compile(r"(?<!\w)" + re.escape(keyword) + r"(?!\w)", re.IGNORECASE)


def _plural(n: int, word: str) -> str:
    """``'1 word'`` / ``'3 words'``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _short(text: str, limit: int = 30) -> str:
    """``repr`` of ``text``, shortened to about ``limit`` characters."""
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def _quote_list(items: Sequence[str]) -> str:
    """'"a"', '"a" and "b"', '"a", "b" and "c"'."""
    quoted = [f'"{i}"' for i in items]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


# ---------------------------------------------------------------- evaluators


def _max_words(response: str, n: int) -> Evaluation:
    count = count_words(response)
    return (count <= n, f"{_plural(count, 'word')} {'<=' if count <= n else '>'} {n}")


def _min_words(response: str, n: int) -> Evaluation:
    count = count_words(response)
    return (count >= n, f"{_plural(count, 'word')} {'>=' if count >= n else '<'} {n}")


def _lowercase(response: str) -> Evaluation:
    upper = sorted({ch for ch in response if ch.isupper()})
    if upper:
        return (False, "uppercase letters found: " + ", ".join(upper[:5]))
    if not any(ch.isalpha() for ch in response):
        return (False, "no letters")
    return (True, "all letters lowercase")


def _uppercase(response: str) -> Evaluation:
    lower = sorted({ch for ch in response if ch.islower()})
    if lower:
        return (False, "lowercase letters found: " + ", ".join(lower[:5]))
    if not any(ch.isalpha() for ch in response):
        return (False, "no letters")
    return (True, "all letters uppercase")


def _ends_with(response: str, phrase: str) -> Evaluation:
    text = response.rstrip()
    if text.endswith(phrase):
        return (True, f"ends with {phrase!r}")
    return (False, f"ends with {_short(text[-len(phrase) - 10 :])}, not {phrase!r}")


def _starts_with(response: str, phrase: str) -> Evaluation:
    text = response.strip()
    if text.startswith(phrase):
        return (True, f"starts with {phrase!r}")
    return (False, f"starts with {_short(text[: len(phrase) + 10])}, not {phrase!r}")


def _contains_keyword(response: str, keyword: str) -> Evaluation:
    hits = len(_keyword_re(keyword).findall(response))
    if hits:
        return (True, f"{keyword!r} found {_plural(hits, 'time')}")
    return (False, f"{keyword!r} not found")


def _excludes_keyword(response: str, keyword: str) -> Evaluation:
    hits = len(_keyword_re(keyword).findall(response))
    if hits:
        return (False, f"{keyword!r} found {_plural(hits, 'time')}")
    return (True, f"{keyword!r} not found")


def _bullet_count(response: str, n: int) -> Evaluation:
    count = sum(1 for line in response.splitlines() if BULLET_RE.match(line))
    op = "==" if count == n else "!="
    return (count == n, f"{_plural(count, 'bullet')} {op} {n}")


def _json_body(response: str) -> str:
    """The response with surrounding whitespace and an optional ``` fence removed."""
    text = response.strip()
    match = FENCE_RE.match(text)
    return match.group(1).strip() if match else text


def _json_keys(response: str, keys: list[str]) -> Evaluation:
    try:
        value = json.loads(_json_body(response))
    except json.JSONDecodeError as exc:
        return (False, f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})")
    if not isinstance(value, dict):
        return (False, f"JSON is {_json_kind(value)}, not an object")
    missing = [k for k in keys if k not in value]
    if missing:
        return (False, "missing keys: " + ", ".join(missing))
    return (True, "JSON object has keys: " + ", ".join(keys))


def _json_kind(value: Any) -> str:
    """'an array', 'a string', ... for a parsed JSON value."""
    kinds = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")


def _no_commas(response: str) -> Evaluation:
    count = response.count(",")
    return (count == 0, f"{_plural(count, 'comma')} found" if count else "no commas")


def _max_sentences(response: str, n: int) -> Evaluation:
    count = len(split_sentences(response))
    return (count <= n, f"{_plural(count, 'sentence')} {'<=' if count <= n else '>'} {n}")


# ---------------------------------------------------------------- phrasings
#
# Each type is instructed in several phrasings, all with the same meaning for its verifier.
# TRAINING phrasings are the ones prompts made for training use (the seed file and
# self-instruct); TRANSFER phrasings are held out: only the transfer split of the eval file
# uses them, so the eval measures whether what the loop teaches carries over to wordings it
# never trained on. Training phrasings speak of "your answer"; transfer phrasings of "your
# response" or "your reply". The first training phrasing is the type's ``describe``.

Phrasing = Callable[..., str]


def _stop(phrase: str) -> str:
    """'' when a quoted phrase already ends the sentence ("Done."), else '.'."""
    return "" if phrase[-1:] in ".!?" else "."


def _keys(keys: list[str]) -> str:
    """'the key "a"' / 'the keys "a" and "b"'."""
    return ("the key " if len(keys) == 1 else "the keys ") + _quote_list(keys)


def _sentences(n: int) -> str:
    return _plural(n, "sentence")


def _bullets(n: int) -> str:
    return _plural(n, "bullet point")


@dataclass(frozen=True)
class Phrasebook:
    """The phrasings of one constraint type: ``training`` (the first is its ``describe``)
    and held-out ``transfer`` ones; each takes the type's parameters as keywords."""

    training: tuple[Phrasing, ...]
    transfer: tuple[Phrasing, ...]


#: Phrasing splits: which phrasings a prompt may be written with.
PHRASING_SPLITS = ("training", "transfer")

PHRASINGS: dict[str, Phrasebook] = {
    "max_words": Phrasebook(
        training=(lambda n: f"Answer in at most {n} words.",
                  lambda n: f"Use no more than {n} words in your answer.",
                  lambda n: f"Keep your answer to {n} words or fewer."),
        transfer=(lambda n: f"Your response must not exceed {n} words.",
                  lambda n: f"Reply in fewer than {n + 1} words."),
    ),
    "min_words": Phrasebook(
        training=(lambda n: f"Answer in at least {n} words.",
                  lambda n: f"Use {n} or more words in your answer.",
                  lambda n: f"Write no fewer than {n} words in your answer."),
        transfer=(lambda n: f"Your response must contain a minimum of {n} words.",
                  lambda n: f"Reply with more than {n - 1} words."),
    ),
    "lowercase": Phrasebook(
        training=(lambda: "Write your whole answer in lowercase letters only.",
                  lambda: "Use only lowercase letters in your answer.",
                  lambda: "Do not use any capital letters in your answer."),
        transfer=(lambda: "Your entire response should be in small letters, with no "
                          "uppercase characters at all.",
                  lambda: "Reply without a single capital letter."),
    ),
    "uppercase": Phrasebook(
        training=(lambda: "Write your whole answer in capital letters only.",
                  lambda: "Use only uppercase letters in your answer.",
                  lambda: "Write your answer in ALL CAPS."),
        transfer=(lambda: "Your entire response should be in block capitals, with no "
                          "lowercase characters at all.",
                  lambda: "Reply without a single small letter."),
    ),
    "ends_with": Phrasebook(
        training=(lambda phrase: f'End your answer with the exact phrase "{phrase}"'
                                 f"{_stop(phrase)}",
                  lambda phrase: f'Finish your answer with "{phrase}"{_stop(phrase)}',
                  lambda phrase: f'The last words of your answer must be "{phrase}"'
                                 f"{_stop(phrase)}"),
        transfer=(lambda phrase: f'Your response must conclude with the words "{phrase}"'
                                 f"{_stop(phrase)}",
                  lambda phrase: f'Close the reply with "{phrase}", with nothing after it.'),
    ),
    "starts_with": Phrasebook(
        training=(lambda phrase: f'Start your answer with "{phrase}".',
                  lambda phrase: f'Begin your answer with "{phrase}".',
                  lambda phrase: f'Your answer must open with "{phrase}".'),
        transfer=(lambda phrase: f'The very first word of your response must be "{phrase}".'
                  if " " not in phrase.strip() else
                  f'The very first words of your response must be "{phrase}".',
                  lambda phrase: f'Put "{phrase}" at the very beginning of the reply.'),
    ),
    "contains_keyword": Phrasebook(
        training=(lambda keyword: f'Use the word "{keyword}" in your answer.',
                  lambda keyword: f'Include the word "{keyword}" in your answer.',
                  lambda keyword: f'Make sure your answer contains the word "{keyword}".'),
        transfer=(lambda keyword: f'Your response must mention "{keyword}" at least once.',
                  lambda keyword: f'Work the word "{keyword}" into the reply.'),
    ),
    "excludes_keyword": Phrasebook(
        training=(lambda keyword: f'Do not use the word "{keyword}" in your answer.',
                  lambda keyword: f'Avoid the word "{keyword}" in your answer.',
                  lambda keyword: f'Never write the word "{keyword}" in your answer.'),
        transfer=(lambda keyword: f'Your response must not contain "{keyword}" anywhere.',
                  lambda keyword: f'Leave the word "{keyword}" out of the reply entirely.'),
    ),
    "bullet_count": Phrasebook(
        training=(lambda n: f'Answer with exactly {n} bullet points, each starting with "- ".',
                  lambda n: f'Give exactly {_bullets(n)} in your answer, each on its own '
                            f'line starting with "- ".',
                  lambda n: f'Write your answer as a list of exactly {_bullets(n)} that '
                            f'start with "- ".'),
        transfer=(lambda n: f'Format the response as precisely {n} '
                            f'{"line" if n == 1 else "lines"} beginning with "- ", no more '
                            f"and no fewer.",
                  lambda n: f"Reply with a list of {n} {'item' if n == 1 else 'items'}, each "
                            'on a new line that begins with "- ".'),
    ),
    "json_keys": Phrasebook(
        training=(lambda keys: f"Answer only with a JSON object that has {_keys(keys)}.",
                  lambda keys: f"Give only a JSON object containing {_keys(keys)} as your "
                               "answer.",
                  lambda keys: f"Your whole answer must be a JSON object with {_keys(keys)}."),
        transfer=(lambda keys: "Return nothing but a valid JSON object whose fields include "
                               f"{_quote_list(keys)}.",
                  lambda keys: "Output a single JSON object (no other text) with the "
                               f"{'property' if len(keys) == 1 else 'properties'} "
                               f"{_quote_list(keys)}."),
    ),
    "no_commas": Phrasebook(
        training=(lambda: "Do not use any commas in your answer.",
                  lambda: "Write your answer without commas.",
                  lambda: "Avoid commas entirely in your answer."),
        transfer=(lambda: "Your response must not contain a single comma.",
                  lambda: "Refrain from using the comma character anywhere in the reply."),
    ),
    "max_sentences": Phrasebook(
        training=(lambda n: "Answer in one sentence." if n == 1
                  else f"Answer in at most {n} sentences.",
                  lambda n: f"Use no more than {_sentences(n)} in your answer.",
                  lambda n: "Keep your answer to a single sentence." if n == 1
                  else f"Keep your answer to {n} sentences or fewer."),
        transfer=(lambda n: f"Your response must not exceed {_sentences(n)}.",
                  lambda n: "Reply in just one sentence." if n == 1
                  else f"Limit the reply to a maximum of {n} sentences."),
    ),
}


# ---------------------------------------------------------------- registry


def _make(
    name: str,
    params: dict[str, type],
    evaluate: Callable[..., Evaluation],
    choices: dict[str, list] | None = None,
    version: str = "1",
) -> ConstraintType:
    """Build a :class:`ConstraintType` whose ``check`` is derived from ``evaluate`` and whose
    ``describe`` is its first training phrasing (see :data:`PHRASINGS`)."""

    def check(response: str, **kwargs: Any) -> bool:
        return evaluate(response, **kwargs)[0]

    check.__name__ = f"check_{name}"
    check.__doc__ = f"True when ``response`` satisfies {name}."
    describe = PHRASINGS[name].training[0]
    return ConstraintType(name, version, params, check, describe, choices or {}, evaluate)


CONSTRAINTS: dict[str, ConstraintType] = {
    c.name: c
    for c in [
        _make("max_words", {"n": int}, _max_words, {"n": [10, 15, 20, 25, 30]}),
        _make("min_words", {"n": int}, _min_words, {"n": [5, 10]}),
        _make("lowercase", {}, _lowercase),
        _make("uppercase", {}, _uppercase),
        _make("ends_with", {"phrase": str}, _ends_with,
              {"phrase": ["Done.", "That is all.", "Thank you."]}),
        _make("starts_with", {"phrase": str}, _starts_with,
              {"phrase": ["Yes", "Sure", "Answer:"]}),
        _make("contains_keyword", {"keyword": str}, _contains_keyword,
              {"keyword": ["simple", "example", "important", "because"]}),
        _make("excludes_keyword", {"keyword": str}, _excludes_keyword,
              {"keyword": ["very", "also", "really", "can"]}),
        _make("bullet_count", {"n": int}, _bullet_count, {"n": [2, 3]}),
        _make("json_keys", {"keys": list}, _json_keys, {"keys": [["answer"], ["name", "reason"]]}),
        _make("no_commas", {}, _no_commas),
        _make("max_sentences", {"n": int}, _max_sentences, {"n": [1, 2, 3]}),
    ]
}


# ---------------------------------------------------------------- validation


def _type_name(value: Any) -> str:
    """JSON-ish name of a value's type for error messages."""
    return {dict: "object", list: "list", type(None): "null"}.get(type(value), type(value).__name__)


def _got(value: Any) -> str:
    """'str '5'' — the type and a short repr of a bad value."""
    text = repr(value)
    return f"{_type_name(value)} {text if len(text) <= 40 else text[:37] + '...'}"


def _param_error(name: str, expected: type, value: Any) -> str | None:
    """Why ``value`` is not a valid parameter of type ``expected`` (None when valid)."""
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"expected int, got {_got(value)}"
        return None if value >= 1 else f"expected a positive int, got {value}"
    if expected is str:
        if not isinstance(value, str):
            return f"expected str, got {_got(value)}"
        return None if value.strip() else "expected a non-empty string, got ''"
    if expected is list:
        if not isinstance(value, list):
            return f"expected list, got {_got(value)}"
        if not value or not all(isinstance(v, str) and v.strip() for v in value):
            return f"expected a non-empty list of non-empty strings, got {_got(value)}"
    return None


def _expected(ctype: ConstraintType) -> str:
    """'expected: n' / 'expected: no parameters'."""
    return "expected: " + (", ".join(ctype.params) if ctype.params else "no parameters")


def _validate_one(item: Any, at: str) -> list[str]:
    """Errors of one constraint object; ``at`` is e.g. ``'where: constraints[0]'``."""
    valid = ", ".join(sorted(CONSTRAINTS))
    if not isinstance(item, dict):
        return [f'{at}: expected an object like {{"type": "max_words", "n": 20}}, got {_got(item)}']
    if "type" not in item:
        return [f'{at}: missing "type" (valid types: {valid})']
    name = item["type"]
    if not isinstance(name, str):
        return [f"{at}.type: expected str, got {_got(name)} (valid types: {valid})"]
    if name not in CONSTRAINTS:
        return [f"{at}.type: unknown constraint type {name!r} (valid types: {valid})"]
    ctype = CONSTRAINTS[name]
    errors = [
        f"{at}: missing parameter {p!r} for {name} ({_expected(ctype)})"
        for p in ctype.params
        if p not in item
    ]
    errors += [
        f"{at}: unexpected parameter {p!r} for {name} ({_expected(ctype)})"
        for p in item
        if p != "type" and p not in ctype.params
    ]
    for p, expected in ctype.params.items():
        problem = _param_error(p, expected, item[p]) if p in item else None
        if problem:
            errors.append(f"{at}.{p}: {problem}")
    return errors


def validate_constraints(constraints: Any, where: str) -> list[str]:
    """All problems with a constraints value, each prefixed by ``where``; [] when valid."""
    if not isinstance(constraints, list):
        return [f"{where}: constraints: expected a list of objects, got {_got(constraints)}"]
    errors: list[str] = []
    for i, item in enumerate(constraints):
        errors += _validate_one(item, f"{where}: constraints[{i}]")
    return errors


def _require_valid(constraints: Any) -> None:
    """Raise :class:`FlywheelError` listing every problem when ``constraints`` is invalid."""
    errors = validate_constraints(constraints, "constraints")
    if errors:
        raise FlywheelError("invalid constraints", details=errors)


def _params(constraint: dict) -> dict[str, Any]:
    """The parameters of a constraint object (everything but ``type``)."""
    return {k: v for k, v in constraint.items() if k != "type"}


# ---------------------------------------------------------------- verification


def verify(response: str, constraints: list[dict]) -> list[VerifierResult]:
    """Check ``response`` against each constraint; one result per constraint, in order."""
    _require_valid(constraints)
    results = []
    for c in constraints:
        ctype = CONSTRAINTS[c["type"]]
        passed, detail = ctype.evaluate(response, **_params(c))
        results.append(VerifierResult(ctype.name, ctype.verifier, passed, detail))
    return results


def pass_fraction(results: Sequence[VerifierResult]) -> float | None:
    """Fraction of results that passed; None when there are no results."""
    if not results:
        return None
    return sum(r.passed for r in results) / len(results)


def describe_constraints(constraints: list[dict]) -> str:
    """The natural-language instructions for ``constraints``, joined by spaces."""
    _require_valid(constraints)
    return " ".join(CONSTRAINTS[c["type"]].describe(**_params(c)) for c in constraints)


def phrasings(name: str, split: str = "training") -> tuple[Phrasing, ...]:
    """The phrasings of constraint type ``name`` in ``split`` (training or transfer)."""
    if split not in PHRASING_SPLITS:
        raise ValueError(f"unknown phrasing split {split!r} (one of: "
                         f"{', '.join(PHRASING_SPLITS)})")
    return getattr(PHRASINGS[name], split)


def phrase_constraints(constraints: list[dict], rng: random.Random | None = None,
                       split: str = "training") -> str:
    """The instructions for ``constraints``, joined by spaces, each in a phrasing of ``split``
    drawn with ``rng`` (one draw per constraint). Without an rng: each type's first phrasing
    of the split, so ``phrase_constraints(c)`` is :func:`describe_constraints`."""
    _require_valid(constraints)
    out = []
    for c in constraints:
        options = phrasings(c["type"], split)
        chosen = options[0] if rng is None else options[rng.randrange(len(options))]
        out.append(chosen(**_params(c)))
    return " ".join(out)


def renderings(constraint: dict, split: str | None = None) -> list[str]:
    """Every phrasing of one constraint rendered with its parameters (of ``split``; None:
    both splits), without repeats, in phrasebook order."""
    _require_valid([constraint])
    splits = PHRASING_SPLITS if split is None else (split,)
    texts = [f(**_params(constraint)) for s in splits for f in phrasings(constraint["type"], s)]
    return list(dict.fromkeys(texts))


def strip_instructions(text: str, constraints: list[dict]) -> str:
    """``text`` without the instruction sentences of ``constraints`` at its end, in any of
    their phrasings (both splits): the task alone. The instructions follow the task in the
    constraints' order; a text that does not end with one phrasing of each of them is returned
    unchanged."""
    rest = text
    for c in reversed(constraints):
        match = next((r for r in sorted(renderings(c), key=len, reverse=True)
                      if rest.endswith(r)), None)
        if match is None:
            return text
        rest = rest[: -len(match)].rstrip()
    return rest.strip()


def stored_constraints(value) -> list[dict]:
    """A prompt row's constraints, stored as JSON text or as a list (None: none)."""
    return json.loads(value) if isinstance(value, str) else list(value or [])


def rephrase(text: str, constraints: list[dict], shift: int) -> str | None:
    """``text`` with each instruction sentence at its end moved ``shift`` places along its
    type's training phrasings (wrapping around): the same task and constraints in other words.
    None when the text does not end with a training phrasing of each constraint, in order."""
    if not constraints:
        return None
    rest, chosen = text, []
    for c in reversed(constraints):
        options = [f(**_params(c)) for f in phrasings(c["type"], "training")]
        at = max((i for i, r in enumerate(options) if rest.endswith(r)),
                 key=lambda i: len(options[i]), default=None)
        if at is None:
            return None
        rest = rest[: -len(options[at])].rstrip()
        chosen.append(options[(at + shift) % len(options)])
    return " ".join([rest, *reversed(chosen)]).strip()


# ---------------------------------------------------------------- sampling

# Type pairs that never go together, whatever their parameters.
_EXCLUSIVE: set[frozenset[str]] = {
    frozenset(pair)
    for pair in [
        ("lowercase", "uppercase"),
        ("json_keys", "bullet_count"),
        ("json_keys", "max_sentences"),
        ("json_keys", "starts_with"),
        ("json_keys", "ends_with"),
        ("json_keys", "no_commas"),
        ("json_keys", "uppercase"),
        ("bullet_count", "max_sentences"),
    ]
}


def _phrase_clashes(phrase: str, other: dict) -> bool:
    """True when a starts_with/ends_with ``phrase`` cannot coexist with ``other``."""
    kind = other["type"]
    if kind == "lowercase":
        return any(ch.isupper() for ch in phrase)
    if kind == "uppercase":
        return any(ch.islower() for ch in phrase)
    if kind == "no_commas":
        return "," in phrase
    if kind == "excludes_keyword":
        return bool(_keyword_re(other["keyword"]).search(phrase))
    if kind == "max_words":
        return count_words(phrase) >= other["n"]
    if kind == "max_sentences":
        return len(split_sentences(phrase)) >= other["n"] and phrase.rstrip()[-1:] in ".!?"
    return False


def _one_way_conflict(a: dict, b: dict) -> bool:
    """Conflicts checked from ``a``'s side (see :func:`compatible`)."""
    if a["type"] in ("starts_with", "ends_with"):
        return _phrase_clashes(a["phrase"], b)
    if a["type"] == "min_words" and b["type"] == "max_words":
        return a["n"] >= b["n"]
    if a["type"] == "contains_keyword" and b["type"] == "excludes_keyword":
        return a["keyword"].lower() == b["keyword"].lower()
    return False


def compatible(a: dict, b: dict) -> bool:
    """True when constraints ``a`` and ``b`` can both be satisfied by a sensible answer."""
    if a["type"] == b["type"] or frozenset((a["type"], b["type"])) in _EXCLUSIVE:
        return False
    return not (_one_way_conflict(a, b) or _one_way_conflict(b, a))


def _draw(rng: random.Random, name: str) -> dict:
    """A constraint of type ``name`` with parameters drawn from its ``choices``."""
    ctype = CONSTRAINTS[name]
    drawn = {p: rng.choice(ctype.choices[p]) for p in ctype.params}
    return {"type": name, **{p: list(v) if isinstance(v, list) else v for p, v in drawn.items()}}


def _try_sample(rng: random.Random, k: int, pool: list[str]) -> list[dict]:
    """One greedy pass: shuffle ``pool`` and keep compatible draws until ``k`` are chosen."""
    order = list(pool)
    rng.shuffle(order)
    chosen: list[dict] = []
    for name in order:
        if len(chosen) == k:
            break
        for _ in range(3):
            candidate = _draw(rng, name)
            if all(compatible(candidate, c) for c in chosen):
                chosen.append(candidate)
                break
    return chosen


def sample_constraints(rng: random.Random, k: int, types: list[str] | None = None) -> list[dict]:
    """Draw ``k`` distinct, mutually compatible constraints from ``types`` (default: all).

    Parameters come from each type's ``choices``; only ``rng`` is used for
    randomness, so the result is deterministic for a given rng state.
    """
    pool = list(CONSTRAINTS) if types is None else list(dict.fromkeys(types))
    unknown = [t for t in pool if t not in CONSTRAINTS]
    if unknown:
        raise FlywheelError(
            f"unknown constraint type(s): {', '.join(unknown)}",
            details=[f"valid types: {', '.join(sorted(CONSTRAINTS))}"],
        )
    if not 0 <= k <= len(pool):
        raise FlywheelError(
            f"cannot sample {k} constraints from {len(pool)} type(s)",
            details=[f"choose k between 0 and {len(pool)}, or allow more types"],
        )
    for _ in range(50):
        chosen = _try_sample(rng, k, pool)
        if len(chosen) == k:
            return chosen
    raise FlywheelError(
        f"could not find {k} mutually compatible constraints among: {', '.join(pool)}",
        details=["lower k, or allow more constraint types"],
    )


# ---------------------------------------------------------------- repairs
#
# A repair rewrites an answer so that it meets one constraint, by program: the least edit that
# makes the verifier pass (lower-case it, append the closing phrase, keep the first n
# sentences...). `pairs.repair` uses them where a prompt's candidates all fail: the best of them,
# repaired, is the chosen answer and the candidate itself the rejected one, so the pair differs
# in what the constraint asks and little else. A repair returns None when no such edit exists
# (an answer without letters cannot be lower-cased into a pass; two sentences cannot make three
# bullets). Types without a repair (contains_keyword, min_words: the edit would have to write
# new content) are left to exploration.


def _cut_after(text: str, pattern: re.Pattern[str], n: int) -> str | None:
    """``text`` up to the end of the n-th match of ``pattern`` (None when fewer)."""
    ends = [m.end() for m in pattern.finditer(text)]
    return text[: ends[n - 1]] if len(ends) >= n else None


def _repair_max_words(text: str, n: int) -> str | None:
    if count_words(text) <= n:
        return text
    cut = _cut_after(text, WORD_RE, n)
    return None if cut is None or n < 1 else cut.rstrip(" ,;:-") + "."


_SENTENCE_RE = re.compile(r"[^.!?]*?\w[^.!?]*?(?:[.!?]+(?=\s|$)|$)", re.DOTALL)


def _sentences_kept(text: str) -> list[str]:
    """The sentences of ``text`` with their terminators, as `split_sentences` counts them."""
    return [m.group(0).strip() for m in _SENTENCE_RE.finditer(text) if m.group(0).strip()]


def _repair_max_sentences(text: str, n: int) -> str | None:
    kept = _sentences_kept(text)
    if len(kept) <= n:
        return text
    return " ".join(kept[:n]) if n >= 1 else None


_NUMBERED_RE = re.compile(r"^\s*\d+[.)]\s+")


def _repair_bullet_count(text: str, n: int) -> str | None:
    """n bullets: the answer's own list items (bulleted, numbered, or its lines), else its
    sentences; the first n of them."""
    lines = [line for line in text.splitlines() if line.strip()]
    for items in ([BULLET_RE.sub("", x).strip() for x in lines if BULLET_RE.match(x)],
                  [_NUMBERED_RE.sub("", x).strip() for x in lines if _NUMBERED_RE.match(x)],
                  [x.strip() for x in lines], _sentences_kept(text)):
        items = [x for x in items if any(ch.isalnum() for ch in x)]
        if n >= 1 and len(items) >= n:
            return "\n".join(f"- {item}" for item in items[:n])
    return None


def _repair_json_keys(text: str, keys: list[str]) -> str | None:
    """A JSON object of the answer: one key holds it all; several take a sentence each (the
    last key the rest)."""
    body = _json_body(text).strip()
    parts = [body] if len(keys) == 1 else _sentences_kept(body)
    if not keys or not body or len(parts) < len(keys):
        return None
    values = parts[: len(keys) - 1] + [" ".join(parts[len(keys) - 1:])]
    return json.dumps(dict(zip(keys, values)), ensure_ascii=False)


def _repair_excludes_keyword(text: str, keyword: str) -> str | None:
    out = re.sub(r"[ \t]{2,}", " ", _keyword_re(keyword).sub("", text)).strip()
    return out if any(ch.isalnum() for ch in out) else None


def _repair_ends_with(text: str, phrase: str) -> str | None:
    """The phrase after the answer's last finished sentence (an answer cut off mid-sentence
    loses the unfinished tail)."""
    body = text.rstrip()
    if body.endswith(phrase):
        return body
    if body and body[-1] not in ".!?\"')":
        last = max(body.rfind(". "), body.rfind("! "), body.rfind("? "))
        if last > 0:
            body = body[: last + 1]
    return f"{body} {phrase}".lstrip()


def _repair_starts_with(text: str, phrase: str) -> str | None:
    body = text.strip()
    return body if body.startswith(phrase) else f"{phrase} {body}".rstrip()


def _repair_case(convert: Callable[[str], str]) -> Callable[[str], str | None]:
    def repair(text: str) -> str | None:
        return convert(text) if any(ch.isalpha() for ch in text) else None
    return repair


#: constraint type -> repair(response, **params) -> the repaired response, or None. The order
#: is the order repairs are applied in for a prompt with several constraints: cuts first, the
#: closing and opening phrases next, the letter case last (so a phrase is case-converted too);
#: the result is verified against every constraint, and kept only if it passes all of them.
REPAIRS: dict[str, Callable[..., str | None]] = {
    "json_keys": _repair_json_keys,
    "bullet_count": _repair_bullet_count,
    "max_sentences": _repair_max_sentences,
    "max_words": _repair_max_words,
    "excludes_keyword": _repair_excludes_keyword,
    "no_commas": lambda text: text.replace(",", ""),
    "ends_with": _repair_ends_with,
    "starts_with": _repair_starts_with,
    "lowercase": _repair_case(str.lower),
    "uppercase": _repair_case(str.upper),
}


def repair(response: str, constraints: list[dict], types: Sequence[str] | None = None
           ) -> str | None:
    """``response`` rewritten by the repairs of its constraints' types (those in ``types``;
    None = every type with a repair) so that it passes EVERY constraint; None when a type has
    no repair (or is not allowed), a repair finds no edit, or the result still fails one."""
    _require_valid(constraints)
    allowed = set(REPAIRS if types is None else types)
    order = list(REPAIRS)
    text = response
    for c in sorted(constraints, key=lambda c: order.index(c["type"]) if c["type"] in order
                    else -1):
        if all(r.passed for r in verify(text, [c])):
            continue
        fix = REPAIRS.get(c["type"]) if c["type"] in allowed else None
        if fix is None:
            return None
        text = fix(text, **_params(c))
        if text is None:
            return None
    if text == response or not all(r.passed for r in verify(text, constraints)):
        return None
    return text
