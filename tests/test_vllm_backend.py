"""The `vllm` backend: the managed `vllm serve`, its lifecycle (start, health wait, a round's
model change by restart, sleep/stop while training, stop however flywheel ends) and its
control calls.

vLLM cannot be installed on these CPU machines, so the server process here is the stand-in of
tests/vllm_standin (llama.cpp's real OpenAI-compatible server under vLLM's command line, with
vLLM's control endpoints recorded, not applied): every process, port, signal and HTTP call is
real; what sleep and adapters do to a GPU is not exercised here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flywheel.backends.vllm import VLLMBackend, vllm_argv, vllm_env, vllm_missing
from flywheel.config import VLLMConfig, load_config
from flywheel.errors import FlywheelError
from flywheel.servers import group_members

ROOT = Path(__file__).resolve().parents[1]
STANDIN = ROOT / "tests" / "vllm_standin"
BUNDLED = ROOT / "models" / "SmolLM2-135M-Instruct"
CONV = [[{"role": "user", "content": "Say hi."}]]


def _alive(pid: int) -> bool:
    return bool(group_members(pid))


def _wait_gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def standin(tmp_path, monkeypatch):
    """An interpreter whose `vllm` is the stand-in, the calls file, and two checkpoint
    folders (r0, model-r1-x) that are the bundled model (config, tokenizer, GGUF)."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("llama-cpp-python is not installed (CI=true: these tests must run)")
        pytest.skip("llama-cpp-python is not installed: run `make setup`")
    from flywheel.modelprep import bundled_gguf

    python = tmp_path / "bin" / "python"
    python.parent.mkdir()
    python.write_text(f"#!/bin/sh\nPYTHONPATH={STANDIN}${{PYTHONPATH:+:$PYTHONPATH}} "
                      f"exec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("VLLM_STANDIN_CALLS", str(calls))
    monkeypatch.setenv("VLLM_STANDIN_GGUF", str(bundled_gguf()))
    folders = []
    for name in ("r0", "model-r1-x"):
        folder = tmp_path / "models" / name
        folder.mkdir(parents=True)
        for f in BUNDLED.iterdir():
            if f.suffix != ".safetensors":
                (folder / f.name).symlink_to(f)
        (folder / "model.gguf").symlink_to(bundled_gguf())
        folders.append(str(folder))

    def read_calls() -> list[dict]:
        if not calls.exists():
            return []
        return [json.loads(line) for line in calls.read_text().splitlines()]

    return type("Standin", (), {"python": str(python), "calls": read_calls,
                                "models": folders, "tmp": tmp_path})


def _backend(standin, **settings) -> VLLMBackend:
    s = VLLMConfig(python=standin.python, startup_timeout=120, **settings)
    return VLLMBackend(settings=s, dtype="float32", progress=False,
                       log_path=standin.tmp / "ws" / ".flywheel" / "vllm-server.log",
                       log=lambda m: None)


# -- the command line --------------------------------------------------------------------------
def test_argv_and_env_follow_the_settings():
    s = VLLMConfig(python="/v/bin/python", tensor_parallel_size=4, gpu_memory_utilization=0.5,
                   max_model_len=8192, enable_prefix_caching=False, extra_args=["--seed", "3"],
                   during_training="sleep", max_lora_rank=32)
    argv = vllm_argv(s, python=s.python, model="/m/r1", name="r1", port=8123, dtype="bfloat16",
                     lora=True)
    assert argv[:5] == ["/v/bin/python", "-m", "vllm.entrypoints.cli.main", "serve", "/m/r1"]
    pairs = dict(zip(argv[5::1], argv[6::1]))
    assert pairs["--served-model-name"] == "r1" and pairs["--port"] == "8123"
    assert pairs["--host"] == "127.0.0.1" and pairs["--tensor-parallel-size"] == "4"
    assert pairs["--gpu-memory-utilization"] == "0.5" and pairs["--max-model-len"] == "8192"
    assert pairs["--dtype"] == "bfloat16" and pairs["--max-lora-rank"] == "32"
    assert "--no-enable-prefix-caching" in argv and "--enable-sleep-mode" in argv
    assert "--enable-lora" in argv and argv[-2:] == ["--seed", "3"]
    assert vllm_env(s, lora=True) == {"VLLM_SERVER_DEV_MODE": "1",
                                      "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    stop = VLLMConfig(during_training="stop")
    assert "--enable-sleep-mode" not in vllm_argv(stop, python="p", model="m", name="m",
                                                  port=1, dtype="float16")
    assert vllm_env(stop) == {}


def test_bad_vllm_settings_are_named():
    with pytest.raises(FlywheelError) as err:
        load_config(None, ["models.vllm.gpu_memory_utilization=1.5",
                           "models.vllm.max_lora_rank=24", "models.vllm.tensor_parallel_size=0"])
    text = str(err.value)
    assert "models.vllm.gpu_memory_utilization: must be in (0, 1], got 1.5" in text
    assert "models.vllm.max_lora_rank: must be one of 1, 8, 16, 32, 64" in text
    assert "models.vllm.tensor_parallel_size: must be > 0, got 0" in text


# -- without vLLM ------------------------------------------------------------------------------
def test_vllm_missing_says_how_to_install(tmp_path):
    gone = vllm_missing(str(tmp_path / "nope" / "python"))
    assert "does not exist" in gone and "make setup-vllm" in gone
    here = vllm_missing(sys.executable)  # this environment has no vLLM
    assert here.startswith(f"vLLM is not installed in {sys.executable}")
    assert "make setup-vllm" in here


def test_iterate_with_vllm_missing_exits_2_at_preflight_and_writes_nothing(tmp_path):
    ws = tmp_path / "ws"
    flywheel = Path(sys.executable).with_name("flywheel")
    done = subprocess.run(
        [str(flywheel), "iterate", "--rounds", "1", "--config", str(ROOT / "configs/tiny.yaml"),
         "--set", f"workspace={ws}", "--set", "models.backend=vllm",
         "--set", f"models.vllm.python={tmp_path / 'venv-vllm/bin/python'}"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done.stderr
    assert "models.backend is vllm, but models.vllm.python" in done.stderr
    assert "run `make setup-vllm`" in done.stderr
    assert not (ws / "flywheel.duckdb").exists()


# -- the managed server --------------------------------------------------------------------------
def test_start_generate_restart_on_a_new_round_and_stop(standin):
    backend = _backend(standin, during_training="keep")
    r0, r1 = standin.models
    out = backend.generate(r0, CONV, max_new_tokens=8)
    assert len(out) == 1 and out[0][0].completion_tokens > 0
    first = backend.server.pid
    assert _alive(first) and backend.served.name == "r0"
    assert backend.generate(r0, CONV, max_new_tokens=4)  # same model: same server
    assert backend.server.pid == first
    backend.generate(r1, CONV, max_new_tokens=4)  # the next round's model: a restart
    second = backend.server.pid
    assert second != first and not _alive(first) and _alive(second)
    assert backend.served.name == "model-r1-x" and backend.served.model == r1
    starts = [c for c in standin.calls() if c["event"] == "start"]
    assert [(c["model"], c["name"]) for c in starts] == [(r0, "r0"), (r1, "model-r1-x")]
    assert starts[0]["unknown"] == []  # every argument flywheel passes, vLLM's spelling
    assert len(backend.timings["start"]) == 2
    log = backend.log_path.read_text()
    assert log.count("flywheel starts:") == 2 and "vllm.entrypoints.cli.main serve" in log
    backend.close()
    assert _wait_gone(second, 5) and backend.server is None


def test_sleep_while_training_then_wake_before_the_next_request(standin):
    backend = _backend(standin, during_training="sleep")
    r0 = standin.models[0]
    backend.generate(r0, CONV, max_new_tokens=4)
    pid = backend.server.pid
    backend.release()  # training starts
    assert backend.sleeping and _alive(pid)
    with pytest.raises(FlywheelError, match="503"):  # asleep, it answers nothing
        backend._client(r0, "r0").generate("r0", CONV, max_new_tokens=2)
    out = backend.generate(r0, CONV, max_new_tokens=4)  # after training: woken first
    assert out[0][0].completion_tokens > 0 and backend.server.pid == pid
    events = [(c["event"], c.get("level")) for c in standin.calls() if c["event"] != "start"]
    assert events == [("sleep", 1), ("wake_up", None)]
    start = next(c for c in standin.calls() if c["event"] == "start")
    assert start["env"]["VLLM_SERVER_DEV_MODE"] == "1" and "--enable-sleep-mode" in start["argv"]
    assert len(backend.timings["sleep"]) == 1 and len(backend.timings["wake"]) == 1
    backend.close()
    assert _wait_gone(pid, 5)


def test_stop_while_training_then_restart(standin):
    backend = _backend(standin, during_training="stop")
    r0 = standin.models[0]
    backend.generate(r0, CONV, max_new_tokens=4)
    pid = backend.server.pid
    backend.release()
    assert backend.server is None and _wait_gone(pid, 5)
    backend.generate(r0, CONV, max_new_tokens=4)
    assert backend.server.pid != pid
    assert [c["event"] for c in standin.calls()] == ["start", "start"]
    backend.close()


def test_lora_mode_loads_each_rounds_adapter_under_its_own_name(standin, monkeypatch):
    from flywheel import adapters

    r0, r1 = standin.models
    adapter = standin.tmp / "adapter-r1"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    monkeypatch.setattr(adapters, "adapter_for_base",
                        lambda path, max_rank=None: (Path(r0), adapter, 16) if path == r1
                        else None, raising=False)
    backend = _backend(standin, policy_update="lora", during_training="keep", max_lora_rank=32)
    backend.generate(r0, CONV, max_new_tokens=4)  # the base: no adapter
    pid = backend.server.pid
    backend.generate(r1, CONV, max_new_tokens=4)  # round 1: its adapter on the same server
    backend.generate(r1, CONV, max_new_tokens=4)  # loaded once
    assert backend.server.pid == pid
    calls = standin.calls()
    assert [c["event"] for c in calls] == ["start", "load_lora_adapter"]
    assert calls[1]["lora_name"] == "model-r1-x" and calls[1]["lora_path"] == str(adapter)
    assert "--enable-lora" in calls[0]["argv"] and "32" in calls[0]["argv"]
    assert calls[0]["env"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    backend.close()


def test_a_failed_start_shows_the_log_and_out_of_memory_advice(standin, monkeypatch):
    monkeypatch.setenv("VLLM_STANDIN_FAIL", "torch.OutOfMemoryError: CUDA out of memory. "
                                            "Tried to allocate 2.00 GiB")
    backend = _backend(standin)
    with pytest.raises(FlywheelError) as err:
        backend.generate(standin.models[0], CONV, max_new_tokens=4)
    text = str(err.value)
    assert "the server exited with code 1" in text and "CUDA out of memory" in text
    assert "models.vllm.gpu_memory_utilization" in text
    assert "models.vllm.during_training: stop" in text
    assert backend.server is None


# -- flywheel ends: the server goes with it --------------------------------------------------
SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from flywheel.backends.vllm import VLLMBackend
    from flywheel.config import VLLMConfig
    b = VLLMBackend(settings=VLLMConfig(python=sys.argv[1], startup_timeout=120),
                    dtype="float32", progress=False, log_path=Path(sys.argv[3]),
                    log=lambda m: None)
    b.generate(sys.argv[2], [[{"role": "user", "content": "Hi"}]], max_new_tokens=2)
    print(b.server.pid, flush=True)
    how = sys.argv[4]
    if how == "success":
        b.close()
    elif how == "failure":
        raise RuntimeError("a stage failed")
    else:
        time.sleep(600)
""")


@pytest.mark.parametrize("how", ["success", "failure", "SIGINT", "SIGTERM", "SIGKILL"])
def test_no_server_outlives_its_process(standin, how):
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, standin.python, standin.models[0],
         str(standin.tmp / "server.log"), how], stdout=subprocess.PIPE, text=True,
        stdin=subprocess.DEVNULL, cwd=ROOT)
    pid = int(proc.stdout.readline())
    assert _alive(pid)
    if how.startswith("SIG"):
        proc.send_signal(getattr(signal, how))
    proc.wait(timeout=60)
    assert _wait_gone(pid, 30), f"server {pid} left behind after {how}"


def test_a_run_stops_its_server_when_it_fails_or_finishes(standin, tmp_path):
    from flywheel import pipeline

    cfg = load_config(ROOT / "configs/tiny.yaml",
                      [f"workspace={tmp_path / 'ws'}", "models.backend=vllm",
                       f"models.vllm.python={standin.python}", "progress=false"])
    pids = []
    with pytest.raises(RuntimeError, match="a stage failed"):
        with pipeline.running(cfg) as ctx:
            ctx.backend.generate(standin.models[0], CONV, max_new_tokens=2)
            pids.append(ctx.backend.server.pid)
            raise RuntimeError("a stage failed")
    with pipeline.running(cfg) as ctx:
        ctx.backend.generate(standin.models[0], CONV, max_new_tokens=2)
        pids.append(ctx.backend.server.pid)
    assert all(_wait_gone(p, 5) for p in pids)
    assert (tmp_path / "ws" / ".flywheel" / "vllm-server.log").read_text().count(
        "flywheel starts:") == 2


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_flywheel_iterate_leaves_no_server_behind(standin, tmp_path, sig):
    """`flywheel iterate` on the vllm backend, signalled while its server serves round 0's
    eval: the server (its pid from the stand-in's own record) is gone after flywheel."""
    flywheel = Path(sys.executable).with_name("flywheel")
    env = {**os.environ, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    proc = subprocess.Popen(
        [str(flywheel), "iterate", "--rounds", "1", "--config", str(ROOT / "configs/tiny.yaml"),
         "--set", f"workspace={tmp_path / 'ws'}", "--set", "models.backend=vllm",
         "--set", f"models.vllm.python={standin.python}"],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "flywheel.err", "w"))
    deadline = time.monotonic() + 240
    while not standin.calls() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    starts = standin.calls()
    assert starts, (tmp_path / "flywheel.err").read_text()[-3000:]
    server = starts[0]["pid"]
    time.sleep(2)
    assert _alive(server)
    proc.send_signal(getattr(signal, sig))
    code = proc.wait(timeout=120)
    assert code == {"SIGINT": 130, "SIGTERM": 143, "SIGKILL": -9}[sig]
    assert _wait_gone(server, 30), f"server {server} left behind after {sig} of flywheel"


@pytest.mark.slow
def test_a_round_on_the_vllm_backend(standin, tmp_path):
    """One round with every local role on the managed server: round 0's eval and the round's
    prompts, samples and judgments through it, the server asleep while training runs, and
    restarted on the round's merged checkpoint for its eval (restart mode)."""
    from flywheel.catalog import Catalog

    flywheel = Path(sys.executable).with_name("flywheel")
    ws = tmp_path / "ws"
    done = subprocess.run(
        [str(flywheel), "iterate", "--rounds", "1", "--config", str(ROOT / "configs/tiny.yaml"),
         "--set", f"workspace={ws}", "--set", "models.backend=vllm",
         "--set", f"models.vllm.python={standin.python}", "--set", "judge.verdict=logprobs",
         "--set", "sampling.n=3", "--set", "sampling.max_new_tokens=16",
         "--set", "eval.max_prompts=2"],
        cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    calls = standin.calls()
    events = [(c["event"], Path(c["model"]).name if c["event"] == "start" else c.get("level"))
              for c in calls]
    model = Catalog(ws / "flywheel.duckdb").df(
        "SELECT path FROM models WHERE version_id IN "
        "(SELECT version_id FROM versions WHERE kind = 'model' AND round = 1)")
    trained = Path(model.path[0]).name
    assert trained.startswith("model-r1-")
    # the base serves round 0's eval and the round's prompts, samples and judgments; asleep
    # while training; the trained model answers the eval; the base judges it (self-judging)
    base = "SmolLM2-135M-Instruct"
    assert events == [("start", base), ("sleep", 1), ("start", trained), ("start", base)]
    assert all(not _alive(c["pid"]) for c in calls if c["event"] == "start")
    assert "vllm: asleep while training" in done.stderr
