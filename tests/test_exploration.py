"""Exploration in the samples stage (`sampling.explore_*`): more candidates for the prompts
whose candidates all pass or all fail their constraints, within a budget, deterministic, and
nothing of it at the defaults."""

from __future__ import annotations

import json
from dataclasses import replace

import pandas as pd
import pytest

from flywheel.backends import Generation
from flywheel.config import SamplingConfig
from flywheel.errors import FlywheelError
from flywheel.hashing import stable_id
from flywheel.stages.sampling import (
    SAMPLE_COLUMNS,
    Split,
    candidates,
    exploration_order,
    explore,
    explore_seed,
)

SEED, SALT = 7001, "fp-explore"
LOWER = [{"type": "lowercase"}]
UPPER = [{"type": "uppercase"}]
SHORT = [{"type": "max_words", "n": 50}]


class Script:
    """A scripted backend: `answer(prompt, seed, j)` is the j-th answer to a prompt in one
    call (identical conversations count on); records every call."""

    def __init__(self, answer=lambda prompt, seed, j: "Mixed Case"):
        self.answer = answer
        self.calls: list[dict] = []

    def generate(self, model, conversations, *, n=1, temperature=0.0, top_p=1.0,
                 max_new_tokens=64, seed=0, desc="generate"):
        self.calls.append({"prompts": [c[-1]["content"] for c in conversations], "n": n,
                           "temperature": temperature, "seed": seed, "desc": desc})
        seen: dict[str, int] = {}
        out = []
        for conv in conversations:
            prompt = conv[-1]["content"]
            j = seen[prompt] = seen.get(prompt, -1) + 1
            out.append([Generation(self.answer(prompt, seed, j * n + k), "stop", 5, 3)
                        for k in range(n)])
        return out


def prompts_df(rows: dict[str, list[dict]]) -> pd.DataFrame:
    """Prompts whose text is their id, with the given constraints."""
    return pd.DataFrame([{"prompt_id": pid, "text": pid, "gold": None,
                          "constraints": json.dumps(c)} for pid, c in rows.items()])


def scfg(**kw) -> SamplingConfig:
    return SamplingConfig(**{"n": 2, "explore_n": 2, "explore_rounds": 2,
                             "explore_temperature": 1.3, **kw})


def run(backend: Script, prompts: pd.DataFrame, cfg: SamplingConfig
        ) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The first candidates, then exploration, as the samples stage runs them."""
    first = candidates(backend, "/m", "m0", prompts, n=cfg.n, temperature=cfg.temperature,
                       top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, seed=SEED,
                       salt=SALT)
    extra, stats = explore(backend, "/m", "m0", prompts, first, cfg, seed=SEED, salt=SALT)
    return first, extra, stats


# -- off by default ----------------------------------------------------------------------------
def test_exploration_is_off_by_default():
    assert SamplingConfig().explore_budget == 0
    backend = Script()
    prompts = prompts_df({"a": LOWER, "b": UPPER})
    first, extra, stats = run(backend, prompts, replace(SamplingConfig(), n=2))
    assert len(backend.calls) == 1 and len(first) == 4  # the first candidates only
    assert extra.empty and list(extra.columns) == SAMPLE_COLUMNS
    assert stats == {"budget": 0, "drawn": 0, "passes": [], "by_type": {
        "lowercase": {"prompts": 1, "split_before": 0, "split_after": 0, "extra_samples": 0},
        "uppercase": {"prompts": 1, "split_before": 0, "split_after": 0, "extra_samples": 0}}}


# -- the budget ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("budget", "drawn", "per_pass"), [
    (1, 1, [1]), (7, 7, [7]), (10, 10, [10]), (11, 11, [10, 1]), (19, 19, [10, 9]),
    (20, 20, [10, 10]), (500, 20, [10, 10])])  # 5 prompts x 2 per pass x 2 passes = 20 at most
def test_the_budget_is_never_exceeded(budget, drawn, per_pass):
    backend = Script()  # every answer fails lowercase: no prompt ever gets a pass
    prompts = prompts_df({f"p{i}": LOWER for i in range(5)})
    first, extra, stats = run(backend, prompts, scfg(explore_budget=budget))
    assert len(extra) == stats["drawn"] == drawn
    assert [p["samples"] for p in stats["passes"]] == per_pass
    assert [c["n"] for c in backend.calls] == [2] + [1] * len(per_pass)
    assert [len(c["prompts"]) for c in backend.calls[1:]] == per_pass
    # ordinary candidates: own ids and indices after the first n, the pass's seed recorded
    assert not set(extra.sample_id) & set(first.sample_id)
    assert extra.sample_id.is_unique
    for pid, g in extra.groupby("prompt_id"):
        assert sorted(g.idx) == list(range(2, 2 + len(g)))
        assert list(g.sample_id) == ["s_" + stable_id(SALT, pid, i) for i in g.idx]
    assert set(extra.seed) == {explore_seed(SEED, p) for p in range(1, len(per_pass) + 1)}
    assert set(extra.temperature) == {1.3} and not extra.greedy.any()
    assert stats["by_type"]["lowercase"]["extra_samples"] == drawn


def test_a_partial_share_goes_to_the_last_prompt_served():
    backend = Script()
    prompts = prompts_df({f"p{i}": LOWER for i in range(3)})
    _, extra, stats = run(backend, prompts, scfg(explore_budget=5, explore_n=2,
                                                 explore_rounds=1))
    assert extra.prompt_id.value_counts().to_dict() == {"p0": 2, "p1": 2, "p2": 1}
    assert stats["passes"] == [{"pass": 1, "seed": explore_seed(SEED, 1), "prompts": 3,
                                "samples": 5}]


def test_no_passes_no_exploration_and_a_bad_setting_is_named():
    backend = Script()
    prompts = prompts_df({"a": LOWER})
    _, extra, stats = run(backend, prompts, scfg(explore_budget=5, explore_rounds=0))
    assert extra.empty and stats["passes"] == [] and len(backend.calls) == 1
    with pytest.raises(FlywheelError, match=r"sampling\.explore_n must be > 0, got 0"):
        run(backend, prompts, scfg(explore_budget=5, explore_n=0))
    with pytest.raises(FlywheelError, match=r"explore_temperature must be >= 0, got -1"):
        run(backend, prompts, scfg(explore_budget=5, explore_temperature=-1))


# -- which prompts, in which order, until when ------------------------------------------------
def test_all_fail_prompts_first_then_all_pass_in_turns_by_type():
    cons = {"c1": SHORT, "a1": LOWER, "a2": LOWER, "b1": UPPER, "d": [], "e": LOWER,
            "c2": SHORT}
    split = {"c1": Split(2, 0), "a1": Split(0, 2), "a2": Split(0, 2), "b1": Split(0, 2),
             "e": Split(1, 1), "c2": Split(2, 0)}
    order = ["c1", "a1", "a2", "b1", "d", "e", "c2"]
    assert exploration_order(order, split, cons) == ["a1", "b1", "a2", "c1", "c2"]


def test_only_prompts_without_a_pass_and_a_fail_are_explored():
    def answer(prompt, seed, j):  # e: a pass and a fail among its first two
        return "fine" if prompt == "e" and j == 0 else "Mixed Case"

    backend = Script(answer)
    prompts = prompts_df({"c1": SHORT, "a1": LOWER, "b1": UPPER, "d": [], "e": LOWER})
    _, extra, stats = run(backend, prompts, scfg(explore_budget=3, explore_n=1,
                                                 explore_rounds=1))
    # c1 passes max_words every time (all pass); a1 and b1 always fail; d has no constraints
    assert backend.calls[1]["prompts"] == ["a1", "b1", "c1"]
    assert list(extra.prompt_id) == ["a1", "b1", "c1"]
    assert stats["by_type"] == {
        "lowercase": {"prompts": 2, "split_before": 1, "split_after": 1, "extra_samples": 1},
        "max_words": {"prompts": 1, "split_before": 0, "split_after": 0, "extra_samples": 1},
        "uppercase": {"prompts": 1, "split_before": 0, "split_after": 0, "extra_samples": 1}}


def test_a_prompt_that_found_its_pass_is_not_explored_again():
    lucky = explore_seed(SEED, 1)

    def answer(prompt, seed, j):  # a1's second extra answer in pass 1 passes lowercase
        return "all lower" if (prompt, seed, j) == ("a1", lucky, 1) else "Mixed Case"

    backend = Script(answer)
    prompts = prompts_df({"a1": LOWER, "a2": LOWER + SHORT})
    _, extra, stats = run(backend, prompts, scfg(explore_budget=100, explore_rounds=3))
    assert [c["prompts"] for c in backend.calls[1:]] == [
        ["a1", "a1", "a2", "a2"], ["a2", "a2"], ["a2", "a2"]]
    assert stats["drawn"] == 8 and [p["prompts"] for p in stats["passes"]] == [2, 1, 1]
    assert stats["by_type"] == {
        "lowercase": {"prompts": 2, "split_before": 0, "split_after": 1, "extra_samples": 8},
        "max_words": {"prompts": 1, "split_before": 0, "split_after": 0, "extra_samples": 6}}
    assert extra[extra.prompt_id == "a1"].text.tolist() == ["Mixed Case", "all lower"]


def test_exploration_is_deterministic():
    def answer(prompt, seed, j):
        return f"{prompt} {seed} {j}"

    prompts = prompts_df({"a": UPPER, "b": UPPER, "c": LOWER})
    cfg = scfg(explore_budget=9)
    one, two = run(Script(answer), prompts, cfg), run(Script(answer), prompts, cfg)
    assert one[1].equals(two[1]) and one[2] == two[2]
    assert len(one[1]) == 9


# -- through the pipeline's samples stage -------------------------------------------------------
def _workspace(tmp_path, model_dir, *overrides):
    """A context over a new catalog with one prompts version (constraints of three types and
    one prompt without; the first with a gold answer); (ctx, prompts version)."""
    from flywheel import pipeline
    from flywheel.config import load_config

    cfg = load_config(None, [f"workspace={tmp_path}", "progress=false",
                             f"models.policy={model_dir}", "sampling.n=2",
                             "sampling.max_new_tokens=8", "sampling.prompts_per_round=0",
                             *overrides])
    ctx = pipeline.context(cfg)
    ctx.catalog.init()
    rows = pd.DataFrame([
        {"prompt_id": f"p_{i}", "text": text, "gold": "hi" if i == 0 else None,
         "constraints": json.dumps(c),
         "category": None, "source": "seed", "source_ref": f"x:{i}", "examples": [],
         "raw": None}
        for i, (text, c) in enumerate([("Say hi.", LOWER), ("Name a fruit.", UPPER),
                                       ("Describe rain.", SHORT), ("Tell a joke.", [])])])
    pv = ctx.catalog.commit(kind="prompts", run_id="r", round=0, parents=[], params={},
                            fp="p" * 20, tables={"prompts": rows}).version_id
    return ctx, pv


def _fake_model(ctx, folder) -> str:
    folder.mkdir(exist_ok=True)
    row = pd.DataFrame([{"path": str(folder), "content_hash": "h" * 16, "base_version": None,
                         "method": "base", "train_pairs": 0, "metrics": "{}"}])
    return ctx.catalog.commit(kind="model", run_id="r", round=0, parents=[], params={},
                              fp="m" * 20, tables={"models": row}).version_id


def _scripted(answer=lambda prompt, seed, j: "Mixed Case"):
    return Script(answer)


def test_the_samples_stage_at_defaults_is_what_it_was(tmp_path):
    """Nothing of exploration at the defaults: the fingerprint of the params as they were, the
    rows of the first candidates alone, one generate call."""
    from flywheel import pipeline
    from flywheel.config import shaping
    from flywheel.hashing import fingerprint
    from flywheel.stages.sampling import CODE_VERSION

    ctx, pv = _workspace(tmp_path / "ws", tmp_path / "model")
    model = _fake_model(ctx, tmp_path / "model")
    ctx._backend = backend = _scripted()
    v = pipeline.sample(ctx, 1, pv, [], model)
    version = ctx.catalog.get(v)
    before = {"round": 1, "seed": 0, "n": 2, "temperature": 0.7, "top_p": 0.9,
              "max_new_tokens": 8, "prompts_per_round": 0, "spin": False,
              **pipeline._gen_params(ctx.cfg)}
    assert shaping(ctx.cfg.sampling) == {k: before[k] for k in
                                         ("n", "temperature", "top_p", "max_new_tokens",
                                          "prompts_per_round")}
    parents = [ctx.catalog.get(p).fingerprint for p in (pv, model)]
    assert version.fingerprint == fingerprint("samples", before, parents, CODE_VERSION)
    assert not [k for k in version.params if k.startswith("explore_")]
    assert version.params["exploration"]["drawn"] == 0
    assert len(backend.calls) == 1
    rows = ctx.catalog.rows("samples", v).drop(columns="version_id")
    prompts = ctx.catalog.rows("prompts", pv)
    expected = candidates(_scripted(), str(tmp_path / "model"), model, prompts, n=2,
                          temperature=0.7, top_p=0.9, max_new_tokens=8, seed=1,
                          salt=version.fingerprint)
    assert len(rows) == 8
    assert rows.sort_values("sample_id").reset_index(drop=True).equals(
        expected.sort_values("sample_id").reset_index(drop=True).astype(rows.dtypes))


def test_the_samples_stage_explores_within_its_budget(tmp_path):
    from flywheel import pipeline

    budget = ["sampling.explore_budget=5", "sampling.explore_n=2",
              "sampling.explore_rounds=3", "sampling.explore_temperature=1.1"]
    ctx, pv = _workspace(tmp_path / "ws", tmp_path / "model", *budget)
    model = _fake_model(ctx, tmp_path / "model")
    ctx._backend = _scripted()
    v = pipeline.sample(ctx, 1, pv, [], model)
    version = ctx.catalog.get(v)
    # ADDED settings: those not at their defaults (explore_n is) enter the fingerprint
    assert {k: version.params[k] for k in version.params if k.startswith("explore_")} == {
        "explore_budget": 5, "explore_rounds": 3, "explore_temperature": 1.1}
    rows = ctx.catalog.rows("samples", v)
    extra = rows[rows.idx >= 2]
    assert len(rows) == 8 + 5 and len(extra) == 5
    stats = version.params["exploration"]
    assert stats["drawn"] == 5 and stats["budget"] == 5
    # "Mixed Case" fails lowercase and uppercase (served first), passes max_words
    assert stats["by_type"] == {
        "lowercase": {"prompts": 1, "split_before": 0, "split_after": 0, "extra_samples": 2},
        "max_words": {"prompts": 1, "split_before": 0, "split_after": 0, "extra_samples": 1},
        "uppercase": {"prompts": 1, "split_before": 0, "split_after": 0, "extra_samples": 2}}
    assert set(extra.temperature) == {1.1}
    assert set(extra.seed) == {explore_seed(1, 1)}

    # the same inputs: the version is reused; in a new catalog, the same rows
    assert pipeline.sample(ctx, 1, pv, [], model) == v
    ctx2, pv2 = _workspace(tmp_path / "ws2", tmp_path / "model", *budget)
    ctx2._backend = _scripted()
    v2 = pipeline.sample(ctx2, 1, pv2, [], _fake_model(ctx2, tmp_path / "model"))
    again = ctx2.catalog.rows("samples", v2).drop(columns="version_id")
    assert again.sort_values("sample_id").reset_index(drop=True).equals(
        rows.drop(columns="version_id").sort_values("sample_id").reset_index(drop=True))


def test_spin_does_not_explore(tmp_path):
    from flywheel import pipeline

    ctx, pv = _workspace(tmp_path / "ws", tmp_path / "model", "sampling.explore_budget=4",
                         "train.method=spin")
    model = _fake_model(ctx, tmp_path / "model")
    ctx._backend = backend = _scripted()
    v = pipeline.sample(ctx, 1, pv, [], model)
    params = ctx.catalog.get(v).params
    assert not [k for k in params if k.startswith("explore_")]
    assert params["exploration"]["drawn"] == 0
    assert [c["desc"] for c in backend.calls] == ["sampling", "greedy answers"]


def test_the_samples_stage_explores_with_a_real_tiny_model(tiny_model, tmp_path):
    """The transformers backend on a tiny random model: exploration draws exactly its budget
    (random text fails lowercase and uppercase), and the first candidates are those of a run
    at the defaults, in another catalog."""
    from flywheel import pipeline

    backend = None

    def run_once(ws, *overrides):
        nonlocal backend
        ctx, pv = _workspace(ws, tiny_model, *overrides)
        if backend is not None:  # the model loaded once
            ctx._backend = backend
        v = pipeline.sample(ctx, 1, pv, [], pipeline.base_model(ctx))
        backend = ctx.backend
        return ctx.catalog.get(v).params, ctx.catalog.rows("samples", v)

    explore_on = ["sampling.explore_budget=3", "sampling.explore_n=2"]
    params, rows = run_once(tmp_path / "a", *explore_on)
    _, plain = run_once(tmp_path / "b")
    stats = params["exploration"]
    split = {t: s["split_before"] for t, s in stats["by_type"].items()}
    assert split["lowercase"] == split["uppercase"] == 0  # random tokens: both all fail
    assert stats["drawn"] == len(rows) - 8 == 3
    assert set(rows[rows.idx >= 2].prompt_id) <= {"p_0", "p_1", "p_2"}

    def texts(df):
        return sorted(zip(df.prompt_id, df.idx, df.text))

    assert texts(rows[rows.idx < 2]) == texts(plain)
