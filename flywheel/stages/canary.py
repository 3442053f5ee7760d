"""The canary set: comparisons whose right answer is known, judged every round by the round's
judge, to see the judge drift.

Each item of `judge.canary_file` (JSONL, one object a line) is a prompt with a `good` and a
`bad` answer: `kind` `verifier` (the prompt carries `constraints`; the good answer passes
their verifiers, the bad one fails) or `broken` (a right answer against a deliberately broken
one: cut short, off-topic, repeated). Every item is judged in both orders (good shown first as
A, then as B) by the judge that judges the round's candidates, through the same pairwise
template and verdict reading as the judging stage (`flywheel.stages.judging`); the verdicts
are stored as the winner they name, `good` or `bad` (None for a tie or an unparsed verdict),
in the canary_judgments table. `judge_stats` and `flywheel.catalog.queries.canary_by_round`
give per round and judge the accuracy and the order-flip rate.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from flywheel.backends import Backend
from flywheel.config import JudgeConfig
from flywheel.constraints import verify
from flywheel.errors import FlywheelError
from flywheel.stages.judging import Judge, pairwise_judgments
from flywheel.tables import columns

CANARY_COLUMNS = columns("canary_judgments")
KINDS = ("verifier", "broken")
FIELDS = ("id", "prompt", "good", "bad", "kind")

#: The code version of this stage's output: part of its fingerprint.
CODE_VERSION = "0.1.0+1"


def load_canary(path: str | Path) -> list[dict]:
    """The items of a canary file, checked: every line an object with a unique `id`, text
    `prompt`, `good` and `bad`, `kind` verifier or broken; a verifier item's `constraints`
    (a list) are passed by its good answer and failed by its bad one. All problems in one
    FlywheelError naming the file and line."""
    path = Path(path)
    fix = ("each line of the canary file is {\"id\", \"prompt\", \"good\", \"bad\", \"kind\": "
           "verifier | broken} (verifier items add \"constraints\"); fix the file, or set "
           "judge.canary_file to '' to judge no canary set")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise FlywheelError(f"judge.canary_file: cannot read {path}: {exc.strerror}",
                            details=["point judge.canary_file at the canary set (the default "
                                     "is data/canary.jsonl), or set it to '' to judge none"]
                            ) from None
    items, problems, seen = [], [], set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            item = json.loads(line)
        except ValueError as exc:
            problems.append(f"{where}: not JSON ({exc})")
            continue
        if not isinstance(item, dict):
            problems.append(f"{where}: not a JSON object")
            continue
        bad = [f for f in FIELDS if not isinstance(item.get(f), str) or not item[f].strip()]
        if bad:
            problems.append(f"{where}: missing or empty text field(s): {', '.join(bad)}")
            continue
        if item["kind"] not in KINDS:
            problems.append(f"{where}: kind {item['kind']!r} is not one of: {', '.join(KINDS)}")
            continue
        if item["id"] in seen:
            problems.append(f"{where}: id {item['id']!r} is used twice")
            continue
        seen.add(item["id"])
        if item["kind"] == "verifier":
            problems += _verifier_problems(item, where)
        items.append(item)
    if not items and not problems:
        problems.append(f"{path}: no items")
    if problems:
        raise FlywheelError(f"judge.canary_file {path} is not a valid canary set",
                            details=[*problems, fix])
    return items


def _verifier_problems(item: dict, where: str) -> list[str]:
    """Why a verifier item's answers do not pass (good) and fail (bad) its constraints."""
    cons = item.get("constraints")
    if not isinstance(cons, list) or not cons:
        return [f"{where}: a verifier item needs \"constraints\" (a non-empty list)"]
    try:
        good = all(r.passed for r in verify(item["good"], cons))
        bad = all(r.passed for r in verify(item["bad"], cons))
    except FlywheelError as exc:
        return [f"{where}: constraints: {exc}".replace("\n  - ", " — ")]
    out = []
    if not good:
        out.append(f"{where}: the good answer fails its constraints")
    if bad:
        out.append(f"{where}: the bad answer passes its constraints")
    return out


def _unparsed(row: dict) -> str:
    """An unparsed verdict's rationale: why it was not read, then what the judge wrote."""
    said = (row["rationale"] or "").strip()
    return f"{row['error']}" + (f": {said}" if said else "")


def judge_canary(backend: Backend, judge: Judge, items: list[dict], cfg: JudgeConfig, *,
                 round_: int, seed: int, salt: str) -> pd.DataFrame:
    """Every item judged in both orders by `judge`, as rows of canary_judgments (the
    rationale of a verdict that could not be read starts with why)."""
    samples = pd.DataFrame(
        [{"sample_id": f"{side}:{it['id']}", "prompt_id": it["id"], "text": it[side]}
         for it in items for side in ("good", "bad")])
    prompts = pd.DataFrame({"prompt_id": [it["id"] for it in items],
                            "text": [it["prompt"] for it in items]})
    comparisons = [(f"good:{it['id']}", f"bad:{it['id']}") for it in items]
    rows = pairwise_judgments(backend, judge, prompts, samples, comparisons, cfg, seed, salt)
    kind = {it["id"]: it["kind"] for it in items}
    out = []
    for r in rows:
        winner = r["winner"].split(":", 1)[0] if r["winner"] else None
        out.append({"round": round_, "judge": judge.version, "canary_id": r["prompt_id"],
                    "kind": kind[r["prompt_id"]], "order_ab": not r["swapped"],
                    "winner": winner, "parsed": bool(r["parsed"]),
                    "correct": winner == "good",
                    "rationale": r["rationale"] if r["parsed"] else _unparsed(r)})
    return pd.DataFrame(out, columns=CANARY_COLUMNS)
