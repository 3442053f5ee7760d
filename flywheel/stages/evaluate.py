"""Eval: the new model against the round's starting model on held-out prompts.

Per prompt: the prompt's verifiers decide first (a higher constraint pass fraction wins); where
they tie, the LLM judge compares the two answers in both orders, and only agreement counts.
Win rate counts ties as half, with a 95% Wilson interval. Constraint pass rates are reported
per constraint type.

The eval file has two splits (flywheel.promptfile): in-distribution prompts, written like the
training prompts, and transfer prompts, whose topics and instruction phrasings never appear in
training. Each is reported on its own (`split_report`: pass rate and mean answer length, per
constraint type); the comparison with the baseline, and so the win rate and the promotion gate,
use the in-distribution split only: the transfer split measures, it never decides.
"""

from __future__ import annotations

import json
import math

import pandas as pd

from flywheel.backends import Backend
from flywheel.constraints import pass_fraction, verify
from flywheel.promptfile import SPLITS
from flywheel.stages.sampling import conversation
from flywheel.tables import columns

ITEM_COLUMNS = columns("eval_items")

#: The code version of this stage's output: part of its fingerprint; bump it when the stage
#: makes different rows from the same inputs.
CODE_VERSION = "0.1.0+1"


def answers(backend: Backend, model_path: str, prompts: pd.DataFrame, max_new_tokens: int
            ) -> pd.DataFrame:
    """Greedy answers to the eval prompts, with their verifier results."""
    gens = backend.generate(model_path, [conversation(t) for t in prompts.text], n=1,
                            temperature=0.0, max_new_tokens=max_new_tokens, desc="eval answers")
    rows = []
    for p, [g] in zip(prompts.itertuples(), gens):
        results = verify(g.text, json.loads(p.constraints))
        rows.append({"prompt_id": p.prompt_id, "text": g.text, "finish_reason": g.finish_reason,
                     "checks": json.dumps([r.__dict__ for r in results]),
                     "pass_fraction": pass_fraction(results)})
    return pd.DataFrame(rows)


def pass_rates(items: pd.DataFrame) -> tuple[float | None, dict[str, float]]:
    """Overall share of constraints passed, and the share per constraint type."""
    per_type: dict[str, list[bool]] = {}
    for checks in items.checks:
        for c in json.loads(checks):
            per_type.setdefault(c["type"], []).append(bool(c["passed"]))
    total = [x for v in per_type.values() for x in v]
    overall = sum(total) / len(total) if total else None
    return overall, {k: sum(v) / len(v) for k, v in sorted(per_type.items())}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def split_report(items: pd.DataFrame, splits: list[str]) -> dict[str, dict]:
    """Per split (`splits[i]` is the split of `items.iloc[i]`), every split named even when it
    has no prompts: `prompts`, `pass_rate` (share of constraints passed), `mean_chars` (mean
    answer length in characters) and `by_type`: per constraint type, `prompts` carrying it,
    `checks`, `pass_rate` and `mean_chars` of the answers to those prompts."""
    out: dict[str, dict] = {}
    for split in SPLITS:
        rows = [(text, json.loads(checks)) for (text, checks), s in
                zip(zip(items.text, items.checks), splits) if s == split]
        passed = [bool(c["passed"]) for _, checks in rows for c in checks]
        by_type: dict[str, dict] = {}
        for i, (text, checks) in enumerate(rows):
            for c in checks:
                t = by_type.setdefault(c["type"], {"passed": [], "chars": {}})
                t["passed"].append(bool(c["passed"]))
                t["chars"][i] = len(text)  # one length per prompt
        out[split] = {
            "prompts": len(rows), "pass_rate": _mean(passed),
            "mean_chars": _mean([len(text) for text, _ in rows]),
            "by_type": {k: {"prompts": len(v["chars"]), "checks": len(v["passed"]),
                            "pass_rate": _mean(v["passed"]),
                            "mean_chars": _mean(list(v["chars"].values()))}
                        for k, v in sorted(by_type.items())}}
    return out


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion `p` over `n` items."""
    if n == 0:
        return 0.0, 1.0
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def outcome(new_frac: float | None, base_frac: float | None, ab: str | None,
            ba: str | None) -> str:
    """win / loss / tie of the new answer. `ab`: verdict with new shown first; `ba`: swapped."""
    if new_frac is not None and base_frac is not None and new_frac != base_frac:
        return "win" if new_frac > base_frac else "loss"
    new_wins = (ab == "A", ba == "B")
    base_wins = (ab == "B", ba == "A")
    if all(new_wins):
        return "win"
    if all(base_wins):
        return "loss"
    return "tie"


def summarise(items: pd.DataFrame) -> dict:
    """Wins, losses, ties, win rate (ties half) with its interval, and the LLM flip rate."""
    n = len(items)
    wins, losses = int((items.outcome == "win").sum()), int((items.outcome == "loss").sum())
    ties = n - wins - losses
    rate = (wins + 0.5 * ties) / n if n else None
    lo, hi = wilson(rate, n) if n else (None, None)
    judged = items.dropna(subset=["verdict_ab", "verdict_ba"])
    flips = [not ((a == "A" and b == "B") or (a == "B" and b == "A") or (a == b == "C"))
             for a, b in zip(judged.verdict_ab, judged.verdict_ba)]
    return {"wins": wins, "losses": losses, "ties": ties, "win_rate": rate, "ci_low": lo,
            "ci_high": hi, "llm_flip_rate": sum(flips) / len(flips) if flips else None}
