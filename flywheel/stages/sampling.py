"""Samples: N candidate responses per prompt from the current policy (and, for SPIN, the
greedy answer to every prompt that has a gold answer)."""

from __future__ import annotations

import random

import pandas as pd

from flywheel.backends import Backend
from flywheel.hashing import stable_id
from flywheel.tables import columns

SAMPLE_COLUMNS = columns("samples")

#: The code version of this stage's output: part of its fingerprint; bump it when the stage
#: makes different rows from the same inputs.
CODE_VERSION = "0.1.0+1"


def select_prompts(pool: pd.DataFrame, new_ids: list[str], k: int, seed: int) -> pd.DataFrame:
    """The round's new prompts first, then a seeded draw from the rest of the pool (k=0: all)."""
    pool = pool.drop_duplicates("prompt_id")
    if k <= 0 or k >= len(pool):
        return pool.reset_index(drop=True)
    new = pool[pool.prompt_id.isin(new_ids)]
    rest = pool[~pool.prompt_id.isin(new_ids)].sort_values("prompt_id")
    take = max(0, k - len(new))
    picked = random.Random(seed).sample(range(len(rest)), min(take, len(rest)))
    return pd.concat([new.head(k), rest.iloc[sorted(picked)]]).reset_index(drop=True)


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
