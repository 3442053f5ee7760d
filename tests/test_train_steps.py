"""Per-step training metrics: every logged step of a training (the SFT step's and DPO's) is a
row of train_steps, committed with the model version (flywheel.stages.train.step_rows,
pipeline.train, queries.train_curves)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from flywheel import pipeline
from flywheel.catalog import Catalog, queries
from flywheel.config import load_config
from flywheel.stages.train import STEP_COLUMNS, step_rows

#: a DPO log history as TRL writes it (restored from a checkpoint at step 2, then continued:
#: step 2 logged twice) and its closing summary
DPO_HISTORY = [
    {"loss": 0.69, "grad_norm": 1.0, "learning_rate": 5e-4, "rewards/accuracies": 0.0,
     "rewards/margins": 0.0, "epoch": 0.5, "step": 1},
    {"loss": 0.60, "learning_rate": 5e-4, "rewards/accuracies": 0.5, "rewards/margins": 0.1,
     "epoch": 1.0, "step": 2},
    {"loss": 0.61, "learning_rate": 5e-4, "rewards/accuracies": 1.0, "rewards/margins": 0.2,
     "epoch": 1.0, "step": 2},
    {"loss": 0.50, "learning_rate": 4e-4, "rewards/accuracies": 1.0, "rewards/margins": 0.4,
     "epoch": 1.5, "step": 3},
    {"train_runtime": 3.2, "train_loss": 0.6, "epoch": 1.5, "step": 3},
]


def test_step_rows_one_per_step_the_last_log_kept():
    rows = step_rows(DPO_HISTORY, "dpo")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1] == {"phase": "dpo", "step": 2, "epoch": 1.0, "loss": 0.61,
                       "reward_accuracy": 1.0, "reward_margin": 0.2, "learning_rate": 5e-4}
    assert list(rows[0]) == STEP_COLUMNS
    sft = step_rows([{"loss": 2.5, "learning_rate": 1e-4, "epoch": 1.0, "step": 1,
                      "mean_token_accuracy": 0.3}, {"train_loss": 2.5, "step": 1}], "sft")
    assert sft == [{"phase": "sft", "step": 1, "epoch": 1.0, "loss": 2.5,
                    "reward_accuracy": None, "reward_margin": None, "learning_rate": 1e-4}]
    assert step_rows([], "dpo") == []


PAIRS = [{"prompt_id": f"p{i}", "chosen_text": f"yes, {i} it is", "rejected_text": "no",
          "rule": "verifier", "chosen_score": 1.0} for i in range(4)]


def test_a_training_stores_every_step_with_its_model_version(tiny_model, tmp_path):
    """A real (tiny) training through the pipeline's train stage, with the SFT step: one row
    per step of each phase, under the model version's id, in the same commit; the model's
    metrics JSON stays as it was (no step rows in it)."""
    cfg = load_config(None, [f"workspace={tmp_path / 'ws'}", "progress=false",
                             "train.batch_size=2", "train.max_length=64", "train.lora_r=4",
                             "train.lora_alpha=8", "train.checkpoint_steps=0",
                             "train.epochs=1", "train.sft_epochs=1", "train.min_pairs=1"])
    cat = Catalog(cfg.catalog_path())
    cat.init()
    ctx = pipeline.Context(cfg=cfg, run_id="run-1", catalog=cat, log=lambda m: None)
    prompts = cat.commit(kind="prompts", run_id="run-1", round=0, parents=[], params={},
                         fp="fp-prompts", tables={"prompts": pd.DataFrame([{
                             "prompt_id": f"p{i}", "text": f"is it {i}?", "gold": None,
                             "constraints": "[]", "category": None, "source": "seed",
                             "source_ref": None, "examples": [], "raw": None}
                             for i in range(4)])}).version_id
    policy = cat.commit(kind="model", run_id="run-1", round=0, parents=[], params={},
                        fp="fp-base", tables={"models": pd.DataFrame([{
                            "path": str(tiny_model), "content_hash": "h0",
                            "base_version": None, "method": "base", "train_pairs": 0,
                            "metrics": "{}"}])}).version_id
    pair_rows = pd.DataFrame([{**p, "pair_id": f"pr{i}", "chosen_id": f"c{i}",
                               "rejected_id": f"r{i}", "rejected_score": 0.0, "margin": 1.0,
                               "min_margin": None, "judgment_ids": []}
                              for i, p in enumerate(PAIRS)])
    pairs = cat.commit(kind="pairs", run_id="run-1", round=1, parents=[prompts], params={},
                       fp="fp-pairs", tables={"pairs": pair_rows}).version_id

    model = pipeline.train(ctx, 1, pairs, [prompts], policy)

    steps = cat.df("SELECT * FROM train_steps ORDER BY phase DESC, step")
    assert set(steps.version_id) == {model}
    assert list(steps.phase) == ["sft", "sft", "dpo", "dpo"]  # 4 examples, 2 a step
    assert list(steps.step) == [1, 2, 1, 2]
    sft, dpo = steps[steps.phase == "sft"], steps[steps.phase == "dpo"]
    assert sft.reward_accuracy.isna().all() and sft.reward_margin.isna().all()
    assert dpo.reward_accuracy.notna().all() and dpo.reward_margin.notna().all()
    assert all(math.isfinite(x) for x in steps.loss)
    assert list(dpo.epoch) == [0.5, 1.0] and (steps.learning_rate > 0).all()
    metrics = json.loads(cat.rows("model", model).metrics.item())
    assert "train_steps" not in metrics
    assert metrics["losses"] == pytest.approx(list(dpo.loss))
    assert metrics["sft_steps"] == 2
    assert cat.get(model).row_count == 1  # the model version counts its models row

    curves = queries.train_curves(cat)
    assert list(curves.columns) == queries.TRAIN_CURVE_COLUMNS
    assert list(zip(curves.phase, curves.step)) == [("sft", 1), ("sft", 2), ("dpo", 1),
                                                   ("dpo", 2)]
    assert set(curves["round"]) == {1} and set(curves.version_id) == {model}
    # reused on a second run: nothing trained, no rows added
    assert pipeline.train(ctx, 1, pairs, [prompts], policy) == model
    assert len(cat.df("SELECT * FROM train_steps")) == 4


def test_a_resumed_training_gives_one_row_per_step(tiny_model, tmp_path, monkeypatch):
    """Stopped after step 2 with a checkpoint every step, then run again: it resumes from
    checkpoint-1 (its log history restored) and the steps are 1..4, each once."""
    import signal

    from flywheel import interrupt
    from flywheel.config import TrainConfig
    from flywheel.errors import Interrupted
    from flywheel.stages import train

    pairs = pd.DataFrame([{"prompt_id": f"p{i}", "chosen_text": "yes", "rejected_text": "no"}
                          for i in range(4)])
    text = {f"p{i}": f"question {i}" for i in range(4)}
    cfg = TrainConfig(batch_size=1, max_length=64, lora_r=2, lora_alpha=4, checkpoint_steps=1)
    real_stop = train._stop_callback

    def stop_at_two():
        cb = real_stop()
        on_step_end = cb.on_step_end

        def step_end(args, state, control, **kw):
            if state.global_step == 2:
                interrupt.request(signal.SIGTERM)
            return on_step_end(args, state, control, **kw)

        cb.on_step_end = step_end
        return cb

    out = tmp_path / "model"
    with monkeypatch.context() as m:
        m.setattr(train, "_stop_callback", stop_at_two)
        with pytest.raises(Interrupted):
            train.train_lora(str(tiny_model), pairs, text, cfg, out, seed=0, progress=False)
    interrupt.reset()
    assert train.last_checkpoint(out.with_name("model.work")).name == "checkpoint-1"
    logs = []
    metrics = train.train_lora(str(tiny_model), pairs, text, cfg, out, seed=0,
                               progress=False, log=logs.append)
    assert any("resuming training from" in line for line in logs)
    steps = metrics["train_steps"]
    assert [(r["phase"], r["step"]) for r in steps] == [("dpo", s) for s in (1, 2, 3, 4)]
    assert [r["loss"] for r in steps] == pytest.approx(metrics["losses"])


@pytest.mark.slow
def test_a_training_in_two_processes_returns_every_step(tiny_model, tmp_path):
    """`train.num_processes: 2` (CPU processes over gloo): the main process's metrics, read
    back by the launching side, carry one row per step."""
    from flywheel.config import TrainConfig
    from flywheel.stages.train import train_lora

    pairs = pd.DataFrame([{"prompt_id": f"p{i}", "chosen_text": "yes", "rejected_text": "no"}
                          for i in range(4)])
    text = {f"p{i}": f"question {i}" for i in range(4)}
    cfg = TrainConfig(batch_size=1, max_length=64, lora_r=4, lora_alpha=8, checkpoint_steps=0,
                      num_processes=2)
    metrics = train_lora(str(tiny_model), pairs, text, cfg, tmp_path / "m", seed=0,
                         progress=False)
    assert metrics["num_processes"] == 2
    steps = metrics["train_steps"]
    assert [(r["phase"], r["step"]) for r in steps] == [("dpo", 1), ("dpo", 2)]  # 4 pairs, 2 a step
    assert [r["loss"] for r in steps] == pytest.approx(metrics["losses"])
    assert all(r["reward_accuracy"] is not None for r in steps)
