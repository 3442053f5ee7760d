"""Training honours models.dtype and models.device: the tiny Llama trained in bfloat16 on the
CPU gives a bfloat16 checkpoint and finite metrics; float32 keeps the exact arguments of 0.1.0
(earlier figures); a device or dtype the machine cannot train with is a clear error naming
the setting. The GPU cases run where torch sees a GPU."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pandas as pd
import pytest
import torch

from flywheel.config import TrainConfig
from flywheel.errors import FlywheelError
from flywheel.stages import train
from flywheel.stages.train import Placement, _dpo_kwargs, _pin_device, training_placement

CUDA = torch.cuda.is_available()
PAIRS = pd.DataFrame([{"prompt_id": f"p{i}", "chosen_text": f"yes, {i} it is",
                       "rejected_text": "no"} for i in range(4)])
TEXT = {f"p{i}": f"is it {i}?" for i in range(4)}
SMALL = TrainConfig(batch_size=2, max_length=64, lora_r=4, lora_alpha=8, checkpoint_steps=0)


def safetensors_dtypes(folder: Path) -> set[str]:
    """The dtypes of every tensor in `folder`/model.safetensors, read from its header."""
    raw = (folder / "model.safetensors").read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + size])
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def watch_training(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Record, when training begins, the device and dtype of the policy's weights, the
    trainable (LoRA) weights' dtype, the Trainer's device, GPU count and precision flags."""
    from transformers import TrainerCallback

    seen: dict = {}

    class Watch(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            frozen = [p for p in model.parameters() if not p.requires_grad]
            lora = [p for p in model.parameters() if p.requires_grad]
            seen.update(device=str(frozen[0].device), dtype=frozen[0].dtype,
                        lora_dtype=lora[0].dtype, args_device=str(args.device),
                        n_gpu=args.n_gpu, bf16=args.bf16, fp16=args.fp16)

    monkeypatch.setattr(train, "_progress_callback", lambda enabled: Watch())  # no bar
    return seen


@pytest.mark.parametrize(("dtype", "stored"), [("bfloat16", "BF16"), ("float32", "F32")])
def test_trains_in_the_configured_dtype_on_the_cpu(tiny_model, tmp_path, monkeypatch,
                                                  dtype, stored):
    """The policy and the reference (train.reference: base) are loaded in `dtype`; bfloat16
    trains with TRL's bf16 mixed precision (LoRA weights float32) and saves a bf16 checkpoint."""
    seen = watch_training(monkeypatch)
    out = tmp_path / "model"
    metrics = train.train_lora(str(tiny_model), PAIRS, TEXT, SMALL, out, seed=0, device="cpu",
                               dtype=dtype, progress=False, ref_path=str(tiny_model))
    assert seen["device"] == "cpu" and seen["args_device"] == "cpu"
    assert seen["dtype"] == getattr(torch, dtype) and seen["lora_dtype"] == torch.float32
    assert (seen["bf16"], seen["fp16"]) == (dtype == "bfloat16", False)
    assert safetensors_dtypes(out) == {stored}
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype
    assert metrics["steps"] == 2 and len(metrics["losses"]) == 2
    finite = [metrics["train_loss"], metrics["reward_margin"], *metrics["losses"]]
    assert all(math.isfinite(v) for v in finite), metrics
    assert abs(metrics["first_loss"] - math.log(2)) < 1e-3  # policy == reference at step 1
    assert not (tmp_path / "model.work").exists() and not (tmp_path / "model.tmp").exists()


def test_float32_keeps_the_arguments_of_0_1_0():
    """float32 on the CPU (the default) trains with exactly the DPOConfig of 0.1.0:
    the same weights and figures, bit for bit."""
    cfg = TrainConfig()
    kwargs = _dpo_kwargs(cfg, Path("w"), 10, 3, training_placement("cpu", "float32"))
    assert kwargs == dict(
        output_dir="w", per_device_train_batch_size=4, gradient_accumulation_steps=1,
        num_train_epochs=1.0, learning_rate=5e-5, beta=0.1, warmup_steps=0,
        loss_type=["sigmoid"], max_length=512, bf16=False, fp16=False,
        gradient_checkpointing=False, use_cpu=True, report_to="none", save_strategy="steps",
        save_steps=50, save_total_limit=2, save_only_model=False, logging_steps=1, seed=3,
        disable_tqdm=True, dataloader_num_workers=0, lr_scheduler_type="constant")
    many = _dpo_kwargs(TrainConfig(checkpoint_steps=0, warmup_ratio=0.1), Path("w"), 40, 3,
                       Placement("cuda:1", "bfloat16"))
    assert (many["save_strategy"], many["save_steps"], many["warmup_steps"]) == ("no", 500, 1)
    assert (many["bf16"], many["fp16"], many["use_cpu"]) == (True, False, False)
    assert many["lr_scheduler_type"] == "linear"  # 10 steps


def fake_gpus(monkeypatch: pytest.MonkeyPatch, count: int, capability=(9, 0)) -> None:
    """Make torch report `count` CUDA devices of `capability` (no GPU is touched)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "Tesla T4")


@pytest.mark.parametrize(("count", "device", "dtype", "expected"), [
    (0, "cpu", "float32", "cpu"), (0, "auto", "bfloat16", "cpu"),
    (2, "cpu", "bfloat16", "cpu"), (2, "auto", "float16", "cuda:0"),
    (2, "cuda", "bfloat16", "cuda:0"), (2, "cuda:1", "float16", "cuda:1"),
    (1, "cuda:0", "float32", "cuda:0"),
])
def test_placement(monkeypatch, count, device, dtype, expected):
    fake_gpus(monkeypatch, count)
    place = training_placement(device, dtype)
    assert place == Placement(expected, dtype)
    assert place.cuda_index == (None if expected == "cpu" else int(expected[-1]))


@pytest.mark.parametrize(("count", "device", "dtype", "first_line", "hint"), [
    (0, "cuda:3", "float32",
     "models.device is 'cuda:3', but torch sees no CUDA device on this machine",
     "set models.device: cpu (or auto"),
    (0, "cuda", "bfloat16",
     "models.device is 'cuda', but torch sees no CUDA device on this machine",
     "set models.device: cpu"),
    (2, "cuda:3", "bfloat16",
     "models.device is 'cuda:3', but torch sees 2 CUDA devices here: cuda:0, cuda:1",
     "set models.device to one of them"),
    (1, "cuda:1", "float32",
     "models.device is 'cuda:1', but torch sees 1 CUDA device here: cuda:0",
     "CUDA_VISIBLE_DEVICES"),
    (0, "gpu", "float32", "models.device 'gpu' is not one of: cpu, cuda, cuda:N, auto", None),
    (0, "cpu", "float64", "models.dtype 'float64' is not one of: float32, bfloat16, float16",
     None),
    (0, "cpu", "float16",
     "models.dtype float16 cannot train on the CPU: fp16 training needs a GPU's gradient "
     "scaler", "set models.dtype: bfloat16 (or float32) to train on the CPU"),
    (0, "auto", "float16", "models.dtype float16 cannot train on the CPU", "models.device is "
     "'auto'"),
])
def test_unusable_device_or_dtype_is_a_clear_error(monkeypatch, count, device, dtype,
                                                   first_line, hint):
    fake_gpus(monkeypatch, count)
    with pytest.raises(FlywheelError) as info:
        training_placement(device, dtype)
    message = str(info.value)
    assert message.splitlines()[0].startswith(first_line), message
    if hint:
        assert hint in message


def test_bfloat16_on_a_gpu_without_it_is_a_clear_error(monkeypatch):
    fake_gpus(monkeypatch, 1, capability=(7, 5))
    with pytest.raises(FlywheelError) as info:
        training_placement("cuda", "bfloat16")
    assert str(info.value).splitlines() == [
        "models.dtype bfloat16: cuda:0 (Tesla T4, compute capability 7.5) has no bfloat16 "
        "support (it needs 8.0 or newer)",
        "  - set models.dtype: float16 (mixed precision with a gradient scaler) or float32"]
    assert training_placement("cuda", "float16") == Placement("cuda:0", "float16")


@pytest.mark.skipif(CUDA, reason="this machine has a GPU")
def test_train_lora_refuses_a_missing_gpu_before_loading(tmp_path):
    """On a machine without a GPU, models.device: cuda:3 stops training at once (it used to
    train on the CPU without a word)."""
    with pytest.raises(FlywheelError, match=r"models\.device is 'cuda:3', but torch sees no "
                       r"CUDA device"):
        train.train_lora(str(tmp_path / "no-model"), PAIRS, TEXT, SMALL, tmp_path / "out",
                         seed=0, device="cuda:3", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_pin_device_gives_the_trainer_one_gpu(monkeypatch):
    """With several GPUs the Trainer would take cuda:0 and DataParallel over all of them;
    pinned, its device is the configured one and its GPU count 1 (checked against the
    installed transformers without a GPU: the CPU build keeps use_cpu=False args on cpu)."""
    from trl import DPOConfig

    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: chosen.append(i))
    place = Placement("cuda:1", "float32")
    args = DPOConfig(**_dpo_kwargs(SMALL, Path("/nonexistent/w"), 4, 0, place))
    _pin_device(args, place)
    assert args.device == torch.device("cuda", 1)
    assert args.n_gpu == 1
    assert chosen[-1] == 1
    cpu = DPOConfig(**_dpo_kwargs(SMALL, Path("/nonexistent/w"), 4, 0, Placement("cpu",
                                                                                  "float32")))
    before = (cpu.device, cpu.n_gpu)
    _pin_device(cpu, Placement("cpu", "float32"))
    assert (cpu.device, cpu.n_gpu) == before == (torch.device("cpu"), 0)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_trains_on_the_configured_gpu(tiny_model, tmp_path, monkeypatch, dtype):
    """On a GPU: the last GPU torch sees (the index honoured), one GPU only, the precision of
    `dtype`, a checkpoint in `dtype`, and the process's current GPU restored afterwards."""
    index = torch.cuda.device_count() - 1
    if dtype == "bfloat16" and torch.cuda.get_device_capability(index)[0] < 8:
        pytest.skip("this GPU has no bfloat16")
    before = torch.cuda.current_device()
    seen = watch_training(monkeypatch)
    out = tmp_path / "model"
    metrics = train.train_lora(str(tiny_model), PAIRS, TEXT, SMALL, out, seed=0,
                               device=f"cuda:{index}", dtype=dtype, progress=False,
                               ref_path=str(tiny_model))
    assert seen["device"] == seen["args_device"] == f"cuda:{index}"
    assert seen["n_gpu"] == 1 and seen["dtype"] == getattr(torch, dtype)
    assert (seen["bf16"], seen["fp16"]) == (dtype == "bfloat16", dtype == "float16")
    assert safetensors_dtypes(out) == {"BF16" if dtype == "bfloat16" else "F16"}
    assert all(math.isfinite(v) for v in [metrics["train_loss"], *metrics["losses"]]), metrics
    assert torch.cuda.current_device() == before
