"""Training in several processes (`train.num_processes`): two CPU processes over gloo under
`accelerate launch` make the same kind of model version as one process; a run whose flywheel
is SIGKILLed after the first checkpoint leaves no process behind and resumes from that
checkpoint; Ctrl-C / SIGTERM stop the processes; out-of-memory errors and failed launches are
clear errors; the settings are validated."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from flywheel import interrupt
from flywheel.config import TrainConfig, load_config
from flywheel.errors import FlywheelError, Interrupted
from flywheel.servers import group_members
from flywheel.stages import train_worker
from flywheel.stages.train import _dpo_kwargs, last_checkpoint, train_lora, training_placement

ROOT = Path(__file__).resolve().parent.parent


def pairs_of(n: int) -> tuple[pd.DataFrame, dict[str, str]]:
    pairs = pd.DataFrame([{"prompt_id": f"p{i}", "chosen_text": f"yes, {i} it is",
                           "rejected_text": "no", "margin": 1.0} for i in range(n)])
    return pairs, {f"p{i}": f"is it {i}?" for i in range(n)}


def small(**kw) -> TrainConfig:
    return TrainConfig(**{"batch_size": 1, "max_length": 64, "lora_r": 4, "lora_alpha": 8,
                          "checkpoint_steps": 0, **kw})


def launcher_and_workers(log: Path) -> tuple[int, list[int]]:
    """The launcher's process group and the pids of the training processes that reported
    waiting at FLYWHEEL_STALL=train:step, read from the launch log."""
    text = log.read_text()
    group = int(re.search(r"--- launcher process group (\d+)", text).group(1))
    workers = [int(p) for p in re.findall(r"FLYWHEEL_STALL=train:step: waiting \(process "
                                          r"(\d+)\)", text)]
    return group, workers


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in "ZX"


def stalled(log: Path, n: int) -> bool:
    """Whether `n` training processes wait after saving the first checkpoint."""
    return log.is_file() and log.read_text().count("FLYWHEEL_STALL=train:step: waiting") >= n


# -- settings ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("override", "message"), [
    ("train.num_processes=0", "train.num_processes: must be > 0, got 0"),
    ("train.num_processes=-2", "train.num_processes: must be > 0, got -2"),
    ("train.distributed=deepspeed", "train.distributed: 'deepspeed' is not one of: ddp, fsdp"),
])
def test_bad_multi_process_settings_are_config_errors(override, message):
    with pytest.raises(FlywheelError) as info:
        load_config(overrides=[override])
    assert message in str(info.value)


def test_new_settings_defaults_and_fingerprint():
    """Defaults train as before; only num_processes (the effective batch) shapes the model,
    and only when not 1, so versions made before it keep their fingerprints."""
    from flywheel.config import shaping

    cfg = load_config(overrides=["train.num_processes=4", "train.distributed=fsdp",
                                 "train.gradient_checkpointing=true"])
    t = cfg.train
    assert (t.num_processes, t.distributed, t.gradient_checkpointing) == (4, "fsdp", True)
    assert shaping(t)["num_processes"] == 4
    assert "distributed" not in shaping(t) and "gradient_checkpointing" not in shaping(t)
    default = TrainConfig()
    assert (default.num_processes, default.distributed, default.gradient_checkpointing) == (
        1, "ddp", False)
    assert "num_processes" not in shaping(default)


def test_gradient_checkpointing_and_processes_reach_the_trainer_arguments():
    place = training_placement("cpu", "float32")
    on = _dpo_kwargs(TrainConfig(gradient_checkpointing=True, num_processes=2,
                                 warmup_ratio=0.5), Path("w"), 16, 0, place)
    assert on["gradient_checkpointing"] is True
    assert on["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    assert on["warmup_steps"] == 1  # 16 pairs / (4 a process x 2 processes) = 2 steps
    off = _dpo_kwargs(TrainConfig(), Path("w"), 16, 0, place)
    assert off["gradient_checkpointing"] is False and "gradient_checkpointing_kwargs" not in off


def test_launch_command():
    argv = train_worker.launch_argv(Path("/w/launch/spec.json"), small(num_processes=3),
                                    port=29555, python="/py")
    assert argv[:3] == ["/py", "-m", "accelerate.commands.launch"]
    joined = " ".join(argv)
    assert ("--multi_gpu --num_processes 3 --num_machines 1 --mixed_precision no "
            "--dynamo_backend no --main_process_port 29555") in joined
    assert "--use_fsdp" not in argv
    assert argv[-3:] == ["-m", "flywheel.stages.train_worker", "/w/launch/spec.json"]
    fsdp = train_worker.launch_argv(Path("s.json"), small(num_processes=2, distributed="fsdp"),
                                    port=1)
    assert "--use_fsdp" in fsdp and "--multi_gpu" not in fsdp
    assert fsdp[fsdp.index("--fsdp_use_orig_params") + 1] == "true"


def test_too_few_gpus_is_a_clear_error(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(FlywheelError) as info:
        train_worker._check_devices(small(num_processes=2), "cuda:0")
    assert "train.num_processes is 2, but torch sees 1 CUDA device here" in str(info.value)
    with pytest.raises(FlywheelError) as info:
        train_worker._check_devices(small(num_processes=2), "cuda:1")
    assert "set models.device: cuda and choose the GPUs with CUDA_VISIBLE_DEVICES" in str(
        info.value)
    train_worker._check_devices(small(num_processes=8), "cpu")  # CPU processes: any number


# -- out of memory, failed launches ------------------------------------------------------------

def oom(*args, **kwargs):
    import torch

    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; "
                                 "79.3 GiB total capacity)")


def test_out_of_memory_in_one_process_names_the_settings(tiny_model, tmp_path, monkeypatch):
    from trl import DPOTrainer

    monkeypatch.setattr(DPOTrainer, "train", oom)
    pairs, text = pairs_of(2)
    with pytest.raises(FlywheelError) as info:
        train_lora(str(tiny_model), pairs, text, small(), tmp_path / "m", seed=0,
                   progress=False)
    message = str(info.value)
    assert message.startswith("training ran out of memory on cpu: CUDA out of memory. Tried "
                              "to allocate 2.00 GiB"), message
    for setting in ("train.batch_size", "train.grad_accum", "train.max_length",
                    "train.gradient_checkpointing: true", "models.dtype: bfloat16",
                    "models.vllm.during_training: stop"):
        assert setting in message
    assert "now: train.batch_size 1, train.grad_accum 1, train.max_length 64" in message
    assert not (tmp_path / "m").exists()


def test_out_of_memory_in_a_training_process_is_reported(tiny_model, tmp_path, monkeypatch):
    """The training process's side (run here as a one-process world) records the error; the
    launching side raises it."""
    from trl import DPOTrainer

    monkeypatch.setattr(DPOTrainer, "train", oom)
    pairs, text = pairs_of(2)
    out = tmp_path / "m"
    folder = train_worker.launch_dir(out)
    spec = train_worker.write_spec(folder, str(tiny_model), pairs, text, small(), out,
                                   resume=None, seed=0, device="cpu", dtype="float32",
                                   ref_path=None)
    assert train_worker.main([str(spec)]) == 1
    recorded = json.loads((folder / "error-rank0.json").read_text())["message"]
    assert recorded.startswith("training ran out of memory on the CPU: CUDA out of memory")
    assert "train.gradient_checkpointing: true" in recorded


def fake_launch(monkeypatch, script: str) -> None:
    """Make the launch run `python -c script SPEC` instead of accelerate."""
    monkeypatch.setattr(train_worker, "launch_argv",
                        lambda spec, cfg, port: [sys.executable, "-c", script, str(spec)])


def test_a_failed_launch_shows_the_log(tmp_path, monkeypatch):
    fake_launch(monkeypatch, "import sys; print('boom: no GPU answered'); sys.exit(3)")
    pairs, text = pairs_of(2)
    with pytest.raises(FlywheelError) as info:
        train_lora("unused", pairs, text, small(num_processes=2), tmp_path / "m", seed=0,
                   log=lambda m: None)
    message = str(info.value)
    assert message.startswith("the training processes failed (accelerate launch exited with "
                              "code 3)"), message
    assert "    boom: no GPU answered" in message
    assert f"log: {tmp_path / 'm.work' / 'launch' / 'train.log'}" in message


def test_an_error_recorded_by_a_training_process_is_raised(tmp_path, monkeypatch):
    fake_launch(monkeypatch, textwrap.dedent("""
        import json, sys, pathlib
        folder = pathlib.Path(sys.argv[1]).parent
        (folder / "error-rank1.json").write_text(json.dumps({"message": "training ran out of "
                                                             "memory on the GPU of process 1"}))
        sys.exit(1)"""))
    pairs, text = pairs_of(2)
    with pytest.raises(FlywheelError) as info:
        train_lora("unused", pairs, text, small(num_processes=2), tmp_path / "m", seed=0,
                   log=lambda m: None)
    assert str(info.value).startswith("training ran out of memory on the GPU of process 1\n"
                                      "  log of the training processes: ")


# -- real multi-process training ---------------------------------------------------------------

@pytest.mark.slow
def test_two_processes_make_the_same_kind_of_model_as_one(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    pairs, text = pairs_of(4)
    lines: list[str] = []
    one = train_lora(str(tiny_model), pairs, text, small(batch_size=2), tmp_path / "one",
                     seed=0, dtype="bfloat16", progress=False, log=lines.append)
    two = train_lora(str(tiny_model), pairs, text, small(num_processes=2), tmp_path / "two",
                     seed=0, dtype="bfloat16", progress=False, log=lines.append)
    assert two["num_processes"] == 2 and "num_processes" not in one
    assert set(two) == set(one) | {"num_processes"}
    assert one["steps"] == two["steps"] == 2  # 4 pairs, 2 a step (1 in each of 2 processes)
    assert len(two["losses"]) == 2 and all(math.isfinite(v) for v in two["losses"])
    assert abs(two["first_loss"] - math.log(2)) < 1e-3  # policy == reference at step 1
    assert "trained with world size 2" in lines
    assert any(line.startswith("training in 2 processes (ddp, CPU over gloo)") for line in lines)
    files = {p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*")}
    assert {p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*")} == files
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "two")
    assert model.config.num_hidden_layers == 2 and str(model.config.dtype) == "torch.bfloat16"
    assert not any(n for n, _ in model.named_parameters() if "lora" in n)  # merged
    assert not (tmp_path / "two.work").exists() and not (tmp_path / "two.tmp").exists()


RUN = textwrap.dedent("""
    import sys
    import pandas as pd
    from flywheel.config import TrainConfig
    from flywheel.stages.train import train_lora

    model, out = sys.argv[1], sys.argv[2]
    pairs = pd.DataFrame([{"prompt_id": f"p{i}", "chosen_text": f"yes, {i} it is",
                           "rejected_text": "no"} for i in range(8)])
    text = {f"p{i}": f"is it {i}?" for i in range(8)}
    cfg = TrainConfig(batch_size=1, max_length=64, lora_r=4, lora_alpha=8, checkpoint_steps=1,
                      num_processes=2)
    train_lora(model, pairs, text, cfg, out, seed=0, progress=False)
""")


@pytest.mark.slow
def test_sigkill_of_flywheel_leaves_no_process_and_the_rerun_resumes(tiny_model, tmp_path):
    out = tmp_path / "m"
    log = train_worker.launch_dir(out) / train_worker.LOG_NAME
    parent = subprocess.Popen(
        [sys.executable, "-c", RUN, str(tiny_model), str(out)], cwd=ROOT,
        env={**os.environ, "FLYWHEEL_STALL": "train:step"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: stalled(log, 2) or parent.poll() is not None, 180,
                 "both training processes to save the first checkpoint")
        assert parent.poll() is None, log.read_text()[-3000:]
        group, workers = launcher_and_workers(log)
        assert len(workers) == 2 and all(alive(p) for p in workers + [group])
        os.kill(parent.pid, signal.SIGKILL)
        assert parent.wait(timeout=10) == -signal.SIGKILL
        wait_for(lambda: not group_members(group) and not any(map(alive, workers)), 30,
                 "the launcher and the training processes to end")
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
    checkpoint = last_checkpoint(out.with_name("m.work"))
    assert checkpoint is not None and checkpoint.name == "checkpoint-1"
    assert not out.exists()

    pairs, text = pairs_of(8)
    lines: list[str] = []
    cfg = small(checkpoint_steps=1, num_processes=2)
    metrics = train_lora(str(tiny_model), pairs, text, cfg, out, seed=0, progress=False,
                         log=lines.append)
    assert lines[0] == f"resuming training from {checkpoint} (left by an interrupted run)"
    assert metrics["steps"] == 4 and len(metrics["losses"]) == 4  # 8 pairs, 2 a step
    assert metrics["num_processes"] == 2
    assert (out / "model.safetensors").is_file() and not out.with_name("m.work").exists()


@pytest.mark.slow
def test_sigterm_stops_the_training_processes(tiny_model, tmp_path, monkeypatch):
    """A stop request (the handler of SIGINT / SIGTERM) while the processes train: they are
    stopped, nothing is saved, and the same `Interrupted` as in one process is raised."""
    monkeypatch.setenv("FLYWHEEL_STALL", "train:step")
    out = tmp_path / "m"
    log = train_worker.launch_dir(out) / train_worker.LOG_NAME
    pairs, text = pairs_of(8)
    seen: dict = {}

    def stop_when_stalled():
        wait_for(lambda: stalled(log, 2), 180, "both training processes to stall")
        seen["group"], seen["workers"] = launcher_and_workers(log)
        interrupt.request(signal.SIGTERM)

    interrupt.reset()
    thread = threading.Thread(target=stop_when_stalled, daemon=True)
    thread.start()
    try:
        with pytest.raises(Interrupted) as info:
            train_lora(str(tiny_model), pairs, text, small(checkpoint_steps=1, num_processes=2),
                       out, seed=0, progress=False, log=lambda m: None)
    finally:
        interrupt.reset()
    thread.join(5)
    assert info.value.signum == signal.SIGTERM
    assert len(seen["workers"]) == 2
    assert group_members(seen["group"]) == [] and not any(map(alive, seen["workers"]))
    assert not out.exists() and last_checkpoint(out.with_name("m.work")) is not None


def test_fsdp_on_the_cpu_is_a_clear_error():
    with pytest.raises(FlywheelError) as info:
        train_worker._check_devices(small(num_processes=2, distributed="fsdp"), "cpu")
    assert str(info.value).startswith("train.distributed fsdp needs GPUs (accelerate's FSDP "
                                      "does not run on the CPU), but models.device is cpu")


def test_a_failed_training_process_shows_its_error_not_the_launcher_summary(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("\n".join([
        "[rank1]: Traceback (most recent call last):",
        '[rank1]:   File "x.py", line 1, in <module>',
        "[rank1]: RuntimeError: the real reason",
        "Traceback (most recent call last):",
        '  File "run.py", line 9, in main',
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
        "=" * 60, "flywheel.stages.train_worker FAILED", "=" * 60]) + "\n")
    tail = train_worker.Launcher(["x"], log).log_tail()
    assert tail[-1] == "[rank1]: RuntimeError: the real reason" and len(tail) == 3


def test_gradient_checkpointing_trains_the_lora_weights(tiny_model, tmp_path, monkeypatch):
    """With train.gradient_checkpointing the policy recomputes activations (non-reentrant) and
    the LoRA weights still get gradients: the loss moves away from log 2."""
    from transformers import TrainerCallback

    from flywheel.stages import train

    seen: dict = {}

    class Watch(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            seen["checkpointing"] = model.base_model.model.is_gradient_checkpointing

    monkeypatch.setattr(train, "_progress_callback", lambda enabled: Watch())
    pairs, text = pairs_of(4)
    metrics = train_lora(str(tiny_model), pairs, text,
                         small(gradient_checkpointing=True, learning_rate=1e-2), tmp_path / "m",
                         seed=0, progress=False)
    assert seen["checkpointing"] is True
    assert metrics["steps"] == 4 and abs(metrics["last_loss"] - math.log(2)) > 1e-3
