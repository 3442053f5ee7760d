"""Pairs: best vs worst per prompt with a minimum margin (or several per prompt, across the
verifier split, with `pairs.per_prompt`); SPIN pairs (gold chosen, own answer rejected). Pure
functions over DataFrames of samples and judgments."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from flywheel.config import PairsConfig
from flywheel.constraints import stored_constraints
from flywheel.hashing import stable_id
from flywheel.tables import columns

PAIR_COLUMNS = columns("pairs")

#: The code version of this stage's output: part of its fingerprint; bump it when the stage
#: makes different rows from the same inputs.
CODE_VERSION = "0.1.0+1"


@dataclass(frozen=True)
class Standing:
    """What the judges said about one sample."""

    sample_id: str
    verifier: float | None  # pass fraction over the prompt's constraints
    llm: float | None  # mean parsed pointwise score, or consistent pairwise wins
    judgment_ids: tuple[str, ...]
    finished: bool = True  # ended on its own, not cut at max_new_tokens (last tie-break)


def standings(samples: pd.DataFrame, judgments: pd.DataFrame, mode: str = "hybrid"
              ) -> dict[str, list[Standing]]:
    """Per prompt, each non-greedy sample's verifier fraction and LLM score: the mean
    pointwise score, or in pairwise mode (`judge.mode`) the comparisons it won in both orders.

    Unparseable judge outputs are excluded, never turned into scores.
    """
    ok = judgments[judgments.parsed.astype(bool)]
    ver = ok[ok.type == "verifier"].groupby("sample_id")
    pw = ok[ok.type == "pointwise"].groupby("sample_id")
    vmean, pmean = ver.score.mean(), pw.score.mean()
    ids = {sid: list(g.judgment_id) for sid, g in ok[ok.type != "pairwise"].groupby("sample_id")}
    wins = consistent_wins(judgments) if mode == "pairwise" else {}
    out: dict[str, list[Standing]] = {}
    for s in samples[~samples.greedy].itertuples():
        llm = pmean.get(s.sample_id)
        if llm is None and wins:
            llm = float(wins.get(s.sample_id, 0))
        out.setdefault(s.prompt_id, []).append(Standing(
            s.sample_id, _num(vmean.get(s.sample_id)), _num(llm),
            tuple(ids.get(s.sample_id, ())), s.finish_reason != "length"))
    return out


def _num(x) -> float | None:
    return None if x is None or pd.isna(x) else float(x)


def consistent_wins(judgments: pd.DataFrame) -> dict[str, int]:
    """Per sample, the comparisons it won in both orders (pairwise mode's score)."""
    pw = judgments[(judgments.type == "pairwise") & judgments.parsed.astype(bool)]
    wins: dict[str, int] = {}
    for _, g in pw.groupby("comparison_id"):
        w = set(g.winner.fillna("tie"))
        if len(g) == 2 and len(w) == 1 and "tie" not in w:
            winner = w.pop()
            wins[winner] = wins.get(winner, 0) + 1
    return wins


def _key(s: Standing) -> tuple[float, float, bool]:
    """Verifier pass fraction first, then the LLM score; among equals a finished answer ranks
    above one cut off at max_new_tokens."""
    return (-1.0 if s.verifier is None else s.verifier, -1e9 if s.llm is None else s.llm,
            s.finished)


def best_and_worst(group: list[Standing]) -> tuple[Standing, Standing] | None:
    """Best and worst by (verifier pass fraction, LLM score); None without two rankable samples."""
    rankable = [s for s in group if s.verifier is not None or s.llm is not None]
    if len(rankable) < 2:
        return None
    ranked = sorted(rankable, key=lambda s: (_key(s), s.sample_id))
    return ranked[-1], ranked[0]


def pairwise_agrees(judgments: pd.DataFrame, best: str, worst: str) -> tuple[bool, list[str]]:
    """Whether both orders of the best-vs-worst comparison chose `best`, and their ids."""
    pw = judgments[(judgments.type == "pairwise")
                   & (((judgments.sample_a == best) & (judgments.sample_b == worst))
                      | ((judgments.sample_a == worst) & (judgments.sample_b == best)))]
    ids = list(pw.judgment_id)
    ok = pw[pw.parsed]
    return (len(ok) == 2 and set(ok.winner.fillna("tie")) == {best}), ids


def decide(best: Standing, worst: Standing, judgments: pd.DataFrame, cfg: PairsConfig
           ) -> tuple[str, float, list[str]] | None:
    """(rule, margin, judgment ids) if the pair is kept, else None."""
    ids = list(best.judgment_ids + worst.judgment_ids)
    if best.verifier is not None and worst.verifier is not None:
        margin = best.verifier - worst.verifier
        if margin >= cfg.min_verifier_margin:
            return "verifier", margin, ids
    if best.llm is None or worst.llm is None:
        return None
    margin = best.llm - worst.llm
    if margin < cfg.min_margin or margin <= 0:
        return None
    agreed, pw_ids = pairwise_agrees(judgments, best.sample_id, worst.sample_id)
    if cfg.require_agreement and pw_ids and not agreed:
        return None
    return ("llm+pairwise" if pw_ids and agreed else "llm"), margin, ids + pw_ids


def _several(group: list[Standing], judgments: pd.DataFrame, cfg: PairsConfig,
             text: dict[str, str], mode: str, bounds: tuple = ()
             ) -> list[tuple[Standing, Standing, tuple]]:
    """Up to `cfg.per_prompt` (chosen, rejected, decision) of one prompt's candidates: every
    pair of a higher- and a lower-ranked candidate that `decide` and the length ratios keep,
    verifier-decided ones first, by margin, then in the judge's order (chosen highest, rejected
    lowest first), so the first is best vs worst whenever that pair is kept. Pairs with the
    same texts as one taken, or with identical texts, are skipped; a sample keeps the role of
    its first pair (never chosen in one pair and rejected in another). In hybrid mode, where
    the pairwise judge compares best and worst only, another LLM-decided pair is not kept when
    agreement is required."""
    rankable = [s for s in group if s.verifier is not None or s.llm is not None]
    ranked = sorted(rankable, key=lambda s: (_key(s), s.sample_id), reverse=True)
    options = []
    for i, chosen in enumerate(ranked):
        for j in range(i + 1, len(ranked)):
            rejected = ranked[j]
            decision = decide(chosen, rejected, judgments, cfg)
            if decision is None or _off_ratio(text[chosen.sample_id],
                                             text[rejected.sample_id], cfg, bounds):
                continue
            rule, margin, ids = decision
            if mode == "hybrid" and cfg.require_agreement and rule == "llm" \
                    and (i, j) != (0, len(ranked) - 1):
                continue  # the judge was never asked to confirm it in both orders
            options.append(((rule != "verifier", -margin, i, -j), chosen, rejected, decision))
    out: list[tuple[Standing, Standing, tuple]] = []
    roles: dict[str, str] = {}
    texts: set[tuple[str, str]] = set()
    for _, chosen, rejected, decision in sorted(options, key=lambda o: o[0]):
        if len(out) >= cfg.per_prompt:
            break
        pair_text = (text[chosen.sample_id].strip(), text[rejected.sample_id].strip())
        if pair_text[0] == pair_text[1] or pair_text in texts \
                or roles.get(chosen.sample_id, "chosen") != "chosen" \
                or roles.get(rejected.sample_id, "rejected") != "rejected":
            continue
        texts.add(pair_text)
        roles[chosen.sample_id], roles[rejected.sample_id] = "chosen", "rejected"
        out.append((chosen, rejected, decision))
    return out


def _off_ratio(chosen: str, rejected: str, cfg: PairsConfig, bounds: tuple = ()) -> bool:
    """Whether the chosen text is over `cfg.max_length_ratio` times the rejected one, or under
    `cfg.min_length_ratio` times the length the prompt asks for (`allowed_chars`: the
    rejected text's length, or less where `bounds`, the prompt's upper-bound constraints, ask
    for less)."""
    if cfg.max_length_ratio and len(chosen) > cfg.max_length_ratio * max(1, len(rejected)):
        return True
    return bool(cfg.min_length_ratio) \
        and len(chosen) < cfg.min_length_ratio * allowed_chars(rejected, bounds)


#: Constraint types that bound an answer's length from above: a shorter chosen answer is what
#: their pairs teach, down to the bound (see `allowed_chars`).
UPPER_BOUND_TYPES = frozenset({"max_words", "max_sentences"})


def repaired(text: str, constraints: list[dict], types, cfg: PairsConfig | None = None,
             bounds: tuple = ()) -> str | None:
    """``text`` rewritten by the constraints' repairs (`flywheel.constraints.repair`, only
    `types`) so that it passes every constraint; None where it cannot be, or (with `cfg`)
    where the result's length is off the pairs' ratios against ``text`` (`_off_ratio`)."""
    from flywheel.constraints import repair

    fixed = repair(text, constraints, types)
    if fixed is None or (cfg is not None and _off_ratio(fixed, text, cfg, bounds)):
        return None
    return fixed


def allowed_chars(rejected: str, bounds: tuple | list = ()) -> float:
    """The length, in characters, an answer to the rejected one's prompt may have: the rejected
    text's, scaled down by each upper bound it breaks (at most n words or sentences, against
    the rejected text's count)."""
    from flywheel.constraints import count_words, split_sentences

    scale = 1.0
    for c in bounds:
        have = count_words(rejected) if c["type"] == "max_words" else len(
            split_sentences(rejected))
        if have > c["n"]:
            scale = min(scale, c["n"] / have)
    return len(rejected) * scale


def length_bounds(prompts: pd.DataFrame) -> dict[str, tuple[dict, ...]]:
    """Per prompt id, its constraints of the `UPPER_BOUND_TYPES` (prompts without one left
    out)."""
    out = {}
    for r in prompts.itertuples():
        c = stored_constraints(r.constraints)
        bounds = tuple(x for x in c if isinstance(x, dict) and x.get("type") in UPPER_BOUND_TYPES
                       and isinstance(x.get("n"), int))
        if bounds:
            out[r.prompt_id] = bounds
    return out


def build_pairs(samples: pd.DataFrame, judgments: pd.DataFrame, cfg: PairsConfig, salt: str,
                mode: str = "hybrid", bounds: dict[str, tuple] | None = None) -> pd.DataFrame:
    """Preference pairs: best vs worst, one per prompt at most, or with `cfg.per_prompt` > 1
    up to that many per prompt (see `_several`); `mode` is the judge mode (judge.mode) that
    made the judgments; `bounds` the prompts' upper length bounds (`length_bounds`), which
    `cfg.min_length_ratio` allows for."""
    bounds = bounds or {}
    text = dict(zip(samples.sample_id, samples.text))
    rows = []
    several = cfg.per_prompt > 1
    of_prompt = dict(tuple(judgments.groupby("prompt_id"))) if several else {}
    for pid, group in sorted(standings(samples, judgments, mode).items()):
        if several:
            picks = _several(group, of_prompt.get(pid, judgments.iloc[:0]), cfg, text, mode,
                             bounds.get(pid, ()))
        else:
            picks = []
            bw = best_and_worst(group)
            decision = decide(*bw, judgments, cfg) if bw is not None else None
            if decision is not None and not _off_ratio(text[bw[0].sample_id],
                                                       text[bw[1].sample_id], cfg,
                                                       bounds.get(pid, ())):
                picks = [(*bw, decision)]
        for best, worst, (rule, margin, ids) in picks:
            by_verifier = rule == "verifier"
            rows.append({
                "pair_id": "pr_" + stable_id(salt, best.sample_id, worst.sample_id),
                "prompt_id": pid, "chosen_id": best.sample_id, "rejected_id": worst.sample_id,
                "chosen_text": text[best.sample_id], "rejected_text": text[worst.sample_id],
                "chosen_score": best.verifier if by_verifier else best.llm,
                "rejected_score": worst.verifier if by_verifier else worst.llm,
                "margin": margin, "rule": rule,
                "min_margin": cfg.min_verifier_margin if by_verifier else cfg.min_margin,
                "judgment_ids": ids})
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def repair_pairs(prompts: pd.DataFrame, samples: pd.DataFrame, judgments: pd.DataFrame,
                 types: list[str], salt: str, mode: str = "hybrid",
                 cfg: PairsConfig | None = None) -> pd.DataFrame:
    """Pairs where the candidates all fail (`pairs.repair`): for each prompt with constraints
    none of whose sampled answers passes every one of them, its best candidate (highest verifier
    fraction, then LLM score, then one that ended on its own, then sample id) rewritten by the
    constraints' repairs (`flywheel.constraints.repair`, only the `types` named) is the chosen
    answer, the candidate itself the rejected one: rule `repair`, chosen id `repair:<sample
    id>`, scores the verifier fractions (1.0 for the repaired answer, which passes every
    constraint). With `cfg`, its length ratios apply as to other pairs."""
    text = dict(zip(samples.sample_id, samples.text))
    cons = {r.prompt_id: r.constraints for r in prompts.itertuples()}
    bounds = length_bounds(prompts) if cfg is not None else {}
    rows = []
    for pid, group in sorted(standings(samples, judgments, mode).items()):
        c = stored_constraints(cons.get(pid))
        if not c or any(s.verifier is not None and s.verifier >= 1.0 for s in group):
            continue
        best = min(group, key=lambda s: (-(s.verifier or 0.0), -(s.llm or 0.0),
                                         not s.finished, s.sample_id))
        fixed = repaired(text[best.sample_id], c, types, cfg, bounds.get(pid, ()))
        if fixed is None:
            continue
        score = best.verifier if best.verifier is not None else 0.0
        rows.append({"pair_id": "pr_" + stable_id(salt, "repair", best.sample_id),
                     "prompt_id": pid, "chosen_id": f"repair:{best.sample_id}",
                     "rejected_id": best.sample_id, "chosen_text": fixed,
                     "rejected_text": text[best.sample_id], "chosen_score": 1.0,
                     "rejected_score": score, "margin": 1.0 - score, "rule": "repair",
                     "min_margin": None, "judgment_ids": list(best.judgment_ids)})
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def pairs_by_type(prompts: pd.DataFrame, samples: pd.DataFrame, pairs: pd.DataFrame
                  ) -> dict[str, dict[str, int]]:
    """Per constraint type (`(none)` for prompts without constraints): the sampled prompts
    that have it, those that ended with at least one pair, and their pairs (a prompt with two
    types counts for both)."""
    cons = {r.prompt_id: r.constraints for r in prompts.itertuples()}
    per_prompt = pairs.prompt_id.value_counts().to_dict()
    out: dict[str, dict[str, int]] = {}
    for pid in sorted(set(samples[~samples.greedy.astype(bool)].prompt_id)):
        c = stored_constraints(cons.get(pid))
        for t in sorted({x["type"] for x in c}) or ["(none)"]:
            row = out.setdefault(t, {"prompts": 0, "with_pair": 0, "pairs": 0})
            row["prompts"] += 1
            row["with_pair"] += pid in per_prompt
            row["pairs"] += per_prompt.get(pid, 0)
    return dict(sorted(out.items()))


def spin_pairs(prompts: pd.DataFrame, samples: pd.DataFrame, salt: str) -> pd.DataFrame:
    """SPIN: for each prompt with a gold answer, gold = chosen, the policy's greedy = rejected."""
    gold = {r.prompt_id: r.gold for r in prompts.itertuples() if isinstance(r.gold, str) and r.gold}
    rows = []
    for s in samples[samples.greedy].sort_values("prompt_id").itertuples():
        g = gold.get(s.prompt_id)
        if not g or g.strip() == s.text.strip():
            continue
        rows.append({"pair_id": "pr_" + stable_id(salt, "gold", s.sample_id),
                     "prompt_id": s.prompt_id, "chosen_id": f"gold:{s.prompt_id}",
                     "rejected_id": s.sample_id, "chosen_text": g, "rejected_text": s.text,
                     "chosen_score": None, "rejected_score": None, "margin": None,
                     "rule": "spin", "min_margin": None, "judgment_ids": []})
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)
