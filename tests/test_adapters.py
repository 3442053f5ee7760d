"""Each round's LoRA adapter is kept in its checkpoint with a lineage, and the adapters of
several rounds stack into one adapter relative to the base that gives the last round's model:
two real rounds of the tiny Llama (random LoRA weights, merged), compared logit for logit in
float32 through PEFT; the stacked folder is written once; a moved workspace still resolves; bad
lineages are clear errors; `train_lora` leaves the adapter and its lineage in its output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from flywheel.adapters import Lineage, adapter_for_base, lineage, save_adapter
from flywheel.config import TrainConfig
from flywheel.errors import FlywheelError
from flywheel.modelprep import model_hash

TOKENS = torch.tensor([[1, 17, 250, 3000, 42, 9, 777, 12345, 5, 60]])


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def with_adapter(base: Path, adapter: Path) -> torch.Tensor:
    """The logits of `base` with the PEFT adapter in `adapter` applied."""
    from peft import PeftModel

    return logits(PeftModel.from_pretrained(load(base), str(adapter)).eval())


def lora_round(start: Path, out: Path, *, r: int, alpha: int, seed: int,
               targets=("q_proj", "k_proj", "v_proj", "o_proj"), rslora: bool = False,
               merge: bool = True) -> Path:
    """One 'round' as train_lora makes it: a LoRA on `start` with random non-zero weights
    (standing in for training), its adapter saved into `<out>.tmp`, merged, renamed to `out`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    model = get_peft_model(load(start), LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                                   target_modules=list(targets),
                                                   use_rslora=rslora, task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    tmp = out.with_name(out.name + ".tmp")
    save_adapter(model, tmp, start=start)
    if merge:
        model.merge_and_unload().save_pretrained(tmp)
        AutoTokenizer.from_pretrained(start).save_pretrained(tmp)
    tmp.rename(out)
    return out


@pytest.fixture(scope="module")
def two_rounds(tiny_model, tmp_path_factory) -> Path:
    """A workspace with base/, m1/ (LoRA r=4, alpha=8 on base), m2/ (r=2, alpha=6 on m1) and
    m3/ (rsLoRA r=3, alpha=3 on m2)."""
    ws = tmp_path_factory.mktemp("adapters-ws")
    shutil.copytree(tiny_model, ws / "base")
    lora_round(ws / "base", ws / "m1", r=4, alpha=8, seed=1)
    lora_round(ws / "m1", ws / "m2", r=2, alpha=6, seed=2)
    lora_round(ws / "m2", ws / "m3", r=3, alpha=3, seed=3, rslora=True)
    return ws


def test_the_lineage_of_each_round(two_rounds):
    ws = two_rounds.resolve()
    assert lineage(ws / "base") is None
    one, two = lineage(ws / "m1"), lineage(ws / "m2")
    assert (one.base, one.chain, one.rank) == (ws / "base", [ws / "m1" / "adapter"], 4)
    assert (two.base, two.chain, two.rank) == (
        ws / "base", [ws / "m1" / "adapter", ws / "m2" / "adapter"], 6)
    record = json.loads((ws / "m2" / "adapter" / "lineage.json").read_text())
    assert record["base"] == "../../base" and record["chain"] == ["../../m1/adapter", "."]
    assert record["absolute"] == {"base": str(ws / "base"),
                                  "chain": [str(ws / "m1" / "adapter")]}
    config = json.loads((ws / "m2" / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (2, 6)
    three = lineage(ws / "m3")
    assert (three.base, three.chain[:2], three.rank) == (ws / "base", two.chain, 9)
    assert json.loads((ws / "m3" / "adapter" / "lineage.json").read_text())["chain"] == [
        "../../m1/adapter", "../../m2/adapter", "."]


def test_base_plus_the_stacked_adapter_is_the_last_rounds_model(two_rounds):
    ws = two_rounds.resolve()
    base, folder, rank = adapter_for_base(ws / "m2")
    assert (base, folder, rank) == (ws / "base", ws / "m2" / "adapter-stacked", 6)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (
        6, 6, str(ws / "base"))
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    want, plain = logits(load(ws / "m2")), logits(load(ws / "base"))
    got = with_adapter(ws / "base", folder)
    assert (want - plain).abs().max() > 0.1  # the two rounds changed the model visibly
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    # the round's own adapter alone is relative to m1, not to the base
    assert (with_adapter(ws / "base", ws / "m2" / "adapter") - want).abs().max() > 0.01
    # three rounds, the last with rsLoRA's scaling (alpha / sqrt(r))
    assert adapter_for_base(ws / "m3")[1:] == (ws / "m3" / "adapter-stacked", 9)
    want = logits(load(ws / "m3"))
    assert (want - logits(load(ws / "m2"))).abs().max() > 0.1
    torch.testing.assert_close(with_adapter(ws / "base", ws / "m3" / "adapter-stacked"), want,
                               atol=2e-5, rtol=1e-5)


def test_a_chain_of_one_is_the_rounds_own_adapter(two_rounds):
    ws = two_rounds.resolve()
    assert adapter_for_base(ws / "m1") == (ws / "base", ws / "m1" / "adapter", 4)
    assert not (ws / "m1" / "adapter-stacked").exists()
    torch.testing.assert_close(with_adapter(ws / "base", ws / "m1" / "adapter"),
                               logits(load(ws / "m1")), atol=2e-5, rtol=1e-5)
    assert adapter_for_base(ws / "base") is None


def test_the_stacked_adapter_is_written_once_and_max_rank_is_honoured(two_rounds):
    ws = two_rounds.resolve()
    weights = ws / "m2" / "adapter-stacked" / "adapter_model.safetensors"
    first = adapter_for_base(ws / "m2")
    stamp = weights.stat().st_mtime_ns
    assert adapter_for_base(ws / "m2", max_rank=6) == first
    assert weights.stat().st_mtime_ns == stamp
    assert adapter_for_base(ws / "m2", max_rank=5) is None
    assert adapter_for_base(ws / "m1", max_rank=3) is None
    assert [p.name for p in (ws / "m2").iterdir() if p.name.startswith("adapter-stacked")] == [
        "adapter-stacked"]  # no temporary folder left


def test_the_adapter_folders_leave_the_model_hash_alone(two_rounds, tmp_path):
    ws = two_rounds.resolve()
    adapter_for_base(ws / "m2")
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in (ws / "m2").iterdir():
        if f.is_file():
            shutil.copy(f, bare / f.name)
    assert model_hash(ws / "m2") == model_hash(bare)


def test_a_moved_workspace_and_a_moved_model_still_resolve(two_rounds, tmp_path):
    moved = tmp_path / "moved-ws"
    shutil.copytree(two_rounds, moved)
    shutil.rmtree(moved / "m2" / "adapter-stacked", ignore_errors=True)
    lin = lineage(moved / "m2")
    assert lin.base == (moved / "base").resolve()  # relative paths: the moved copy
    assert lin.chain[0] == (moved / "m1" / "adapter").resolve()
    alone = tmp_path / "elsewhere" / "m2"
    shutil.copytree(two_rounds / "m2", alone)
    lin = lineage(alone)  # base and m1 stayed where they were: the absolute paths
    assert lin.base == (two_rounds / "base").resolve()
    assert lin.chain == [(two_rounds / "m1" / "adapter").resolve(), (alone / "adapter").resolve()]
    shutil.rmtree(moved / "m1")
    shutil.rmtree(alone)
    shutil.copytree(moved / "m2", alone)  # now neither path leads to m1's adapter
    file = alone / "adapter" / "lineage.json"
    record = json.loads(file.read_text())
    record["absolute"]["chain"] = [str(moved / "m1" / "adapter")]
    file.write_text(json.dumps(record))
    with pytest.raises(FlywheelError) as err:
        adapter_for_base(alone)
    text = str(err.value)
    assert str(file) in text and "adapter #1 of its chain (../../m1/adapter) is missing" in text
    assert "put it back where it was" in text and "serve the merged checkpoint" in text


def test_adapters_on_different_modules_are_refused(two_rounds, tmp_path):
    odd = lora_round(two_rounds / "m2", tmp_path / "odd", r=2, alpha=2, seed=4,
                     targets=("q_proj",), merge=False)
    with pytest.raises(FlywheelError) as err:
        adapter_for_base(odd)
    text = str(err.value)
    assert str(odd.resolve() / "adapter" / "adapter_config.json") in text
    assert "target_modules ['q_proj'] differ from" in text and "cannot be stacked" in text
    assert [p.name for p in odd.iterdir()] == ["adapter"]  # nothing half-written left


def test_train_lora_keeps_the_adapter_with_its_lineage(tiny_model, tmp_path):
    from flywheel.stages.train import train_lora

    pairs = pd.DataFrame([{"prompt_id": f"p{i}", "chosen_text": f"yes, {i} it is",
                           "rejected_text": "no"} for i in range(4)])
    text = {f"p{i}": f"is it {i}?" for i in range(4)}
    cfg = TrainConfig(batch_size=2, max_length=64, lora_r=4, lora_alpha=8, checkpoint_steps=0,
                      learning_rate=5e-3)
    out = tmp_path / "model-r1"
    train_lora(str(tiny_model), pairs, text, cfg, out, seed=0, progress=False)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    record = json.loads((out / "adapter" / "lineage.json").read_text())
    assert record["chain"] == ["."]
    assert (out / "adapter" / record["base"]).resolve() == tiny_model.resolve()
    assert adapter_for_base(out) == (tiny_model.resolve(), (out / "adapter").resolve(), 4)
    assert not (tmp_path / "model-r1.tmp").exists()
    # the kept adapter is the one that was merged: base + adapter gives the trained model
    want = logits(load(out))
    assert (want - logits(load(tiny_model))).abs().max() > 1e-4
    torch.testing.assert_close(with_adapter(tiny_model, out / "adapter"), want,
                               atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "cannot read the adapter lineage"),
    ('{"base": "../../base", "chain": []}', "'chain' must be a list of adapter folders"),
    ('{"base": "../../nowhere", "chain": ["."]}', "the base model is missing (no config.json"),
])
def test_a_bad_lineage_file_is_a_clear_error(two_rounds, tmp_path, content, message):
    model = tmp_path / "m1"
    shutil.copytree(two_rounds / "m1", model)
    file = model / "adapter" / "lineage.json"
    file.write_text(content)
    with pytest.raises(FlywheelError) as err:
        lineage(model)
    assert str(err.value).startswith(str(file)) and message in str(err.value)
    assert "serve the merged checkpoint instead" in str(err.value)
    # a round trained on it starts a new chain there: its adapter is exact relative to it
    after = lora_round(model, tmp_path / "m2", r=2, alpha=2, seed=5, merge=False)
    assert lineage(after) == Lineage(model.resolve(), [(after / "adapter").resolve()], 2)
