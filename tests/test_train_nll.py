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
    sampled_passes,
    sft_copies,
    sft_dataset,
    sft_examples,
    sft_rephrasings,
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


# -- train.sft_rephrase: each SFT epoch in another phrasing -----------------------------------
REPHRASE_PROMPTS = pd.DataFrame([
    {"prompt_id": "p0", "text": "Name a fruit. Answer in at most 5 words.",
     "constraints": json.dumps([{"type": "max_words", "n": 5}])},
    {"prompt_id": "p1", "text": "Name a fruit.", "constraints": "[]"},
    {"prompt_id": "p2", "text": "Name a fruit, in at most 5 words.",  # not a library sentence
     "constraints": json.dumps([{"type": "max_words", "n": 5}])},
    {"prompt_id": "p9", "text": "Unused. Answer in at most 5 words.",
     "constraints": json.dumps([{"type": "max_words", "n": 5}])},
])


def test_sft_rephrasings_are_the_other_training_phrasings_of_used_prompts():
    assert sft_copies(TrainConfig(sft_epochs=2.0, sft_rephrase=True)) == 2
    assert sft_copies(TrainConfig(sft_epochs=1.5, sft_rephrase=True)) == 2
    assert sft_copies(TrainConfig(sft_epochs=2.0)) == 1
    got = sft_rephrasings(REPHRASE_PROMPTS, {"p0", "p1", "p2"}, 3)
    assert got == {"p0#1": "Name a fruit. Use no more than 5 words in your answer.",
                   "p0#2": "Name a fruit. Keep your answer to 5 words or fewer."}
    assert "rephrase" not in json.dumps(shaping(TrainConfig()))
    assert shaping(TrainConfig(sft_rephrase=True))["sft_rephrase"] is True


def test_sft_rephrase_keeps_the_steps_and_varies_the_prompts(tmp_path):
    from trl import SFTConfig

    cfg = TrainConfig(sft_epochs=2.0, sft_rephrase=True, batch_size=2, max_length=128)
    examples = pd.DataFrame({"prompt_id": ["p0", "p1", "p2"], "text": ["Apple.", "Pear.", "Fig."]})
    text = dict(zip(REPHRASE_PROMPTS.prompt_id, REPHRASE_PROMPTS.text))
    text |= sft_rephrasings(REPHRASE_PROMPTS, set(examples.prompt_id), sft_copies(cfg))
    rows = list(sft_dataset(examples, text, sft_copies(cfg)))
    prompts = [(r["prompt"][0]["content"], r["completion"][0]["content"]) for r in rows]
    assert prompts == [
        ("Name a fruit. Answer in at most 5 words.", "Apple."),
        ("Name a fruit.", "Pear."),
        ("Name a fruit, in at most 5 words.", "Fig."),
        ("Name a fruit. Use no more than 5 words in your answer.", "Apple."),
        ("Name a fruit.", "Pear."),  # no rephrasing: the prompt itself again
        ("Name a fruit, in at most 5 words.", "Fig."),
    ]
    # one pass over the two copies: as many steps as two epochs over the examples
    rephrased = SFTConfig(**_sft_kwargs(cfg, tmp_path, len(examples), 3, CPU))
    plain = SFTConfig(**_sft_kwargs(TrainConfig(sft_epochs=2.0, batch_size=2, max_length=128),
                                    tmp_path, len(examples), 3, CPU))
    assert (rephrased.num_train_epochs, plain.num_train_epochs) == (1.0, 2.0)


def test_sft_rephrase_on_a_tiny_model(tiny_model, tmp_path, monkeypatch):
    """The SFT step runs one epoch over both phrasings: the same 2 steps as two epochs."""
    seen = watch(monkeypatch)
    used: list[list[str]] = []
    real = train.sft_dataset

    def recording(examples, prompt_text, copies=1):
        ds = real(examples, prompt_text, copies)
        used.append([r["prompt"][0]["content"] for r in ds])
        return ds

    monkeypatch.setattr(train, "sft_dataset", recording)
    cfg = TrainConfig(**SMALL, sft_epochs=2.0, sft_rephrase=True, learning_rate=1e-2)
    text = {**TEXT, "p0#1": "is it 0, in other words?"}
    metrics = train_lora(str(tiny_model), PAIRS, text, cfg, tmp_path / "out", seed=1,
                         progress=False)
    assert seen[0]["args"].num_train_epochs == 1.0
    assert (metrics["sft_examples"], metrics["sft_steps"]) == (2, 2)
    assert used == [["is it 0?", "is it 2?", "is it 0, in other words?", "is it 2?"]]


def test_the_training_spec_carries_the_rephrasings(tmp_path):
    from flywheel.stages.train_worker import write_spec

    cfg = TrainConfig(sft_epochs=2.0, sft_rephrase=True)
    text = {**TEXT, "p0#1": "is it 0, in other words?", "p9": "extra", "p9#1": "extra, again",
            "p8": "unused"}
    extra = pd.DataFrame({"prompt_id": ["p9"], "text": ["a pass"]})
    spec = write_spec(tmp_path, "base", PAIRS, text, cfg, tmp_path / "out", resume=None,
                      seed=1, device="cpu", dtype="float32", ref_path=None, sft_extra=extra)
    prompts = json.loads((spec.parent / "prompts.json").read_text())
    assert prompts == {**TEXT, "p0#1": "is it 0, in other words?", "p9": "extra",
                       "p9#1": "extra, again"}
    assert pd.read_parquet(spec.parent / "sft_extra.parquet").equals(extra)


# -- train.sft_per_prompt: the round's other verified passes ---------------------------------
def _round(spec: dict[str, list[tuple[str, float | None, float, str]]]):
    """prompts, samples, judgments from {prompt_id: [(text, verifier, llm, finish), ...]}
    (verifier None: a prompt without constraints)."""
    prompts, samples, judgments = [], [], []
    for pid, cands in spec.items():
        constrained = any(v is not None for _, v, _, _ in cands)
        prompts.append({"prompt_id": pid, "text": f"task {pid}",
                        "constraints": json.dumps([{"type": "lowercase"}] if constrained else [])})
        for k, (text, verifier, llm, finish) in enumerate(cands):
            sid = f"s_{pid}_{k}"
            samples.append({"sample_id": sid, "prompt_id": pid, "text": text, "greedy": False,
                            "finish_reason": finish})
            if verifier is not None:
                judgments.append({"judgment_id": f"j_v_{sid}", "sample_id": sid,
                                  "type": "verifier", "score": verifier, "parsed": True})
            judgments.append({"judgment_id": f"j_p_{sid}", "sample_id": sid, "type": "pointwise",
                              "score": llm, "parsed": True})
    return pd.DataFrame(prompts), pd.DataFrame(samples), pd.DataFrame(judgments)


def test_sampled_passes_take_the_best_finished_distinct_passes_per_prompt():
    prompts, samples, judgments = _round({
        "a": [("a1", 1.0, 2.0, "stop"), ("a2", 1.0, 4.0, "stop"), ("a3", 1.0, 3.0, "stop"),
              ("a4", 0.0, 5.0, "stop")],
        "b": [("b1", 1.0, 1.0, "length"), ("b2", 1.0, 1.0, "stop"), ("b2", 1.0, 2.0, "stop")],
        "c": [("c1", 0.0, 1.0, "stop"), ("c2", 0.5, 1.0, "stop")],  # no pass
        "d": [("d1", None, 5.0, "stop")],  # no constraints: nothing verified
    })
    got = sampled_passes(prompts, samples, judgments, per_prompt=2)
    # a: the two best judged passes (a4 fails); b: the truncated b1 is left out, b2 once
    assert list(zip(got.prompt_id, got.text)) == [("a", "a2"), ("a", "a3"), ("b", "b2")]
    assert list(sampled_passes(prompts, samples, judgments, per_prompt=1).text) == ["a2", "b2"]
    assert sampled_passes(prompts, samples, judgments, per_prompt=0).empty


def test_sft_repair_tops_up_prompts_with_few_passes_from_repaired_candidates():
    from flywheel.config import PairsConfig

    prompts, samples, judgments = _round({
        "a": [("A1", 1.0, 2.0, "stop"), ("a2", 1.0, 4.0, "stop"), ("Ax", 0.0, 9.0, "stop")],
        "b": [("b1", 1.0, 1.0, "stop"), ("B Two", 0.0, 1.0, "stop"),
              ("B Cut", 0.0, 3.0, "length"), ("B three", 0.0, 2.0, "stop")],
        "c": [("C One", 0.0, 1.0, "stop"), ("1 2 3", 0.0, 5.0, "stop"),  # no letter to lower
              ("c one", 0.0, 0.0, "length")],
        "d": [("D1", None, 5.0, "stop")],  # no constraints: nothing verified, nothing repaired
    })
    got = sampled_passes(prompts, samples, judgments, per_prompt=2,
                         repair_types=["lowercase"], pairs_cfg=PairsConfig())
    # a: two passes already; b: its pass, then the best judged finished failure lower-cased
    # (the truncated "B Cut" is left out); c: "1 2 3" has no repair, "C One" gives "c one"
    assert list(zip(got.prompt_id, got.text)) == [
        ("a", "a2"), ("a", "A1"), ("b", "b1"), ("b", "b three"), ("c", "c one")]
    assert sampled_passes(prompts, samples, judgments, per_prompt=2).text.tolist() == [
        "a2", "A1", "b1"]  # without repair_types: passes only
    assert sampled_passes(prompts, samples, judgments, per_prompt=2,
                          repair_types=["uppercase"]).text.tolist() == ["a2", "A1", "b1"]


def test_sft_repair_keeps_the_pairs_length_ratios():
    from flywheel.config import PairsConfig

    prompts, samples, judgments = _round({"a": [("Way too long. " * 4, 0.0, 1.0, "stop")]})
    prompts["constraints"] = json.dumps([{"type": "max_sentences", "n": 1}])
    kw = dict(per_prompt=1, repair_types=["max_sentences"])
    assert sampled_passes(prompts, samples, judgments, **kw).text.tolist() == ["Way too long."]
    # the prompt asks for a quarter of the candidate's 56 characters (1 sentence of 4): 14;
    # the repaired 13 are over half of that, and under 0.95 of it
    assert sampled_passes(prompts, samples, judgments, **kw,
                          pairs_cfg=PairsConfig(min_length_ratio=0.5)).text.tolist() == [
        "Way too long."]
    assert sampled_passes(prompts, samples, judgments, **kw,
                          pairs_cfg=PairsConfig(min_length_ratio=0.95)).empty


@pytest.mark.parametrize("yaml", [
    "train:\n  sft_repair: true\n",
    "train:\n  sft_repair: true\n  sft_epochs: 1\n  sft_per_prompt: 2\n",
    "train:\n  sft_repair: true\n  sft_epochs: 1\npairs:\n  repair: [lowercase]\n",
])
def test_sft_repair_without_what_it_works_on_is_a_config_error(tmp_path, yaml):
    path = tmp_path / "c.yaml"
    path.write_text(yaml)
    with pytest.raises(FlywheelError) as err:
        load_config(path)
    assert "train.sft_repair: repairs candidates for the SFT step's per-prompt examples: it " \
           "needs train.sft_epochs > 0, train.sft_per_prompt > 0" in str(err.value)
    cfg_ok = tmp_path / "ok.yaml"
    cfg_ok.write_text("train:\n  sft_repair: true\n  sft_epochs: 1\n  sft_per_prompt: 2\n"
                      "pairs:\n  repair: [lowercase]\n")
    assert load_config(cfg_ok).train.sft_repair is True


def test_sft_examples_join_the_pairs_passes_and_the_sampled_ones_once():
    extra = pd.DataFrame({"prompt_id": ["p0", "p3"], "text": ["yes, 0 it is", "p3's pass"]})
    got = sft_examples(PAIRS, extra)
    assert list(zip(got.prompt_id, got.text)) == [("p0", "yes, 0 it is"),
                                                  ("p2", "yes, 2 it is"), ("p3", "p3's pass")]
    assert sft_examples(PAIRS).equals(verified_passes(PAIRS))


def test_sft_per_prompt_trains_on_the_extra_passes(tiny_model, tmp_path, monkeypatch):
    seen = watch(monkeypatch)
    cfg = TrainConfig(**SMALL, sft_epochs=1.0, sft_per_prompt=2)
    extra = pd.DataFrame({"prompt_id": ["p3", "p4"], "text": ["three", "four"]})
    metrics = train_lora(str(tiny_model), PAIRS, TEXT, cfg, tmp_path / "out", seed=1,
                         progress=False, sft_extra=extra)
    assert (metrics["sft_examples"], metrics["sft_steps"]) == (4, 2)  # 2 + 2, batch 2
    assert type(seen[0]["args"]).__name__ == "SFTConfig"
    assert shaping(cfg)["sft_per_prompt"] == 2 and "sft_per_prompt" not in shaping(TrainConfig())


def test_a_negative_sft_per_prompt_is_a_config_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  sft_per_prompt: -1\n")
    with pytest.raises(FlywheelError) as err:
        load_config(path)
    assert "train.sft_per_prompt: must be >= 0, got -1" in str(err.value)
