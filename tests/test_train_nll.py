"""DPO plus NLL on the chosen answer (`train.loss_type: [sigmoid, sft]` with
`train.loss_weights`) and the rejection-sampling SFT step before DPO (`train.sft_epochs`): the
settings reach TRL's DPOConfig / SFTConfig, a real tiny-model training runs the SFT step and
records it, bad settings are config errors naming the key, defaults are unchanged."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from flywheel.config import TrainConfig, load_config, shaping
from flywheel.errors import FlywheelError
from flywheel.stages import train
from flywheel.stages.train import (
    _dpo_kwargs,
    _sft_kwargs,
    train_lora,
    training_placement,
    verified_passes,
)

CPU = training_placement("cpu", "float32")
#: Five prompts: p0 and p2 have a chosen answer that passed every constraint (verifier rule,
#: score 1.0); p1's passed half of them; p3 and p4 were decided by the LLM judge.
PAIRS = pd.DataFrame([
    {"prompt_id": f"p{i}", "chosen_text": f"yes, {i} it is", "rejected_text": "no",
     "rule": "verifier" if i < 3 else "llm", "chosen_score": 0.5 if i == 1 else 1.0}
    for i in range(5)])
TEXT = {f"p{i}": f"is it {i}?" for i in range(5)}
NLL = dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2])
SMALL = dict(batch_size=2, max_length=64, lora_r=4, lora_alpha=8, checkpoint_steps=0)


def test_the_nll_weight_reaches_the_dpo_config(tmp_path):
    from trl import DPOConfig

    args = DPOConfig(**_dpo_kwargs(TrainConfig(**NLL), tmp_path, 10, 3, CPU))
    assert args.loss_type == ["sigmoid", "sft"]
    assert args.loss_weights == [1.0, 0.2]


def test_defaults_are_unchanged(tmp_path):
    """No loss_weights / SFT at defaults: TRL's default weights, and the model's fingerprint
    params are those of before (ADDED settings enter only when set)."""
    from trl import DPOConfig

    kwargs = _dpo_kwargs(TrainConfig(), tmp_path, 10, 3, CPU)
    assert "loss_weights" not in kwargs
    assert DPOConfig(**kwargs).loss_weights is None
    assert TrainConfig().problems() == []
    assert "loss_weights" not in shaping(TrainConfig())
    assert "sft_epochs" not in shaping(TrainConfig())
    changed = shaping(TrainConfig(**NLL, sft_epochs=1.5))
    assert (changed["loss_weights"], changed["sft_epochs"]) == ([1.0, 0.2], 1.5)


def test_the_sft_step_reaches_the_sft_config(tmp_path):
    from trl import SFTConfig

    cfg = TrainConfig(sft_epochs=2.0, batch_size=2, learning_rate=1e-4, max_length=128)
    args = SFTConfig(**_sft_kwargs(cfg, tmp_path, 7, 3, CPU))
    assert args.num_train_epochs == 2.0
    assert (args.per_device_train_batch_size, args.learning_rate, args.max_length) == (
        2, 1e-4, 128)
    assert args.output_dir == str(tmp_path / "sft")
    assert args.save_strategy == "no" and args.seed == 3 and args.use_cpu


def test_verified_passes_are_the_fully_passing_verifier_chosen_answers():
    twice = pd.concat([PAIRS, PAIRS.iloc[[2]].assign(rejected_text="nope")])  # p2's again
    got = verified_passes(twice)
    assert got.to_dict("records") == [{"prompt_id": "p0", "text": "yes, 0 it is"},
                                      {"prompt_id": "p2", "text": "yes, 2 it is"}]
    spin = PAIRS.assign(rule="spin", chosen_score=None)
    assert verified_passes(spin).empty


@pytest.mark.parametrize(("settings", "message"), [
    ({"loss_weights": [1.0]}, "train.loss_weights: has 1 weight for 2 loss types (train."
                              "loss_type: [sigmoid, sft]): give one weight per loss type"),
    ({"loss_weights": [1.0, -0.2]}, "train.loss_weights: must all be >= 0, got -0.2"),
    ({"loss_weights": [0.0, 0.0]}, "train.loss_weights: are all 0: nothing would be trained"),
    ({"sft_epochs": -1.0}, "train.sft_epochs: must be >= 0, got -1.0"),
    ({"sft_epochs": 1.0, "num_processes": 2, "distributed": "fsdp"},
     "train.sft_epochs: needs train.distributed: ddp (or train.num_processes: 1) for now"),
])
def test_bad_settings_are_errors_naming_the_key(tmp_path, settings, message):
    cfg = TrainConfig(loss_type=["sigmoid", "sft"], **settings)
    assert [f"{k}: {m}" for k, m in cfg.problems()][0].startswith(message)
    with pytest.raises(FlywheelError) as err:  # before any model is loaded
        train_lora("no-such-model", PAIRS, TEXT, cfg, tmp_path / "out", seed=0)
    assert "invalid training settings" in str(err.value)
    assert any(d.startswith(message) for d in err.value.details), err.value.details


def test_sft_with_several_ddp_processes_is_allowed():
    assert TrainConfig(sft_epochs=1.0, num_processes=2).problems() == []


def test_loss_weights_load_from_yaml_and_bad_ones_are_config_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  loss_type: [sigmoid, sft]\n  loss_weights: [1, 0.2]\n"
                    "  sft_epochs: 1\n")
    cfg = load_config(path)
    assert cfg.train.loss_weights == [1.0, 0.2] and cfg.train.sft_epochs == 1.0
    with pytest.raises(FlywheelError) as err:
        load_config(path, ["train.loss_weights=[1.0, -1]"])
    assert "train.loss_weights: must all be >= 0, got -1.0" in "\n".join(err.value.details)
    with pytest.raises(FlywheelError) as err:
        load_config(path, ["train.loss_weights=[1.0, high]"])
    assert "train.loss_weights: expected list[float], but item 1 is str 'high'" in "\n".join(
        err.value.details)


def watch(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Record each trainer's args when it begins (the SFT step's, then DPO's) and its logs."""
    from transformers import TrainerCallback

    seen: list[dict] = []

    class Watch(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            seen.append({"args": args, "logs": [], "adapters": sorted(model.peft_config)})

        def on_log(self, args, state, control, logs=None, **kw):
            seen[-1]["logs"].append(dict(logs or {}))

    monkeypatch.setattr(train, "_progress_callback", lambda enabled: Watch())
    return seen


def test_sft_then_dpo_with_nll_on_a_tiny_model(tiny_model, tmp_path, monkeypatch):
    """The SFT step trains on the 2 verified passes, then DPO (with the NLL term) continues the
    same adapter against the model after SFT: DPO's first step has zero rewards (policy ==
    reference). The metrics record the SFT step; the saved adapter is the one adapter."""
    seen = watch(monkeypatch)
    cfg = TrainConfig(**SMALL, **NLL, sft_epochs=2.0, learning_rate=1e-2)  # SFT moves the model
    metrics = train_lora(str(tiny_model), PAIRS, TEXT, cfg, tmp_path / "out", seed=1,
                         progress=False)

    sft, dpo = seen
    assert type(sft["args"]).__name__ == "SFTConfig" and sft["args"].num_train_epochs == 2.0
    assert type(dpo["args"]).__name__ == "DPOConfig"
    assert dpo["args"].loss_type == ["sigmoid", "sft"] and dpo["args"].loss_weights == [1.0, 0.2]
    assert dpo["adapters"] == ["default", "ref"]  # TRL's frozen copy of the SFT'd adapter
    assert (metrics["sft_examples"], metrics["sft_steps"]) == (2, 2)  # 1 batch x 2 epochs
    sft_losses = [log["loss"] for log in sft["logs"] if "loss" in log]
    assert len(sft_losses) == 2 and metrics["sft_loss"] == pytest.approx(sum(sft_losses) / 2)
    assert metrics["sft_loss"] > 1.0  # a random model's NLL on the answers
    assert metrics["sft_last_loss"] < metrics["sft_first_loss"] - 0.1
    assert metrics["steps"] == 3 and len(metrics["losses"]) == 3  # 5 pairs, batch 2
    first = next(log for log in dpo["logs"] if "loss" in log)
    assert abs(first["rewards/chosen"]) < 1e-4 and abs(first["rewards/rejected"]) < 1e-4
    adapter = tmp_path / "out" / "adapter"
    assert not (adapter / "ref").exists()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert not (tmp_path / "out.work").exists()

    # train.reference: base (here the start model itself): no frozen copy; the SFT step has
    # already moved the policy away from that reference when DPO begins
    seen.clear()
    train_lora(str(tiny_model), PAIRS, TEXT, cfg, tmp_path / "out2", seed=1, progress=False,
               ref_path=str(tiny_model))
    assert seen[1]["adapters"] == ["default"]
    first = next(log for log in seen[1]["logs"] if "loss" in log)
    assert first["rewards/chosen"] > 0.01


def test_no_verified_pass_means_no_sft_step(tiny_model, tmp_path, monkeypatch):
    seen = watch(monkeypatch)
    logged: list[str] = []
    cfg = TrainConfig(**SMALL, sft_epochs=1.0)
    metrics = train_lora(str(tiny_model), PAIRS.assign(rule="llm"), TEXT, cfg,
                         tmp_path / "out", seed=1, progress=False, log=logged.append)
    assert [type(s["args"]).__name__ for s in seen] == ["DPOConfig"]
    assert (metrics["sft_examples"], metrics["sft_steps"], metrics["sft_loss"]) == (0, 0, None)
    assert any("no SFT step this round" in line for line in logged)
    assert metrics["steps"] == 3


def test_a_resumed_training_redoes_the_sft_step(tiny_model, tmp_path, monkeypatch):
    """Killed after DPO's first checkpoint, the same training resumes from it: the SFT step is
    redone (it keeps no checkpoint), and the model equals an uninterrupted training's."""
    from transformers import TrainerCallback

    cfg = TrainConfig(**{**SMALL, "checkpoint_steps": 1}, **NLL, sft_epochs=1.0)
    whole = train_lora(str(tiny_model), PAIRS, TEXT, cfg, tmp_path / "a", seed=1,
                       progress=False)

    class Killed(RuntimeError):
        pass

    class Kill(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            raise Killed("killed after the first checkpoint")

    monkeypatch.setattr(train, "_fault_callback", lambda: Kill())
    with pytest.raises(Killed):
        train_lora(str(tiny_model), PAIRS, TEXT, cfg, tmp_path / "b", seed=1, progress=False)
    assert (tmp_path / "b.work" / "checkpoint-1").is_dir()
    monkeypatch.undo()
    seen = watch(monkeypatch)
    logged: list[str] = []
    resumed = train_lora(str(tiny_model), PAIRS, TEXT, cfg, tmp_path / "b", seed=1,
                         progress=False, log=logged.append)

    assert any("resuming training from" in line for line in logged)
    assert [type(s["args"]).__name__ for s in seen] == ["SFTConfig", "DPOConfig"]
    assert (resumed["sft_examples"], resumed["sft_steps"]) == (2, 1)
    assert resumed["sft_loss"] == pytest.approx(whole["sft_loss"])
    assert resumed["losses"] == pytest.approx(whole["losses"], abs=1e-5)
    a, b = (load_file(tmp_path / x / "model.safetensors") for x in ("a", "b"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.slow
def test_sft_then_dpo_in_two_processes(tiny_model, tmp_path):
    """Under `accelerate launch` (DDP, CPU over gloo) every process runs the SFT step on its
    share of the verified passes, then DPO; the main process's metrics record both."""
    lines: list[str] = []
    cfg = TrainConfig(**{**SMALL, "batch_size": 1}, **NLL, sft_epochs=2.0, num_processes=2)
    metrics = train_lora(str(tiny_model), PAIRS.iloc[:4], TEXT, cfg, tmp_path / "two", seed=1,
                         progress=False, log=lines.append)
    assert "trained with world size 2" in lines
    assert metrics["num_processes"] == 2
    # 2 verified passes, 1 a step in each of 2 processes: 1 step an epoch, 2 epochs
    assert (metrics["sft_examples"], metrics["sft_steps"]) == (2, 2)
    assert metrics["sft_loss"] > 1.0
    assert metrics["steps"] == 2  # 4 pairs, 2 a step
    assert sorted(p.name for p in (tmp_path / "two" / "adapter").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "lineage.json"]
