"""Per-role model settings: a local checkpoint or an endpoint for the policy, the judge and the
prompt generator, in YAML and with --set; their checks; the backend registry; what of an
endpoint enters a fingerprint; `flywheel cache` and the cache line of `flywheel check`."""

from __future__ import annotations

import pytest

from flywheel import roles
from flywheel.backends import BACKENDS, REMOTE_BACKENDS, VerdictProbabilities, get_backend
from flywheel.config import RoleConfig, config_from_dict, dump_yaml, load_config
from flywheel.errors import FlywheelError
from tests.conftest import one_version_catalog, run_cli


def test_a_plain_string_is_the_path_and_a_mapping_sets_the_endpoint(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(
        "models:\n  judge:\n    backend: openai\n    base_url: http://127.0.0.1:8000/v1\n"
        "    model: Qwen/Qwen2.5-72B-Instruct\n    api_key_env: JUDGE_KEY\n"
        "    extra: {top_k: 20}\n  generator: gens/small\n")
    cfg = load_config(cfg_file, ["models.policy=ckpt/base", "models.judge.concurrency=32"])
    assert cfg.models.policy == RoleConfig(path="ckpt/base")
    assert cfg.models.generator.path == "gens/small" and not cfg.models.generator.endpoint
    j = cfg.models.judge
    assert (j.endpoint, j.base_url, j.model, j.api_key_env, j.concurrency, j.extra) == (
        True, "http://127.0.0.1:8000/v1", "Qwen/Qwen2.5-72B-Instruct", "JUDGE_KEY", 32,
        {"top_k": 20})
    # the dump loads back to the same config; a deployment's dict too
    again = tmp_path / "again.yaml"
    again.write_text(dump_yaml(cfg))
    assert load_config(again) == cfg
    assert config_from_dict(cfg.to_dict()) == cfg
    # --set models.policy=123 is the path "123", not a number
    assert load_config(None, ["models.policy=123"]).models.policy.path == "123"


def test_an_old_config_dict_with_string_roles_still_loads():
    """Runs and deployments recorded before endpoints stored each role as a string."""
    cfg = config_from_dict({"models": {"policy": "m/base", "judge": "", "generator": "g"}})
    assert (cfg.models.policy.path, cfg.models.judge.path, cfg.models.generator.path) == (
        "m/base", "", "g")


@pytest.mark.parametrize("sets, expected", [
    (["models.judge.backend=openai"],
     ["models.judge.base_url: must be the endpoint's http(s) URL up to /v1",
      "models.judge.model: must name the served model"]),
    (["models.judge.backend=openai", "models.judge.base_url=127.0.0.1:8000",
      "models.judge.model=m"],
     ["models.judge.base_url: must be the endpoint's http(s) URL up to /v1 (e.g. "
      "http://127.0.0.1:8000/v1), got str '127.0.0.1:8000'"]),
    (["models.generator.base_url=http://h/v1"],
     ["models.generator.backend: is local, but models.generator.base_url is set: set "
      "models.generator.backend: openai to use the endpoint"]),
    (["models.policy.backend=openai", "models.policy.base_url=http://h/v1",
      "models.policy.model=m", "models.policy.path="],
     ["models.policy.backend: the policy is trained every round"]),
    (["models.judge.backend=openai", "models.judge.base_url=http://h/v1",
      "models.judge.model=m", "models.judge.path=j"],
     ["models.judge.path: is set, but models.judge.backend is openai"]),
    (["models.judge.concurrency=0", "models.judge.timeout=0", "models.judge.retries=-1"],
     ["models.judge.concurrency: must be > 0", "models.judge.timeout: must be > 0",
      "models.judge.retries: must be >= 0"]),
    (["models.judge.backend=vllm"], ["models.judge.backend: 'vllm' is not one of: local, openai"]),
    (["models.judge.extra=[1, 2]"], ["models.judge.extra: expected a mapping of names to values"]),
])
def test_endpoint_settings_that_cannot_work_are_refused(sets, expected):
    with pytest.raises(FlywheelError) as exc:
        load_config(None, sets)
    for text in expected:
        assert text in str(exc.value), str(exc.value)


def test_a_key_in_place_of_a_variable_name_is_refused_without_echoing_it():
    secret = "sk-live-0123456789abcdef"
    with pytest.raises(FlywheelError) as exc:
        load_config(None, [f"models.judge.api_key_env={secret}"])
    assert "models.judge.api_key_env: must name an environment variable" in str(exc.value)
    assert secret not in str(exc.value)


def test_backends_come_from_a_registry_and_verdict_probabilities_are_a_capability():
    assert set(BACKENDS) == {"transformers", "openai", "vllm"}
    assert REMOTE_BACKENDS == {"openai"}  # vllm's server is flywheel's own: not retried
    with pytest.raises(FlywheelError) as exc:
        get_backend("tgi")
    assert str(exc.value) == "unknown backend 'tgi'\n  - backends: transformers, openai, vllm"
    from flywheel.backends.openai import Endpoint, OpenAIBackend

    served = get_backend("openai", endpoint=Endpoint(role="judge", base_url="http://h/v1",
                                                     model="m"), cache=None)
    assert isinstance(served, OpenAIBackend) and isinstance(served, VerdictProbabilities)

    class TextOnly:
        def generate(self, *a, **k):
            return []

    assert not isinstance(TextOnly(), VerdictProbabilities)


def test_an_endpoint_fingerprint_holds_what_is_served_not_where(monkeypatch):
    cfg = load_config(None, ["models.judge.backend=openai", "models.judge.base_url=http://a:1/v1",
                             "models.judge.model=m", "judge.verdict=logprobs"])
    moved = load_config(None, ["models.judge.backend=openai",
                               "models.judge.base_url=http://b:2/v1", "models.judge.model=m",
                               "judge.verdict=logprobs"])
    roles.forget()
    monkeypatch.setitem(roles._IDENTITIES, ("judge", "http://a:1/v1", "m"),
                        {"url": "http://a:1/v1", "model": "m", "identity": "ab" * 8})
    monkeypatch.setitem(roles._IDENTITIES, ("judge", "http://b:2/v1", "m"),
                        {"url": "http://b:2/v1", "model": "m", "identity": "ab" * 8})
    params = roles.fingerprint_params(cfg, "judge")
    assert params == {"backend": "openai", "model": "m", "identity": "ab" * 8,
                      "verdict_reading": "own"}
    assert roles.fingerprint_params(moved, "judge") == params
    roles.forget()


def test_cache_command_reports_and_clears_only_its_file(tmp_path):
    from flywheel.backends.cache import RequestCache

    ws = tmp_path / "ws"
    proc = run_cli("cache", "--workspace", str(ws))
    assert proc.returncode == 0 and "no request cache" in proc.stdout
    cache = RequestCache(ws / ".flywheel" / "requests.sqlite3")
    for i in range(3):
        cache.put(f"k{i}", {"choices": [{"text": "x" * 100}]})
    cache.close()
    (ws / ".flywheel" / "keep.json").write_text("{}")
    proc = run_cli("cache", "--workspace", str(ws))
    assert proc.returncode == 0 and "3 cached responses" in proc.stdout, proc.stdout
    one_version_catalog(ws / "flywheel.duckdb")
    proc = run_cli("check", "--catalog", str(ws / "flywheel.duckdb"), "--no-hashes")
    assert "3 cached responses" in proc.stderr and "flywheel cache clear" in proc.stderr
    proc = run_cli("cache", "clear", "--workspace", str(ws))
    assert proc.returncode == 0 and "cleared 3 cached responses" in proc.stderr
    assert not (ws / ".flywheel" / "requests.sqlite3").exists()
    assert (ws / ".flywheel" / "keep.json").exists()
