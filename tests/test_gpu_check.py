"""The GPU check (bench/gpu_check.py, `make gpu-check`): without a GPU it says why and exits 0
at once, importing nothing heavy; with --allow-cpu (tests only) the same code path runs a real
round and the sampling comparison on the CPU with a tiny model and tiny settings."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "bench" / "gpu_check.py"


def _check():
    spec = importlib.util.spec_from_file_location("flywheel_gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


gc = _check()


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(_has_gpu(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_why_and_exits_zero_within_seconds():
    probe = (f"import runpy, sys; sys.argv = [{str(SCRIPT)!r}]\n"
             "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
             "except SystemExit as e:\n    code = e.code\n"
             "heavy = [m for m in ('transformers', 'flywheel.pipeline', 'duckdb', 'trl', "
             "'prefect', 'pandas') if m in sys.modules]\n"
             "print('EXIT', code, 'HEAVY', heavy)\n")
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    took = time.monotonic() - began
    lines = done.stdout.splitlines()
    assert lines[0].startswith("no GPU: torch ") and "sees no CUDA device" in lines[0]
    assert lines[-1] == "EXIT 0 HEAVY []"
    assert took < 20, took


def test_help_says_allow_cpu_is_for_tests_only():
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0
    flat = " ".join(done.stdout.split())
    assert "--allow-cpu for tests only" in flat and "--out" in flat
    assert "--vllm-offline-worker" not in flat


def _result(vllm: dict) -> dict:
    stage = {"round": 1, "stage": "samples", "label": "samples (sampling)", "version": "v",
             "rows": 8, "seconds": 1.25}
    rate = {"tokens_per_s": 1000.0, "tokens": 5000, "seconds": 5.0, "runs": 3}
    return {"machine": {"device": "cuda", "date": "d", "gpu": "G", "torch": "t", "cuda": "c",
                        "python": "p"},
            "round_config": {"backend": "vllm", "dtype": "bfloat16"},
            "settings": {"n": 4, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 128,
                         "seed": 0, "prompts": 64, "repeats": 3, "batch_size": 64},
            "round": {"seconds": 90.0, "peak_gib": 3.5, "stages": [stage],
                      "server_timings": {"start": [20.0, 18.5], "sleep": [0.4],
                                         "wake": [0.2], "load_adapter": []}},
            "sampling": {"flywheel": rate, "bare": {**rate, "tokens_per_s": 1050.0},
                         "peak_gib": 1.0, "ratio": 0.952},
            "vllm": vllm}


def test_tables_with_vllm_show_its_rates_ratio_and_server_times():
    rate = {"tokens_per_s": 9000.0, "tokens": 30000, "seconds": 3.3, "runs": 3}
    res = _result({"flywheel": rate, "offline": {**rate, "tokens_per_s": 10000.0},
                   "ratio": 0.9, "timings": {"start": [21.0], "sleep": [0.5], "wake": [0.3]}})
    t = gc.tables(res)
    assert t["stages"]["header"] == ["stage", "round", "seconds", "rows"]
    assert t["stages"]["rows"][0] == ["samples (sampling)", "1", "1.2", "8"]
    rows = {r[0]: r[1:] for r in t["measures"]["rows"]}
    assert rows["ratio flywheel / bare"] == ["0.952", "target ≥ 0.9: met"]
    assert rows["peak GPU memory: the round"][0] == "3.50 GiB"
    assert rows["sampling: offline vllm.LLM.chat"][0] == "10000.0 tok/s"
    assert rows["ratio flywheel vLLM / offline vLLM"][0] == "0.900"
    assert rows["vLLM server start"][0] == "21.00 s"
    assert rows["vLLM in the round: start"][0] == "20.00 s, 18.50 s"
    assert "vLLM in the round: adapter load" not in rows
    md = gc.markdown({**res, "tables": t})
    assert md.count("\n|---|---|---|\n") == 1 and "| samples (sampling) | 1 | 1.2 | 8 |" in md


def test_tables_without_vllm_say_why_in_a_row():
    t = gc.tables(_result({"missing": "vLLM is not installed in .venv-vllm/bin/python"}))
    (row,) = [r for r in t["measures"]["rows"] if r[0].startswith("vLLM")]
    assert row == ["vLLM", "not measured", "vLLM is not installed in .venv-vllm/bin/python"]


@pytest.mark.slow
def test_allow_cpu_runs_a_round_and_compares_sampling(tiny_model, tmp_path):
    """The whole path on the CPU: a real round (every stage, training included), the stage
    times read from the catalog, both sampling paths, the table and its files."""
    out = tmp_path / "gpu-check"
    done = subprocess.run([sys.executable, str(SCRIPT), "--allow-cpu", "--model",
                           str(tiny_model), "--workspace", str(tmp_path / "ws"), "--out",
                           str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".md").read_text().strip() in done.stdout
    stages = [(s["round"], s["stage"]) for s in result["round"]["stages"]]
    assert stages == [(0, "prompts"), (0, "model"), (0, "eval"), (1, "prompts"),
                      (1, "samples"), (1, "judgments"), (1, "canary"), (1, "pairs"), (1, "model"),
                      (1, "eval"), (1, "gate")]
    assert all(s["seconds"] >= 0 for s in result["round"]["stages"])
    by = {(s["round"], s["stage"]): s for s in result["round"]["stages"]}
    assert by[(1, "samples")]["rows"] == 4 * 2 and by[(1, "pairs")]["rows"] >= 1  # it trained
    assert result["round_config"] == {"backend": "transformers", "dtype": "bfloat16",
                                      "config": str(ROOT / "configs" / "gpu.yaml"),
                                      "model": str(tiny_model)}
    samp = result["sampling"]
    assert samp["flywheel"]["tokens"] > 0 and samp["bare"]["tokens"] > 0
    assert samp["ratio"] > 0 and samp["ratio"] == pytest.approx(
        samp["flywheel"]["tokens_per_s"] / samp["bare"]["tokens_per_s"], rel=0.01)
    assert result["vllm"] == {"missing": "not measured on the CPU (--allow-cpu): vLLM needs "
                                         "a GPU"}
    measures = result["tables"]["measures"]
    assert measures["header"] == ["measure", "value", "detail"]
    assert [r[0] for r in measures["rows"]] == [
        "sampling: flywheel (TransformersBackend.generate)", "sampling: bare model.generate",
        "ratio flywheel / bare", "peak GPU memory: the round",
        "peak GPU memory: the sampling measurement", "vLLM"]
    assert len(result["tables"]["stages"]["rows"]) == len(stages) + 1
    assert (tmp_path / "ws" / "flywheel.duckdb").is_file()  # --workspace is kept
