"""The `vllm` backend: the local roles' checkpoints served by a `vllm serve` process that
flywheel manages, and talked to through the `openai` backend.

    backend = VLLMBackend(settings=cfg.models.vllm, dtype="bfloat16", log_path=ws / "vllm.log")
    backend.generate("data/models/model-r1-abc", conversations, n=4)  # starts or switches
    backend.release()    # before training: sleep (level 1) or stop, by settings
    backend.generate(...)  # wakes it (or restarts it) first
    backend.close()      # stops it; also on failure, Ctrl-C and SIGTERM (flywheel's run),
                         # and on SIGKILL of flywheel (the server's parent-death signal)

vLLM pins versions of libraries Prefect needs, so it runs from an environment of its own
(`models.vllm.python`, made by `make setup-vllm`): `python -m vllm.entrypoints.cli.main serve`
is `vllm serve`. The server listens on a free loopback port, writes its log to the workspace
and runs in a process group of its own (see flywheel.servers.ManagedServer).

Each round's policy reaches the server by `settings.policy_update`:
- restart: the server is restarted on the round's merged checkpoint (served under the
  checkpoint folder's name, which carries the round and its fingerprint);
- lora: the server keeps the base loaded (`--enable-lora`) and loads the round's adapter,
  stacked relative to the base (flywheel.adapters), with `POST /v1/load_lora_adapter` under the
  checkpoint folder's name: a name of its own per round, since reloading a name can serve the
  old adapter's prefix-cache blocks. A checkpoint without an adapter lineage, or whose stacked
  rank exceeds `max_lora_rank`, is served by a restart.

While training runs, `release()` puts the server to sleep (`--enable-sleep-mode`,
`VLLM_SERVER_DEV_MODE=1`, `POST /sleep?level=1`: weights to CPU RAM, KV cache dropped) or
stops it, by `settings.during_training`; the next request wakes it (`POST /wake_up`).

Stdlib only at import time (the openai SDK and transformers load when first used).
"""

from __future__ import annotations

import atexit
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from flywheel.backends import Conversation, Generation, Overflow
from flywheel.errors import FlywheelError

INSTALL = "make setup-vllm"
#: What an out-of-memory failure of the server looks like in its log or answer.
_OOM = re.compile(r"out of memory|OutOfMemoryError|No available memory for the cache blocks|"
                  r"CUDA error: out of memory|insufficient memory", re.IGNORECASE)
OOM_ADVICE = ["lower models.vllm.gpu_memory_utilization (the share of the GPU vLLM takes)",
              "lower models.vllm.max_model_len (the KV cache it reserves per sequence)",
              "set models.vllm.during_training: stop (the server leaves the GPU to training "
              "entirely and restarts after)",
              "raise models.vllm.tensor_parallel_size to split the model over more GPUs"]


def vllm_missing(python: str, *, timeout: float = 120) -> str | None:
    """Why vLLM cannot run from the interpreter `python` (None when it can): the interpreter
    is missing, or it cannot find the `vllm` package."""
    path = Path(python)
    if not path.exists():
        return (f"models.vllm.python {python} does not exist: vLLM runs from an environment of "
                f"its own; run `{INSTALL}` on a machine with a GPU (it makes .venv-vllm), or "
                "set models.vllm.python to the interpreter of an environment that has vLLM")
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    try:
        done = subprocess.run([str(path), "-c", probe], capture_output=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"models.vllm.python {python} cannot be run: {exc}"
    if done.returncode != 0:
        return (f"vLLM is not installed in {python} (models.vllm.python): run `{INSTALL}` on "
                "a machine with a GPU, or point models.vllm.python at an environment that has "
                "vLLM")
    return None


def vllm_argv(settings, *, python: str, model: str, name: str, port: int, dtype: str,
              lora: bool = False) -> list[str]:
    """The `vllm serve` command for `model` served as `name` on 127.0.0.1:`port`."""
    argv = [python, "-m", "vllm.entrypoints.cli.main", "serve", str(model),
            "--served-model-name", name, "--host", "127.0.0.1", "--port", str(int(port)),
            "--tensor-parallel-size", str(settings.tensor_parallel_size),
            "--gpu-memory-utilization", str(settings.gpu_memory_utilization),
            "--max-model-len", str(settings.max_model_len), "--dtype", dtype,
            "--enable-prefix-caching" if settings.enable_prefix_caching
            else "--no-enable-prefix-caching"]
    if settings.during_training == "sleep":
        argv.append("--enable-sleep-mode")
    if lora:
        argv += ["--enable-lora", "--max-lora-rank", str(settings.max_lora_rank)]
    return argv + [str(a) for a in settings.extra_args]


def vllm_env(settings, *, lora: bool = False) -> dict[str, str]:
    """The environment the server's control endpoints need: /sleep and /wake_up are served in
    dev mode only; runtime adapter loading needs its own switch."""
    env = {}
    if settings.during_training == "sleep":
        env["VLLM_SERVER_DEV_MODE"] = "1"
    if lora:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    return env


@dataclass
class Served:
    """What the server serves now: the checkpoint it was started on, under which name, and the
    adapters loaded on it (name -> adapter folder)."""

    model: str
    name: str
    lora: bool
    adapters: dict[str, str] = field(default_factory=dict)


class VLLMBackend:
    """The `Backend` protocol (with verdict probabilities and token counting) over a managed
    `vllm serve` (see the module docstring)."""

    def __init__(self, *, settings, device: str = "cuda", dtype: str = "bfloat16",
                 batch_size: int = 16, progress: bool = True, log_path: str | Path = "vllm.log",
                 log=lambda message: print(message, file=sys.stderr, flush=True)):
        self.settings = settings
        self.device = device  # vLLM places itself; kept for messages
        self.dtype = dtype if settings.dtype == "auto" else settings.dtype
        self.progress = progress
        self.log_path = Path(log_path)
        self.log = log
        self.server = None  # flywheel.servers.ManagedServer
        self.served: Served | None = None
        self.sleeping = False
        self.timings: dict[str, list[float]] = {"start": [], "sleep": [], "wake": [],
                                                "load_adapter": []}
        self._clients: dict[str, object] = {}  # served name -> OpenAIBackend
        atexit.register(self.close)  # a script that never closes it still stops the server

    # -- the server's lifecycle ----------------------------------------------------------------
    def _start(self, model: str, name: str, lora: bool) -> None:
        from flywheel.servers import ManagedServer, free_port

        self.close()
        port = free_port()
        argv = vllm_argv(self.settings, python=self.settings.python, model=model, name=name,
                         port=port, dtype=self.dtype, lora=lora)
        server = ManagedServer(argv, port=port, health_path="/health", log_path=self.log_path,
                               env=vllm_env(self.settings, lora=lora),
                               startup_timeout=self.settings.startup_timeout, stop_timeout=30)
        began = time.monotonic()
        try:
            server.start()
        except FlywheelError as exc:
            raise self._with_oom_advice(exc, "\n".join(server.log_tail(200))) from None
        self.timings["start"].append(time.monotonic() - began)
        self.server, self.served, self.sleeping = server, Served(model, name, lora), False
        self._clients.clear()
        self.log(f"vllm: serving {model} as {name!r} at {server.base_url} (pid {server.pid}, "
                 f"started in {self.timings['start'][-1]:.1f} s; log {self.log_path})")

    def _with_oom_advice(self, exc: FlywheelError, text: str) -> FlywheelError:
        if not _OOM.search(text):
            return exc
        return FlywheelError(f"{exc}\n  the server ran out of GPU memory; what to change:",
                             details=OOM_ADVICE)

    def _post(self, path: str, body: dict | None = None, *, timeout: float = 300) -> str:
        """POST to the server's control endpoint `path`; the answer's text, or a FlywheelError
        naming the endpoint, the status and what the server said."""
        data = json.dumps(body).encode() if body is not None else b""
        request = urllib.request.Request(self.server.url + path, data=data, method="POST",
                                         headers={"Content-Type": "application/json"})
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with direct.open(request, timeout=timeout) as response:
                return response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            said = exc.read().decode("utf-8", "replace")[:2000]
            fix = {404: "this server does not serve it: sleep needs --enable-sleep-mode and "
                        "VLLM_SERVER_DEV_MODE=1, adapters --enable-lora and "
                        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (flywheel sets them; check "
                        "models.vllm.extra_args and the vLLM version)"}.get(exc.code, "")
            error = FlywheelError(f"vllm: POST {path} answered {exc.code}: {said}",
                                  details=[f"server log: {self.log_path}", *([fix] if fix
                                                                             else [])])
            raise self._with_oom_advice(error, said) from None
        except OSError as exc:
            raise FlywheelError(f"vllm: POST {path} failed: {exc}",
                                details=[f"server log: {self.log_path}"]) from None

    def sleep(self) -> None:
        """Level 1 sleep: the weights go to CPU RAM, the KV cache is dropped."""
        if self.server is None or self.sleeping:
            return
        began = time.monotonic()
        self._post("/sleep?level=1")
        self.timings["sleep"].append(time.monotonic() - began)
        self.sleeping = True

    def wake_up(self) -> None:
        if self.server is None or not self.sleeping:
            return
        began = time.monotonic()
        self._post("/wake_up")
        self.timings["wake"].append(time.monotonic() - began)
        self.sleeping = False

    def release(self) -> None:
        """Before training: sleep, stop or keep the server, by `during_training`."""
        if self.server is None:
            return
        mode = self.settings.during_training
        if mode == "sleep":
            self.sleep()
            self.log(f"vllm: asleep while training ({self.timings['sleep'][-1]:.2f} s)")
        elif mode == "stop":
            self.close()
            self.log("vllm: stopped while training")

    def close(self) -> None:
        """Stop the server (safe to call more than once)."""
        server, self.server, self.served = self.server, None, None
        self.sleeping = False
        self._clients.clear()
        if server is not None:
            server.stop()

    # -- which name serves a checkpoint --------------------------------------------------------
    def _name(self, model: str) -> str:
        """The served name of checkpoint `model` (bringing the server to serve it)."""
        path = str(model)
        if self.settings.policy_update == "lora":
            name = self._via_adapter(path)
            if name is not None:
                return name
        served = self.served
        if served is None or Path(served.model).resolve() != Path(path).resolve():
            self._start(path, Path(path).name, lora=self.settings.policy_update == "lora")
        self.wake_up()
        return self.served.name

    def _via_adapter(self, path: str) -> str | None:
        from flywheel import adapters

        try:
            found = adapters.adapter_for_base(path, max_rank=self.settings.max_lora_rank)
        except FlywheelError as exc:
            self.log(f"vllm: {str(exc).splitlines()[0]}: serving {path} by a restart")
            return None
        if found is None:
            return None
        base, folder, rank = found
        if (self.served is None or not self.served.lora
                or Path(self.served.model).resolve() != Path(base).resolve()):
            self._start(str(base), Path(base).name, lora=True)
        self.wake_up()
        name = Path(path).name
        if name not in self.served.adapters:
            began = time.monotonic()
            self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(folder)})
            self.timings["load_adapter"].append(time.monotonic() - began)
            self.served.adapters[name] = str(folder)
            self.log(f"vllm: adapter {name!r} (rank {rank}) loaded on {Path(base).name}")
        return name

    def _client(self, model: str, name: str):
        """The openai backend talking to the server, for checkpoint `model` served as `name`
        (its tokenizer writes /v1/completions prompts for forced verdicts)."""
        if name not in self._clients:
            from flywheel.backends.openai import Endpoint, OpenAIBackend

            endpoint = Endpoint(role="vllm", base_url=self.server.base_url, model=name,
                                concurrency=self.settings.concurrency, timeout=600.0,
                                retries=2, tokenizer=str(model))
            self._clients[name] = OpenAIBackend(endpoint, progress=self.progress)
        return self._clients[name]

    # -- the Backend protocol ------------------------------------------------------------------
    def generate(self, model: str, conversations: list[Conversation], *, n: int = 1,
                 temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 64,
                 seed: int = 0, desc: str = "generate") -> list[list[Generation]]:
        if not conversations:
            return []
        name = self._name(model)
        return self._client(model, name).generate(
            name, conversations, n=n, temperature=temperature, top_p=top_p,
            max_new_tokens=max_new_tokens, seed=seed, desc=desc)

    def rationale_then_probs(self, model: str, conversations: list[Conversation], *,
                             forced_prefix: str, candidates: list[str], max_new_tokens: int,
                             temperature: float = 0.0, seed: int = 0, stop=None,
                             desc: str = "judge") -> list[tuple[str, str, dict[str, float]]]:
        if not conversations:
            return []
        name = self._name(model)
        return self._client(model, name).rationale_then_probs(
            name, conversations, forced_prefix=forced_prefix, candidates=candidates,
            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, stop=stop,
            desc=desc)

    def overflows(self, model: str, conversations: list[Conversation], *, max_new_tokens: int,
                  forced_prefix: str = "") -> list[Overflow | None]:
        """Counted with the checkpoint's tokenizer against the smaller of its context and
        models.vllm.max_model_len (nothing is sent)."""
        if not conversations:
            return []
        from flywheel.limits import counter

        tok = counter(str(model)).tokenizer
        context = self.settings.max_model_len
        try:
            config = json.loads((Path(model) / "config.json").read_text())
            context = min(context, int(config.get("max_position_embeddings") or context))
        except (OSError, ValueError):
            pass
        reserved = max_new_tokens + len(tok.encode(forced_prefix, add_special_tokens=False))
        texts = tok.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)
        lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
        return [Overflow(n, context, reserved) if n + reserved > context else None
                for n in lengths]
