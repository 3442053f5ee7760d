"""Judgments: verifiers, and an LLM judge with reasoning before the verdict, pointwise and
pairwise in both orders.

Modes: `pointwise` (additive 5-point rubric, k samples averaged), `pairwise` (round-robin, each
comparison judged in both orders), `hybrid` (pointwise ranking, then the best-vs-worst pair
judged pairwise in both orders). Verdicts are parsed from the judge's text (the rules of
`flywheel.parsing`: quoted text and echoes of the judged responses ignored, the last verdict
counts, different verdicts in its paragraph are ambiguous), or read from the judge's next-token
probabilities after its rationale (`verdict: logprobs`; NaN or infinite ones are flagged). A
judge input that does not fit the judge's context with room for its reply is not sent: it
becomes a flagged judgment saying so. Every raw output is kept with its parsed result; an
unparseable, ambiguous or unsent one is flagged (`parsed` false, `error` says why), never
scored.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass

import pandas as pd

from flywheel.backends import Backend, Overflow, VerdictProbabilities
from flywheel.config import JudgeConfig
from flywheel.constraints import verify
from flywheel.errors import FlywheelError
from flywheel.hashing import stable_id
from flywheel.parsing import (
    SCORE_KEYS,
    VERDICT_KEYS,
    Parsed,
    parse_pairwise,
    parse_score,
    score_from_probs,
    verdict_from_probs,
)
from flywheel.stages.pairs import best_and_worst, standings
from flywheel.tables import columns
from flywheel.templates import render, template_hash

JUDGMENT_COLUMNS = columns("judgments")

#: Appended after the judge's rationale when verdicts are read from next-token probabilities.
FORCED_PREFIX = {"pointwise": "\nScore: ", "pairwise": "\n\nFinal verdict: [["}
_VERDICT_START = re.compile(r"score\s*[:=]|\[\[|final verdict", re.IGNORECASE)

#: The code version of this stage's output: part of its fingerprint; bump it when the stage
#: makes different rows from the same inputs. +2: a sampled judge (judge.samples > 1) draws
#: by the transformers backend's InverseCdfSampler, not torch.multinomial.
CODE_VERSION = "0.1.0+2"


@dataclass(frozen=True)
class Judge:
    """The judge's identity, stored with every judgment it makes."""

    version: str  # model version id in the catalog, fixed:<folder>, or endpoint:<model>
    path: str  # what the backend is asked for: a checkpoint folder, or the served model id
    content_hash: str  # the checkpoint's content hash, or the endpoint's identity
    location: str = ""  # where an endpoint judge is served (its URL without credentials)

    @property
    def where(self) -> str:
        """What judgments record as `judge_path`: the checkpoint folder, or the endpoint."""
        return self.location or self.path


def _row(**kw) -> dict:
    row = dict.fromkeys(JUDGMENT_COLUMNS)
    row.update(kw)
    return row


def verifier_judgments(prompts: pd.DataFrame, samples: pd.DataFrame, salt: str) -> list[dict]:
    """One judgment per (sample, constraint): judge = the verifier's name@version."""
    cons = {r.prompt_id: json.loads(r.constraints) for r in prompts.itertuples()}
    rows = []
    for s in samples[~samples.greedy].itertuples():
        for i, res in enumerate(verify(s.text, cons.get(s.prompt_id) or [])):
            rows.append(_row(
                judgment_id="j_" + stable_id(salt, "verifier", s.sample_id, i), type="verifier",
                prompt_id=s.prompt_id, sample_id=s.sample_id, k=i, judge=res.verifier,
                method="verifier", raw=res.detail, rationale=res.detail, parsed=True,
                score=1.0 if res.passed else 0.0, verdict="pass" if res.passed else "fail"))
    return rows


def clean_rationale(text: str) -> str:
    """The judge's reasoning up to (not including) any verdict it started writing itself."""
    m = _VERDICT_START.search(text)
    return (text[: m.start()] if m else text).strip()


def too_long_error(overflow: Overflow, kind: str) -> str:
    """Why a judge input was not sent, and what to change."""
    why = (f"input is {overflow.tokens} tokens, over the judge's context of "
           f"{max(overflow.limit, 0)} ({overflow.context} less {overflow.reserved} for its "
           "reply): not sent to the judge; ")
    if overflow.limit <= 0:
        return why + (f"the reply alone fills the context: set judge.max_new_tokens below "
                      f"{overflow.context}, or use a judge with a longer context")
    return why + ("shorten the answers (sampling.max_new_tokens, eval.max_new_tokens), lower "
                  f"judge.max_new_tokens, use judge.{kind}_template: {kind}_brief.j2, or a "
                  "judge with a longer context")


def over_context(rows: pd.DataFrame | list[dict]) -> list[str]:
    """The errors of the judgments not sent to the judge because their input was too long."""
    df = pd.DataFrame(rows, columns=JUDGMENT_COLUMNS)
    return list(df.error[df.error.fillna("").str.startswith("input is ") & (df.raw == "")])


def ask_judge(backend: Backend, judge: Judge, conversations: list[list[dict]], kind: str,
              cfg: JudgeConfig, seed: int, shown: list[list[str]] | None = None
              ) -> list[list[tuple[str, Parsed, dict | None]]]:
    """`cfg.samples` (raw, parsed, probs) per conversation, by text parsing or forced verdict.

    `shown`: per conversation, the responses the judge is shown (their own verdicts are not
    the judge's). A conversation too long for the judge's context is not sent: its results
    are empty outputs flagged with the reason.
    """
    k = cfg.samples if kind == "pointwise" else 1
    shown = shown if shown is not None else [[] for _ in conversations]
    check = getattr(backend, "overflows", None)  # a backend that cannot count sends everything
    prefix = FORCED_PREFIX[kind] if cfg.verdict == "logprobs" else ""
    overflow = (check(judge.path, conversations, max_new_tokens=cfg.max_new_tokens,
                      forced_prefix=prefix) if check and conversations
                else [None] * len(conversations))
    send = [i for i, o in enumerate(overflow) if o is None]
    out: list = [[("", Parsed(None, False, too_long_error(o, kind), ""), None)] * k
                 if o is not None else None for o in overflow]
    if send:
        results = _ask(backend, judge, [conversations[i] for i in send], kind, cfg, seed,
                       [shown[i] for i in send])
        for i, result in zip(send, results, strict=True):
            out[i] = result
    return out


def _ask(backend: Backend, judge: Judge, conversations: list[list[dict]], kind: str,
         cfg: JudgeConfig, seed: int, shown: list[list[str]]
         ) -> list[list[tuple[str, Parsed, dict | None]]]:
    """`ask_judge` for conversations that fit the judge's context."""
    k = cfg.samples if kind == "pointwise" else 1
    temperature = cfg.temperature if k > 1 else 0.0
    if cfg.verdict == "text":
        gens = backend.generate(judge.path, conversations, n=k, temperature=temperature,
                                top_p=1.0, max_new_tokens=cfg.max_new_tokens, seed=seed,
                                desc=f"judge {kind}")
        parse = parse_score if kind == "pointwise" else parse_pairwise
        return [[(g.text, parse(g.text, shown=responses), None) for g in row]
                for row, responses in zip(gens, shown, strict=True)]
    if not isinstance(backend, VerdictProbabilities):
        raise FlywheelError(f"the judge's backend ({type(backend).__name__}) cannot read "
                            "verdict probabilities", details=["set judge.verdict: text"])
    keys = list(SCORE_KEYS if kind == "pointwise" else VERDICT_KEYS)
    flat = [c for c in conversations for _ in range(k)]
    results = backend.rationale_then_probs(
        judge.path, flat, forced_prefix=FORCED_PREFIX[kind], candidates=keys,
        max_new_tokens=cfg.max_new_tokens, temperature=temperature, seed=seed,
        stop=verdict_start, desc=f"judge {kind}")
    out = []
    for i in range(len(conversations)):
        items = []
        for raw, rationale, probs in results[i * k:(i + 1) * k]:
            items.append((raw, _forced(kind, probs, rationale), probs))
        out.append(items)
    return out


def _forced(kind: str, probs: dict[str, float], rationale: str) -> Parsed:
    """The verdict read from probabilities; unusable probabilities are a parse failure."""
    try:
        value = score_from_probs(probs) if kind == "pointwise" else verdict_from_probs(probs)
    except ValueError as exc:
        return Parsed(None, False, f"unusable verdict probabilities: {exc}", rationale)
    return Parsed(value, True, None, rationale)


def verdict_start(text: str) -> int | None:
    """Where the judge began writing a verdict of its own (cut there before forcing one)."""
    m = _VERDICT_START.search(text)
    return m.start() if m else None


def pointwise_judgments(backend: Backend, judge: Judge, prompts: pd.DataFrame,
                        samples: pd.DataFrame, cfg: JudgeConfig, seed: int,
                        salt: str) -> list[dict]:
    """The additive-rubric score of every non-greedy sample, `cfg.samples` times."""
    text = dict(zip(prompts.prompt_id, prompts.text))
    todo = samples[~samples.greedy]
    convs = [[{"role": "user", "content": render(cfg.pointwise_template, prompt=text[s.prompt_id],
                                                 response=s.text)}] for s in todo.itertuples()]
    thash = template_hash(cfg.pointwise_template)
    rows = []
    shown = [[s.text] for s in todo.itertuples()]
    for s, results in zip(todo.itertuples(), ask_judge(backend, judge, convs, "pointwise", cfg,
                                                       seed, shown)):
        for k, (raw, parsed, probs) in enumerate(results):
            rows.append(_row(
                judgment_id="j_" + stable_id(salt, "pointwise", s.sample_id, k), type="pointwise",
                prompt_id=s.prompt_id, sample_id=s.sample_id, k=k, judge=judge.version,
                judge_path=judge.where, judge_hash=judge.content_hash, template_hash=thash,
                method=cfg.verdict, raw=raw, rationale=parsed.rationale, parsed=parsed.ok,
                error=parsed.error, score=parsed.value if parsed.ok else None,
                probs=json.dumps(probs) if probs else None))
    return rows


def pairwise_judgments(backend: Backend, judge: Judge, prompts: pd.DataFrame,
                       samples: pd.DataFrame, comparisons: list[tuple[str, str]],
                       cfg: JudgeConfig, seed: int,
                       salt: str) -> list[dict]:
    """Every comparison (a, b) judged twice: a shown first, then b shown first."""
    text = dict(zip(samples.sample_id, samples.text))
    prompt_of = dict(zip(samples.sample_id, samples.prompt_id))
    ptext = dict(zip(prompts.prompt_id, prompts.text))
    ordered = [(a, b, False) for a, b in comparisons] + [(b, a, True) for a, b in comparisons]
    convs = [[{"role": "user", "content": render(
        cfg.pairwise_template, prompt=ptext[prompt_of[a]], response_a=text[a],
        response_b=text[b])}] for a, b, _ in ordered]
    thash = template_hash(cfg.pairwise_template)
    rows = []
    shown = [[text[a], text[b]] for a, b, _ in ordered]
    for (a, b, swapped), [(raw, parsed, probs)] in zip(
            ordered, ask_judge(backend, judge, convs, "pairwise", cfg, seed, shown)):
        comparison = "c_" + stable_id(salt, *sorted((a, b)))
        winner = {"A": a, "B": b}.get(parsed.value) if parsed.ok else None
        rows.append(_row(
            judgment_id="j_" + stable_id(comparison, swapped), type="pairwise",
            prompt_id=prompt_of[a], sample_a=a, sample_b=b, comparison_id=comparison,
            swapped=swapped, k=0, judge=judge.version, judge_path=judge.where,
            judge_hash=judge.content_hash, template_hash=thash, method=cfg.verdict, raw=raw,
            rationale=parsed.rationale, parsed=parsed.ok, error=parsed.error,
            verdict=parsed.value if parsed.ok else None, winner=winner,
            probs=json.dumps(probs) if probs else None))
    return rows


def round_robin(samples: pd.DataFrame) -> list[tuple[str, str]]:
    """Every unordered pair of candidates of the same prompt."""
    out = []
    for _, g in samples[~samples.greedy].groupby("prompt_id", sort=True):
        out += list(itertools.combinations(sorted(g.sample_id), 2))
    return out


def verifier_ties(samples: pd.DataFrame, verifier_rows: list[dict]) -> pd.DataFrame:
    """The candidates of prompts whose verifier results cannot separate best from worst."""
    frac = pd.DataFrame(verifier_rows, columns=JUDGMENT_COLUMNS).groupby("sample_id").score.mean()
    cand = samples[~samples.greedy].copy()
    cand["frac"] = [frac.get(s, -1.0) for s in cand.sample_id]
    spread = cand.groupby("prompt_id").frac.agg(lambda f: f.max() - f.min())
    return samples[samples.prompt_id.isin(spread[spread == 0].index)]


def judge_samples(backend: Backend, judge: Judge, prompts: pd.DataFrame, samples: pd.DataFrame,
                  cfg: JudgeConfig, seed: int, salt: str) -> pd.DataFrame:
    """All judgments of one samples version, per `cfg.mode` (and `cfg.llm_on`)."""
    rows = verifier_judgments(prompts, samples, salt) if cfg.verifiers else []
    if cfg.llm_on == "ties" and cfg.verifiers:
        samples = verifier_ties(samples, rows)
    if cfg.mode in ("pointwise", "hybrid"):
        rows += pointwise_judgments(backend, judge, prompts, samples, cfg, seed, salt)
    if cfg.mode == "pairwise":
        comparisons = round_robin(samples)
    elif cfg.mode == "hybrid":
        ranked = standings(samples, pd.DataFrame(rows, columns=JUDGMENT_COLUMNS), cfg.mode)
        comparisons = []
        for _, group in sorted(ranked.items()):
            bw = best_and_worst(group)
            if bw:
                comparisons.append((bw[0].sample_id, bw[1].sample_id))
    else:
        comparisons = []
    if comparisons:
        rows += pairwise_judgments(backend, judge, prompts, samples, comparisons, cfg, seed + 1,
                                   salt)
    df = pd.DataFrame(rows, columns=JUDGMENT_COLUMNS)
    df["parsed"] = df["parsed"].astype(bool)
    df["swapped"] = df["swapped"].astype("boolean")
    return df
