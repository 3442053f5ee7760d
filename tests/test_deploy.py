"""`flywheel deploy`: a real `prefect server start`, a served deployment whose scheduled runs
add rounds to one workspace (round 1, then round 2), and a work-pool deployment run by a real
`prefect worker start --run-once`; plus unit tests (no server) for path pinning and the
errors given before anything is deployed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from flywheel.cli_deploy import PROJECT_ROOT, pin_paths
from flywheel.config import Config, config_from_dict
from tests.conftest import ROOT, run_cli

FLOW = "flywheel-iterate"


def _config_args(tiny_model, ws):
    """configs/tiny.yaml with the same overrides as tests/test_integration.py; the seed and
    eval files by absolute path (the deploy commands run from a temp directory)."""
    return ["--config", str(ROOT / "configs" / "tiny.yaml"),
            "--set", f"models.policy={tiny_model}", "--set", f"workspace={ws}",
            "--set", f"prompts.seed_file={ROOT / 'data' / 'seed_prompts.jsonl'}",
            "--set", f"eval.prompts_file={ROOT / 'data' / 'eval_prompts.jsonl'}",
            "--set", f"judge.canary_file={ROOT / 'data' / 'canary.jsonl'}",
            "--set", "judge.verdict=logprobs", "--set", "pairs.min_margin=0",
            "--set", "pairs.require_agreement=false"]


# -- unit tests: no server ---------------------------------------------------------------------
def _tree(tmp_path):
    root, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    for d in (root / "data", elsewhere / "data", elsewhere / "model", root / "model"):
        d.mkdir(parents=True)
    return root, elsewhere


def test_pin_paths_from_another_directory_makes_relative_paths_absolute(tmp_path):
    root, elsewhere = _tree(tmp_path)
    cfg = Config().to_dict()
    cfg["workspace"] = "ws"
    cfg["models"]["policy"]["path"] = "model"
    cfg["models"]["judge"]["path"] = "org/hub-model"  # not a local path: left alone
    cfg["eval"]["prompts_file"] = str(tmp_path / "abs.jsonl")
    pinned, changes = pin_paths(cfg, cwd=elsewhere, root=root)
    assert pinned["workspace"] == str(elsewhere / "ws")
    assert pinned["models"]["policy"]["path"] == str(elsewhere / "model")
    assert pinned["prompts"]["seed_file"] == str(elsewhere / "data" / "seed_prompts.jsonl")
    assert pinned["models"]["judge"]["path"] == "org/hub-model"
    assert pinned["models"]["generator"]["path"] == "" and pinned["catalog"] == ""
    assert pinned["eval"]["prompts_file"] == str(tmp_path / "abs.jsonl")
    # templates are names inside the package's prompts/ folder, not paths
    assert pinned["judge"]["pointwise_template"] == cfg["judge"]["pointwise_template"]
    assert pinned["prompts"]["template"] == cfg["prompts"]["template"]
    assert pinned["judge"]["canary_file"] == str(elsewhere / "data" / "canary.jsonl")
    assert pinned["report"]["dir"] == ""  # empty: <workspace>/report, follows the workspace
    assert sorted(c.split(":")[0] for c in changes) == [
        "judge.canary_file", "models.policy.path", "prompts.seed_file", "workspace"]
    assert cfg["workspace"] == "ws"  # the input is not modified
    config_from_dict(pinned)  # still a valid config


def test_pin_paths_keeps_paths_that_mean_the_same_from_the_project_root(tmp_path):
    """Paths are part of stage fingerprints: a run from the project root with the default
    relative paths and a deployed run must record the same strings to share the rounds."""
    root, _ = _tree(tmp_path)
    cfg = Config().to_dict()
    cfg["models"]["policy"]["path"] = "model"
    cfg["catalog"] = "~/flywheel-test.duckdb"
    pinned, changes = pin_paths(cfg, cwd=root, root=root)
    assert pinned["workspace"] == "data"
    assert pinned["prompts"]["seed_file"] == "data/seed_prompts.jsonl"
    assert pinned["judge"]["canary_file"] == "data/canary.jsonl"
    assert pinned["models"]["policy"]["path"] == "model"
    assert pinned["catalog"] == str(Path("~/flywheel-test.duckdb").expanduser())
    assert changes == [f"catalog: ~/flywheel-test.duckdb -> {pinned['catalog']}"]


def test_deploy_help_has_examples_and_does_not_import_prefect():
    code = ("import sys, contextlib, io\n"
            "from flywheel.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try: main(['deploy', '--help'])\n"
            "    except SystemExit: pass\n"
            "print('prefect' in sys.modules, 'example' in out.getvalue(),\n"
            "      'prefect worker start --pool' in out.getvalue())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert out.split() == ["False", "True", "True"]


def test_project_root_holds_the_flow():
    assert (PROJECT_ROOT / "flows" / "iterate.py").is_file()


@pytest.fixture
def fake_model(tiny_model) -> Path:
    """A checkpoint preflight accepts (the tiny random Llama): deploy checks it before the
    server."""
    return tiny_model


def _deploy_cli(tmp_path, *args, api_url=""):
    return run_cli("deploy", *args, timeout=120, env={
        "PREFECT_API_URL": api_url, "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})


def test_deploy_without_prefect_api_url_says_how_to_start_a_server(tmp_path, fake_model):
    proc = _deploy_cli(tmp_path, "--cron", "0 2 * * *", "--set", f"models.policy={fake_model}")
    assert proc.returncode == 2, proc.stderr
    assert "PREFECT_API_URL is not set" in proc.stderr
    assert "prefect server start" in proc.stderr
    assert "prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api" in proc.stderr


def test_deploy_checks_config_and_schedule_before_the_server(tmp_path, fake_model):
    proc = _deploy_cli(tmp_path, "--cron", "0 2 * * *", "--set", "models.policy=/nope")
    assert proc.returncode == 2 and "cannot start" in proc.stderr and "/nope" in proc.stderr
    proc = _deploy_cli(tmp_path, "--cron", "61 2 * * *", "--set", f"models.policy={fake_model}")
    assert proc.returncode == 2 and "not a valid cron expression" in proc.stderr
    proc = _deploy_cli(tmp_path, "--interval", "60", "--set", f"models.policy={fake_model}",
                       api_url=f"http://127.0.0.1:{_free_port()}/api")
    assert proc.returncode == 2 and "no Prefect server answers" in proc.stderr


# -- a real Prefect server ---------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM the process group (its own session), then SIGKILL what is left."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on a free port with its own PREFECT_HOME; yields (api url,
    env for the processes that talk to it)."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": api, "PYTHONUNBUFFERED": "1"}
    log = open(home / "server.log", "w")  # noqa: SIM115 (closed at teardown)
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start",
                             "--host", "127.0.0.1", "--port", str(port)],
                            env={**env, "PREFECT_API_URL": ""}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        import httpx

        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail("prefect server did not start:\n"
                            + (home / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        yield api, env
    finally:
        _stop(proc)
        log.close()


def _api(method: str, url: str, **kw):
    """A call to the Prefect server's API. A 503 (the server's database busy with a run's
    writes, as on a loaded 2-core machine) is asked again, up to 10 times over about 20 s:
    the tests are about what flywheel deploys, not the server's availability."""
    import httpx

    for attempt in range(10):
        r = httpx.request(method, url, timeout=30, **kw)
        if r.status_code != 503:
            break
        time.sleep(0.5 * (attempt + 1) if attempt < 5 else 3.0)
    r.raise_for_status()
    return r.json() if r.content else None


def _deployment(api: str, name: str) -> dict:
    return _api("GET", f"{api}/deployments/name/{FLOW}/{name}")


def _runs(api: str, deployment_id: str) -> list[dict]:
    return _api("POST", f"{api}/flow_runs/filter", json={
        "flow_runs": {"deployment_id": {"any_": [deployment_id]}},
        "sort": "EXPECTED_START_TIME_ASC"})


def _wait(what: str, check, timeout: float, proc: subprocess.Popen | None = None,
          log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(1)
    tail = log.read_text()[-4000:] if log and log.exists() else ""
    pytest.fail(f"timed out waiting for {what}\n{tail}")


def _state(run: dict) -> str:
    return (run.get("state") or {}).get("type", "")


def _gates(ws: Path) -> list[int]:
    with duckdb.connect(str(ws / "flywheel.duckdb"), read_only=True) as con:
        return [r for (r,) in con.execute(
            "SELECT round FROM versions WHERE kind = 'gate' ORDER BY round").fetchall()]


@pytest.mark.slow
def test_served_schedule_continues_the_workspace(prefect_server, tiny_model, tmp_path):
    """`flywheel deploy --interval 20` from another directory: the schedule's first run makes
    round 1, the next one round 2 (round 1 reused), both in the one workspace."""
    api, env = prefect_server
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        serve = subprocess.Popen(
            [sys.executable, "-m", "flywheel.cli", "deploy", "--interval", "20", "--rounds", "1",
             "--name", "test-serve", *_config_args(tiny_model, "ws")],
            cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        dep = _wait("the deployment", lambda: _find(api, "test-serve"), 60, serve, log)
        params = dep["parameters"]
        assert params["rounds"] == 1 and params["continue_rounds"] is True
        assert params["config"]["workspace"] == str(cwd / "ws")  # pinned, not "ws"
        assert params["config"]["models"]["policy"]["path"] == str(tiny_model)
        assert dep["schedules"][0]["schedule"]["interval"] == 20

        def done(n):
            runs = _runs(api, dep["id"])
            bad = [r for r in runs if _state(r) in ("FAILED", "CRASHED")]
            assert not bad, log.read_text()[-4000:]
            return sum(_state(r) == "COMPLETED" for r in runs) >= n

        _wait("the first scheduled run", lambda: done(1), 150, serve, log)
        # the next run is due (or late) already: let it start, then pause the schedule so
        # no third one follows
        _wait("a second run", lambda: sum(_state(r) in ("RUNNING", "COMPLETED", "PENDING")
                                          for r in _runs(api, dep["id"])) >= 2, 60, serve, log)
        _api("PATCH", f"{api}/deployments/{dep['id']}", json={"paused": True})
        _wait("the second run", lambda: done(2), 150, serve, log)
    finally:
        _stop(serve)
    assert _gates(cwd / "ws")[:2] == [1, 2]
    with duckdb.connect(str(cwd / "ws" / "flywheel.duckdb"), read_only=True) as con:
        per_round = dict(con.execute(
            "SELECT round, count(*) FROM versions WHERE kind = 'samples' GROUP BY round"
        ).fetchall())
        commands = [c for (c,) in con.execute("SELECT command FROM runs").fetchall()]
    assert per_round[1] == 1 and per_round[2] == 1  # round 1 reused by the second run
    assert sum("deployment flywheel-iterate/test-serve" in c for c in commands) >= 2
    assert "stopped serving" in log.read_text()


def _find(api: str, name: str) -> dict | None:
    import httpx

    try:
        return _deployment(api, name)
    except httpx.HTTPStatusError:
        return None


@pytest.mark.slow
def test_work_pool_deployment_runs_on_a_worker(prefect_server, tiny_model, tmp_path):
    """`flywheel deploy --pool`: the command returns, the pool is created, the deployment
    carries the parameters and the project root as its working directory; a worker started
    elsewhere runs one triggered run, which makes round 1 in the workspace."""
    api, env = prefect_server
    ws = tmp_path / "ws"
    proc = subprocess.run(
        [sys.executable, "-m", "flywheel.cli", "deploy", "--cron", "0 2 * * *",
         "--pool", "test-pool", "--name", "test-pool", *_config_args(tiny_model, ws)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "prefect worker start --pool test-pool" in proc.stdout
    assert "created work pool 'test-pool'" in proc.stderr
    dep = _deployment(api, "test-pool")
    assert dep["work_pool_name"] == "test-pool"
    assert dep["entrypoint"] == "flows/iterate.py:iterate_flow"
    assert json.dumps(dep["pull_steps"]).count(str(PROJECT_ROOT)) == 1
    assert dep["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
    assert dep["parameters"]["continue_rounds"] is True
    assert dep["parameters"]["config"]["workspace"] == str(ws)
    pool = _api("GET", f"{api}/work_pools/test-pool")
    assert pool["type"] == "process"

    run = _api("POST", f"{api}/deployments/{dep['id']}/create_flow_run", json={})
    log = tmp_path / "worker.log"
    with open(log, "w") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", "test-pool",
             "--run-once"], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        worker.wait(240)
    except subprocess.TimeoutExpired:
        pass
    finally:
        _stop(worker)
    state = _state(_api("GET", f"{api}/flow_runs/{run['id']}"))
    assert state == "COMPLETED", log.read_text()[-4000:]
    assert _gates(ws) == [1]
