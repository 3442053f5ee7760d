"""Train: DPO or SPIN with a LoRA adapter (TRL DPOTrainer + PEFT), merged into a checkpoint.

Reads top to bottom: validate -> load -> dataset -> trainer -> train -> merge -> save. The
reference model is the round's starting model (the base with the adapter disabled), so SPIN is
the sigmoid DPO loss on (gold, own answer) pairs against the previous round's model; with
`train.reference: base` it is the round-0 model, loaded beside the policy. Checkpoints every
`train.checkpoint_steps` let a killed training resume. `train.loss_weights` weigh the
`train.loss_type` losses ([sigmoid, sft] with [1.0, 0.2]: DPO plus NLL on the chosen answer);
`train.sft_epochs` runs a supervised step on the round's verified passes first, in the same
adapter, which DPO then continues against the model after it (see `_sft_step`).

Precision and place follow `models.dtype` and `models.device` (see `training_placement`): the
policy (and a separate reference) is loaded in the dtype, bfloat16 and float16 train with TRL's
mixed precision (`bf16` / `fp16`; the LoRA weights stay float32), and the merged checkpoint is
saved in the dtype it was loaded in. Training runs on one device (the CPU or one CUDA GPU) in
flywheel's own process, or with `train.num_processes` > 1 in that many processes under
`accelerate launch` (DDP or FSDP; see flywheel.stages.train_worker).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from flywheel.config import TrainConfig
from flywheel.errors import FlywheelError

#: The code version of this stage's output (and of the round-0 base model version): part of
#: its fingerprint; bump it when training makes a different model from the same inputs.
CODE_VERSION = "0.1.0+1"


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


#: the key of the metrics dict `train_lora` returns that holds every logged training step
#: (rows of the train_steps table, see `step_rows`): the pipeline stores them as rows, not in
#: the model's metrics
STEPS_KEY = "train_steps"
STEP_COLUMNS = ["phase", "step", "epoch", "loss", "reward_accuracy", "reward_margin",
                "learning_rate"]


def _number(value) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def step_rows(history: list[dict], phase: str) -> list[dict]:
    """One row per logged training step of the Trainer's log history (`phase` sft or dpo):
    the columns of the train_steps table (STEP_COLUMNS). A history restored from a checkpoint
    and continued may log a step twice: the last log of each step is kept. The rewards are
    DPO's (TRL's rewards/accuracies and rewards/margins), None for SFT."""
    by_step: dict[int, dict] = {}
    for h in history:
        if "loss" not in h or "step" not in h:
            continue
        dpo = phase == "dpo"
        by_step[int(h["step"])] = {
            "phase": phase, "step": int(h["step"]), "epoch": _number(h.get("epoch")),
            "loss": _number(h.get("loss")),
            "reward_accuracy": _number(h.get("rewards/accuracies")) if dpo else None,
            "reward_margin": _number(h.get("rewards/margins")) if dpo else None,
            "learning_rate": _number(h.get("learning_rate"))}
    return [by_step[k] for k in sorted(by_step)]


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


#: The dtypes training accepts (`models.dtype`).
DTYPES = ("float32", "bfloat16", "float16")
_DEVICE = re.compile(r"cpu|auto|cuda(?::(\d+))?")


@dataclass(frozen=True)
class Placement:
    """Where and in which precision a training runs: `device` is "cpu" or "cuda:N"."""

    device: str
    dtype: str

    @property
    def cuda_index(self) -> int | None:
        return None if self.device == "cpu" else int(self.device.split(":")[1])


def training_placement(device: str = "cpu", dtype: str = "float32") -> Placement:
    """Resolve `models.device` and `models.dtype` for training on this machine.

    cpu is the CPU; cuda is cuda:0; cuda:N is the N-th GPU torch sees (after
    CUDA_VISIBLE_DEVICES); auto is cuda:0 where torch sees a GPU, else the CPU. float16 needs a
    GPU (the CPU has no gradient scaler for fp16 training), bfloat16 a GPU that has it
    (compute capability 8.0+) or the CPU. Anything else is a FlywheelError naming the setting."""
    import torch

    if dtype not in DTYPES:
        raise FlywheelError(f"models.dtype {dtype!r} is not one of: {', '.join(DTYPES)}")
    match = _DEVICE.fullmatch(device)
    if match is None:
        raise FlywheelError(f"models.device {device!r} is not one of: cpu, cuda, cuda:N, auto")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "cpu" or (device == "auto" and count == 0):
        place = Placement("cpu", dtype)
    else:
        index = int(match.group(1) or 0)
        if count == 0:
            raise FlywheelError(
                f"models.device is {device!r}, but torch sees no CUDA device on this machine",
                details=[f"torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}",
                         "set models.device: cpu (or auto: a GPU where there is one, else "
                         "the CPU)"])
        if index >= count:
            raise FlywheelError(
                f"models.device is {device!r}, but torch sees {count} CUDA "
                f"device{'s' if count > 1 else ''} here: "
                + ", ".join(f"cuda:{i}" for i in range(count)),
                details=["set models.device to one of them (indices count the GPUs left "
                         "visible by CUDA_VISIBLE_DEVICES)"])
        place = Placement(f"cuda:{index}", dtype)
    if dtype == "float16" and place.device == "cpu":
        raise FlywheelError(
            "models.dtype float16 cannot train on the CPU: fp16 training needs a GPU's "
            "gradient scaler",
            details=[f"models.device is {device!r}",
                     "set models.dtype: bfloat16 (or float32) to train on the CPU, or "
                     "models.device: cuda on a machine with a GPU"])
    if dtype == "bfloat16" and place.cuda_index is not None:
        major, minor = torch.cuda.get_device_capability(place.cuda_index)
        if major < 8:
            name = torch.cuda.get_device_name(place.cuda_index)
            raise FlywheelError(
                f"models.dtype bfloat16: {place.device} ({name}, compute capability "
                f"{major}.{minor}) has no bfloat16 support (it needs 8.0 or newer)",
                details=["set models.dtype: float16 (mixed precision with a gradient "
                         "scaler) or float32"])
    return place


def _dpo_kwargs(cfg: TrainConfig, work: Path, n_pairs: int, seed: int,
                place: Placement) -> dict:
    """The DPOConfig arguments: the training settings, the precision and the device."""
    steps = cfg.checkpoint_steps
    steps_per_epoch = math.ceil(n_pairs / (cfg.batch_size * cfg.grad_accum * cfg.num_processes))
    return dict(
        output_dir=str(work), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, num_train_epochs=cfg.epochs,
        learning_rate=cfg.learning_rate, beta=cfg.beta,
        warmup_steps=int(cfg.warmup_ratio * steps_per_epoch * cfg.epochs),
        loss_type=list(cfg.loss_type), max_length=cfg.max_length,
        **({"loss_weights": list(cfg.loss_weights)} if cfg.loss_weights else {}),
        bf16=place.dtype == "bfloat16", fp16=place.dtype == "float16",
        gradient_checkpointing=cfg.gradient_checkpointing, use_cpu=place.device == "cpu",
        report_to="none",
        save_strategy="steps" if steps else "no", save_steps=steps or 500, save_total_limit=2,
        save_only_model=False,
        logging_steps=1, seed=seed, disable_tqdm=True, dataloader_num_workers=0,
        lr_scheduler_type="constant" if steps_per_epoch * cfg.epochs < 10 else "linear",
        # non-reentrant checkpointing: the reentrant kind loses the LoRA weights' gradients
        **({"gradient_checkpointing_kwargs": {"use_reentrant": False}}
           if cfg.gradient_checkpointing else {}))


#: The pair rules (flywheel.stages.pairs) under which the verifiers ranked the chosen answer.
VERIFIED_RULES = ("verifier", "repair")
#: The subfolder of `<out>.work` the SFT step trains in (no checkpoints: redone on resume).
SFT_DIR = "sft"


def verified_passes(pairs: pd.DataFrame) -> pd.DataFrame:
    """The SFT step's examples (prompt_id, text): the chosen answers of the pairs the verifiers
    decided (`VERIFIED_RULES`) that pass every constraint of their prompt (chosen_score 1.0),
    each (prompt, answer) once, in a stable order."""
    if pairs.empty or "rule" not in pairs:
        return pd.DataFrame(columns=["prompt_id", "text"])
    score = pd.to_numeric(pairs["chosen_score"], errors="coerce")
    kept = pairs[pairs["rule"].isin(VERIFIED_RULES) & (score >= 1.0)]
    out = kept[["prompt_id", "chosen_text"]].rename(columns={"chosen_text": "text"})
    return out.drop_duplicates().sort_values(["prompt_id", "text"]).reset_index(drop=True)


def sampled_passes(prompts: pd.DataFrame, samples: pd.DataFrame, judgments: pd.DataFrame,
                   per_prompt: int, mode: str = "hybrid", repair_types: list[str] | None = None,
                   pairs_cfg=None) -> pd.DataFrame:
    """`train.sft_per_prompt`'s SFT examples (prompt_id, text): up to `per_prompt` distinct
    answers per constrained prompt among its candidates that pass every constraint (verifier
    fraction 1.0) and ended on their own, best first (LLM score, then sample id), whether or
    not the prompt made a pair. With `repair_types` (`train.sft_repair`: the `pairs.repair`
    types), a prompt with fewer passes is topped up with its other finished candidates as the
    constraints' repairs rewrite them (`flywheel.constraints.repair`: kept only if the result
    passes every constraint), best first (verifier fraction, LLM score, sample id); with
    `pairs_cfg`, a repaired answer whose length is off the pairs' ratios against the candidate
    it came from is left out, as for repair pairs."""
    from flywheel.constraints import stored_constraints
    from flywheel.stages.pairs import length_bounds, repaired, standings

    rows: list[dict] = []
    if per_prompt <= 0:
        return pd.DataFrame(rows, columns=["prompt_id", "text"])
    text = dict(zip(samples.sample_id, samples.text))
    cons = {p.prompt_id: stored_constraints(p.constraints) for p in prompts.itertuples()}
    bounds = length_bounds(prompts) if pairs_cfg is not None else {}
    for pid, group in sorted(standings(samples, judgments, mode).items()):
        if not cons.get(pid):
            continue
        passes = sorted((s for s in group if s.verifier is not None and s.verifier >= 1.0
                         and s.finished), key=lambda s: (-(s.llm or 0.0), s.sample_id))
        kept: list[str] = []
        for s in passes:
            if text[s.sample_id] not in kept:
                kept.append(text[s.sample_id])
            if len(kept) == per_prompt:
                break
        if repair_types and len(kept) < per_prompt:
            failing = sorted((s for s in group if s.finished
                              and (s.verifier is None or s.verifier < 1.0)),
                             key=lambda s: (-(s.verifier or 0.0), -(s.llm or 0.0), s.sample_id))
            for s in failing:
                fixed = repaired(text[s.sample_id], cons[pid], repair_types, pairs_cfg,
                                 bounds.get(pid, ()))
                if fixed is None or fixed in kept:
                    continue
                kept.append(fixed)
                if len(kept) == per_prompt:
                    break
        rows += [{"prompt_id": pid, "text": t} for t in kept]
    return pd.DataFrame(rows, columns=["prompt_id", "text"])


def sft_examples(pairs: pd.DataFrame, extra: pd.DataFrame | None = None) -> pd.DataFrame:
    """The SFT step's examples: the pairs' verified passes (`verified_passes`) and `extra`
    (`sampled_passes`), each (prompt, answer) once, in a stable order."""
    examples = verified_passes(pairs)
    if extra is not None and len(extra):
        examples = pd.concat([examples, extra[["prompt_id", "text"]]], ignore_index=True)
    return examples.drop_duplicates().sort_values(["prompt_id", "text"]).reset_index(drop=True)


def sft_copies(cfg: TrainConfig) -> int:
    """How many phrasings of each prompt the SFT step shows: one per (started) epoch with
    `train.sft_rephrase`, else one."""
    return max(1, math.ceil(cfg.sft_epochs)) if cfg.sft_rephrase else 1


def rephrased_key(prompt_id: str, copy: int) -> str:
    """The prompt-text key of a prompt's `copy`-th rephrasing (copy 0: the prompt itself)."""
    return prompt_id if copy == 0 else f"{prompt_id}#{copy}"


def sft_rephrasings(prompts: pd.DataFrame, prompt_ids: set[str], copies: int
                    ) -> dict[str, str]:
    """For `train.sft_rephrase`: the texts of each prompt in `prompt_ids` with its
    instructions moved 1 .. copies-1 places along their types' training phrasings
    (`flywheel.constraints.rephrase`), under `rephrased_key`; prompts without constraints, or
    whose text does not end with their instructions, have none (the SFT step repeats them)."""
    from flywheel.constraints import rephrase, stored_constraints

    out = {}
    for p in prompts.drop_duplicates("prompt_id").itertuples():
        if p.prompt_id not in prompt_ids:
            continue
        for copy in range(1, copies):
            text = rephrase(p.text, stored_constraints(p.constraints), copy)
            if text is not None and text != p.text:
                out[rephrased_key(p.prompt_id, copy)] = text
    return out


def sft_dataset(examples: pd.DataFrame, prompt_text: dict[str, str], copies: int = 1):
    """A TRL conversational prompt-completion dataset (the loss is on the answer only): each
    example `copies` times, copy k with its prompt's k-th rephrasing where `prompt_text` has
    one (`sft_rephrasings`), else the prompt itself."""
    from datasets import Dataset

    def prompt(pid: str, copy: int) -> str:
        return prompt_text.get(rephrased_key(pid, copy), prompt_text[pid])

    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": prompt(e.prompt_id, copy)}],
         "completion": [{"role": "assistant", "content": e.text}]}
        for copy in range(copies) for e in examples.itertuples()
    ])


def _sft_kwargs(cfg: TrainConfig, work: Path, n_examples: int, seed: int,
                place: Placement) -> dict:
    """The SFTConfig arguments: DPO's settings, `train.sft_epochs` epochs, no checkpoints.
    With `train.sft_rephrase` the dataset holds `sft_copies` copies of each example (one per
    epoch, each in another phrasing): sft_epochs / copies passes over it, the same steps."""
    copies = sft_copies(cfg)
    epochs = cfg.sft_epochs / copies
    steps_per_epoch = math.ceil(n_examples * copies / (cfg.batch_size * cfg.grad_accum
                                                       * cfg.num_processes))
    return dict(
        output_dir=str(work / SFT_DIR), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, num_train_epochs=epochs,
        learning_rate=cfg.learning_rate,
        warmup_steps=int(cfg.warmup_ratio * steps_per_epoch * epochs),
        max_length=cfg.max_length, bf16=place.dtype == "bfloat16",
        fp16=place.dtype == "float16", gradient_checkpointing=cfg.gradient_checkpointing,
        use_cpu=place.device == "cpu", report_to="none", save_strategy="no",
        logging_steps=1, seed=seed, disable_tqdm=True, dataloader_num_workers=0,
        lr_scheduler_type="constant" if steps_per_epoch * epochs < 10 else "linear",
        **({"gradient_checkpointing_kwargs": {"use_reentrant": False}}
           if cfg.gradient_checkpointing else {}))


def _sft_step(model, tok, pairs: pd.DataFrame, prompt_text: dict[str, str], cfg: TrainConfig,
              work: Path, *, seed: int, place: Placement, peft_config, progress: bool, log,
              distributed: bool = False, extra: pd.DataFrame | None = None):
    """Rejection-sampling SFT before DPO: train `peft_config`'s LoRA adapter on the verified
    passes (`sft_examples`: the pairs' and `extra`) for `cfg.sft_epochs` epochs; return (the
    model, now a PEFT model with that adapter, or `model` unchanged when there is nothing to
    learn from, and the sft_* metrics). DPO then
    continues the same adapter; TRL keeps a frozen copy of it as the reference, so DPO's
    reference is the model after SFT (or the model at `train.reference: base`). `distributed`:
    one process of several (DDP), as in `_train`."""
    examples = sft_examples(pairs, extra)
    if examples.empty:
        log("train.sft_epochs: no pair's chosen answer passed every constraint of its "
            "prompt: no SFT step this round, DPO only")
        return model, {"sft_examples": 0, "sft_steps": 0, "sft_loss": None, STEPS_KEY: []}
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**_sft_kwargs(cfg, work, len(examples), seed, place))
    if not distributed:
        _pin_device(args, place)
    sft = SFTTrainer(model=model, args=args, processing_class=tok,
                     train_dataset=sft_dataset(examples, prompt_text, sft_copies(cfg)),
                     peft_config=peft_config)
    sft.remove_callback(PrinterCallback)
    sft.add_callback(_progress_callback(progress))
    sft.add_callback(_stop_callback())
    sft.train()
    m = _metrics(sft.state.log_history)
    shutil.rmtree(work / SFT_DIR, ignore_errors=True)
    return sft.model, {"sft_examples": len(examples), "sft_steps": m["steps"],
                       "sft_loss": m["train_loss"], "sft_first_loss": m["first_loss"],
                       "sft_last_loss": m["last_loss"],
                       STEPS_KEY: step_rows(sft.state.log_history, "sft")}


def _pin_device(args, place: Placement) -> None:
    """Train on `place`'s one GPU: the Trainer takes cuda:0 and, with several GPUs visible,
    wraps the model in DataParallel over all of them; pin its device (the device it moves the
    model and the batches to, and Accelerate's current device) and its GPU count to one."""
    import torch

    if place.cuda_index is None:
        return
    _ = args.device  # the Trainer's own choice, made once and cached
    args.__dict__["_setup_devices"] = torch.device("cuda", place.cuda_index)
    args._n_gpu = 1
    torch.cuda.set_device(place.cuda_index)


#: What to change when training runs out of memory (the FlywheelError's details).
OOM_ADVICE = (
    "train.batch_size: fewer pairs a step (raise train.grad_accum to keep the effective batch)",
    "train.max_length: shorter prompt + answer",
    "train.gradient_checkpointing: true (recompute activations instead of keeping them)",
    "models.dtype: bfloat16 (half the memory of float32 weights)",
    "models.vllm.during_training: stop (a sleeping vLLM server still holds some GPU memory)",
    "train.num_processes > 1 with train.distributed: fsdp (the model sharded over the GPUs)",
)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is torch's out-of-memory error (CUDA's, or a device's "out of memory")."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def out_of_memory_error(what: str, cfg: TrainConfig, dtype: str, where: str) -> FlywheelError:
    """The FlywheelError for an out-of-memory error in training: what ran out, the settings now
    and which to change."""
    first = what.strip().splitlines()[0] if what.strip() else "out of memory"
    return FlywheelError(
        f"training ran out of memory on {where}: {first}",
        details=[f"now: train.batch_size {cfg.batch_size}, train.grad_accum {cfg.grad_accum}, "
                 f"train.max_length {cfg.max_length}, train.gradient_checkpointing "
                 f"{str(cfg.gradient_checkpointing).lower()}, training dtype {dtype}, "
                 f"train.num_processes {cfg.num_processes}",
                 "change one or more of:", *OOM_ADVICE])


def train_lora(base_path: str, pairs: pd.DataFrame, prompt_text: dict[str, str],
               cfg: TrainConfig, out_dir: str | Path, *, seed: int, device: str = "cpu",
               dtype: str = "float32", progress: bool = True, ref_path: str | None = None,
               log=print, sft_extra: pd.DataFrame | None = None) -> dict:
    """Train a LoRA adapter with DPO on `pairs`, merge it, save to `out_dir`; return metrics.

    The reference policy is `base_path` with the adapter disabled, or the model at `ref_path`.
    `device` and `dtype` are `models.device` and `models.dtype` (see `training_placement`); the
    merged checkpoint is saved in `dtype`. Checkpoints go to `<out_dir>.work` every
    `cfg.checkpoint_steps` steps; a training killed midway resumes from the newest one when it
    is run again with the same inputs (the folder name carries the model's fingerprint).

    `cfg.num_processes > 1` runs the same training in that many processes under `accelerate
    launch` (see flywheel.stages.train_worker); the metrics then also name `num_processes`.
    The metrics' `train_steps` (STEPS_KEY) lists every logged step, SFT's then DPO's
    (`step_rows`): the pipeline stores them in the train_steps table. `sft_extra` (prompt_id,
    text): SFT examples beyond the pairs' verified passes (`sampled_passes`)."""
    if pairs.empty:
        raise FlywheelError("no pairs to train on")
    bad = cfg.problems()
    if bad:
        raise FlywheelError("invalid training settings:",
                            details=[f"{key}: {message}" for key, message in bad])
    place = training_placement(device, dtype)
    out = Path(out_dir)
    work = out.with_name(out.name + ".work")
    resume = last_checkpoint(work) if cfg.checkpoint_steps else None
    if resume is None:
        shutil.rmtree(work, ignore_errors=True)
    else:
        log(f"resuming training from {resume} (left by an interrupted run)")
    if cfg.num_processes > 1:
        from flywheel.stages.train_worker import launch_training

        return launch_training(base_path, pairs, prompt_text, cfg, out, resume=resume,
                               seed=seed, place=place, ref_path=ref_path, log=log,
                               sft_extra=sft_extra)
    try:
        return _train(base_path, pairs, prompt_text, cfg, out, resume=resume, seed=seed,
                      place=place, progress=progress, ref_path=ref_path, log=log,
                      sft_extra=sft_extra)
    except Exception as exc:
        if is_out_of_memory(exc):
            raise out_of_memory_error(str(exc), cfg, place.dtype, place.device) from None
        raise


def score_labelled_positions_only() -> bool:
    """TRL's fused LM head (its chunked log-probabilities, run by the SFT and DPO trainers)
    scores only the positions that carry a label on Triton devices, and every position
    elsewhere, to keep tile shapes fixed for compilers that would recompile on each new shape.
    Nothing is compiled on a CPU, where scoring every position means the LM head, in float32,
    over each prompt and its padding as well: a third of a step's time on the demo's 49k
    vocabulary. This makes TRL score the labelled positions on the CPU too (the same
    log-probabilities: each position's is computed alone). True when TRL has the switch this
    relies on (`trl.trainer.utils._use_triton`, TRL 1.16); otherwise it changes nothing."""
    import trl.trainer.utils as trl_utils

    decide = getattr(trl_utils, "_use_triton", None)
    if decide is None:
        return False
    if not getattr(decide, "flywheel_cpu_compact", False):
        def compact(device) -> bool:
            return device.type == "cpu" or decide(device)

        compact.flywheel_cpu_compact = True  # type: ignore[attr-defined]
        compact.original = decide  # type: ignore[attr-defined]
        trl_utils._use_triton = compact
    return True


def _train(base_path: str, pairs: pd.DataFrame, prompt_text: dict[str, str],
           cfg: TrainConfig, out: Path, *, resume: Path | None, seed: int, place: Placement,
           progress: bool, ref_path: str | None, distributed: bool = False,
           log=print, sft_extra: pd.DataFrame | None = None) -> dict | None:
    """Train, merge and save (`train_lora` without its checks). `distributed`: one process of
    several under `accelerate launch` (each on the GPU of its local rank, or the CPU): all
    train; the main process merges, saves and returns the metrics, the others return None
    once training has ended everywhere; `<out>.work` is left to the launching process.

    With `train.sft_epochs` the SFT step (`_sft_step`) runs first (in every process, with
    DDP); it keeps no checkpoints, so a resumed training redoes it (same seed, same adapter)
    before the DPO checkpoint's weights are loaded over it."""
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    score_labelled_positions_only()
    work = out.with_name(out.name + ".work")
    tok = AutoTokenizer.from_pretrained(base_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    weights = getattr(torch, place.dtype)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=weights)
    pinned = not distributed and place.cuda_index is not None
    previous_gpu = torch.cuda.current_device() if pinned else None
    args = DPOConfig(**_dpo_kwargs(cfg, work, len(pairs), seed, place))
    if not distributed:  # several processes: each takes the GPU of its local rank
        _pin_device(args, place)
    try:
        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                 lora_dropout=cfg.lora_dropout,
                                 target_modules=list(cfg.lora_targets), task_type="CAUSAL_LM")
        ref_model = (AutoModelForCausalLM.from_pretrained(ref_path, dtype=weights)
                     if ref_path else None)
        sft_metrics: dict = {}
        if cfg.sft_epochs > 0:
            model, sft_metrics = _sft_step(model, tok, pairs, prompt_text, cfg, work, seed=seed,
                                           place=place, peft_config=peft_config,
                                           progress=progress, log=log,
                                           distributed=distributed, extra=sft_extra)
        tuned = isinstance(model, PeftModel)  # after SFT: DPO continues its adapter
        trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, processing_class=tok,
                             train_dataset=preference_dataset(pairs, prompt_text),
                             peft_config=None if tuned else peft_config)
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # no log dicts on stdout: the bar shows loss
        trainer.add_callback(_progress_callback(progress))
        trainer.add_callback(_fault_callback())
        trainer.add_callback(_stop_callback())
        if distributed:
            from flywheel.stages.train_worker import announce

            announce(trainer)
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        sft_steps = sft_metrics.pop(STEPS_KEY, [])
        metrics = {**_metrics(trainer.state.log_history, resumed=resume is not None),
                   **sft_metrics,
                   STEPS_KEY: sft_steps + step_rows(trainer.state.log_history, "dpo")}
        if distributed:
            from flywheel.stages.train_worker import gather_policy

            if not gather_policy(trainer, base_path, weights):
                return None  # not the main process: it has nothing to save
            metrics["num_processes"] = trainer.accelerator.num_processes
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        from flywheel.adapters import save_adapter

        if "ref" in getattr(trainer.model, "peft_config", {}):  # TRL's frozen copy after SFT
            trainer.model.delete_adapter("ref")
        save_adapter(trainer.model, tmp, start=base_path)  # <model>/adapter/, with its lineage
        merged = trainer.model.merge_and_unload()  # the adapter folded into `dtype` weights
        merged.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        if not distributed:  # the launching process reads the metrics from it, then removes it
            shutil.rmtree(work, ignore_errors=True)
        return metrics
    finally:
        if previous_gpu is not None:  # free the GPU for the stages after training
            model = ref_model = trainer = merged = None
            torch.cuda.set_device(previous_gpu)
            torch.cuda.empty_cache()
