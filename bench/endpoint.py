"""Endpoint benchmark: the judge through an OpenAI-compatible endpoint (llama.cpp's server,
llama-cpp-python, serving the bundled SmolLM2-135M-Instruct GGUF) beside the same model read
in-process (transformers, the checkpoint in models/ that was dequantised from that GGUF).

    python bench/endpoint.py [--comparisons 40] [--replicas 1,2] [--max-new-tokens 16]
                             [--dtypes float32,bfloat16] [--answer-tokens 48] [--dequantised]
                             [--extra JSON] [--out FILE.json]

The workload: the first comparisons/2 prompts of data/eval_prompts.jsonl (then
data/seed_prompts.jsonl). Each prompt gets two answers: the in-process model's own greedy answer
to it (float32, `--answer-tokens` new tokens) and the greedy answer to the next prompt (an
off-topic answer; the last prompt takes the first prompt's). Each pair is judged in both orders
(own answer as A, then as B) with the pairwise template `pairwise_brief.j2`: `--comparisons`
judge calls, at temperature 0 and `--max-new-tokens` each.

It prints two markdown tables:

1. Agreement of verdict probabilities (`judge.verdict: logprobs`): every judge call through
   the backends' `rationale_then_probs` (rationale, cut where a verdict begins, then
   P(A), P(B), P(C) after the forced "Final verdict: [["), in-process with
   `TransformersBackend(dtype="float32")` and through the endpoint with `OpenAIBackend`
   (tokenizer of the checkpoint: the verdict is forced by a /v1/completions request). Reported:
   n, argmax agreement, mean and max |p_endpoint - p_inprocess| over the three verdicts, how
   often the two rationales are identical, and the agreement where they differ. A call whose
   probabilities give no verdict counts as a disagreement.
2. Throughput side by side: the same judge calls with verdict text (`generate`, the
   `judge.verdict: text` path) in-process (batch 16, per dtype) and through the endpoint with
   N replicas and N requests in flight, per `--replicas` entry. "wall s" is the workload alone
   (the model loaded, the server answering); loading and server start are in the last column.

Every request to the endpoint carries the extra fields of the demo's judge
(`models.judge.extra` in configs/endpoint.yaml), or those of `--extra`. They matter here:
llama-cpp-python's server applies a repetition penalty of 1.1 unless a request says otherwise,
also at temperature 0, where the in-process backend decodes plain greedy;
`--extra '{"repeat_penalty": 1.0}'` asks for the same decoding.

`--dequantised` serves a float32 copy of the GGUF instead (its weights dequantised into a
temporary file: the same numbers as the checkpoint, so llama.cpp computes in float32): a control
that separates what quantised arithmetic changes from what the endpoint path changes.

The API key is random per run (or $FLYWHEEL_API_KEY when set) and never printed. `--out`
writes every number of both tables, and each judge call's verdicts and rationales, as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: import the checkout's flywheel

from flywheel.errors import FlywheelError  # noqa: E402

CHECKPOINT = ROOT / "models" / "SmolLM2-135M-Instruct"
PROMPT_FILES = (ROOT / "data" / "eval_prompts.jsonl", ROOT / "data" / "seed_prompts.jsonl")
TEMPLATE = "pairwise_brief.j2"
CANDIDATES = ["A", "B", "C"]
ALIAS = "smollm2"
KEY_ENV = "FLYWHEEL_API_KEY"
#: The variable this process hands the key to the `openai` backend in (never printed).
BACKEND_KEY_ENV = "FLYWHEEL_BENCH_ENDPOINT_KEY"
#: The demo's endpoint config: its judge's extra request fields are what the bench sends.
DEMO_CONFIG = ROOT / "configs" / "endpoint.yaml"
BATCH_SIZE = 16
TARGET_AGREEMENT = 90.0


# -- the machine ------------------------------------------------------------------------------

def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown CPU"


def _loadavg() -> str:
    with contextlib.suppress(OSError, IndexError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "n/a"


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "not installed"


def machine() -> dict:
    import torch

    return {"nproc": os.cpu_count(), "cpu": _cpu_model(),
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": _version("transformers"),
            "llama_cpp_python": _version("llama_cpp_python"),
            "torch_threads": torch.get_num_threads(), "loadavg_start": _loadavg()}


# -- the workload -----------------------------------------------------------------------------

def load_prompts(n: int) -> list[str]:
    """The first `n` prompt texts of data/eval_prompts.jsonl, then data/seed_prompts.jsonl."""
    texts: list[str] = []
    for path in PROMPT_FILES:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["prompt"])
            except (ValueError, KeyError, TypeError) as exc:
                raise FlywheelError(f"{path.relative_to(ROOT)} line {i}: not a prompt record "
                                    f"({type(exc).__name__}: {exc})",
                                    details=["each line is a JSON object with a \"prompt\" "
                                             "field"]) from None
            if len(texts) == n:
                return texts
    return texts


def judge_conversations(prompts: list[str], answers: list[str]) -> tuple[list, list[dict]]:
    """The pairwise judge calls: prompt i's own answer against the next prompt's answer, shown
    first (A) and then second (B), in the layout of `pairwise_judgments` (all first orders,
    then all second orders). Returns (conversations, what each call compares)."""
    from flywheel.templates import render

    m = len(prompts)
    pairs = [(i, answers[i], answers[(i + 1) % m]) for i in range(m)]
    ordered = [(i, own, other, "own answer as A") for i, own, other in pairs] + \
              [(i, other, own, "own answer as B") for i, own, other in pairs]
    convs, meta = [], []
    for i, a, b, order in ordered:
        convs.append([{"role": "user", "content": render(
            TEMPLATE, prompt=prompts[i], response_a=a, response_b=b)}])
        meta.append({"prompt": i, "order": order})
    return convs, meta


# -- endpoint -----------------------------------------------------------------------------------

def dequantised_copy(src: Path, dst: Path) -> Path:
    """Write `src` to `dst` with every tensor dequantised to float32 (metadata unchanged but
    the file type): llama.cpp then computes with the checkpoint's numbers in float32."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for f in reader.fields.values():
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
            continue  # written by the writer itself
        kind = f.types[0]
        value = 0 if f.name == gguf.Keys.General.FILE_TYPE else f.contents()  # 0: all F32
        writer.add_key_value(f.name, value, kind,
                             sub_type=f.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        writer.add_tensor(t.name, gguf.quants.dequantize(t.data, t.tensor_type)
                          .astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def _timed_backend(endpoint):
    """An `OpenAIBackend` that records (start, seconds, route) of every request it sends."""
    from flywheel.backends.openai import OpenAIBackend

    class Timed(OpenAIBackend):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.requests: list[tuple[float, float, str]] = []

        async def _send(self, client, route, body, **kw):
            t0 = time.perf_counter()
            try:
                return await super()._send(client, route, body, **kw)
            finally:
                self.requests.append((t0, time.perf_counter() - t0, route))

    return Timed(endpoint, cache=None, progress=False)


def endpoint_backend(base_url: str, concurrency: int, extra: dict | None = None):
    from flywheel.backends.openai import Endpoint

    return _timed_backend(Endpoint(role="judge", base_url=base_url, model=ALIAS,
                                   api_key_env=BACKEND_KEY_ENV, concurrency=concurrency,
                                   timeout=300.0, retries=2, extra=dict(extra or {}),
                                   tokenizer=str(CHECKPOINT)))


# -- measurements -----------------------------------------------------------------------------

def throughput(backend, model: str, convs: list, max_new_tokens: int) -> dict:
    """The judge calls with verdict text: requests, wall seconds, tokens."""
    t0 = time.perf_counter()
    gens = backend.generate(model, convs, n=1, temperature=0.0, max_new_tokens=max_new_tokens,
                            seed=0, desc="judge pairwise")
    wall = time.perf_counter() - t0
    flat = [g for row in gens for g in row]
    completion = sum(g.completion_tokens for g in flat)
    return {"requests": len(flat), "wall_s": wall, "requests_per_s": len(flat) / wall,
            "completion_tokens": completion, "completion_tokens_per_s": completion / wall,
            "prompt_tokens": sum(g.prompt_tokens for g in flat)}


def verdict_probs(backend, model: str, convs: list, max_new_tokens: int) -> list[tuple]:
    from flywheel.stages.judging import FORCED_PREFIX, verdict_start

    return backend.rationale_then_probs(
        model, convs, forced_prefix=FORCED_PREFIX["pairwise"], candidates=CANDIDATES,
        max_new_tokens=max_new_tokens, temperature=0.0, seed=0, stop=verdict_start,
        desc="judge pairwise")


def _verdict(probs: dict) -> str | None:
    from flywheel.parsing import verdict_from_probs

    try:
        return verdict_from_probs(probs)
    except ValueError:
        return None


def agreement(local: list[tuple], remote: list[tuple], meta: list[dict]) -> dict:
    """Argmax agreement and probability differences of two readings of the same calls."""
    calls = []
    for (_, why_l, p_l), (_, why_r, p_r), m in zip(local, remote, meta, strict=True):
        v_l, v_r = _verdict(p_l), _verdict(p_r)
        calls.append({**m, "verdict_inprocess": v_l, "verdict_endpoint": v_r,
                      "agree": v_l is not None and v_l == v_r,
                      "abs_diff": {c: abs(p_r.get(c, 0.0) - p_l.get(c, 0.0))
                                   for c in CANDIDATES},
                      "probs_inprocess": p_l, "probs_endpoint": p_r,
                      "rationale_inprocess": why_l, "rationale_endpoint": why_r,
                      "same_rationale": why_l == why_r})
    n = len(calls)
    agree = sum(c["agree"] for c in calls)
    diffs = [d for c in calls for d in c["abs_diff"].values()]
    same = [c for c in calls if c["same_rationale"]]
    differ = [c for c in calls if not c["same_rationale"]]

    def counts(key):
        return {v or "none": sum(c[key] == v for c in calls) for v in [*CANDIDATES, None]}

    def mean_diff(rows):
        values = [d for c in rows for d in c["abs_diff"].values()]
        return statistics.fmean(values) if values else None

    return {"n": n, "agree": agree, "agreement_pct": 100.0 * agree / n if n else 0.0,
            "mean_abs_diff": mean_diff(calls) or 0.0,
            "mean_abs_diff_identical": mean_diff(same),
            "mean_abs_diff_differ": mean_diff(differ),
            "max_abs_diff": max(diffs, default=0.0),
            "identical_rationales": len(same),
            "agree_identical": sum(c["agree"] for c in same),
            "differ": len(differ), "agree_differ": sum(c["agree"] for c in differ),
            "verdicts_inprocess": counts("verdict_inprocess"),
            "verdicts_endpoint": counts("verdict_endpoint"), "calls": calls}


# -- printing ---------------------------------------------------------------------------------

def _pct(k: int, n: int) -> str:
    return f"{k}/{n} = {100.0 * k / n:.1f}%" if n else f"{k}/{n}"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _counts(c: dict) -> str:
    return " / ".join(f"{k} {v}" for k, v in c.items())


def render_agreement(a: dict) -> str:
    met = "yes" if a["agreement_pct"] >= TARGET_AGREEMENT else "**no**"
    rows = [
        ("judge calls (n)", f"{a['n']} ({a['n'] // 2} answer pairs × 2 orders)"),
        ("argmax verdict agreement", _pct(a["agree"], a["n"])),
        (f"agreement ≥ {TARGET_AGREEMENT:.0f}%", met),
        ("mean abs difference of P(A), P(B), P(C)", f"{a['mean_abs_diff']:.4f}"),
        ("max abs difference of P(A), P(B), P(C)", f"{a['max_abs_diff']:.4f}"),
        ("mean abs difference where the rationales are identical / differ",
         f"{_num(a['mean_abs_diff_identical'])} / {_num(a['mean_abs_diff_differ'])}"),
        ("identical rationales", _pct(a["identical_rationales"], a["n"])),
        ("agreement where the rationales are identical",
         _pct(a["agree_identical"], a["identical_rationales"])),
        ("agreement where the rationales differ", _pct(a["agree_differ"], a["differ"])),
        ("verdicts in-process (A / B / C / none)", _counts(a["verdicts_inprocess"])),
        ("verdicts through the endpoint (A / B / C / none)", _counts(a["verdicts_endpoint"])),
    ]
    lines = ["| measurement | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def render_throughput(rows: list[dict]) -> str:
    lines = ["| backend | setting | requests | wall s | requests/s | completion tokens/s | "
             "where the time goes |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['setting']} | {r['requests']} | {r['wall_s']:.2f} "
                     f"| {r['requests_per_s']:.2f} | {r['completion_tokens_per_s']:.1f} "
                     f"| {r['where']} |")
    return "\n".join(lines)


# -- the run ----------------------------------------------------------------------------------

def _positive_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give replica counts >= 1, e.g. 1,2")
    return values


def _dtypes(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in ("float32", "bfloat16", "float16")]
    if not values or bad:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give dtypes among float32, bfloat16, float16, e.g. float32,bfloat16")
    return values


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r}: give a JSON object, e.g. "
                                         '\'{"repeat_penalty": 1.0}\'')
    return value


def demo_extra() -> dict:
    """`models.judge.extra` of configs/endpoint.yaml ({} when it sets none)."""
    import yaml

    try:
        config = yaml.safe_load(DEMO_CONFIG.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    judge = (config.get("models") or {}).get("judge")
    extra = judge.get("extra") if isinstance(judge, dict) else None
    return dict(extra) if isinstance(extra, dict) else {}


def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comparisons", type=int, default=40,
                    help="judge calls: comparisons/2 answer pairs, each judged in both orders "
                         "(even, default 40)")
    ap.add_argument("--replicas", type=_positive_list, default=[1, 2],
                    help="endpoint settings, comma-separated: N llama.cpp replicas with N "
                         "requests in flight (default 1,2); the first also gives the agreement")
    ap.add_argument("--max-new-tokens", type=int, default=16,
                    help="judge tokens per call (default 16)")
    ap.add_argument("--dtypes", type=_dtypes, default=["float32", "bfloat16"],
                    help="in-process dtypes for the throughput table (default float32,bfloat16;"
                         " the agreement always reads float32)")
    ap.add_argument("--answer-tokens", type=int, default=48,
                    help="tokens of the greedy answers that are judged (default 48)")
    ap.add_argument("--dequantised", action="store_true",
                    help="serve a float32 copy of the GGUF (its weights dequantised): a control "
                         "without quantised arithmetic")
    ap.add_argument("--extra", type=_json_object, default=None, metavar="JSON",
                    help="fields merged into every request to the endpoint, as "
                         "models.judge.extra (default: that of configs/endpoint.yaml; '{}': "
                         "none, the server's own sampling defaults)")
    ap.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = ap.parse_args(argv)
    args.extra_source = "--extra" if args.extra is not None else \
        f"models.judge.extra of {DEMO_CONFIG.relative_to(ROOT)}"
    if args.extra is None:
        args.extra = demo_extra()
    limit = 2 * (sum(1 for f in PROMPT_FILES for line in f.read_text().splitlines()
                     if line.strip()))
    if args.comparisons < 2 or args.comparisons % 2 or args.comparisons > limit:
        ap.error(f"--comparisons {args.comparisons}: give an even number from 2 to {limit} "
                 "(each answer pair is judged in both orders)")
    if args.max_new_tokens < 1 or args.answer_tokens < 1:
        ap.error("--max-new-tokens and --answer-tokens: give 1 or more")
    if not (CHECKPOINT / "config.json").is_file():
        ap.error(f"{CHECKPOINT.relative_to(ROOT)} is missing: run `make setup`")
    return args


def run(args) -> dict:
    from flywheel.backends.transformers import TransformersBackend
    from flywheel.modelprep import bundled_gguf
    from flywheel.servers import llama_cpp_missing, llama_cpp_servers

    if llama_cpp_missing():
        raise FlywheelError("llama-cpp-python[server] is not installed (missing: "
                            f"{', '.join(llama_cpp_missing())}): run make setup")
    gguf = bundled_gguf()
    served = (f"a float32 copy of {gguf.name} (weights dequantised)" if args.dequantised
              else gguf.name)
    label = "F32 copy of the GGUF" if args.dequantised else "Q4_1 GGUF"
    info = {"machine": machine(), "gguf": served, "checkpoint": CHECKPOINT.name,
            "comparisons": args.comparisons, "max_new_tokens": args.max_new_tokens,
            "answer_tokens": args.answer_tokens, "template": TEMPLATE,
            "extra": args.extra, "extra_source": args.extra_source}
    prompts = load_prompts(args.comparisons // 2)
    key = os.environ.get(KEY_ENV) or secrets.token_urlsafe(24)
    os.environ[BACKEND_KEY_ENV] = key
    rows: list[dict] = []
    model = str(CHECKPOINT)

    # in-process, float32: answers, throughput, verdict probabilities
    local = None
    convs = meta = None
    for dtype in dict.fromkeys(["float32", *args.dtypes]):
        backend = TransformersBackend(dtype=dtype, batch_size=BATCH_SIZE, progress=False)
        t0 = time.perf_counter()
        backend.load(model)
        load_s = time.perf_counter() - t0
        if convs is None:
            t0 = time.perf_counter()
            gens = backend.generate(model, [[{"role": "user", "content": p}] for p in prompts],
                                    temperature=0.0, max_new_tokens=args.answer_tokens,
                                    desc="answers")
            info["answers_s"] = time.perf_counter() - t0
            info["answers"] = [row[0].text for row in gens]
            convs, meta = judge_conversations(prompts, info["answers"])
        if dtype in args.dtypes:
            r = throughput(backend, model, convs, args.max_new_tokens)
            rows.append({"backend": "transformers (in-process)",
                         "setting": f"{dtype}, batch {BATCH_SIZE}, "
                                    f"{info['machine']['torch_threads']} torch threads",
                         **r, "load_s": load_s,
                         "where": f"load {load_s:.1f} s; generation {r['wall_s']:.1f} s"})
        if dtype == "float32":
            t0 = time.perf_counter()
            local = verdict_probs(backend, model, convs, args.max_new_tokens)
            info["agreement_inprocess_s"] = time.perf_counter() - t0
        backend.release()

    # the endpoint: per replica count, a fresh server; the first also reads the verdicts
    remote = None
    with tempfile.TemporaryDirectory(prefix="flywheel-bench-endpoint-") as tmp:
        if args.dequantised:
            t0 = time.perf_counter()
            gguf = dequantised_copy(gguf, Path(tmp) / gguf.name.replace(".gguf", ".F32.gguf"))
            info["dequantise_s"] = time.perf_counter() - t0
        for n in args.replicas:
            t0 = time.perf_counter()
            with llama_cpp_servers(gguf, api_key=key, alias=ALIAS, parallel=n,
                                   log_path=Path(tmp) / f"llama-{n}.log") as base_url:
                start_s = time.perf_counter() - t0
                backend = endpoint_backend(base_url, concurrency=n, extra=args.extra)
                r = throughput(backend, ALIAS, convs, args.max_new_tokens)
                sent = sorted(backend.requests)
                first = sent[0][1]
                mean = statistics.fmean(s for _, s, _ in sent)
                threads = ("llama.cpp default threads" if n == 1
                           else f"{max(1, (os.cpu_count() or 1) // n)} thread(s) each")
                rows.append({"backend": f"openai → llama.cpp server ({label})",
                             "setting": f"{n} replica{'s' * (n > 1)} ({threads}), "
                                        f"concurrency {n}",
                             **r, "replicas": n, "server_start_s": start_s,
                             "first_request_s": first, "mean_latency_s": mean,
                             "sent": backend.sent, "retried": backend.retried,
                             "where": f"server start {start_s:.1f} s; first request "
                                      f"{first:.2f} s; mean latency {mean:.2f} s"})
                if remote is None:
                    t0, sent_before = time.perf_counter(), backend.sent
                    remote = verdict_probs(backend, ALIAS, convs, args.max_new_tokens)
                    info["agreement_endpoint_s"] = time.perf_counter() - t0
                    info["agreement_endpoint_requests"] = backend.sent - sent_before
                    info["agreement_endpoint_replicas"] = n
    info["machine"]["loadavg_end"] = _loadavg()
    info["agreement"] = agreement(local, remote, meta)
    info["throughput"] = rows
    return info


def verdict_timing(info: dict) -> str:
    """The verdict-probability path's time (the agreement's calls), both ways."""
    n = info["agreement"]["n"]
    local, remote = info["agreement_inprocess_s"], info["agreement_endpoint_s"]
    return (f"\nverdict probabilities (the agreement's {n} calls, rationale then forced verdict): "
            f"in-process float32 {local:.1f} s ({n / local:.2f} calls/s); endpoint "
            f"{remote:.1f} s ({n / remote:.2f} calls/s, {info['agreement_endpoint_requests']} "
            f"requests, {info['agreement_endpoint_replicas']} replica(s))")


def header(info: dict) -> str:
    m = info["machine"]
    fields = (f"{json.dumps(info['extra'])} added to every request" if info["extra"]
              else "no extra fields (the server's sampling defaults)")
    fields += f", from {info['extra_source']}"
    return (f"machine: {m['nproc']} CPU cores ({m['cpu']}), {m['date']}; load average "
            f"{m['loadavg_start']} at the start, {m['loadavg_end']} at the end\n"
            f"versions: Python {m['python']}, torch {m['torch']}, transformers "
            f"{m['transformers']}, llama-cpp-python {m['llama_cpp_python']}\n"
            f"models: {info['checkpoint']} in-process, {info['gguf']} behind the endpoint\n"
            f"requests to the endpoint: {fields}\n"
            f"workload: {info['comparisons']} pairwise judge calls ({info['comparisons'] // 2} "
            f"prompts: own greedy answer of {info['answer_tokens']} tokens vs the next "
            f"prompt's, both orders), {info['template']}, temperature 0, max_new_tokens "
            f"{info['max_new_tokens']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        info = run(args)
    except FlywheelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    info["total_s"] = time.perf_counter() - t0
    print(header(info))
    print("\nagreement of verdict probabilities (judge.verdict: logprobs; in-process float32 vs "
          f"endpoint, {info['agreement_endpoint_replicas']} replica(s)):\n")
    print(render_agreement(info["agreement"]))
    print("\nthroughput, the same judge calls with verdict text (wall s: the workload alone):\n")
    print(render_throughput(info["throughput"]))
    print(verdict_timing(info))
    print(f"\ntotal {info['total_s']:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
        print(f"numbers written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
