"""Rounds with the judge and the prompt generator behind a real OpenAI-compatible server
(llama.cpp's, serving the bundled SmolLM2 GGUF with an API key), through a fault-injecting
proxy that counts what reaches the server: what judgments record, that the key is written
nowhere, preflight errors, faults retried or failed cleanly, and resuming from the request
cache after a failure or a SIGKILL without sending an answered request again."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import duckdb
import pytest

from tests import crashkit
from tests.conftest import BUNDLED, run_cli
from tests.faultproxy import FaultProxy

KEY_VAR = "FLYWHEEL_TEST_ENDPOINT_KEY"


@pytest.fixture()
def proxy(llama_server):
    with FaultProxy(llama_server.url, timeout_s=12) as p:
        yield p


def served(role: str, url: str, *extra: str, model: str = "smollm2",
           timeout: int = 60) -> list[str]:
    return ["--set", f"models.{role}.backend=openai", "--set", f"models.{role}.base_url={url}",
            "--set", f"models.{role}.model={model}",
            "--set", f"models.{role}.api_key_env={KEY_VAR}",
            "--set", f"models.{role}.concurrency=2", "--set", f"models.{role}.timeout={timeout}",
            *extra]


def judge_args(tiny_model: Path, ws: Path, url: str, *extra: str, retries: int = 3,
               generator: bool = False, rounds: int = 1, timeout: int = 60) -> list[str]:
    args = crashkit.iterate_args(tiny_model, ws, rounds=rounds) + served(
        "judge", url, "--set", f"models.judge.tokenizer={BUNDLED}",
        "--set", f"models.judge.retries={retries}", timeout=timeout)
    if generator:
        args += served("generator", url, "--set", f"models.generator.retries={retries}")
    # a small round: 3 prompts x 2 candidates judged, 3 eval prompts
    small = ["--set", "sampling.prompts_per_round=3", "--set", "eval.max_prompts=3"]
    return args + small + list(extra)


def env(key: str) -> dict:
    return {KEY_VAR: key}


def cached(ws: Path) -> int:
    from flywheel.backends.cache import RequestCache

    path = ws / ".flywheel" / "requests.sqlite3"
    return RequestCache(path).stats()[0] if path.exists() else 0


def kinds(ws: Path) -> list[str]:
    con = duckdb.connect(str(ws / "flywheel.duckdb"), read_only=True)
    try:
        rows = con.execute("SELECT kind FROM versions ORDER BY created_at").fetchall()
        return [k for (k,) in rows]
    finally:
        con.close()


def test_a_round_judged_and_generated_through_the_endpoint(tiny_model, tmp_path, llama_server,
                                                           proxy):
    ws = tmp_path / "ws"
    url = proxy.url + "/v1"
    proc = run_cli(*judge_args(tiny_model, ws, url, generator=True),
                   env=env(llama_server.api_key))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proxy.posts > 0 and proxy.faults == []
    con = duckdb.connect(str(ws / "flywheel.duckdb"), read_only=True)
    llm = con.execute("SELECT DISTINCT judge, judge_path, judge_hash, template_hash IS NOT NULL "
                      "FROM judgments WHERE type <> 'verifier'").fetchall()
    assert len(llm) == 1
    judge, where, identity, has_template = llm[0]
    assert (judge, where, has_template) == ("endpoint:smollm2", url, True)
    assert len(identity) == 16
    params = dict(con.execute("SELECT kind, params FROM versions WHERE round = 1 "
                              "AND kind IN ('prompts', 'judgments')").fetchall())
    assert '"generator": "endpoint:smollm2"' in params["prompts"]
    assert f'"identity": "{identity}"' in params["judgments"]
    assert url not in params["judgments"]  # the fingerprint holds no host or port
    n_method = con.execute("SELECT count(*) FROM judgments WHERE type <> 'verifier' "
                           "AND method = 'logprobs' AND parsed").fetchone()[0]
    assert n_method > 0
    con.close()
    # the key is written nowhere and printed nowhere
    key = llama_server.api_key.encode()
    for path in ws.rglob("*"):
        if path.is_file():
            assert key not in path.read_bytes(), path
    assert llama_server.api_key not in proc.stdout + proc.stderr
    # nor on any command line on the machine (the server reads it from its environment)
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            assert key not in cmdline.read_bytes(), cmdline
        except OSError:
            continue
    # a second run reuses every version and sends the server nothing
    proxy.reset()
    again = run_cli(*judge_args(tiny_model, ws, url, generator=True),
                    env=env(llama_server.api_key))
    assert again.returncode == 0, again.stderr[-3000:]
    assert " made " not in again.stderr
    assert proxy.posts == 0, proxy.counts


@pytest.mark.parametrize("case", ["unreachable", "not-served", "bad-key", "no-logprobs"])
def test_preflight_refuses_an_endpoint_that_cannot_serve(case, tiny_model, tmp_path,
                                                         llama_server, proxy):
    from flywheel.servers import free_port

    ws = tmp_path / "ws"
    url, model, key = proxy.url + "/v1", "smollm2", llama_server.api_key
    if case == "unreachable":
        url = f"http://127.0.0.1:{free_port()}/v1"
    elif case == "not-served":
        model = "llama-70b"
    elif case == "bad-key":
        key = "wrong-key-0123456789"
    else:
        proxy.strip_logprobs = True
    args = crashkit.iterate_args(tiny_model, ws) + served("judge", url, model=model)
    proc = run_cli(*args, "--set", "models.judge.retries=0", env=env(key))
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr
    assert "cannot start: nothing was written" in err and "models.judge" in err
    expected = {"unreachable": url, "not-served": "smollm2", "bad-key": KEY_VAR,
                "no-logprobs": "log-probabilities"}[case]
    assert expected in err, err
    assert key not in err + proc.stdout
    assert not ws.exists() or not any(ws.iterdir())


def test_faults_are_retried_and_the_round_completes(tiny_model, tmp_path, llama_server, proxy):
    ws = tmp_path / "ws"
    proxy.inject("429", "500", "503", "timeout", "drop", "truncate")
    proc = run_cli(*judge_args(tiny_model, ws, proxy.url + "/v1", retries=6, timeout=10),
                   env=env(llama_server.api_key))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proxy.faults == ["429", "500", "503", "timeout", "drop", "truncate"]
    assert proxy.posts == proxy.forwarded + 6
    assert {"judgments", "gate"} <= set(kinds(ws))


def test_past_the_retry_budget_nothing_partial_is_committed_and_the_rerun_resumes(
        tiny_model, tmp_path, llama_server, proxy):
    ws = tmp_path / "ws"
    url = proxy.url + "/v1"
    proxy.fail_always("503", after=4)  # the preflight probe and 3 judge requests pass
    failed = run_cli(*judge_args(tiny_model, ws, url, retries=1), env=env(llama_server.api_key))
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "judge" in failed.stderr and url in failed.stderr and "503" in failed.stderr
    assert "judgments" not in kinds(ws)
    assert crashkit.problems(ws) == []
    answered = cached(ws)
    assert answered >= 3
    proxy.clear()
    proxy.reset()
    rerun = run_cli(*judge_args(tiny_model, ws, url), env=env(llama_server.api_key))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "judgments" in kinds(ws)
    # every request the rerun sent was one not answered before
    assert proxy.posts == cached(ws) - answered


def test_a_run_killed_mid_judging_resumes_sending_only_unanswered_requests(
        tiny_model, tmp_path, llama_server, proxy, monkeypatch):
    ws = tmp_path / "ws"
    url = proxy.url + "/v1"
    args = judge_args(tiny_model, ws, url)
    monkeypatch.setenv(KEY_VAR, llama_server.api_key)  # the child inherits it
    child, out = crashkit.start(args)
    deadline = time.monotonic() + 300
    while cached(ws) < 4 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGKILL)
    killed = crashkit.finish(child, out)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    answered = cached(ws)
    assert answered >= 4
    assert "judgments" not in kinds(ws) and crashkit.problems(ws) == []
    proxy.reset()
    rerun = run_cli(*args, env=env(llama_server.api_key))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert proxy.posts == cached(ws) - answered
