"""Train: DPO or SPIN with a LoRA adapter (TRL DPOTrainer + PEFT), merged into a checkpoint.

Reads top to bottom: validate -> load -> dataset -> trainer -> train -> merge -> save. The
reference model is the round's starting model (the base with the adapter disabled), so SPIN is
the sigmoid DPO loss on (gold, own answer) pairs against the previous round's model; with
`train.reference: base` it is the round-0 model, loaded beside the policy. Checkpoints every
`train.checkpoint_steps` let a killed training resume.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd

from flywheel.errors import FlywheelError


def preference_dataset(pairs: pd.DataFrame, prompt_text: dict[str, str]):
    """A TRL conversational preference dataset (prompt, chosen, rejected)."""
    from datasets import Dataset

    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": prompt_text[p.prompt_id]}],
         "chosen": [{"role": "assistant", "content": p.chosen_text}],
         "rejected": [{"role": "assistant", "content": p.rejected_text}]}
        for p in pairs.itertuples()
    ])


def _metrics(history: list[dict], resumed: bool = False) -> dict:
    """Training metrics from the Trainer's log history (restored from the checkpoint too, after
    a resume)."""
    logs = [h for h in history if "loss" in h]
    last = logs[-1] if logs else {}
    summary = next((h for h in history if "train_loss" in h), {})
    pick = {k: v for k, v in last.items() if k.startswith("rewards/") or k.startswith("logps/")}
    train_loss = summary.get("train_loss", last.get("loss"))
    if resumed and logs:  # the Trainer's train_loss averages only the steps after the resume;
        train_loss = sum(h["loss"] for h in logs) / len(logs)  # one log per step: all of them
    return {"train_loss": train_loss,
            "first_loss": logs[0]["loss"] if logs else None, "last_loss": last.get("loss"),
            "reward_accuracy": last.get("rewards/accuracies"),
            "reward_margin": last.get("rewards/margins"),
            "steps": summary.get("step", len(logs)), "runtime_s": summary.get("train_runtime"),
            "losses": [h["loss"] for h in logs], **pick}


def _progress_callback(enabled: bool):
    """A quiet progress bar for training: steps, with the last loss as postfix."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class Bar(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.bar = tqdm(total=state.max_steps, desc="train", unit="step",
                            disable=not enabled, leave=False)

        def on_step_end(self, args, state, control, **kw):
            self.bar.update(1)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{float(logs['loss']):.3f}")

        def on_train_end(self, args, state, control, **kw):
            self.bar.close()

    return Bar()


def _complete(checkpoint: Path) -> bool:
    """Whether a checkpoint was saved to the end: the Trainer writes trainer_state.json last,
    and a kill while writing it leaves it cut short."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def last_checkpoint(work: Path) -> Path | None:
    """The newest complete `checkpoint-N` folder a killed training left in `work`."""
    done = [c for c in work.glob("checkpoint-*")
            if c.name.split("-")[-1].isdigit() and _complete(c)]
    return max(done, key=lambda c: int(c.name.split("-")[-1]), default=None)


def _fault_callback():
    """`FLYWHEEL_FAULT=train:step`: die right after the first checkpoint is saved."""
    from transformers import TrainerCallback

    from flywheel import faults

    class Fault(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            faults.point("train:step")

    return Fault()


def _stop_callback():
    """Stop training between steps once SIGINT/SIGTERM asked the run to stop (see
    flywheel.interrupt): the adapter is not merged, the model not committed."""
    from transformers import TrainerCallback

    from flywheel import interrupt

    class Stop(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            interrupt.check()

        def on_step_end(self, args, state, control, **kw):
            interrupt.check()

    return Stop()


def train_lora(base_path: str, pairs: pd.DataFrame, prompt_text: dict[str, str], cfg,
               out_dir: str | Path, *, seed: int, device: str = "cpu",
               progress: bool = True, ref_path: str | None = None, log=print) -> dict:
    """Train a LoRA adapter with DPO on `pairs`, merge it, save to `out_dir`; return metrics.

    The reference policy is `base_path` with the adapter disabled, or the model at `ref_path`.
    Checkpoints go to `<out_dir>.work` every `cfg.checkpoint_steps` steps; a training killed
    midway resumes from the newest one when it is run again with the same inputs (the folder
    name carries the model's fingerprint)."""
    if pairs.empty:
        raise FlywheelError("no pairs to train on")
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    out = Path(out_dir)
    work = out.with_name(out.name + ".work")
    steps = getattr(cfg, "checkpoint_steps", 0)
    resume = last_checkpoint(work) if steps else None
    if resume is None:
        shutil.rmtree(work, ignore_errors=True)
    else:
        log(f"resuming training from {resume} (left by an interrupted run)")
    tok = AutoTokenizer.from_pretrained(base_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    use_cpu = device == "cpu" or not torch.cuda.is_available()
    steps_per_epoch = math.ceil(len(pairs) / (cfg.batch_size * cfg.grad_accum))
    args = DPOConfig(
        output_dir=str(work), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, num_train_epochs=cfg.epochs,
        learning_rate=cfg.learning_rate, beta=cfg.beta,
        warmup_steps=int(cfg.warmup_ratio * steps_per_epoch * cfg.epochs),
        loss_type=list(cfg.loss_type), max_length=cfg.max_length, bf16=False,
        gradient_checkpointing=False, use_cpu=use_cpu, report_to="none",
        save_strategy="steps" if steps else "no", save_steps=steps or 500, save_total_limit=2,
        save_only_model=False,
        logging_steps=1, seed=seed, disable_tqdm=True, dataloader_num_workers=0,
        lr_scheduler_type="constant" if steps_per_epoch * cfg.epochs < 10 else "linear")
    peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                             lora_dropout=cfg.lora_dropout,
                             target_modules=list(cfg.lora_targets), task_type="CAUSAL_LM")
    ref_model = (AutoModelForCausalLM.from_pretrained(ref_path, dtype=torch.float32)
                 if ref_path else None)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, processing_class=tok,
                         train_dataset=preference_dataset(pairs, prompt_text),
                         peft_config=peft_config)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # no log dicts on stdout: the bar shows the loss
    trainer.add_callback(_progress_callback(progress))
    trainer.add_callback(_fault_callback())
    trainer.add_callback(_stop_callback())
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    metrics = _metrics(trainer.state.log_history, resumed=resume is not None)
    merged = trainer.model.merge_and_unload()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    shutil.rmtree(work, ignore_errors=True)
    return metrics
