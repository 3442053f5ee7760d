"""Parse what models write: judge verdicts, judge probabilities, generated tasks.

Pure standard library.

The rule for verdicts: judges reason first and give their verdict last, so the
parser takes the LAST match in the output. A judge that quotes the response
(which may itself contain ``Score: 5`` or ``[[A]]``) and then gives its own
verdict is read correctly; a judge that writes two verdicts is read by its
final one, and if that final one is invalid (e.g. ``Score: 10`` on a 0..5
scale) the output is rejected rather than falling back to an earlier match.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# "Score: 4", "**Score:** 4", "Score = 4", "Score: [4]", "Score: 4/5", "Score: 4.5".
_SCORE = re.compile(
    r"(?:\*\*|__)?(?<![a-z0-9])score(?![a-z0-9])\s*(?:\*\*|__)?\s*[:=]\s*(?:\*\*|__)?\s*\[?\s*"
    r"(?P<value>[-+]?\d+(?:\.\d+)?)\s*\]?(?:\s*/\s*\d+(?:\.\d+)?)?",
    re.IGNORECASE,
)
# "[[A]]", "[[ b ]]", "[[C]]".
_VERDICT = re.compile(r"\[\[\s*(?P<value>[abc])\s*\]\]", re.IGNORECASE)

_FENCE_LINE = re.compile(r"^[ \t]*```[\w+.-]*[ \t]*$", re.MULTILINE)
_TASK_LABEL = re.compile(
    r"^(?:\*\*|__)?\s*(?:new\s+)?task(?:\s*#?\s*\d+)?\s*(?:\*\*|__)?\s*:\s*(?:\*\*|__)?\s*",
    re.IGNORECASE,
)
_NUMBER_LABEL = re.compile(r"^\d+\s*[.)]\s+")
_BULLET_LABEL = re.compile(r"^[-*\u2022]\s+")
_PREAMBLE = re.compile(
    r"^(?:(?:sure|certainly|okay|ok|of course)\b.*|here(?:'s|\u2019s| is)\b.*):$",
    re.IGNORECASE,
)
_QUOTE_PAIRS = {'"': '"', "'": "'", "`": "`", "\u201c": "\u201d", "\u2018": "\u2019"}
_REFUSAL = re.compile(
    r"^(?:i'm sorry|i am sorry|i cannot|i can not|i can't|as an ai\b"
    r"|i'm unable|i am unable|i apologi[sz]e)",
    re.IGNORECASE,
)

SCORE_KEYS: tuple[str, ...] = ("0", "1", "2", "3", "4", "5")
VERDICT_KEYS: tuple[str, ...] = ("A", "B", "C")


@dataclass(frozen=True)
class Parsed:
    """A parsed judge output.

    ``value`` is the score (float) or verdict ("A"/"B"/"C"), None when not ``ok``;
    ``error`` says why parsing failed; ``rationale`` is the judge's text before
    the last verdict match (the whole text when there is no match), stripped.
    """

    value: float | str | None
    ok: bool
    error: str | None
    rationale: str


def _fail(error: str, rationale: str) -> Parsed:
    """A failed parse with its error message."""
    return Parsed(value=None, ok=False, error=error, rationale=rationale.strip())


def _last_match(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    """The last (non-overlapping) match of ``pattern`` in ``text``, or None."""
    matches = list(pattern.finditer(text))
    return matches[-1] if matches else None


def _rationale(text: str, match: re.Match[str]) -> str:
    """The judge's text before ``match``, stripped, minus an unclosed ``**``."""
    before = text[: match.start()].strip()
    if before.endswith("**") and before.count("**") % 2 == 1:
        before = before[:-2]
    return before.strip()


def _fmt(number: float) -> str:
    """Format a number without a useless ``.0`` (7.0 -> "7", 4.5 -> "4.5")."""
    return f"{number:g}"


def parse_score(text: str, lo: int = 0, hi: int = 5) -> Parsed:
    """Parse a pointwise judge output ending in ``Score: <n>``; the LAST match wins.

    The default range 0..5 fits the additive 5-point rubric (zero points is possible).
    """
    if not text or not text.strip():
        return _fail("empty judge output", text or "")
    match = _last_match(_SCORE, text)
    if match is None:
        return _fail("no 'Score: <n>' line found", text)
    rationale = _rationale(text, match)
    value = float(match.group("value"))
    if not lo <= value <= hi:
        return _fail(f"score {_fmt(value)} outside {lo}..{hi}", rationale)
    return Parsed(value=value, ok=True, error=None, rationale=rationale)


def parse_pairwise(text: str) -> Parsed:
    """Parse a pairwise judge output ending in ``[[A]]``, ``[[B]]`` or ``[[C]]`` (tie).

    Case and inner spaces are tolerated (``[[ b ]]``); the LAST match wins.
    """
    if not text or not text.strip():
        return _fail("empty judge output", text or "")
    match = _last_match(_VERDICT, text)
    if match is None:
        return _fail("no [[A]]/[[B]]/[[C]] verdict found", text)
    rationale = _rationale(text, match)
    return Parsed(
        value=match.group("value").upper(), ok=True, error=None, rationale=rationale
    )


def _collect(
    probs: dict[str, float], keys: tuple[str, ...], normalise: bool
) -> dict[str, float]:
    """Sum ``probs`` onto ``keys`` (keys compared stripped, optionally upper-cased)."""
    totals = dict.fromkeys(keys, 0.0)
    for key, prob in probs.items():
        name = key.strip().upper() if normalise else key.strip()
        if name in totals:
            if prob < 0:
                raise ValueError(f"negative probability {prob} for {key!r}")
            totals[name] += float(prob)
    return totals


def score_from_probs(probs: dict[str, float]) -> float:
    """Probability-weighted score over the digit keys "0".."5", renormalised over them.

    Other keys (e.g. other tokens) are ignored; keys are compared stripped, so
    " 4" counts as "4". Raises ValueError when the allowed keys carry no mass.
    """
    totals = _collect(probs, SCORE_KEYS, normalise=False)
    mass = sum(totals.values())
    if mass <= 0:
        raise ValueError(f"no probability on score keys {', '.join(SCORE_KEYS)}")
    return sum(int(key) * prob for key, prob in totals.items()) / mass


def verdict_from_probs(probs: dict[str, float]) -> str:
    """Argmax over "A", "B", "C" (keys stripped, any case); ties go to A, then B.

    Raises ValueError when none of A/B/C has positive probability.
    """
    totals = _collect(probs, VERDICT_KEYS, normalise=True)
    if max(totals.values()) <= 0:
        raise ValueError(f"no probability on verdict keys {', '.join(VERDICT_KEYS)}")
    return max(VERDICT_KEYS, key=totals.__getitem__)  # max keeps the first of equals


def _strip_quotes(text: str) -> str:
    """Remove matching quotes around the whole text (straight, curly or backtick).

    Only when the quotes enclose everything: '"a" and "b"' is left alone.
    """
    text = text.strip()
    while len(text) >= 2 and _QUOTE_PAIRS.get(text[0]) == text[-1]:
        inner = text[1:-1]
        if text[0] in inner or text[-1] in inner:
            break
        text = inner.strip()
    return text


def _strip_label(line: str) -> tuple[str, re.Pattern[str] | None]:
    """Drop a leading "Task:"/"New task:"/"Task 9:"/"9."/"- " label.

    Returns the rest of the line and the label's pattern (None when unlabelled).
    """
    for pattern in (_TASK_LABEL, _NUMBER_LABEL, _BULLET_LABEL):
        match = pattern.match(line)
        if match:
            return line[match.end() :].strip(), pattern
    return line, None


def _first_paragraph(lines: list[str]) -> list[str]:
    """The lines of the first task: up to a blank line or the next same-kind label.

    A following "Task N:" line always ends the task; a numbered or bulleted line
    ends it only when the task itself opened with that kind of label (a list of
    tasks), so a task that contains a list keeps it.
    """
    collected: list[str] = []
    kind: re.Pattern[str] | None = None
    for raw in lines:
        line = raw.strip()
        if not collected:
            if not line or _PREAMBLE.match(line):
                continue
            line, kind = _strip_label(_strip_quotes(line))
            if line:
                collected.append(line)
            continue
        if (
            not line
            or _TASK_LABEL.match(line)
            or (kind is not None and kind.match(line))
        ):
            break
        collected.append(line)
    return collected


def parse_task(text: str) -> str | None:
    """Extract one task from a generator model's reply; None if nothing is left.

    Strips whitespace, code fences and surrounding quotes, drops a leading label,
    skips a "Sure, here is a new task:" preamble line, keeps the first paragraph
    and collapses internal whitespace.
    """
    if not text:
        return None
    body = _strip_quotes(_FENCE_LINE.sub("", text))
    task = _strip_quotes(" ".join(_first_paragraph(body.splitlines())))
    task = " ".join(task.split())
    return task or None


def is_refusal(text: str) -> bool:
    """True if ``text`` opens with a common refusal ("I'm sorry", "As an AI", ...)."""
    opening = (text or "").lstrip(" \t\r\n\"'*").replace("\u2019", "'")
    return _REFUSAL.match(opening) is not None
