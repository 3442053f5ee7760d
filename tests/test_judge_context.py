"""A judge input longer than the judge's context: not sent, stored as a flagged judgment, the
rest of the batch judged. Real transformers backend on a tiny random Llama whose context is
256 positions (the brief templates fit it, a 200-word answer does not)."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

import pandas as pd
import pytest

from flywheel.config import JudgeConfig
from flywheel.stages.judging import FORCED_PREFIX, JUDGMENT_COLUMNS, Judge, judge_samples
from flywheel.stages.sampling import SAMPLE_COLUMNS
from flywheel.templates import render
from tests.conftest import BUNDLED, run_cli, tiny_llama

CONTEXT = 256
SHORT, LONG = "Paris.", "word " * 200


@pytest.fixture(scope="module")
def short_judge(tmp_path_factory) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer and a CONTEXT-position context."""
    if not (BUNDLED / "config.json").is_file():
        pytest.skip("bundled model not converted: run `make setup`")
    return tiny_llama(tmp_path_factory.mktemp("short-judge"), context=CONTEXT)


@pytest.fixture(scope="module")
def backend():
    from flywheel.backends.transformers import TransformersBackend

    return TransformersBackend(progress=False, batch_size=4)


class Spy:
    """The real backend, recording which conversations reach the model."""

    def __init__(self, inner):
        self.inner = inner
        self.sent: list[str] = []

    def overflows(self, *args, **kw):
        return self.inner.overflows(*args, **kw)

    def generate(self, model, conversations, **kw):
        self.sent += [c[-1]["content"] for c in conversations]
        return self.inner.generate(model, conversations, **kw)

    def rationale_then_probs(self, model, conversations, **kw):
        self.sent += [c[-1]["content"] for c in conversations]
        return self.inner.rationale_then_probs(model, conversations, **kw)


@cache
def tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def tokens(path: Path, content: str, suffix: str = "") -> int:
    """The prompt's tokens as the backend counts them: chat template + generation prompt."""
    tok = tokenizer(path)
    text = tok.apply_chat_template([{"role": "user", "content": content}],
                                   add_generation_prompt=True, tokenize=False)
    return len(tok(text + suffix, add_special_tokens=False)["input_ids"])


def frames(*answers: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    prompts = pd.DataFrame([{"prompt_id": "p1", "text": "Capital of France?",
                             "constraints": "[]"}])
    samples = pd.DataFrame([
        {"sample_id": f"s{i}", "prompt_id": "p1", "model_version": "m", "idx": i,
         "greedy": False, "text": t, "finish_reason": "stop", "prompt_tokens": 5,
         "completion_tokens": 2, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 8,
         "seed": 0} for i, t in enumerate(answers)], columns=SAMPLE_COLUMNS)
    return prompts, samples


def jcfg(**kw) -> JudgeConfig:
    base = {"mode": "pointwise", "verdict": "text", "samples": 1, "max_new_tokens": 8,
            "verifiers": False, "pointwise_template": "pointwise_brief.j2",
            "pairwise_template": "pairwise_brief.j2"}
    return JudgeConfig(**{**base, **kw})


def test_overflow_boundary(short_judge: Path, backend) -> None:
    """A prompt of n tokens fits with exactly CONTEXT - n new tokens, not with one more."""
    conv = [{"role": "user", "content": SHORT}]
    n = tokens(short_judge, SHORT)
    assert backend.overflows(str(short_judge), [conv], max_new_tokens=CONTEXT - n) == [None]
    [over] = backend.overflows(str(short_judge), [conv], max_new_tokens=CONTEXT - n + 1)
    assert (over.tokens, over.context, over.reserved, over.limit) == (
        n, CONTEXT, CONTEXT - n + 1, n - 1)
    prefix = tokens(short_judge, SHORT, FORCED_PREFIX["pointwise"]) - n
    [over] = backend.overflows(str(short_judge), [conv], max_new_tokens=CONTEXT - n,
                               forced_prefix=FORCED_PREFIX["pointwise"])
    assert over.reserved == CONTEXT - n + prefix
    assert backend.overflows(str(short_judge), [], max_new_tokens=8) == []


@pytest.mark.parametrize("verdict", ["text", "logprobs"])
def test_pointwise_over_long_input_flagged_rest_judged(short_judge: Path, backend,
                                                       verdict: str) -> None:
    prompts, samples = frames(SHORT, LONG, SHORT + " Berlin.")
    spy = Spy(backend)
    judge = Judge(version="fixed:short", path=str(short_judge), content_hash="h")
    rows = judge_samples(spy, judge, prompts, samples, jcfg(verdict=verdict), 7, "salt")
    assert list(rows.columns) == JUDGMENT_COLUMNS and len(rows) == 3
    long_input = render("pointwise_brief.j2", prompt="Capital of France?", response=LONG)
    assert long_input not in spy.sent and len(spy.sent) == 2  # the others, and only they
    n = tokens(short_judge, long_input)
    reserved = 8 + (tokens(short_judge, SHORT, FORCED_PREFIX["pointwise"])
                    - tokens(short_judge, SHORT) if verdict == "logprobs" else 0)
    bad = rows[rows.sample_id == "s1"].iloc[0]
    assert not bad.parsed and pd.isna(bad.score) and bad.raw == ""
    assert bad.error.startswith(
        f"input is {n} tokens, over the judge's context of {CONTEXT - reserved} "
        f"({CONTEXT} less {reserved} for its reply): not sent to the judge; ")
    ok = rows[rows.sample_id != "s1"]
    assert not ok.error.fillna("").str.startswith("input is").any()
    if verdict == "logprobs":  # the judged ones have real probabilities and scores
        assert ok.parsed.all() and ok.score.between(0, 5).all()
        assert all(set(json.loads(p)) == set("012345") for p in ok.probs)


def test_pairwise_over_long_input_flagged_in_both_orders(short_judge: Path, backend) -> None:
    prompts, samples = frames(SHORT, SHORT + " Yes.", LONG)
    spy = Spy(backend)
    judge = Judge(version="fixed:short", path=str(short_judge), content_hash="h")
    rows = judge_samples(spy, judge, prompts, samples, jcfg(mode="pairwise", verdict="logprobs"),
                         7, "salt")
    assert len(rows) == 6  # 3 comparisons x 2 orders
    with_long = (rows.sample_a == "s2") | (rows.sample_b == "s2")
    assert with_long.sum() == 4 and len(spy.sent) == 2
    assert not rows[with_long].parsed.any() and rows[with_long].winner.isna().all()
    assert rows[with_long].error.str.match(r"input is \d+ tokens, over the judge's context").all()
    assert rows[~with_long].parsed.all()
    assert set(rows[~with_long].verdict) <= {"A", "B", "C"}


@pytest.mark.slow
def test_cli_round_with_a_short_context_judge(tiny_model: Path, short_judge: Path,
                                              tmp_path: Path) -> None:
    """A whole round through the CLI: every judge input is over the judge's context, so every
    LLM judgment (the round's and the eval's) is flagged; the run still finishes."""
    import duckdb

    proc = run_cli("iterate", "--rounds", "1", "--no-prefect", "--config", "configs/tiny.yaml",
                   "--set", f"models.policy={tiny_model}", "--set", f"models.judge={short_judge}",
                   "--set", f"workspace={tmp_path}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = re.findall(r"round 1 · (judgments|eval) +(\d+) judge input\(s\) not sent, flagged "
                        r"unparsed; the first: input is \d+ tokens, over the judge's context "
                        rf"of {CONTEXT - 8} \({CONTEXT} less 8 for its reply\)", proc.stderr)
    assert [kind for kind, _ in logged] == ["judgments", "eval"]
    con = duckdb.connect(str(tmp_path / "flywheel.duckdb"), read_only=True)
    try:
        llm = con.execute("SELECT parsed, error, raw, score, verdict FROM judgments "
                          "WHERE type <> 'verifier'").fetchall()
        assert len(llm) == int(logged[0][1]) > 0
        assert all(not parsed and raw == "" and score is None and verdict is None
                   and error.startswith("input is ") for parsed, error, raw, score, verdict
                   in llm)
        assert con.execute("SELECT count(*) FROM pairs WHERE rule LIKE 'llm%'").fetchone() == (0,)
        verdicts = con.execute("SELECT verdict_ab, verdict_ba FROM eval_items i JOIN versions v "
                               "USING (version_id) WHERE v.round = 1").fetchall()
        assert verdicts and all(v == (None, None) for v in verdicts)
    finally:
        con.close()
