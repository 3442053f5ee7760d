"""The transfer split: held-out eval prompts whose topics and instruction phrasings never
appear in training.

The shipped eval file marks its transfer prompts `"split": "transfer"`; they are written in the
constraint library's transfer phrasings on topics of neither the seed file nor the
in-distribution eval prompts. Self-instruct keeps every eval topic (both splits, used or not)
out of the pool; the eval reports both splits per constraint type with mean answer lengths,
compares only the in-distribution split with the baseline, and the round summary shows both.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pandas as pd
import pytest

from flywheel import pipeline, report
from flywheel.backends import Generation
from flywheel.catalog import Catalog
from flywheel.config import PromptsConfig, load_config
from flywheel.constraints import CONSTRAINTS, describe_constraints, renderings
from flywheel.errors import FlywheelError
from flywheel.promptfile import load_prompt_file
from flywheel.stages.evaluate import split_report
from flywheel.stages.prompts import (
    NearDuplicateIndex,
    accept_tasks,
    eval_rows,
    jaccard,
    ngrams,
    task_text,
    task_texts,
)

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ROOT / "data" / "seed_prompts.jsonl"
EVALS = ROOT / "data" / "eval_prompts.jsonl"
BUNDLED = ROOT / "models" / "SmolLM2-135M-Instruct"


def _split(records, split):
    return [r for r in records if r.get("split", "in_distribution") == split]


# -- the shipped eval file --------------------------------------------------------------------
def test_the_eval_file_has_an_in_distribution_and_a_transfer_split_of_every_type():
    records = load_prompt_file(EVALS)
    ind, transfer = _split(records, "in_distribution"), _split(records, "transfer")
    assert (len(ind), len(transfer)) == (50, 39)
    assert len(ind) + len(transfer) == len(records)
    per_type = {name: sum(c["type"] == name for r in transfer for c in r["constraints"])
                for name in CONSTRAINTS}
    assert min(per_type.values()) >= 3, per_type
    assert all(r["id"].startswith("transfer-") for r in transfer)
    # the first twelve (eval.max_prompts: 12) cover every type once
    assert sorted(r["constraints"][0]["type"] for r in transfer[:12]) == sorted(CONSTRAINTS)


def test_transfer_prompts_are_written_in_transfer_phrasings_only():
    for r in _split(load_prompt_file(EVALS), "transfer"):
        cons = r["constraints"]
        assert cons, r["line"]
        rest = r["prompt"]
        for c in reversed(cons):  # the text ends with one transfer phrasing per constraint
            match = [t for t in renderings(c, "transfer") if rest.endswith(t)]
            assert match, (r["line"], c)
            rest = rest[: -len(match[0])].rstrip()
        for c in cons:
            for t in renderings(c, "training"):
                assert t not in r["prompt"], (r["line"], t)


def test_training_data_uses_training_phrasings_only():
    """The seed pool and the in-distribution eval prompts state their constraints in the
    usual sentence (a training phrasing); no transfer sentence occurs in them."""
    every_transfer = {t for name in CONSTRAINTS for c in _all_params(name)
                      for t in renderings(c, "transfer")}
    records = load_prompt_file(SEEDS) + _split(load_prompt_file(EVALS), "in_distribution")
    for r in records:
        if r["constraints"]:
            assert r["prompt"].endswith(" " + describe_constraints(r["constraints"]))
        for c in r["constraints"]:
            every_transfer |= set(renderings(c, "transfer"))
    for r in records:
        assert not any(t in r["prompt"] for t in every_transfer), r["prompt"]


def _all_params(name):
    ctype = CONSTRAINTS[name]
    if not ctype.params:
        return [{"type": name}]
    (p, values), *rest = ctype.choices.items()
    if rest:
        raise AssertionError("one parameter per type")
    return [{"type": name, p: v} for v in values]


def test_transfer_topics_appear_neither_in_the_seeds_nor_in_distribution():
    seen = [task_text(r["prompt"], r["constraints"]) for r in
            load_prompt_file(SEEDS) + _split(load_prompt_file(EVALS), "in_distribution")]
    grams = [ngrams(t) for t in seen]
    worst = 0.0
    for r in _split(load_prompt_file(EVALS), "transfer"):
        task = task_text(r["prompt"], r["constraints"])
        assert task != r["prompt"]  # the instruction was found and taken off
        worst = max(worst, *(jaccard(ngrams(task), g) for g in grams))
    # far below the dedupe threshold (0.6): different topics, not rewordings
    assert worst < 0.45


# -- self-instruct keeps every eval topic out -------------------------------------------------
def test_eval_topics_of_both_splits_are_rejected_by_dedupe():
    cfg = load_config(None, [f"eval.prompts_file={EVALS}", "eval.max_prompts=2"])
    used = pipeline._eval_prompts(cfg)
    assert list(used.split) == ["in_distribution"] * 2 + ["transfer"] * 2
    blocked = task_texts(pipeline._eval_prompts(cfg, limit=False))
    every = eval_rows(load_prompt_file(EVALS), str(EVALS))
    assert len(blocked) == len(every) == 89
    tasks = [task_text(t, json.loads(c)) for t, c in zip(every.text, every.constraints)]
    fresh = ["Describe how a pottery wheel is used to shape clay.",
             "Explain what a weather vane shows."]
    pcfg = PromptsConfig(num_new=200, min_chars=5, constraint_prob=0.0)
    rows, stats = accept_tasks(tasks + fresh, [[]] * len(tasks + fresh), [], blocked, pcfg,
                               random.Random(0), "m")
    assert list(rows.text) == fresh
    assert stats == {"near_duplicate": 89, "accepted": 2}
    # light rewordings of transfer tasks are near-duplicates too
    index = NearDuplicateIndex(pcfg.dedupe_threshold)
    for t in blocked:
        index.add(t)
    assert index.is_duplicate("What does a lighthouse keeper do all day?")
    assert index.is_duplicate("How do penguins keep warm in the Antarctic?")


class Scripted:
    """A backend whose answers are set by the test: `answer(model_path, prompt) -> text`."""

    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def generate(self, model_path, conversations, n=1, **kw):
        self.calls.append((model_path, len(conversations), kw.get("desc")))
        return [[Generation(self.answer(model_path, c[-1]["content"]), "stop", 1, 1)]
                for c in conversations]


def _model(cat, round_, path):
    return cat.commit(kind="model", run_id="run-1", round=round_, parents=[],
                      params={"round": round_}, fp=f"fp-model-{round_}",
                      tables={"models": pd.DataFrame([{
                          "path": str(path), "content_hash": f"h{round_}", "base_version": None,
                          "method": "base", "train_pairs": 0, "metrics": "{}"}])}).version_id


def test_generate_prompts_blocks_every_eval_prompt_even_those_max_prompts_leaves_out(tmp_path):
    if not (BUNDLED / "tokenizer.json").is_file():
        pytest.skip("bundled model not converted: run `make setup`")
    tok = tmp_path / "tok"
    tok.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json",
                 "chat_template.jinja"):
        if (BUNDLED / name).is_file():
            shutil.copy(BUNDLED / name, tok / name)
    transfer = _split(load_prompt_file(EVALS), "transfer")
    outputs = [task_text(r["prompt"], r["constraints"]) for r in transfer[-3:]]
    outputs += ["Describe how a pottery wheel is used to shape clay."]
    cfg = load_config(None, [f"workspace={tmp_path}", f"eval.prompts_file={EVALS}",
                             "eval.max_prompts=1", f"prompts.seed_file={SEEDS}",
                             "prompts.num_new=4", f"prompts.max_attempts={len(outputs)}",
                             "prompts.constraint_prob=1.0", "prompts.phrasings=varied",
                             "progress=false"])
    cat = Catalog(cfg.catalog_path())
    cat.init()
    ctx = pipeline.Context(cfg=cfg, run_id="run-1", catalog=cat, log=lambda m: None)
    ctx._backend = Scripted(lambda path, prompt: outputs.pop(0))
    seeds = pipeline.seed_prompts(ctx)
    policy = _model(cat, 0, tok)
    version = pipeline.generate_prompts(ctx, 1, [seeds], policy)
    rows = cat.rows("prompts", version)
    assert [task_text(t, json.loads(c)) for t, c in zip(rows.text, rows.constraints)] == [
        "Describe how a pottery wheel is used to shape clay."]
    assert cat.get(version).params["stats"] == {"near_duplicate": 3, "accepted": 1}
    assert cat.get(version).params["phrasings"] == "varied"
    [cons] = [json.loads(c) for c in rows.constraints]
    for c in cons:
        assert not any(t in rows.text[0] for t in renderings(c, "transfer"))


# -- the split field --------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "shown"), [
    ('"test"', "unknown split 'test'"),
    ('"Transfer"', "unknown split 'Transfer'"),
    ("3", "unknown split 3 (not a string)"),
    ('["transfer"]', 'unknown split ["transfer"] (not a string)'),
])
def test_an_unknown_split_is_an_error_naming_file_and_line(tmp_path, value, shown):
    path = tmp_path / "evals.jsonl"
    path.write_text('{"prompt": "What is rain?"}\n'
                    f'{{"prompt": "What is snow?", "split": {value}}}\n')
    with pytest.raises(FlywheelError) as err:
        load_prompt_file(path)
    assert str(err.value).startswith(f"prompt file {path} has 1 problem:")
    assert err.value.details == [
        f"{path} line 2: split: {shown} — use one of: in_distribution, transfer (or leave "
        "the key out: in_distribution)"]


def test_a_split_is_kept_and_a_line_without_one_is_in_distribution(tmp_path):
    path = tmp_path / "evals.jsonl"
    path.write_text('{"prompt": "What is rain?"}\n'
                    '{"prompt": "What is snow?", "split": "transfer"}\n'
                    '{"prompt": "What is hail?", "split": "in_distribution"}\n'
                    '{"prompt": "What is sleet?", "split": null}\n')
    records = load_prompt_file(path)
    assert [r.get("split") for r in records] == [None, "transfer", "in_distribution", None]
    assert list(eval_rows(records, str(path)).split) == [
        "in_distribution", "transfer", "in_distribution", "in_distribution"]


# -- the eval reports both splits -------------------------------------------------------------
def test_split_report_per_split_and_type_with_lengths():
    checks = lambda *cs: json.dumps([{"type": t, "passed": p} for t, p in cs])  # noqa: E731
    items = pd.DataFrame({"text": ["abcd", "ab", "abcdef", "a", "xyz"], "checks": [
        checks(("max_words", True), ("lowercase", False)), checks(("max_words", False)),
        checks(), checks(("lowercase", True)), checks(("max_words", True))]})
    got = split_report(items, ["in_distribution"] * 3 + ["transfer"] * 2)
    assert got == {
        "in_distribution": {"prompts": 3, "pass_rate": 1 / 3, "mean_chars": 4.0, "by_type": {
            "lowercase": {"prompts": 1, "checks": 1, "pass_rate": 0.0, "mean_chars": 4.0},
            "max_words": {"prompts": 2, "checks": 2, "pass_rate": 0.5, "mean_chars": 3.0}}},
        "transfer": {"prompts": 2, "pass_rate": 1.0, "mean_chars": 2.0, "by_type": {
            "lowercase": {"prompts": 1, "checks": 1, "pass_rate": 1.0, "mean_chars": 1.0},
            "max_words": {"prompts": 1, "checks": 1, "pass_rate": 1.0, "mean_chars": 3.0}}}}
    empty = split_report(items.head(1), ["in_distribution"])
    assert empty["transfer"] == {"prompts": 0, "pass_rate": None, "mean_chars": None,
                                 "by_type": {}}


EVAL_FILE = [
    {"prompt": "Explain tides. Answer in at most 5 words.",
     "constraints": [{"type": "max_words", "n": 5}]},
    {"prompt": "Describe snow. Write your whole answer in lowercase letters only.",
     "constraints": [{"type": "lowercase"}]},
    {"prompt": "What is a kite?"},
    {"prompt": "What is a comet? Your response must not exceed 5 words.", "split": "transfer",
     "constraints": [{"type": "max_words", "n": 5}]},
    {"prompt": "Describe fog. Reply without a single capital letter.", "split": "transfer",
     "constraints": [{"type": "lowercase"}]},
]
BASE = "This Is A Long Answer With Many Words In It Today."
NEW = {"What is a comet?": "a comet is an icy ball in space.",
       "Describe fog.": "fog is a low cloud."}


def _answer(path, prompt):
    if path.endswith("m0"):
        return BASE
    return next((a for k, a in NEW.items() if prompt.startswith(k)), "short and lowercase.")


def test_the_eval_reports_both_splits_and_compares_only_in_distribution(tmp_path):
    evals = tmp_path / "evals.jsonl"
    evals.write_text("".join(json.dumps(r) + "\n" for r in EVAL_FILE))
    cfg = load_config(None, [f"workspace={tmp_path}", f"eval.prompts_file={evals}",
                             "eval.judge=false", "progress=false"])
    cat = Catalog(cfg.catalog_path())
    cat.init()
    ctx = pipeline.Context(cfg=cfg, run_id="run-1", catalog=cat, log=lambda m: None)
    ctx._backend = backend = Scripted(_answer)
    for name in ("m0", "m1"):
        (tmp_path / name).mkdir()
    m0, m1 = _model(cat, 0, tmp_path / "m0"), _model(cat, 1, tmp_path / "m1")

    e0 = pipeline.evaluate(ctx, 0, m0, None, None)
    e1 = pipeline.evaluate(ctx, 1, m1, m0, e0)
    # the baseline's answers come from its eval: only the new model answers in round 1
    assert [(Path(p).name, n) for p, n, _ in backend.calls] == [("m0", 5), ("m1", 5)]

    row0, row1 = cat.rows("eval", e0).iloc[0], cat.rows("eval", e1).iloc[0]
    assert (row0.n_prompts, row0.pass_rate) == (5, 0.0)
    assert json.loads(row0.pass_by_type) == {"lowercase": 0.0, "max_words": 0.0}
    # pass_rate and the comparison: in-distribution only (2 wins on constraints, a tie)
    assert (row1.n_prompts, row1.pass_rate) == (5, 1.0)
    assert (row1.wins, row1.losses, row1.ties, row1.win_rate) == (2, 0, 1, 2.5 / 3)
    items = cat.df("SELECT * FROM eval_items WHERE version_id = ? ORDER BY prompt_id", [e1])
    by_prompt = {p: o for p, o in zip(items.prompt_id, items.outcome)}
    transfer_ids = set(eval_rows(load_prompt_file(evals), str(evals)).query(
        "split == 'transfer'").prompt_id)
    assert len(by_prompt) == 5
    assert {p for p, o in by_prompt.items() if o is None or pd.isna(o)} == transfer_ids

    n_short, comet, fog = (len("short and lowercase."), len(NEW["What is a comet?"]),
                           len(NEW["Describe fog."]))
    splits1 = cat.get(e1).params["splits"]
    assert splits1 == {
        "in_distribution": {"prompts": 3, "pass_rate": 1.0, "mean_chars": n_short, "by_type": {
            "lowercase": {"prompts": 1, "checks": 1, "pass_rate": 1.0, "mean_chars": n_short},
            "max_words": {"prompts": 1, "checks": 1, "pass_rate": 1.0,
                          "mean_chars": n_short}}},
        "transfer": {"prompts": 2, "pass_rate": 0.5, "mean_chars": (comet + fog) / 2,
                     "by_type": {
            "lowercase": {"prompts": 1, "checks": 1, "pass_rate": 1.0, "mean_chars": fog},
            "max_words": {"prompts": 1, "checks": 1, "pass_rate": 0.0, "mean_chars": comet}}}}
    splits0 = cat.get(e0).params["splits"]
    assert splits0["transfer"]["pass_rate"] == 0.0
    assert splits0["in_distribution"]["mean_chars"] == len(BASE)

    # the round summary's columns: both splits, round 0's transfer rate, answer lengths
    assert report.eval_splits(cat) == {e0: (splits0, splits0), e1: (splits1, splits0)}
    cols = report.split_columns(splits1, splits0)
    assert {k: cols[k] for k in ("transfer_pass_rate", "base_transfer_pass_rate",
                                 "answer_chars", "transfer_answer_chars")} == {
        "transfer_pass_rate": 0.5, "base_transfer_pass_rate": 0.0, "answer_chars": n_short,
        "transfer_answer_chars": (comet + fog) / 2}
    # length-controlled: max_words left out, lowercase 0% -> 100% in-distribution
    assert (cols["beyond_length_pass_rate"], cols["base_beyond_length_pass_rate"]) == (1.0, 0.0)
    headers, cells = report.by_type_cells({"round": 1, **cols})
    assert headers == ["type", "eval prompts", "held-out pass (0 → 1)", "transfer pass (0 → 1)",
                       "answer chars (0 → 1)", "transfer chars (0 → 1)"]
    assert cells == [
        ["lowercase", "1/1", "0% → 100%", "0% → 100%", f"{len(BASE)} → {n_short}",
         f"{len(BASE)} → {fog}"],
        ["max_words", "1/1", "0% → 100%", "0% → 0%", f"{len(BASE)} → {n_short}",
         f"{len(BASE)} → {comet}"]]
    # the round table names both pass rates and both lengths
    table_headers, [table_row] = report.table_cells([{"round": 1, "pass_rate": 1.0, **cols}])
    shown = dict(zip(table_headers, table_row))
    assert (shown["held-out pass"], shown["transfer pass"], shown["round 0 transfer"],
            shown["answer chars"], shown["transfer chars"]) == (
        "100.0%", "50.0%", "0.0%", str(n_short), f"{(comet + fog) / 2:.0f}")
    assert "| lowercase | 1/1 | 0% → 100% |" in report.markdown([{"round": 1, **cols}])


def test_the_length_controlled_pass_rate_leaves_length_types_out():
    by_type = {"max_words": {"checks": 7, "pass_rate": 1.0},
               "max_sentences": {"checks": 8, "pass_rate": 1.0},
               "min_words": {"checks": 1, "pass_rate": 0.0},
               "lowercase": {"checks": 4, "pass_rate": 0.25},
               "ends_with": {"checks": 5, "pass_rate": 0.4},
               "json_keys": {"checks": 3, "pass_rate": 0.0}}
    # (1 + 2 + 0) passed of 12 checks of non-length types
    assert report.beyond_length(by_type) == 3 / 12
    assert report.beyond_length({"max_words": {"checks": 2, "pass_rate": 0.5}}) is None
    assert report.beyond_length(None) is None and report.beyond_length({}) is None
    headers, [row] = report.table_cells([{"round": 1, "beyond_length_pass_rate": 0.25,
                                          "base_beyond_length_pass_rate": None}])
    shown = dict(zip(headers, row))
    assert (shown["pass w/o length types"], shown["round 0 w/o length"]) == ("25.0%", "–")


def test_a_round_whose_eval_has_no_splits_shows_dashes():
    cols = report.split_columns(None, None)
    assert cols["transfer_pass_rate"] is None and cols["answer_chars"] is None
    assert report.by_type_cells({"round": 1, **cols}) == ([], [])
    headers, [row] = report.table_cells([{"round": 1, **cols}])
    assert dict(zip(headers, row))["transfer pass"] == "–"


def test_the_per_type_table_counts_the_prompts_that_ended_with_a_pair(tmp_path):
    cat = Catalog(tmp_path / "flywheel.duckdb")
    cat.init()
    by_type = {"(none)": {"prompts": 2, "with_pair": 0, "pairs": 0},
               "lowercase": {"prompts": 3, "with_pair": 1, "pairs": 2},
               "uppercase": {"prompts": 1, "with_pair": 0, "pairs": 0}}
    p1 = cat.commit(kind="pairs", run_id="run-1", round=1, parents=[], fp="fp-pairs-1",
                    params={"by_type": by_type}, tables={}).version_id
    p0 = cat.commit(kind="pairs", run_id="run-1", round=0, parents=[], fp="fp-pairs-0",
                    params={"by_type": {}}, tables={}).version_id
    rows = {"path": "/m", "content_hash": "h", "base_version": None, "method": "dpo",
            "train_pairs": 2, "metrics": "{}"}
    m1 = cat.commit(kind="model", run_id="run-1", round=1, parents=[p0, p1], fp="fp-m1",
                    params={}, tables={"models": pd.DataFrame([rows])}).version_id
    m2 = cat.commit(kind="model", run_id="run-1", round=2, parents=[p1], fp="fp-m2",
                    params={}, tables={"models": pd.DataFrame([rows])}).version_id
    paired = report.pairs_by_type(cat)
    assert paired == {m1: by_type}  # m2 rests on no pairs version of its own round
    assert m2 not in paired
    splits = {"in_distribution": {"by_type": {"lowercase": {"prompts": 2, "pass_rate": 0.5,
                                                            "mean_chars": 10.0}}},
              "transfer": {"by_type": {}}}
    headers, cells = report.by_type_cells({"round": 1, "splits": splits, "base_splits": splits,
                                           "pairs_by_type": paired[m1]})
    assert headers[-1] == "with a pair (round 1)"
    assert [c[0] for c in cells] == ["lowercase", "uppercase"]  # "(none)" is no type
    assert [c[-1] for c in cells] == ["1/3", "0/1"]
    assert cells[0][2] == "50% → 50%" and cells[1][2] == "– → –"
    # without counts (pairs made before they were counted) the column is left out
    headers, _ = report.by_type_cells({"round": 1, "splits": splits, "base_splits": None})
    assert not any(h.startswith("with a pair") for h in headers)
