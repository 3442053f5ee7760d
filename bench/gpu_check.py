"""GPU check: one round of flywheel on a GPU with the bundled model, and its sampling against
bare generation on the same GPU (`make gpu-check`).

    python bench/gpu_check.py [--out FILE] [--config configs/gpu.yaml] [--model DIR]
                              [--prompts N] [--n N] [--max-new-tokens N] [--repeats N]
                              [--workspace DIR] [--allow-cpu]

Without a GPU (torch sees no CUDA device) it prints `no GPU: <why>` and exits 0 at once:
nothing but torch is imported before that check.

On a GPU, with the bundled SmolLM2-135M-Instruct only (no model hub), in a few minutes:

1. One round on CUDA through `flywheel.pipeline.iterate` (round 0, then sampling,
   self-instruct, judging, pairs, bf16 training, eval, gate), with `configs/gpu.yaml` and
   overrides: small sample counts, `models.device: cuda`, `models.dtype: bfloat16`, a
   temporary workspace. The round runs on the managed vLLM server where vLLM is installed
   (`models.vllm.python` has it), else on the in-process transformers backend. The time of
   each stage is read from the catalog: from the stage's `stage` event in `run_events` to its
   version's `created_at` (computing and committing it).
2. Sampling throughput: the same prompts (from data/eval_prompts.jsonl), `n`, temperature,
   top_p and `max_new_tokens` (the round's sampling settings), through flywheel's
   `TransformersBackend.generate` and through bare `model.generate` on the same loaded model
   and GPU (batches of `models.batch_size` in input order, the same sampling arguments).
   Completion tokens per second of wall time, median of `--repeats` interleaved runs after a
   warm-up; the ratio flywheel / bare.
3. Peak GPU memory (`torch.cuda.max_memory_allocated`) of this process during the round and
   during the sampling measurement (a vLLM server's memory is its own process's, not counted).
4. Where vLLM is installed: the same workload through `VLLMBackend.generate` (flywheel's
   managed `vllm serve`) and through offline `vllm.LLM.chat` run in the vLLM interpreter as a
   subprocess (this file, `--vllm-offline-worker`), the ratio, and the server's start, sleep and
   wake times (`VLLMBackend.timings`). Where vLLM is missing, a row says why.

It prints the tables and, with `--out FILE`, writes them as markdown (FILE.md) and JSON
(FILE.json) for the README. `--allow-cpu` is for tests: the same code path on the CPU with tiny
settings (and `--model` to use a tiny model); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "gpu.yaml"
BUNDLED = ROOT / "models" / "SmolLM2-135M-Instruct"
PROMPT_FILES = (ROOT / "data" / "eval_prompts.jsonl", ROOT / "data" / "seed_prompts.jsonl")
TARGET_RATIO = 0.9
GIB = 1024 ** 3

#: Sizes of the sampling measurement: on a GPU, and on the CPU (--allow-cpu, tests only).
SIZES = {
    "cuda": {"prompts": 64, "n": 4, "max_new_tokens": 128, "repeats": 3},
    "cpu": {"prompts": 4, "n": 2, "max_new_tokens": 8, "repeats": 1},
}
#: The round: the bundled 135M model judges as in configs/demo.yaml (verdict probabilities,
#: brief templates) and every judged margin makes a pair, so the round trains; small sample
#: counts so it runs in minutes on one GPU (seconds on the CPU).
JUDGE = ["judge.verdict=logprobs", "judge.samples=1", "judge.pointwise_template=pointwise_brief.j2",
         "judge.pairwise_template=pairwise_brief.j2", "pairs.min_margin=0",
         "pairs.require_agreement=false"]
ROUND = {
    "cuda": ["prompts.num_new=16", "prompts.max_attempts=48", "sampling.prompts_per_round=64",
             "sampling.n=4", "sampling.max_new_tokens=128", "eval.max_prompts=50",
             "eval.max_new_tokens=128", "judge.max_new_tokens=32", "train.epochs=1",
             "train.checkpoint_steps=0"],
    "cpu": ["prompts.num_new=2", "prompts.max_attempts=4", "prompts.few_shot=2",
            "prompts.max_new_tokens=8", "sampling.prompts_per_round=4", "sampling.n=2",
            "sampling.max_new_tokens=8", "judge.max_new_tokens=8",
            "eval.max_prompts=4", "eval.max_new_tokens=8", "train.batch_size=2",
            "train.max_length=64", "train.lora_r=4", "train.lora_alpha=8", "train.epochs=1",
            "train.checkpoint_steps=0", "models.batch_size=4"],
}


# -- the GPU ----------------------------------------------------------------------------------
def no_gpu_reason() -> str | None:
    """Why this process cannot use a GPU (None when torch sees one). Imports torch only."""
    try:
        import torch
    except ImportError as exc:
        return f"torch cannot be imported by {sys.executable} ({exc})"
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return None
    if not torch.version.cuda:
        return f"torch {torch.__version__} sees no CUDA device (a CPU-only build of torch)"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    hint = f"; CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
    return (f"torch {torch.__version__} sees no CUDA device (built for CUDA "
            f"{torch.version.cuda}{hint})")


def machine(device: str) -> dict:
    import torch

    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "host": platform.node(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "device": device}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name}, {props.total_memory / GIB:.0f} GiB"
        info["gpus"] = torch.cuda.device_count()
    else:
        info["gpu"] = "none (--allow-cpu: the CPU, numbers not meaningful)"
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


class Memory:
    """Peak memory torch allocated on the GPU over a block (None on the CPU)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.peak: float | None = None

    def __enter__(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() / GIB
        return False


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# -- the round --------------------------------------------------------------------------------
def round_config(args, device: str, workspace: Path, backend: str):
    from flywheel.config import load_config

    sets = [f"workspace={workspace}", "progress=false", f"models.device={device}",
            f"models.dtype={args.dtype}", f"models.backend={backend}",
            f"models.policy.path={args.model}", "models.judge.path=''",
            "models.generator.path=''", "models.judge.backend=local",
            "models.generator.backend=local", "train.num_processes=1", *JUDGE,
            *ROUND["cuda" if device.startswith("cuda") else "cpu"], *args.set]
    return load_config(args.config, sets)


def stage_times(catalog_path: Path, run_id: str) -> list[dict]:
    """Each stage the run computed: round, stage (the version kind), version, rows and seconds
    from its `stage` event to its version's commit, in the order they ran."""
    from flywheel.catalog import Catalog

    sql = ("SELECT e.round, e.stage, v.version_id, v.row_count, "
           "(epoch_us(v.created_at) - epoch_us(e.event_at)) / 1e6 AS seconds "
           "FROM run_events e JOIN versions v ON v.run_id = e.run_id AND v.round = e.round "
           "AND v.kind = e.stage WHERE e.run_id = ? AND e.event = 'stage' ORDER BY e.event_at")
    with Catalog(catalog_path).read() as con:
        rows = con.execute(sql, [run_id]).fetchall()
    return [{"round": r, "stage": s, "label": STAGE_LABELS.get((r, s)) or STAGE_LABELS.get(s, s),
             "version": v, "rows": int(n), "seconds": round(float(t), 2)}
            for r, s, v, n, t in rows]


#: What each version kind's stage does, for the table ((round, kind) first, then kind).
STAGE_LABELS = {(0, "prompts"): "seed prompts", (0, "model"): "base model (hashed)",
                (0, "eval"): "eval of the base model", "prompts": "prompts (self-instruct)",
                "samples": "samples (sampling)", "judgments": "judgments (judging)",
                "canary": "canary (judge drift)",
                "pairs": "pairs", "model": "model (training)", "eval": "eval (new vs policy)",
                "gate": "gate"}


def run_round(cfg, device: str, log) -> dict:
    from flywheel import pipeline
    from flywheel.catalog import new_run_id

    run_id = new_run_id()
    timings: dict[str, list[float]] = {}

    def keep_timings(ctx, _result) -> None:  # before the run closes its backend
        backend = ctx.backend
        for key, values in getattr(backend, "timings", {}).items():
            timings[key] = list(values)

    log(f"the round: models.backend {cfg.models.backend}, {device}, {cfg.models.dtype}, "
        f"workspace {cfg.workspace}")
    with Memory(device) as mem:
        began = time.perf_counter()
        results = pipeline.iterate(cfg, 1, run_id=run_id, command="gpu-check",
                                   on_round=keep_timings)
        total = time.perf_counter() - began
    return {"run_id": run_id, "seconds": round(total, 1), "peak_gib": mem.peak,
            "stages": stage_times(cfg.catalog_path(), run_id), "server_timings": timings,
            "promoted": bool(results and getattr(results[-1], "promoted", False))}


# -- the sampling workload --------------------------------------------------------------------
def workload(count: int) -> list[list[dict[str, str]]]:
    """`count` single-turn conversations: the eval prompts, then the seed prompts, cycled."""
    from flywheel.promptfile import load_prompt_file

    texts = [r["prompt"] for path in PROMPT_FILES for r in load_prompt_file(path)]
    return [[{"role": "user", "content": texts[i % len(texts)]}] for i in range(count)]


def _settings(cfg, sizes: dict) -> dict:
    return {"n": sizes["n"], "temperature": cfg.sampling.temperature,
            "top_p": cfg.sampling.top_p, "max_new_tokens": sizes["max_new_tokens"],
            "seed": cfg.seed}


def flywheel_generate(backend, model: str, convs, s: dict) -> int:
    """Completion tokens made by a flywheel backend's `generate` (its Backend protocol)."""
    out = backend.generate(model, convs, n=s["n"], temperature=s["temperature"],
                           top_p=s["top_p"], max_new_tokens=s["max_new_tokens"],
                           seed=s["seed"], desc="gpu-check")
    return sum(g.completion_tokens for gens in out for g in gens)


def bare_generate(mdl, tok, convs, s: dict, batch_size: int, device: str) -> int:
    """Completion tokens made by plain transformers: chat template, left padding, batches of
    `batch_size` in input order, `model.generate` with the same sampling arguments."""
    import torch

    items = [c for c in convs for _ in range(s["n"])]
    eos = {tok.eos_token_id} | set(_as_list(mdl.generation_config.eos_token_id))
    kwargs = {"max_new_tokens": s["max_new_tokens"], "pad_token_id": tok.pad_token_id,
              "eos_token_id": sorted(eos), "do_sample": s["temperature"] > 0}
    if kwargs["do_sample"]:
        kwargs.update(temperature=s["temperature"], top_p=s["top_p"], top_k=0)
    tokens = 0
    with torch.inference_mode():
        for b in range(0, len(items), batch_size):
            texts = tok.apply_chat_template(items[b:b + batch_size], add_generation_prompt=True,
                                            tokenize=False)
            enc = tok(texts, add_special_tokens=False, padding=True,
                      return_tensors="pt").to(device)
            torch.manual_seed(s["seed"] * 100_003 + b)
            gen = mdl.generate(**enc, **kwargs)[:, enc["input_ids"].shape[1]:]
            for row in gen.tolist():
                cut = next((j for j, t in enumerate(row) if t in eos), len(row))
                tokens += cut
    return tokens


def _as_list(x) -> list[int]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def timed(fn, device: str) -> tuple[int, float]:
    _sync(device)
    began = time.perf_counter()
    tokens = fn()
    _sync(device)
    return tokens, time.perf_counter() - began


def rate(runs: list[tuple[int, float]]) -> dict:
    """Median tokens/s over the runs, with the median run's tokens and seconds."""
    per = sorted((t / s, t, s) for t, s in runs)
    mid = per[len(per) // 2]
    return {"tokens_per_s": round(statistics.median(p[0] for p in per), 1),
            "tokens": mid[1], "seconds": round(mid[2], 3), "runs": len(runs)}


def measure_transformers(cfg, model: str, convs, s: dict, repeats: int, device: str,
                         log) -> dict:
    """flywheel's TransformersBackend.generate against bare model.generate, interleaved."""
    from flywheel.backends.transformers import TransformersBackend

    with Memory(device) as mem:
        backend = TransformersBackend(device=device, dtype=cfg.models.dtype,
                                      batch_size=cfg.models.batch_size, progress=False)
        mdl, tok = backend.load(model)
        warm = dict(s, n=1, max_new_tokens=min(8, s["max_new_tokens"]))
        flywheel_generate(backend, model, convs[:2], warm)
        bare_generate(mdl, tok, convs[:2], warm, cfg.models.batch_size, device)
        ours, bare = [], []
        for i in range(repeats):
            log(f"sampling, transformers: run {i + 1} of {repeats}")
            ours.append(timed(lambda: flywheel_generate(backend, model, convs, s), device))
            bare.append(timed(lambda: bare_generate(mdl, tok, convs, s, cfg.models.batch_size,
                                                    device), device))
        backend.release()
    flywheel_rate, bare_rate = rate(ours), rate(bare)
    return {"flywheel": flywheel_rate, "bare": bare_rate, "peak_gib": mem.peak,
            "ratio": round(flywheel_rate["tokens_per_s"] / bare_rate["tokens_per_s"], 3)}


def measure_vllm(cfg, model: str, convs, s: dict, repeats: int, log) -> dict:
    """flywheel's managed vLLM server (VLLMBackend.generate) against offline vllm.LLM in the
    vLLM interpreter; the server's start, sleep and wake times."""
    from flywheel import pipeline

    ctx = pipeline.context(cfg)
    try:
        backend = ctx.backend
        warm = dict(s, n=1, max_new_tokens=min(8, s["max_new_tokens"]))
        flywheel_generate(backend, model, convs[:2], warm)  # starts the server
        runs = []
        for i in range(repeats):
            log(f"sampling, vLLM server: run {i + 1} of {repeats}")
            runs.append(timed(lambda: flywheel_generate(backend, model, convs, s), "cpu"))
        backend.sleep()
        backend.wake_up()
        timings = {k: list(v) for k, v in backend.timings.items()}
    finally:
        ctx.close()
    served = rate(runs)
    offline = run_offline(cfg, model, convs, s, repeats, log)
    return {"flywheel": served, "offline": offline, "timings": timings,
            "ratio": round(served["tokens_per_s"] / offline["tokens_per_s"], 3)}


def run_offline(cfg, model: str, convs, s: dict, repeats: int, log) -> dict:
    """Offline vllm.LLM.chat on the same workload, in the vLLM interpreter (a subprocess)."""
    v = cfg.models.vllm
    spec = {"model": str(model), "conversations": convs, "settings": s, "repeats": repeats,
            "dtype": cfg.models.dtype if v.dtype == "auto" else v.dtype,
            "gpu_memory_utilization": v.gpu_memory_utilization,
            "max_model_len": v.max_model_len, "enable_prefix_caching": v.enable_prefix_caching,
            "tensor_parallel_size": v.tensor_parallel_size}
    with tempfile.TemporaryDirectory(prefix="flywheel-vllm-offline-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        log(f"offline vllm.LLM in {v.python}")
        done = subprocess.run([v.python, __file__, "--vllm-offline-worker", str(spec_path),
                               str(out_path)], capture_output=True, text=True, timeout=900)
        if done.returncode != 0 or not out_path.is_file():
            tail = "\n".join((done.stderr or done.stdout).splitlines()[-20:])
            raise RuntimeError(f"offline vLLM failed (exit {done.returncode}):\n{tail}")
        return json.loads(out_path.read_text())


def offline_worker(spec_path: str, out_path: str) -> int:
    """Runs in the vLLM interpreter: vllm.LLM.chat over the spec's workload (stdlib + vLLM
    only), writing tokens/s (median of the repeats, after a warm-up) to `out_path`."""
    from vllm import LLM, SamplingParams

    spec = json.loads(Path(spec_path).read_text())
    s = spec["settings"]
    llm = LLM(model=spec["model"], dtype=spec["dtype"], seed=s["seed"],
              gpu_memory_utilization=spec["gpu_memory_utilization"],
              max_model_len=spec["max_model_len"],
              enable_prefix_caching=spec["enable_prefix_caching"],
              tensor_parallel_size=spec["tensor_parallel_size"])
    params = SamplingParams(n=s["n"], temperature=s["temperature"], top_p=s["top_p"],
                            max_tokens=s["max_new_tokens"], seed=s["seed"])
    convs = spec["conversations"]
    llm.chat(convs[:2], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    runs = []
    for _ in range(spec["repeats"]):
        began = time.perf_counter()
        outs = llm.chat(convs, params, use_tqdm=False)
        seconds = time.perf_counter() - began
        runs.append((sum(len(c.token_ids) for o in outs for c in o.outputs), seconds))
    Path(out_path).write_text(json.dumps(rate(runs)))
    return 0


# -- the tables -------------------------------------------------------------------------------
def _gib(value: float | None, device: str) -> str:
    return f"{value:.2f} GiB" if value is not None else f"— ({device}: not measured)"


def _secs(values: list[float]) -> str:
    if not values:
        return "—"
    return ", ".join(f"{v:.2f} s" for v in values)


def tables(result: dict) -> dict:
    """The stage table and the measurement table: header and rows of each."""
    rnd, samp, dev = result["round"], result["sampling"], result["machine"]["device"]
    stages = [[r["label"], str(r["round"]), f"{r['seconds']:.1f}", str(r["rows"])]
              for r in rnd["stages"]]
    stages.append(["one round in all (round 0 included; preflight, loading, lock)", "0–1",
                   f"{rnd['seconds']:.1f}", ""])
    s = result["settings"]
    work = (f"{s['prompts']} prompts × n={s['n']}, temperature {s['temperature']}, top_p "
            f"{s['top_p']}, ≤{s['max_new_tokens']} new tokens, batch {s['batch_size']}, "
            f"{result['round_config']['dtype']}, median of {s['repeats']}")
    fw, bare = samp["flywheel"], samp["bare"]
    rows = [
        ["sampling: flywheel (TransformersBackend.generate)", f"{fw['tokens_per_s']:.1f} tok/s",
         f"{fw['tokens']} tokens in {fw['seconds']:.2f} s; {work}"],
        ["sampling: bare model.generate", f"{bare['tokens_per_s']:.1f} tok/s",
         f"{bare['tokens']} tokens in {bare['seconds']:.2f} s; same model, prompts, settings"],
        ["ratio flywheel / bare", f"{samp['ratio']:.3f}",
         f"target ≥ {TARGET_RATIO}: {'met' if samp['ratio'] >= TARGET_RATIO else 'NOT met'}"],
        ["peak GPU memory: the round", _gib(rnd["peak_gib"], dev),
         "torch.cuda.max_memory_allocated of this process (a vLLM server's is its own)"],
        ["peak GPU memory: the sampling measurement", _gib(samp["peak_gib"], dev),
         "torch.cuda.max_memory_allocated"],
    ]
    vl = result["vllm"]
    if vl.get("missing"):
        rows.append(["vLLM", "not measured", vl["missing"]])
    else:
        rows += [
            ["sampling: flywheel vLLM (VLLMBackend.generate)",
             f"{vl['flywheel']['tokens_per_s']:.1f} tok/s",
             f"{vl['flywheel']['tokens']} tokens in {vl['flywheel']['seconds']:.2f} s; "
             "managed `vllm serve`, chat completions"],
            ["sampling: offline vllm.LLM.chat", f"{vl['offline']['tokens_per_s']:.1f} tok/s",
             f"{vl['offline']['tokens']} tokens in {vl['offline']['seconds']:.2f} s"],
            ["ratio flywheel vLLM / offline vLLM", f"{vl['ratio']:.3f}", ""],
            ["vLLM server start", _secs(vl["timings"].get("start", [])),
             "to /health, per start"],
            ["vLLM sleep (level 1)", _secs(vl["timings"].get("sleep", [])), "POST /sleep"],
            ["vLLM wake", _secs(vl["timings"].get("wake", [])), "POST /wake_up"],
        ]
        for key, label in (("start", "start"), ("sleep", "sleep"), ("wake", "wake"),
                           ("load_adapter", "adapter load")):
            if rnd["server_timings"].get(key):
                rows.append([f"vLLM in the round: {label}",
                             _secs(rnd["server_timings"][key]), ""])
    return {"stages": {"header": ["stage", "round", "seconds", "rows"], "rows": stages},
            "measures": {"header": ["measure", "value", "detail"], "rows": rows}}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"GPU check, {m['date']}: {m['gpu']}; torch {m['torch']} (CUDA {m['cuda']}), "
             f"transformers {m.get('transformers', '?')}, Python {m['python']}; round on "
             f"models.backend {result['round_config']['backend']}", ""]
    for table in result["tables"].values():
        lines.append("| " + " | ".join(table["header"]) + " |")
        lines.append("|" + "---|" * len(table["header"]))
        lines += ["| " + " | ".join(row) + " |" for row in table["rows"]]
        lines.append("")
    return "\n".join(lines)


def write_out(out: Path, result: dict, text: str) -> list[Path]:
    base = out.with_suffix("") if out.suffix in (".md", ".json") else out
    md, js = base.with_name(base.name + ".md"), base.with_name(base.name + ".json")
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text + "\n")
    js.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return [md, js]


# -- main -------------------------------------------------------------------------------------
def parse(argv):
    p = argparse.ArgumentParser(
        prog="gpu_check.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(CONFIG), help="config the round starts from")
    p.add_argument("--model", default=str(BUNDLED), help="the policy checkpoint (default: the "
                   "bundled SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="models.dtype of the round and the measurement (default bfloat16)")
    p.add_argument("--prompts", type=int, help="prompts of the sampling measurement")
    p.add_argument("--n", type=int, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, help="new tokens per sample at most")
    p.add_argument("--repeats", type=int, help="timed runs of each path (the median counts)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a further config override for the round (repeatable)")
    p.add_argument("--workspace", help="workspace of the round (default: a temporary folder, "
                   "removed after)")
    p.add_argument("--out", help="write the tables to OUT.md and OUT.json")
    p.add_argument("--no-vllm", action="store_true", help="skip the vLLM path even where "
                   "vLLM is installed")
    p.add_argument("--allow-cpu", action="store_true", help="for tests only: run the same code "
                   "path on the CPU with tiny settings when there is no GPU (numbers mean "
                   "nothing)")
    p.add_argument("--vllm-offline-worker", nargs=2, metavar=("SPEC", "OUT"),
                   help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.vllm_offline_worker:
        return offline_worker(*args.vllm_offline_worker)
    why = no_gpu_reason()
    if why and not args.allow_cpu:
        print(f"no GPU: {why}")
        return 0
    device = "cpu" if why else "cuda"

    def log(message: str) -> None:
        print(f"gpu-check: {message}", file=sys.stderr, flush=True)

    os.chdir(ROOT)  # the config's relative paths (prompt files, models/) are the project's
    from flywheel.errors import FlywheelError

    sizes = dict(SIZES["cuda" if device == "cuda" else "cpu"])
    for key in sizes:
        if getattr(args, key, None) is not None:
            sizes[key] = getattr(args, key)
    workspace = Path(args.workspace) if args.workspace else Path(
        tempfile.mkdtemp(prefix="flywheel-gpu-check-"))
    try:
        try:
            missing = vllm_status(args, device, workspace)
            backend = "vllm" if missing is None else "transformers"
            cfg = round_config(args, device, workspace, backend)
            rnd = run_round(cfg, device, log)
        except FlywheelError as exc:
            print(f"gpu-check: error: {exc}", file=sys.stderr)
            return 1
        s = _settings(cfg, sizes)
        convs = workload(sizes["prompts"])
        samp = measure_transformers(cfg, args.model, convs, s, sizes["repeats"], device, log)
        vl = {"missing": missing} if missing else measure_vllm(cfg, args.model, convs, s,
                                                               sizes["repeats"], log)
    finally:
        if not args.workspace:
            shutil.rmtree(workspace, ignore_errors=True)
    result = {"machine": machine(device),
              "round_config": {"backend": cfg.models.backend, "dtype": cfg.models.dtype,
                               "config": str(args.config), "model": str(args.model)},
              "settings": {**s, "prompts": sizes["prompts"], "repeats": sizes["repeats"],
                           "batch_size": cfg.models.batch_size},
              "round": rnd, "sampling": samp, "vllm": vl}
    result["tables"] = tables(result)
    text = markdown(result)
    print(text)
    if args.out:
        for path in write_out(Path(args.out), result, text):
            log(f"wrote {path}")
    return 0


def vllm_status(args, device: str, workspace: Path) -> str | None:
    """Why the vLLM path is not measured (None when it is)."""
    if args.no_vllm:
        return "skipped (--no-vllm)"
    if device != "cuda":
        return "not measured on the CPU (--allow-cpu): vLLM needs a GPU"
    try:
        from flywheel.backends.vllm import vllm_missing
    except ImportError as exc:
        return f"flywheel.backends.vllm cannot be imported ({exc})"
    from flywheel.config import load_config

    python = load_config(args.config).models.vllm.python
    why = vllm_missing(python)
    return None if why is None else f"{why} (`make setup-vllm`)"


if __name__ == "__main__":
    sys.exit(main())
