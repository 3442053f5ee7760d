"""Parse what models write: judge verdicts, judge probabilities, generated tasks.

Pure standard library.

The rules for verdicts (``parse_score``, ``parse_pairwise``):

1. Quoted text does not count. A verdict inside a fenced or inline code span, on a
   blockquote line (``> ...``) or between quotation marks (straight or curly, double or
   single) is the judge quoting something, not judging. A quotation that holds nothing but
   the verdict (``"[[A]]"``, the templates' own format) still counts when the judge wrote
   no unquoted verdict.
2. Echoes do not count. When the judged responses are given (``shown=``), a verdict of the
   judge's with the same value as a verdict written inside one of those responses (a
   response that says ``Score: 5`` or ``[[A]]``) is taken for a copy of it; if the judge
   wrote nothing else, the output is rejected.
3. The last verdict that counts is the judge's verdict; the text before it is the rationale.
   It must be well formed: a plain number on the rubric's scale, with no denominator other
   than the rubric's (``Score: 4/5`` is 4; ``Score: 4/10``, ``Score: 1e1``, ``Score: 4.5.6``
   are rejected), and an invalid last verdict is never replaced by an earlier one.
4. The final verdict region is the paragraph (text between blank lines) holding that last
   verdict. Every verdict that counts in it must agree with it: ``[[B]]. It is definitely
   not [[A]]`` is ambiguous and rejected. A verdict revised in a later paragraph is read
   by the later one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

_NUMBER = r"[-+]?\d+(?:\.\d+)?"
# What may not follow a number: "1e1", "4.5.6", "4,5", "3-4", "4th", "80%".
_TRAIL = r"(?:[.,+\-\u2013]?[^\W_]|%)*"
# "Score: 4", "**Score:** 4", "Score = 4", "Score: [4]", "Score: 4/5", "Score: 4 out of 5".
_SCORE = re.compile(
    r"(?:\*\*|__)?(?<![a-z0-9])score(?![a-z0-9])\s*(?:\*\*|__)?\s*[:=]\s*(?:\*\*|__)?\s*\[?\s*"
    rf"(?P<value>{_NUMBER})(?P<trail>{_TRAIL})\s*\]?"
    rf"(?:\s*(?:/|\bout\s+of\b)\s*(?P<den>{_NUMBER})(?P<den_trail>{_TRAIL}))?",
    re.IGNORECASE,
)
# "[[A]]", "[[ b ]]", "[[C]]".
_VERDICT = re.compile(r"\[\[\s*(?P<value>[abc])\s*\]\]", re.IGNORECASE)

# Quoted spans: fenced code (to its closing fence, or the end), inline code, blockquote lines,
# straight double quotes on one line, curly double quotes within a paragraph, and single quotes
# on one line whose opening mark follows no letter (so the apostrophe of "it's" opens nothing;
# one inside a word, as in "answer's", is part of the quotation). No quotation contains its own
# opening mark, which keeps the scan linear.
_QUOTED = re.compile(
    r"^[ \t]*(?P<fence>```|~~~)[^`\n]*\n.*?(?:^[ \t]*(?P=fence)[ \t]*$|\Z)"
    r"|`[^`\n]+`"
    r"|^[ \t]*>[^\n]*"
    r"|\"[^\"\n]*\""
    r"|\u201c(?:[^\u201c\u201d\n]|\n(?![ \t]*\n))*\u201d"
    r"|(?<![^\W_])'(?=\S)(?:[^'\n]|(?<=[^\W_])'(?=[^\W_]))*(?<=\S)'(?![^\W_])"
    r"|(?<![^\W_])\u2018(?=\S)(?:[^\u2018\u2019\n]|(?<=[^\W_])\u2019(?=[^\W_]))*"
    r"(?<=\S)\u2019(?![^\W_])",
    re.MULTILINE | re.DOTALL,
)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_MARKUP = " \t\r\n\"'`*_>~\u201c\u201d\u2018\u2019.,:;!"

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
    the last verdict that counts (the whole text when none does), stripped.
    """

    value: float | str | None
    ok: bool
    error: str | None
    rationale: str


def _fail(error: str, rationale: str) -> Parsed:
    """A failed parse with its error message."""
    return Parsed(value=None, ok=False, error=error, rationale=rationale.strip())


@dataclass(frozen=True)
class _Hit:
    """One verdict-like match in a judge's output."""

    start: int
    end: int
    key: float | str  # what an echo is compared by: the number written, or the letter
    value: float | str | None  # the verdict, None when malformed
    error: str | None  # why it is malformed
    label: str  # how it reads in messages: "4", "4/10", "1e1", "[[A]]"


def _rationale(text: str, start: int) -> str:
    """The judge's text before ``start``, stripped, minus an unclosed ``**``."""
    before = text[:start].strip()
    if before.endswith("**") and before.count("**") % 2 == 1:
        before = before[:-2]
    return before.strip()


def _fmt(number: float) -> str:
    """Format a number without a useless ``.0`` (7.0 -> "7", 4.5 -> "4.5")."""
    return f"{number:g}"


def _score_hits(text: str, lo: int, hi: int) -> list[_Hit]:
    hits = []
    for m in _SCORE.finditer(text):
        number = float(m.group("value"))
        den = m.group("den")
        label = _fmt(number) + (f"/{_fmt(float(den))}" if den is not None else "")
        value: float | None = None
        if m.group("trail") or m.group("den_trail"):
            label = m.group(0)[m.start("value") - m.start():].strip()
            error = f"score {label!r} is not a plain number from {lo} to {hi}"
        elif den is not None and float(den) != hi:
            error = (f"score {label} is out of {_fmt(float(den))}, not out of the rubric's "
                     f"{hi}")
        elif not lo <= number <= hi:
            error = f"score {_fmt(number)} outside {lo}..{hi}"
        else:
            value, error = number, None
        hits.append(_Hit(m.start(), m.end(), number, value, error, label))
    return hits


def _verdict_hits(text: str) -> list[_Hit]:
    return [_Hit(m.start(), m.end(), v, v, None, f"[[{v}]]")
            for m in _VERDICT.finditer(text) for v in [m.group("value").upper()]]


def _decide(text: str, hits: list[_Hit], echoes: set, kind: str, missing: str) -> Parsed:
    """Apply the verdict rules (module docstring) to the matches of one judge output."""
    spans = [m.span() for m in _QUOTED.finditer(text)]
    own, bare, echoed = [], [], []  # (hit, where the rationale ends)
    for hit in hits:
        if hit.key in echoes:
            echoed.append(hit)
            continue
        span = next(((a, b) for a, b in spans if a <= hit.start < b), None)
        if span is None:
            own.append((hit, hit.start))
        elif not (text[span[0]:hit.start] + text[hit.end:span[1]]).strip(_MARKUP):
            bare.append((hit, span[0]))  # a quotation of nothing but the verdict: `"[[A]]"`
    counted = own or bare
    if not counted:
        if echoed:
            return _fail(f"the only {kind} ({echoed[-1].label}) repeats one written in "
                         "the judged response; the judge gave none of its own", text)
        return _fail(missing + (" outside quoted text" if hits else ""), text)
    last, end = counted[-1]
    rationale = _rationale(text, end)
    if last.error:
        return _fail(last.error, rationale)
    breaks = [m.end() for m in _PARAGRAPH_BREAK.finditer(text, 0, last.start)]
    region = breaks[-1] if breaks else 0
    values = [h for h, _ in counted if h.start >= region]
    if any(h.value != last.value for h in values):
        seen = ", ".join(dict.fromkeys(h.label for h in values))
        return _fail(f"ambiguous: different {kind}s ({seen}) in the final verdict paragraph",
                     rationale)
    return Parsed(value=last.value, ok=True, error=None, rationale=rationale)


def parse_score(text: str, lo: int = 0, hi: int = 5, *, shown: Iterable[str] = ()) -> Parsed:
    """Parse a pointwise judge output ending in ``Score: <n>`` (rules: module docstring).

    ``shown``: the response(s) the judge was shown, whose own scores it may echo. The
    default range 0..5 fits the additive 5-point rubric (zero points is possible).
    """
    if not text or not text.strip():
        return _fail("empty judge output", text or "")
    echoes = {h.key for r in shown if r for h in _score_hits(r, lo, hi)}
    return _decide(text, _score_hits(text, lo, hi), echoes, "score",
                   "no 'Score: <n>' line found")


def parse_pairwise(text: str, *, shown: Iterable[str] = ()) -> Parsed:
    """Parse a pairwise judge output ending in ``[[A]]``, ``[[B]]`` or ``[[C]]`` (tie).

    Case and inner spaces are tolerated (``[[ b ]]``); rules: module docstring.
    ``shown``: the two responses the judge was shown.
    """
    if not text or not text.strip():
        return _fail("empty judge output", text or "")
    echoes = {h.key for r in shown if r for h in _verdict_hits(r)}
    return _decide(text, _verdict_hits(text), echoes, "verdict",
                   "no [[A]]/[[B]]/[[C]] verdict found")


def _collect(
    probs: dict[str, float], keys: tuple[str, ...], normalise: bool
) -> dict[str, float]:
    """Sum ``probs`` onto ``keys`` (keys compared stripped, optionally upper-cased).

    Raises ValueError for a negative, NaN or infinite probability on one of ``keys``.
    """
    totals = dict.fromkeys(keys, 0.0)
    for key, prob in probs.items():
        name = key.strip().upper() if normalise else key.strip()
        if name in totals:
            prob = float(prob)
            if not math.isfinite(prob):
                raise ValueError(f"probability {prob} for {key!r} is not a finite number")
            if prob < 0:
                raise ValueError(f"negative probability {prob} for {key!r}")
            totals[name] += prob
    return totals


def score_from_probs(probs: dict[str, float]) -> float:
    """Probability-weighted score over the digit keys "0".."5", renormalised over them.

    Other keys (e.g. other tokens) are ignored; keys are compared stripped, so
    " 4" counts as "4". Raises ValueError when the allowed keys carry no mass, or
    when one of them has a negative, NaN or infinite probability.
    """
    totals = _collect(probs, SCORE_KEYS, normalise=False)
    mass = sum(totals.values())
    if not mass > 0 or not math.isfinite(mass):
        raise ValueError(f"no probability on score keys {', '.join(SCORE_KEYS)}")
    return sum(int(key) * prob for key, prob in totals.items()) / mass


def verdict_from_probs(probs: dict[str, float]) -> str:
    """Argmax over "A", "B", "C" (keys stripped, any case); ties go to A, then B.

    Raises ValueError when none of A/B/C has positive probability, or when one of
    them has a negative, NaN or infinite probability.
    """
    totals = _collect(probs, VERDICT_KEYS, normalise=True)
    if not max(totals.values()) > 0:
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
