"""The round, declared once: the stage list both executors run, pure stages, fingerprints
from the config fields' declarations, and the eval's fingerprint naming its judge."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

from flywheel import config as config_mod
from flywheel import pipeline
from flywheel.config import (
    ADDED,
    SHAPES,
    Config,
    config_from_dict,
    fingerprint_problems,
    load_config,
    shaping,
)

ROOT = Path(__file__).resolve().parent.parent
STAGE_MODULES = sorted(p.stem for p in (ROOT / "flywheel" / "stages").glob("*.py")
                       if p.stem != "__init__")
STAGE_FUNCTIONS = ("generate_prompts", "sample", "judge", "canary", "build_pairs", "train",
                   "evaluate", "gate")


# -- one declaration of the round ---------------------------------------------------------------
def test_the_round_is_one_list_of_stages():
    assert [s.name for s in pipeline.ROUND] == ["prompts", "samples", "judgments", "canary",
                                                "pairs", "train", "eval", "gate"]
    assert [s.kind for s in pipeline.ROUND] == ["prompts", "samples", "judgments", "canary",
                                                "pairs", "model", "eval", "gate"]
    fields = {f.name for f in dataclasses.fields(pipeline.RoundState)} | {"prompt_versions"}
    made: set[str] = {"pool", "policy", "policy_eval", "base", "previous_pairs",
                      "previous_gate"}
    for stage in pipeline.ROUND:  # each reads only what the loop or an earlier stage gave
        assert set(stage.inputs) <= fields, stage.name
        assert set(stage.inputs) - {"prompt_versions"} <= made, stage.name
        made.add(stage.output)
        if "prompts" in made:
            made.add("prompt_versions")
    sections = {f.name for f in dataclasses.fields(Config)}
    for stage in pipeline.ROUND:  # the sections named exist (a dotted name: the setting)
        for name in stage.sections:
            section, _, key = name.partition(".")
            assert section in sections, (stage.name, name)
            assert not key or key in {f.name for f in
                                      dataclasses.fields(getattr(Config(), section))}


def _called_names(source: str) -> set[str]:
    tree = ast.parse(source)
    return {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
            for n in ast.walk(tree) if isinstance(n, ast.Call)}


def test_the_stage_order_appears_once_flows_have_none_of_their_own():
    """flows/ calls no stage function: it runs pipeline.ROUND; run_round does the same."""
    flows = "".join(p.read_text() for p in (ROOT / "flows").glob("*.py"))
    assert not set(STAGE_FUNCTIONS) & _called_names(flows)
    assert "pipeline.ROUND" in flows
    run_round = inspect.getsource(pipeline.run_round)
    assert not set(STAGE_FUNCTIONS) & _called_names(run_round)
    assert "ROUND" in run_round
    # the lambdas of ROUND are the only place the stage functions are called in order
    src = (ROOT / "flywheel" / "pipeline.py").read_text()
    assert src.count("generate_prompts(ctx, s.round") == 1


def test_the_flow_makes_one_task_per_stage_named_after_it(monkeypatch):
    from flows import iterate as flows

    cfg = load_config(None, [])
    names = [flows.stage_task(st, cfg).name for st in pipeline.ROUND]
    assert names == [st.name for st in pipeline.ROUND]
    assert {flows.stage_task(st, cfg).retries for st in pipeline.ROUND} == {0}  # local model
    monkeypatch.setattr(flows, "is_remote", lambda name: True)
    retried = [st.name for st in pipeline.ROUND if flows.stage_task(st, cfg).retries]
    assert retried == ["prompts", "samples", "judgments", "canary", "eval"]  # they call a model


# -- pure stages ----------------------------------------------------------------------------------
@pytest.mark.parametrize("module", STAGE_MODULES)
def test_a_stage_imports_neither_duckdb_nor_prefect(module):
    code = (f"import sys; import flywheel.stages.{module}; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'duckdb', 'prefect', 'torch', 'transformers', 'trl'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout.strip()
    assert out == "[]", f"flywheel.stages.{module} pulls in {out}"


@pytest.mark.parametrize("module", STAGE_MODULES)
def test_a_stage_imports_no_catalog_cli_pipeline_or_flow(module):
    tree = ast.parse((ROOT / "flywheel" / "stages" / f"{module}.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
            imported |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
    banned = [m for m in imported
              if m.split(".")[0] in ("duckdb", "prefect", "flows")
              or m.startswith(("flywheel.catalog", "flywheel.cli", "flywheel.pipeline",
                               "flywheel.runlock", "flywheel.report"))]
    assert banned == [], f"flywheel/stages/{module}.py imports {banned}"


#: A stage's code version moves only when it makes different rows from the same inputs: the
#: three that generate with sampling draw by InverseCdfSampler since +2.
BUMPED = {"prompts": "0.1.0+2", "sampling": "0.1.0+2", "judging": "0.1.0+2"}


def test_every_stage_carries_its_own_code_version():
    import importlib

    from flywheel.stages.prompts import SEED_CODE_VERSION

    for module in STAGE_MODULES:
        mod = importlib.import_module(f"flywheel.stages.{module}")
        assert mod.CODE_VERSION == BUMPED.get(module, "0.1.0+1"), module
    assert SEED_CODE_VERSION == "0.1.0+1"  # the seed pool's version keeps its id


# -- fingerprints from field declarations --------------------------------------------------------
def test_every_setting_declares_its_fingerprint_role():
    assert fingerprint_problems() == []


def test_a_setting_without_a_declaration_is_reported():
    @dataclasses.dataclass
    class Section:
        old: int = dataclasses.field(default=1, metadata={"help": "x", "fingerprint": SHAPES})
        new: int = dataclasses.field(default=2, metadata={"help": "y"})

    problems = fingerprint_problems(Section)
    assert problems == ["new: declares no fingerprint role (metadata fp=...; one of shapes, "
                        "added, by-content, derived, operational), got None"]


def test_a_new_setting_at_its_default_leaves_the_fingerprint_alone():
    """An ADDED setting is in the params only when changed; the same section without it gives
    the same params."""
    @dataclasses.dataclass
    class Before:
        a: int = dataclasses.field(default=1, metadata=config_mod._meta("a", fp=SHAPES))

    @dataclasses.dataclass
    class After:
        a: int = dataclasses.field(default=1, metadata=config_mod._meta("a", fp=SHAPES))
        b: int = dataclasses.field(default=5, metadata=config_mod._meta("b", fp=ADDED))

    assert shaping(After()) == shaping(Before()) == {"a": 1}
    assert shaping(After(b=6)) == {"a": 1, "b": 6}


#: What each stage's fingerprint reads of its section, by name: a setting added to a section
#: with fp=SHAPES would change every stored fingerprint of that stage and fail here (declare
#: it ADDED, or OPERATIONAL if it does not change the output).
FINGERPRINTED = {
    "models": ["backend", "dtype", "batch_size"],
    "prompts": ["seed_file", "num_new", "max_attempts", "few_shot", "temperature", "top_p",
                "max_new_tokens", "min_chars", "max_chars", "dedupe_threshold",
                "constraint_prob", "max_constraints", "constraint_types", "template"],
    "sampling": ["n", "temperature", "top_p", "max_new_tokens", "prompts_per_round"],
    "judge": ["mode", "verdict", "samples", "temperature", "max_new_tokens", "verifiers",
              "llm_on", "pointwise_template", "pairwise_template"],
    "pairs": ["min_margin", "min_verifier_margin", "require_agreement", "max_length_ratio"],
    "train": ["method", "loss_type", "beta", "learning_rate", "epochs", "batch_size",
              "grad_accum", "max_length", "warmup_ratio", "lora_r", "lora_alpha",
              "lora_dropout", "lora_targets", "min_pairs"],
    "eval": ["prompts_file", "max_prompts", "max_new_tokens", "judge"],
}


@pytest.mark.parametrize("section", sorted(FINGERPRINTED))
def test_the_default_params_of_each_stage_are_pinned(section):
    assert list(shaping(getattr(Config(), section))) == FINGERPRINTED[section]


def test_the_gate_reads_its_settings_from_eval():
    assert shaping(Config().eval, "gate") == {"min_win_rate": 0.0, "statistic": "point"}


def test_operational_settings_change_no_fingerprint():
    base = Config()
    moved = config_from_dict({"workspace": "elsewhere", "progress": False,
                              "models": {"device": "cuda:1", "policy": "/other"},
                              "train": {"checkpoint_steps": 7}})
    for section in FINGERPRINTED:
        assert shaping(getattr(moved, section)) == shaping(getattr(base, section)), section


# -- the eval's fingerprint names its judge; training's dtype ------------------------------------
DEMO_JUDGE = {"verdict": "logprobs", "samples": 1, "max_new_tokens": 16,
              "pairwise_template": "pairwise_brief.j2"}
# a config whose eval compares with the LLM judge (the demo's until it let verifiers decide)
JUDGED = {"judge": {"mode": "hybrid", "llm_on": "ties", "pointwise_template": "pointwise_brief.j2",
                    **DEMO_JUDGE}}


def test_the_eval_names_the_judge_settings_its_comparison_uses():
    judged = config_from_dict(JUDGED)
    assert pipeline.eval_judge_params(judged, None) == {}  # round 0 compares nothing
    assert pipeline.eval_judge_params(judged, "model-r0-x") == {"judge_settings": DEMO_JUDGE}
    # the demo's eval: verifiers decide, the LLM judge is not asked (eval.judge: false)
    demo = load_config(ROOT / "configs" / "demo.yaml")
    assert pipeline.eval_judge_params(demo, "model-r0-x") == {}
    assert pipeline.eval_judge_params(Config(), "model-r0-x") == {}  # defaults: as before
    off = config_from_dict({"eval": {"judge": False}, "judge": {"verdict": "logprobs"}})
    assert pipeline.eval_judge_params(off, "model-r0-x") == {}
    # the mode does not shape the eval: its judge always compares pairwise, in both orders
    mode = config_from_dict({"judge": {"mode": "pointwise"}})
    assert pipeline.eval_judge_params(mode, "model-r0-x") == {}


def test_the_migration_freezes_what_the_pipeline_puts_in_the_eval():
    from flywheel.catalog import refingerprint

    judge = Config().judge
    assert list(refingerprint.JUDGE_DEFAULTS) == list(pipeline.EVAL_JUDGE_SETTINGS)
    assert refingerprint.JUDGE_DEFAULTS == {k: getattr(judge, k)
                                            for k in pipeline.EVAL_JUDGE_SETTINGS}
    run_config = json.loads(json.dumps(config_from_dict(JUDGED).to_dict()))
    assert refingerprint._judge_settings("eval", ["m", "b", "e"], run_config) == DEMO_JUDGE
    assert refingerprint._judge_settings("eval", ["m"], run_config) == {}


def test_training_runs_in_train_dtype_or_models_dtype():
    assert pipeline.training_dtype(Config()) == "float32"
    bf16 = config_from_dict({"models": {"dtype": "bfloat16"}})
    assert pipeline.training_dtype(bf16) == "bfloat16"
    pinned = config_from_dict({"models": {"dtype": "bfloat16"}, "train": {"dtype": "float32"}})
    assert pipeline.training_dtype(pinned) == "float32"
    demo = load_config(ROOT / "configs" / "demo.yaml")
    assert pipeline.training_dtype(demo) == "bfloat16"  # bf16 mixed precision on the CPU


@pytest.mark.badinput
def test_a_dtype_the_machine_cannot_train_in_or_a_missing_template_stops_before_writing(
        tmp_path):
    from tests.conftest import run_cli

    ws = tmp_path / "ws"
    proc = run_cli("iterate", "--rounds", "1", "--no-prefect", "--set", "models.dtype=float16",
                   "--set", "judge.pairwise_template=nope.j2", "--set", f"workspace={ws}")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == "error: cannot start: nothing was written"
    assert any(line.startswith("  - models.dtype float16 cannot train on the CPU")
               for line in lines)
    assert any(line.startswith("  - judge.pairwise_template: unknown template 'nope.j2'")
               and "available templates: pairwise.j2" in line for line in lines)
    assert not ws.exists()
    proc = run_cli("iterate", "--rounds", "1", "--no-prefect", "--set", "train.dtype=float16",
                   "--set", f"workspace={ws}")
    assert "  - train.dtype float16 cannot train on the CPU" in proc.stderr
    assert not ws.exists()
