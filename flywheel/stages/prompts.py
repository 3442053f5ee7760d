"""Prompts: seed rows, and self-instruct generation with filtering, near-duplicate removal,
provenance and constraints drawn from the constraint library (their instructions written in
the library's training phrasings only: the transfer phrasings are held out for the eval)."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from flywheel.config import PromptsConfig
from flywheel.constraints import phrase_constraints, sample_constraints, strip_instructions
from flywheel.hashing import normalise_text, prompt_id
from flywheel.parsing import is_refusal, parse_task
from flywheel.promptfile import IN_DISTRIBUTION
from flywheel.tables import columns
from flywheel.templates import render

PROMPT_COLUMNS = columns("prompts")

#: The code version of this stage's output: part of its fingerprint; bump it when the stage
#: makes different rows from the same inputs. +2: the transformers backend draws tokens by
#: InverseCdfSampler, not torch.multinomial (the same distribution, other draws).
CODE_VERSION = "0.1.0+2"
#: The code version of the seed pool's prompts version (round 0): no generation, unchanged.
SEED_CODE_VERSION = "0.1.0+1"


def seed_rows(records: list[dict], source_file: str) -> pd.DataFrame:
    """Rows of the seed prompts version from a loaded prompt file (duplicates dropped)."""
    rows, seen = [], set()
    for r in records:
        pid = prompt_id(r["prompt"])
        if pid in seen:
            continue
        seen.add(pid)
        rows.append({"prompt_id": pid, "text": r["prompt"], "gold": r.get("gold"),
                     "constraints": json.dumps(r.get("constraints") or []),
                     "category": r.get("category"), "source": "seed",
                     "source_ref": f"{source_file}:{r['line']}", "examples": [], "raw": None})
    return pd.DataFrame(rows, columns=PROMPT_COLUMNS)


def eval_rows(records: list[dict], source_file: str) -> pd.DataFrame:
    """Rows of a loaded eval file, as `seed_rows`, with the `split` of each prompt
    (in_distribution or transfer: see flywheel.promptfile)."""
    rows = seed_rows(records, source_file)
    split: dict[str, str] = {}
    for r in records:
        split.setdefault(prompt_id(r["prompt"]), r.get("split") or IN_DISTRIBUTION)
    rows["split"] = [split[p] for p in rows.prompt_id]
    return rows


def ngrams(text: str, n: int = 3) -> set[str]:
    """Character n-grams of the normalised text."""
    t = normalise_text(text)
    return {t[i:i + n] for i in range(max(1, len(t) - n + 1))}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


@dataclass
class NearDuplicateIndex:
    """Character 3-gram Jaccard near-duplicate check against a growing pool."""

    threshold: float
    grams: list[set[str]] = field(default_factory=list)

    def add(self, text: str) -> None:
        self.grams.append(ngrams(text))

    def max_similarity(self, text: str) -> float:
        g = ngrams(text)
        return max((jaccard(g, other) for other in self.grams), default=0.0)

    def is_duplicate(self, text: str) -> bool:
        return self.max_similarity(text) >= self.threshold


def task_text(text: str, constraints: list[dict]) -> str:
    """A pool prompt without its constraint sentences (in any of their phrasings, training or
    transfer), to serve as a few-shot example and to be compared with new tasks."""
    return strip_instructions(text, constraints) if constraints else text


def task_texts(prompts: pd.DataFrame) -> list[str]:
    """The tasks of a prompts frame without constraint sentences: what new tasks are compared
    with (a copy of a constrained prompt's task would otherwise slip under the threshold)."""
    return [task_text(t, json.loads(c)) for t, c in zip(prompts.text, prompts.constraints)]


def filter_reason(task: str | None, *, min_chars: int, max_chars: int) -> str | None:
    """Why a generated task is rejected, or None if it passes the filters."""
    if not task:
        return "empty"
    if is_refusal(task):
        return "refusal"
    if len(task) < min_chars:
        return "too_short"
    if len(task) > max_chars:
        return "too_long"
    return None


def self_instruct_requests(pool: pd.DataFrame, cfg: PromptsConfig, rng: random.Random,
                           template_dir=None) -> list[tuple[list[dict], list[str]]]:
    """`cfg.max_attempts` generator conversations, each with `few_shot` pool examples."""
    examples = [(r.prompt_id, task_text(r.text, json.loads(r.constraints)))
                for r in pool.itertuples()]
    requests = []
    for _ in range(cfg.max_attempts):
        shots = rng.sample(examples, min(cfg.few_shot, len(examples)))
        content = render(cfg.template, template_dir, examples=[t for _, t in shots])
        requests.append(([{"role": "user", "content": content}], [pid for pid, _ in shots]))
    return requests


def constrained_prompt(task: str, cfg: PromptsConfig, rng: random.Random
                       ) -> tuple[str, list[dict]]:
    """A new prompt from an accepted task: with probability `cfg.constraint_prob`, 1 to
    `cfg.max_constraints` constraints from the library, their instructions appended in the
    first training phrasing of each type (`prompts.phrasings: one`) or in one drawn with `rng`
    from the training phrasings (`varied`). Transfer phrasings are never used."""
    constraints: list[dict] = []
    if cfg.constraint_prob > 0 and rng.random() < cfg.constraint_prob:
        k = rng.randint(1, cfg.max_constraints)
        constraints = sample_constraints(rng, k, cfg.constraint_types or None)
    if not constraints:
        return task, []
    varied = cfg.phrasings == "varied"
    instructions = phrase_constraints(constraints, rng if varied else None, split="training")
    return (task + " " + instructions).strip(), constraints


def accept_tasks(raw_outputs: list[str], example_ids: list[list[str]], pool_texts: list[str],
                 blocked_texts: list[str], cfg, rng: random.Random,
                 source_ref: str, fits: Callable[[str], bool] | None = None
                 ) -> tuple[pd.DataFrame, dict]:
    """Parse, filter, dedupe and constrain generated tasks; returns rows and rejection counts.

    `fits` says whether a finished prompt (task and constraint sentences) is within
    `prompts.max_prompt_tokens` in the policy's tokens; prompts that are not are dropped and
    counted as `over_max_prompt_tokens`. None: no token limit is applied.
    """
    index = NearDuplicateIndex(cfg.dedupe_threshold)
    for t in pool_texts + blocked_texts:
        index.add(t)
    stats: Counter = Counter()
    rows = []
    for raw, shots in zip(raw_outputs, example_ids):
        if len(rows) >= cfg.num_new:
            stats["surplus"] += 1
            continue
        task = parse_task(raw)
        reason = filter_reason(task, min_chars=cfg.min_chars, max_chars=cfg.max_chars)
        if reason is None and index.is_duplicate(task):
            reason = "near_duplicate"
        if reason:
            stats[reason] += 1
            continue
        text, constraints = constrained_prompt(task, cfg, rng)
        if fits is not None and not fits(text):
            stats["over_max_prompt_tokens"] += 1
            continue
        index.add(task)
        rows.append({"prompt_id": prompt_id(text), "text": text, "gold": None,
                     "constraints": json.dumps(constraints), "category": None,
                     "source": "self-instruct", "source_ref": source_ref, "examples": shots,
                     "raw": raw})
        stats["accepted"] += 1
    return pd.DataFrame(rows, columns=PROMPT_COLUMNS), dict(stats)
