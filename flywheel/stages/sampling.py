"""Samples: N candidate responses per prompt from the current policy (and, for SPIN, the
greedy answer to every prompt that has a gold answer); with exploration on
(`sampling.explore_budget`), more candidates for the prompts whose candidates all pass or all
fail their constraints."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import pandas as pd

from flywheel.backends import Backend
from flywheel.config import SamplingConfig
from flywheel.constraints import stored_constraints, verify
from flywheel.errors import FlywheelError
from flywheel.hashing import stable_id
from flywheel.tables import columns

SAMPLE_COLUMNS = columns("samples")

#: The code version of this stage's output: part of its fingerprint; bump it when the stage
#: makes different rows from the same inputs. +2: the transformers backend draws tokens by
#: InverseCdfSampler, not torch.multinomial (the same distribution, other draws).
CODE_VERSION = "0.1.0+2"


def select_prompts(pool: pd.DataFrame, new_ids: list[str], k: int, seed: int,
                   balance: bool = False) -> pd.DataFrame:
    """The round's new prompts first, then a seeded draw from the rest of the pool (k=0: all).
    With `balance` (`sampling.balance_types`) the draw evens out constraint types: each pick
    is a seeded choice among the prompts of the type the selection has fewest of so far."""
    pool = pool.drop_duplicates("prompt_id")
    if k <= 0 or k >= len(pool):
        return pool.reset_index(drop=True)
    new = pool[pool.prompt_id.isin(new_ids)]
    rest = pool[~pool.prompt_id.isin(new_ids)].sort_values("prompt_id")
    take = max(0, k - len(new))
    rng = random.Random(seed)
    if balance:
        picked = _balanced_draw(new, rest, take, rng)
    else:
        picked = rng.sample(range(len(rest)), min(take, len(rest)))
    return pd.concat([new.head(k), rest.iloc[sorted(picked)]]).reset_index(drop=True)


def prompt_types(constraints) -> list[str]:
    """A prompt's constraint types (stored JSON or a list), `(none)` for one without."""
    return sorted({c["type"] for c in stored_constraints(constraints)}) or ["(none)"]


def _balanced_draw(new: pd.DataFrame, rest: pd.DataFrame, take: int,
                   rng: random.Random) -> list[int]:
    """Positions in `rest` of `take` prompts: each pick is a seeded choice among the unpicked
    prompts having the type that the selection (the new prompts included) has fewest of, and
    of those, the ones whose types are least covered altogether; ties between types go to a
    seeded order."""
    types = [prompt_types(c) for c in rest.constraints]
    counts: dict[str, int] = {t: 0 for ts in types for t in ts}
    for c in new.constraints:
        for t in prompt_types(c):
            counts[t] = counts.get(t, 0) + 1
    order = {t: rng.random() for t in sorted(counts)}
    left = set(range(len(rest)))
    picked: list[int] = []
    while left and len(picked) < take:
        open_types = {t for i in left for t in types[i]}
        want = min(open_types, key=lambda t: (counts[t], order[t]))
        having = [i for i in sorted(left) if want in types[i]]
        least = min(sum(counts[t] for t in types[i]) for i in having)
        i = rng.choice([i for i in having if sum(counts[t] for t in types[i]) == least])
        left.remove(i)
        picked.append(i)
        for t in types[i]:
            counts[t] += 1
    return picked


def conversation(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def candidates(backend: Backend, model_path: str, model_version: str, prompts: pd.DataFrame,
               *, n: int, temperature: float, top_p: float, max_new_tokens: int, seed: int,
               salt: str, greedy: bool = False) -> pd.DataFrame:
    """`n` samples per prompt (or one greedy answer each when `greedy`)."""
    if prompts.empty:
        return pd.DataFrame(columns=SAMPLE_COLUMNS)
    if greedy:
        n, temperature, top_p = 1, 0.0, 1.0
    outs = backend.generate(model_path, [conversation(t) for t in prompts.text], n=n,
                            temperature=temperature, top_p=top_p,
                            max_new_tokens=max_new_tokens, seed=seed,
                            desc="greedy answers" if greedy else "sampling")
    rows = []
    for pid, gens in zip(prompts.prompt_id, outs):
        for k, g in enumerate(gens):
            idx = -1 if greedy else k
            rows.append({"sample_id": "s_" + stable_id(salt, pid, idx), "prompt_id": pid,
                         "model_version": model_version, "idx": idx, "greedy": greedy,
                         "text": g.text, "finish_reason": g.finish_reason,
                         "prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
                         "temperature": temperature, "top_p": top_p,
                         "max_new_tokens": max_new_tokens, "seed": seed})
    return pd.DataFrame(rows, columns=SAMPLE_COLUMNS)


# -- exploration: more candidates where the verifiers found no pass and fail ------------------
#: Added to the stage's seed per exploration pass (pass 1, 2, ...): each pass draws with its
#: own seed, which its rows record in their `seed` column.
EXPLORE_SEED_STEP = 1_000_003


def explore_seed(seed: int, pass_: int) -> int:
    """The seed of exploration pass `pass_` (1, 2, ...) of a samples stage seeded `seed`."""
    return seed + EXPLORE_SEED_STEP * pass_


def prompt_constraints(prompts: pd.DataFrame) -> dict[str, list[dict]]:
    """Per prompt id, its constraints (the prompts table's JSON column)."""
    out = {}
    for r in prompts.itertuples():
        cons = r.constraints
        out[r.prompt_id] = json.loads(cons) if isinstance(cons, str) else list(cons or [])
    return out


def constraint_types(constraints: list[dict]) -> list[str]:
    """The distinct constraint types of one prompt, sorted."""
    return sorted({c["type"] for c in constraints})


def passes(text: str, constraints: list[dict]) -> bool:
    """Whether an answer passes every one of its prompt's constraints."""
    return all(r.passed for r in verify(text, constraints))


@dataclass
class Split:
    """What the verifiers said about one prompt's candidates so far."""

    passed: int = 0
    failed: int = 0

    @property
    def both(self) -> bool:
        """A pass and a fail: the verifiers can make a pair."""
        return self.passed > 0 and self.failed > 0

    def add(self, ok: bool) -> None:
        if ok:
            self.passed += 1
        else:
            self.failed += 1


def splits(samples: pd.DataFrame, cons: dict[str, list[dict]]) -> dict[str, Split]:
    """Per prompt with constraints, how many of its non-greedy candidates pass all of them and
    how many fail one."""
    out = {pid: Split() for pid, c in cons.items() if c}
    for s in samples[~samples.greedy.astype(bool)].itertuples():
        if s.prompt_id in out:
            out[s.prompt_id].add(passes(s.text, cons[s.prompt_id]))
    return out


def _interleave(pids: list[str], key: dict[str, str]) -> list[str]:
    """`pids` taken in turns from each group of equal `key` (groups in order of first
    appearance), so one constraint type does not spend the budget on its own."""
    groups: dict[str, list[str]] = {}
    for pid in pids:
        groups.setdefault(key[pid], []).append(pid)
    out, queues = [], list(groups.values())
    while queues:
        out += [q.pop(0) for q in queues]
        queues = [q for q in queues if q]
    return out


def exploration_order(order: list[str], split: dict[str, Split],
                      cons: dict[str, list[dict]]) -> list[str]:
    """The prompts without a pass and a fail, in the order exploration serves them: those whose
    candidates all fail first (a rare pass is what teaches), then those that all pass; each
    group in turns by constraint types, in `order` (the stage's prompt order) within a type."""
    key = {pid: ",".join(constraint_types(cons[pid])) for pid in split}
    need = [pid for pid in order if pid in split and not split[pid].both]
    all_fail = [pid for pid in need if split[pid].passed == 0]
    all_pass = [pid for pid in need if split[pid].passed > 0]
    return _interleave(all_fail, key) + _interleave(all_pass, key)


def by_type(cons: dict[str, list[dict]], before: dict[str, Split], after: dict[str, Split],
            extra: dict[str, int]) -> dict[str, dict[str, int]]:
    """Per constraint type: the prompts that have it, those with a pass and a fail before and
    after exploration, and the extra candidates drawn for them (a prompt with two types counts
    for both)."""
    out: dict[str, dict[str, int]] = {}
    for pid in sorted(before):
        for t in constraint_types(cons[pid]):
            row = out.setdefault(t, {"prompts": 0, "split_before": 0, "split_after": 0,
                                     "extra_samples": 0})
            row["prompts"] += 1
            row["split_before"] += before[pid].both
            row["split_after"] += after[pid].both
            row["extra_samples"] += extra.get(pid, 0)
    return dict(sorted(out.items()))


def explore(backend: Backend, model_path: str, model_version: str, prompts: pd.DataFrame,
            first: pd.DataFrame, cfg: SamplingConfig, *, seed: int, salt: str
            ) -> tuple[pd.DataFrame, dict]:
    """Exploration after the first `cfg.n` candidates per prompt (`first`): for the prompts
    with constraints whose candidates all pass or all fail, up to `cfg.explore_n` more each per
    pass at `cfg.explore_temperature`, for at most `cfg.explore_rounds` passes, until each has
    a pass and a fail or `cfg.explore_budget` extra candidates are drawn in all.

    Returns the extra rows (ordinary candidates: `idx` from `cfg.n` on per prompt, `seed` the
    pass's `explore_seed`) and what it did: the budget, the candidates drawn, each pass (its
    seed, prompts, candidates) and `by_type` (see `by_type`)."""
    budget = max(0, cfg.explore_budget)
    if budget and (cfg.explore_n <= 0 or cfg.explore_temperature < 0):
        bad = (f"sampling.explore_n must be > 0, got {cfg.explore_n}" if cfg.explore_n <= 0
               else f"sampling.explore_temperature must be >= 0, got "
                    f"{cfg.explore_temperature}")
        raise FlywheelError(f"cannot explore: {bad}",
                            details=["set it in the config's sampling section, or turn "
                                     "exploration off with sampling.explore_budget: 0"])
    cons = prompt_constraints(prompts)
    order = list(dict.fromkeys(prompts.prompt_id))
    text = dict(zip(prompts.prompt_id, prompts.text))
    split = splits(first, cons)
    before = {pid: Split(s.passed, s.failed) for pid, s in split.items()}
    drawn: dict[str, int] = {}
    passes_done: list[dict] = []
    parts = []
    for pass_ in range(1, cfg.explore_rounds + 1):
        left = budget - sum(drawn.values())
        plan = []
        for pid in exploration_order(order, split, cons):
            if left <= 0:
                break
            take = min(cfg.explore_n, left)
            plan.append((pid, take))
            left -= take
        if not plan:
            break
        pass_seed = explore_seed(seed, pass_)
        flat = [pid for pid, take in plan for _ in range(take)]
        outs = backend.generate(model_path, [conversation(text[pid]) for pid in flat], n=1,
                                temperature=cfg.explore_temperature, top_p=cfg.top_p,
                                max_new_tokens=cfg.max_new_tokens, seed=pass_seed,
                                desc=f"exploring ({pass_})")
        rows = []
        for pid, gens in zip(flat, outs, strict=True):
            g = gens[0]
            idx = cfg.n + drawn.get(pid, 0)
            drawn[pid] = drawn.get(pid, 0) + 1
            split[pid].add(passes(g.text, cons[pid]))
            rows.append({"sample_id": "s_" + stable_id(salt, pid, idx), "prompt_id": pid,
                         "model_version": model_version, "idx": idx, "greedy": False,
                         "text": g.text, "finish_reason": g.finish_reason,
                         "prompt_tokens": g.prompt_tokens,
                         "completion_tokens": g.completion_tokens,
                         "temperature": cfg.explore_temperature, "top_p": cfg.top_p,
                         "max_new_tokens": cfg.max_new_tokens, "seed": pass_seed})
        parts.append(pd.DataFrame(rows, columns=SAMPLE_COLUMNS))
        passes_done.append({"pass": pass_, "seed": pass_seed, "prompts": len(plan),
                            "samples": len(flat)})
    extra = (pd.concat(parts, ignore_index=True) if parts
             else pd.DataFrame(columns=SAMPLE_COLUMNS))
    stats = {"budget": budget, "drawn": len(extra), "passes": passes_done,
             "by_type": by_type(cons, before, split, drawn)}
    return extra, stats
