"""Training in several processes: `train.num_processes` > 1 runs the one-process training code
(`flywheel.stages.train._train`) in N processes under `accelerate launch`.

The launching side (`launch_training`, in flywheel's process) writes a spec into
`<out>.work/launch/` (the pairs as Parquet, the prompt texts, the settings) and runs

    python -m accelerate.commands.launch --multi_gpu|--use_fsdp --num_processes N --num_machines 1
        --mixed_precision no --dynamo_backend no --main_process_port PORT [--use_fsdp ...]
        -m flywheel.stages.train_worker <out>.work/launch/spec.json

in a process group of its own that dies with flywheel (a parent-death signal), its output in
`<out>.work/launch/train.log`. On CUDA each process trains on the GPU of its local rank (NCCL);
with `models.device: cpu` the processes train on the CPU over gloo. Every process trains; once
training has ended everywhere the main process merges the adapter, saves the model and writes
the metrics, which the launching side reads and returns. Checkpoints go to `<out>.work` as in
one process, so a killed training resumes from the newest complete one when run again (with
the same number of processes). Ctrl-C or SIGTERM stops the launcher's group and the training
processes (SIGTERM, then SIGKILL) and raises `Interrupted`, as one process does between steps.

`python -m flywheel.stages.train_worker SPEC` is the side that runs in each process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from flywheel.config import TrainConfig
from flywheel.errors import FlywheelError
from flywheel.stages.train import (  # noqa: F401  CODE_VERSION: the train stage's code, run apart
    CODE_VERSION,
    rephrased_key,
    sft_copies,
)

LAUNCH_DIR = "launch"
LOG_NAME = "train.log"
LOG_TAIL_LINES = 20
STOP_TIMEOUT = 15.0  # seconds the processes get to end after SIGTERM before SIGKILL


def launch_dir(out: Path) -> Path:
    """Where a multi-process training of `out` keeps its spec, log, metrics and errors."""
    return out.with_name(out.name + ".work") / LAUNCH_DIR


def launch_argv(spec: Path, cfg: TrainConfig, *, port: int,
                python: str = sys.executable) -> list[str]:
    """The `accelerate launch` command that runs `cfg.num_processes` training processes."""
    argv = [python, "-m", "accelerate.commands.launch",
            "--use_fsdp" if cfg.distributed == "fsdp" else "--multi_gpu",
            "--num_processes", str(cfg.num_processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port)]
    if cfg.distributed == "fsdp":
        # LoRA: frozen and trained weights share FSDP's flat parameters (use_orig_params);
        # one decoder layer a unit (the model's own _no_split_modules); full state dicts, so
        # that the main process can merge the adapter and checkpoints resume as with DDP
        argv += ["--fsdp_version", "1", "--fsdp_sharding_strategy", "FULL_SHARD",
                 "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                 "--fsdp_use_orig_params", "true", "--fsdp_state_dict_type", "FULL_STATE_DICT",
                 "--fsdp_sync_module_states", "true", "--fsdp_cpu_ram_efficient_loading", "false"]
    return argv + ["-m", "flywheel.stages.train_worker", str(spec)]


def _check_devices(cfg: TrainConfig, device: str) -> None:
    """N processes on CUDA need N GPUs, counted from cuda:0; FSDP needs GPUs."""
    if device == "cpu":
        if cfg.distributed == "fsdp":
            raise FlywheelError(
                "train.distributed fsdp needs GPUs (accelerate's FSDP does not run on the "
                "CPU), but models.device is cpu",
                details=["set train.distributed: ddp to train in CPU processes over gloo, or "
                         "models.device: cuda on a machine with GPUs"])
        return
    import torch

    count = torch.cuda.device_count()
    if device != "cuda:0":  # models.device cuda and auto are cuda:0 here
        raise FlywheelError(
            f"train.num_processes {cfg.num_processes} trains on GPUs cuda:0 to "
            f"cuda:{cfg.num_processes - 1}, but models.device is {device!r}",
            details=["set models.device: cuda and choose the GPUs with CUDA_VISIBLE_DEVICES"])
    if count < cfg.num_processes:
        raise FlywheelError(
            f"train.num_processes is {cfg.num_processes}, but torch sees {count} CUDA "
            f"device{'s' if count != 1 else ''} here (one process per GPU)",
            details=[f"set train.num_processes to {count} or fewer, or models.device: cpu "
                     "to train in CPU processes"])


def write_spec(folder: Path, base_path: str, pairs: pd.DataFrame, prompt_text: dict[str, str],
               cfg: TrainConfig, out: Path, *, resume: Path | None, seed: int, device: str,
               dtype: str, ref_path: str | None, sft_extra: pd.DataFrame | None = None) -> Path:
    """Write what the training processes need into `folder`; the spec file's path."""
    folder.mkdir(parents=True, exist_ok=True)
    # the rule and the chosen answer's score pick the SFT step's examples (train.sft_epochs)
    columns = ["prompt_id", "chosen_text", "rejected_text",
               *[c for c in ("rule", "chosen_score") if c in pairs]]
    rows = pairs[columns].reset_index(drop=True)
    rows.to_parquet(folder / "pairs.parquet", index=False)
    extra = (sft_extra if sft_extra is not None else pd.DataFrame(columns=["prompt_id", "text"]))
    extra = extra[["prompt_id", "text"]].reset_index(drop=True)
    extra.to_parquet(folder / "sft_extra.parquet", index=False)
    used = {}  # each prompt's text, with its SFT rephrasings (train.sft_rephrase)
    for p in dict.fromkeys([*rows.prompt_id, *extra.prompt_id]):
        for copy in range(sft_copies(cfg)):
            if rephrased_key(p, copy) in prompt_text:
                used[rephrased_key(p, copy)] = prompt_text[rephrased_key(p, copy)]
    (folder / "prompts.json").write_text(json.dumps(used))
    spec = {"base_path": str(base_path), "ref_path": ref_path, "out_dir": str(out),
            "resume": str(resume) if resume else None, "seed": seed, "device": device,
            "dtype": dtype, "train": dataclasses.asdict(cfg),
            "pairs": "pairs.parquet", "prompts": "prompts.json", "metrics": "metrics.json",
            "sft_extra": "sft_extra.parquet"}
    path = folder / "spec.json"
    path.write_text(json.dumps(spec, indent=1))
    return path


def launch_training(base_path: str, pairs: pd.DataFrame, prompt_text: dict[str, str],
                    cfg: TrainConfig, out: Path, *, resume: Path | None, seed: int, place,
                    ref_path: str | None, log=print,
                    sft_extra: pd.DataFrame | None = None) -> dict:
    """Train in `cfg.num_processes` processes under `accelerate launch`; the main process's
    metrics. `place` is the resolved `training_placement`; `resume` the checkpoint to resume
    from (None: `<out>.work` has been cleared). A failed launch is a FlywheelError with the
    log's last lines; Ctrl-C or SIGTERM stop the processes and raise `Interrupted`."""
    from flywheel import interrupt
    from flywheel.servers import free_port

    device = "cpu" if place.device == "cpu" else "cuda"
    _check_devices(cfg, place.device)
    folder = launch_dir(out)
    for stale in [folder / "metrics.json", *folder.glob("error-rank*.json")]:
        stale.unlink(missing_ok=True)
    spec = write_spec(folder, base_path, pairs, prompt_text, cfg, out, resume=resume,
                      seed=seed, device=device, dtype=place.dtype, ref_path=ref_path,
                      sft_extra=sft_extra)
    argv = launch_argv(spec, cfg, port=free_port())
    log_path = folder / LOG_NAME
    log(f"training in {cfg.num_processes} processes ({cfg.distributed}, "
        f"{'CPU over gloo' if device == 'cpu' else 'one GPU each'}); log: {log_path}")
    interrupt.check()
    launcher = Launcher(argv, log_path)
    launcher.start()
    try:
        while launcher.proc.poll() is None:
            interrupt.check()
            with contextlib.suppress(subprocess.TimeoutExpired):
                launcher.proc.wait(timeout=0.2)
    except BaseException:  # Interrupted (Ctrl-C, SIGTERM) or anything else: stop them all
        launcher.stop()
        raise
    launcher.stop()  # a training process the launcher left behind
    code = launcher.returncode
    errors = sorted(folder.glob("error-rank*.json"))
    if errors:  # a training process failed with a FlywheelError (out of memory, ...)
        first = json.loads(errors[0].read_text())
        raise FlywheelError(first["message"] + f"\n  log of the training processes: {log_path}")
    if code != 0:
        raise launcher.failure(f"the training processes failed (accelerate launch exited "
                               f"with code {code})",
                               "read the log above: it says why; training resumes from the "
                               "newest checkpoint when the run is started again")
    metrics_path = folder / "metrics.json"
    if not metrics_path.is_file() or not out.is_dir():
        raise launcher.failure("the training processes ended without saving the model",
                               "read the log above")
    metrics = json.loads(metrics_path.read_text())
    log(f"trained with world size {metrics.get('num_processes')}")
    import shutil

    shutil.rmtree(out.with_name(out.name + ".work"), ignore_errors=True)
    return metrics


class Launcher:
    """`accelerate launch` in a session (and process group) of its own that dies with the
    thread that started it, its output appended to `log_path`. The training processes it
    starts are each in a session of their own (torch's elastic agent puts them there) and die
    with it; `stop` ends them all: SIGTERM, up to STOP_TIMEOUT seconds, then SIGKILL."""

    def __init__(self, argv: list[str], log_path: Path):
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None  # also the process group's id
        self.returncode: int | None = None
        self._offset = 0

    @property
    def command(self) -> str:
        return shlex.join(self.argv)

    def start(self) -> None:
        from flywheel.servers import child_setup

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self._offset = out.tell()
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            out.write(f"--- {stamp} flywheel starts: {self.command}\n".encode())
            out.flush()
            try:
                self.proc = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
                    preexec_fn=child_setup())
            except OSError as exc:
                raise FlywheelError(f"cannot start the training processes: "
                                    f"{exc.strerror or exc}",
                                    details=[f"command: {self.command}"]) from None
            self.pid = self.proc.pid
            out.write(f"--- launcher process group {self.pid}\n".encode())

    def processes(self) -> list[int]:
        """The live processes of the launcher's group and every process descending from it
        (the training processes, in sessions of their own)."""
        from flywheel.servers import group_members

        if self.pid is None:
            return []
        return sorted(set(group_members(self.pid)) | set(descendants(self.pid)))

    def stop(self) -> None:
        """SIGTERM to the launcher's group and every training process, up to STOP_TIMEOUT
        seconds for them to end, then SIGKILL. Safe to call more than once."""
        proc = self.proc
        if proc is None:
            return
        try:
            alive = self.processes()
            if alive:
                _signal_all(self.pid, alive, signal.SIGTERM)
                deadline = time.monotonic() + STOP_TIMEOUT
                while time.monotonic() < deadline:
                    alive = [p for p in alive if _alive(p)] + [
                        p for p in self.processes() if p not in alive]
                    if not alive:
                        break
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=0.05)
        finally:  # also when a second Ctrl-C cuts the wait short
            left = self.processes()
            if left:
                _signal_all(self.pid, left, signal.SIGKILL)
            self.returncode = proc.wait()
            self.proc = None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> list[str]:
        """The last `lines` lines this launch wrote to the log; when a training process
        failed, the last lines before the launcher's own report of it (torch's summary of
        the failed ranks, which does not say why)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._offset)
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return []
        rows = text.splitlines()
        if any("ChildFailedError" in row for row in rows):
            starts = [i for i, row in enumerate(rows)
                      if row.startswith("Traceback (most recent call last)")]
            if starts and starts[-1] > 0:
                rows = rows[:starts[-1]]
        return rows[-lines:]

    def failure(self, what: str, fix: str) -> FlywheelError:
        tail = self.log_tail()
        shown = "\n".join(f"    {line}" for line in tail) or "    (nothing)"
        return FlywheelError(
            f"{what}\n  command: {self.command}\n  log: {self.log_path}\n"
            f"  last {len(tail)} lines of the log:\n{shown}\n  what to do: {fix}")


def _alive(pid: int) -> bool:
    """Whether `pid` runs (not a zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return not Path("/proc/self/stat").exists()
    return state not in "ZX"


def _signal_all(pgid: int, pids: list[int], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def descendants(pid: int) -> list[int]:
    """The live processes descending from `pid` (Linux: from /proc; elsewhere none)."""
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if len(fields) > 1 and fields[0] not in "ZX":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        out.append(child)
        todo += children.get(child, [])
    return out


# -- inside each training process -------------------------------------------------------------

def announce(trainer) -> None:
    """The main process says how many processes train and over which backend."""
    state = trainer.accelerator.state
    if state.is_main_process:
        import torch.distributed as dist

        backend = dist.get_backend() if dist.is_initialized() else "none"
        print(f"flywheel: training with world size {state.num_processes} ({backend}, "
              f"{state.distributed_type.value.lower()}, device {state.device}, mixed "
              f"precision {state.mixed_precision})", flush=True)


def gather_policy(trainer, base_path: str, weights) -> bool:
    """After training, in every process: wait until all have ended; with FSDP gather the
    adapter (all processes take part) and, in the main process, set `trainer.model` to the
    base model with the gathered adapter, ready to merge. Whether this is the main process."""
    accelerator = trainer.accelerator
    accelerator.wait_for_everyone()
    if trainer.is_fsdp_enabled:
        folder = Path(trainer.args.output_dir) / "gathered-adapter"
        trainer.save_model(str(folder))  # FULL_STATE_DICT: gathered, saved by the main one
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(base_path, dtype=weights)
            trainer.model = PeftModel.from_pretrained(base, str(folder))
    return accelerator.is_main_process


def _die_with_parent() -> None:
    """SIGKILL this process when the launcher that started it ends (Linux)."""
    if sys.platform != "linux":
        return
    import ctypes

    parent = os.getppid()
    with contextlib.suppress(OSError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent or parent == 1:
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    """Run one training process of a multi-process training from its spec file."""
    _die_with_parent()
    argv = list(sys.argv[1:] if argv is None else argv)
    spec_path = Path(argv[0])
    spec = json.loads(spec_path.read_text())
    folder = spec_path.parent
    rank = int(os.environ.get("RANK", "0"))
    from flywheel.stages.train import Placement, _train, is_out_of_memory, out_of_memory_error

    cfg = TrainConfig(**spec["train"])
    pairs = pd.read_parquet(folder / spec["pairs"])
    prompt_text = json.loads((folder / spec["prompts"]).read_text())
    place = Placement(spec["device"], spec["dtype"])
    try:
        try:
            metrics = _train(spec["base_path"], pairs, prompt_text, cfg, Path(spec["out_dir"]),
                             resume=Path(spec["resume"]) if spec["resume"] else None,
                             seed=spec["seed"], place=place, progress=False,
                             ref_path=spec["ref_path"], distributed=True,
                             sft_extra=pd.read_parquet(folder / spec["sft_extra"]))
        except Exception as exc:
            if is_out_of_memory(exc):
                where = "the CPU" if place.device == "cpu" else \
                    f"the GPU of process {rank} (cuda:{os.environ.get('LOCAL_RANK', rank)})"
                raise out_of_memory_error(str(exc), cfg, place.dtype, where) from None
            raise
    except FlywheelError as exc:
        (folder / f"error-rank{rank}.json").write_text(json.dumps({"message": str(exc)}))
        print(f"error (process {rank}): {exc}", file=sys.stderr, flush=True)
        return 1
    if metrics is not None:
        tmp = folder / "metrics.json.tmp"
        tmp.write_text(json.dumps(metrics))
        tmp.rename(folder / spec["metrics"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
