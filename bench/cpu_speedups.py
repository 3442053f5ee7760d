"""CPU speed-ups of sampling and training, each timed against what it replaced, side by side,
with the results compared.

    python bench/cpu_speedups.py [--repeats 3]

1. Sampling: the demo's sampling stage on the bundled SmolLM2-135M-Instruct (24 seed prompts x
   4 candidates, 48 new tokens, temperature 1.0, top_p 0.9, bf16, batch 32), with top-p done
   by transformers' TopPLogitsWarper (a full sort of the 49k vocabulary per step) and by
   flywheel's NucleusWarper (the nucleus among the 512 most probable tokens, a full sort only
   for a row whose nucleus is wider). Same seeds, so the same candidates but where a boundary
   token's summed probability rounds differently: the table counts the candidates that differ.
   Then the draw: transformers' `torch.multinomial` (an exponential variate for every token
   of the vocabulary) against flywheel's InverseCdfSampler (one uniform number a row and a
   cumulative sum): the same distribution, other draws; the table gives both mean lengths.
2. Training: the demo's training step (SFT on verified passes, then DPO+NLL, LoRA, bf16) on a
   fixed set of pairs made from the seed file (chosen: the gold answer; rejected: its first
   sentence cut to 6 words), with TRL's fused LM head scoring every position (TRL's CPU default)
   and only the labelled ones (`score_labelled_positions_only`). The losses are compared.

Prints a markdown table: median wall time of each variant (after one warm-up for sampling), the
ratio, and whether the outputs agree.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
SEEDS = ROOT / "data" / "seed_prompts.jsonl"


def _seeds() -> list[dict]:
    return [json.loads(line) for line in SEEDS.read_text().splitlines() if line.strip()]


def bench_sampling(repeats: int) -> dict:
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList
    from transformers.generation.logits_process import TopPLogitsWarper

    from flywheel.backends import transformers as tb
    from flywheel.stages.sampling import conversation

    convs = [conversation(s["prompt"]) for s in _seeds()[:24]]
    backend = tb.TransformersBackend(dtype="bfloat16", batch_size=32, progress=False)
    backend.load(str(MODEL))

    class MultinomialDraw(LogitsProcessor):
        """transformers' draw (`torch.multinomial` of the softmax), as a processor."""

        def __init__(self, generator):
            self.generator = generator

        def __call__(self, input_ids, scores):
            token = torch.multinomial(scores.float().softmax(dim=-1), 1,
                                      generator=self.generator)
            return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)

    variants = {
        "full": lambda t, p, g: LogitsProcessorList([TopPLogitsWarper(p), MultinomialDraw(g)]),
        "nucleus": lambda t, p, g: LogitsProcessorList([tb.NucleusWarper(p),
                                                        MultinomialDraw(g)]),
        "cdf": tb.sampling_processors,
    }

    def run(name) -> tuple[float, list[str]]:
        saved, tb.sampling_processors = tb.sampling_processors, variants[name]
        try:
            start = time.perf_counter()
            out = backend.generate(str(MODEL), convs, n=4, temperature=1.0, top_p=0.9,
                                   max_new_tokens=48, seed=7)
            return time.perf_counter() - start, [g.text for row in out for g in row]
        finally:
            tb.sampling_processors = saved

    run("cdf")  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    texts = {}
    for _ in range(repeats):
        for name in variants:
            seconds, texts[name] = run(name)
            times[name].append(seconds)
    differ = sum(a != b for a, b in zip(texts["full"], texts["nucleus"]))
    chars = {name: statistics.mean(len(t) for t in texts[name]) for name in variants}
    return {**{name: statistics.median(times[name]) for name in variants},
            "agree": f"{len(texts['full']) - differ}/{len(texts['full'])} candidates identical",
            "chars": chars}


def _pairs():
    import pandas as pd

    rows, text = [], {}
    for s in _seeds():
        if not s.get("gold"):
            continue
        cut = " ".join(s["gold"].split(".")[0].split()[:6])
        rows.append({"prompt_id": s["id"], "chosen_text": s["gold"], "rejected_text": cut,
                     "rule": "verifier", "chosen_score": 1.0})
        text[s["id"]] = s["prompt"]
    return pd.DataFrame(rows[:20]), text


def bench_training(repeats: int) -> dict:
    from flywheel.config import load_config
    from flywheel.stages import train

    cfg = load_config(ROOT / "configs" / "demo.yaml").train
    pairs, text = _pairs()
    real = train.score_labelled_positions_only
    import trl.trainer.utils as trl_utils

    before = trl_utils._use_triton
    original = getattr(before, "original", before)
    times: dict[str, list[float]] = {"every": [], "labelled": []}
    losses = {}
    try:
        for _ in range(repeats):
            for name in ("every", "labelled"):
                trl_utils._use_triton = original
                train.score_labelled_positions_only = (real if name == "labelled"
                                                       else (lambda: False))
                with tempfile.TemporaryDirectory() as tmp:
                    start = time.perf_counter()
                    m = train.train_lora(str(MODEL), pairs, text, cfg, Path(tmp) / "out",
                                         seed=1, progress=False, dtype="bfloat16",
                                         log=lambda *_: None)
                    times[name].append(time.perf_counter() - start)
                losses[name] = (m["sft_loss"], m["train_loss"])
    finally:
        train.score_labelled_positions_only = real
        trl_utils._use_triton = before
    same = losses["every"] == losses["labelled"]
    return {"every": statistics.median(times["every"]),
            "labelled": statistics.median(times["labelled"]),
            "agree": ("identical SFT and DPO losses" if same else
                      f"losses differ: {losses['every']} vs {losses['labelled']}"),
            "pairs": len(pairs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import torch

    s = bench_sampling(args.repeats)
    t = bench_training(args.repeats)
    print(f"\n{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, median of {args.repeats}\n")
    print("| step | before | after | ratio | outputs |")
    print("|---|---|---|---|---|")
    print(f"| sampling, 96 candidates (top-p: full sort → NucleusWarper) | {s['full']:.1f} s | "
          f"{s['nucleus']:.1f} s | {s['full'] / s['nucleus']:.2f}x | {s['agree']} |")
    print(f"| sampling, 96 candidates (the draw: torch.multinomial → InverseCdfSampler) | "
          f"{s['nucleus']:.1f} s | {s['cdf']:.1f} s | {s['nucleus'] / s['cdf']:.2f}x | other "
          f"draws of the same distribution: mean {s['chars']['nucleus']:.0f} vs "
          f"{s['chars']['cdf']:.0f} chars |")
    print(f"| sampling, both (transformers' sampling → flywheel's) | {s['full']:.1f} s | "
          f"{s['cdf']:.1f} s | {s['full'] / s['cdf']:.2f}x | |")
    print(f"| training, {t['pairs']} pairs (LM head: every position → labelled ones) | "
          f"{t['every']:.1f} s | {t['labelled']:.1f} s | {t['every'] / t['labelled']:.2f}x | "
          f"{t['agree']} |")


if __name__ == "__main__":
    main()
