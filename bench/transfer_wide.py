"""A wider transfer check than the eval file's transfer split: the eval file's tasks (both
splits: topics kept out of training) each given two fresh draws of constraints from the library,
instructed in transfer phrasings only — 178 prompts, about 250 checks instead of 42 — so that
one model's transfer pass rate moves by 0.4 points per check, not 2.4.

    python bench/transfer_wide.py MODEL_DIR [MODEL_DIR ...] [--workspace WS]

With --workspace, the models are the workspace's round models (round 0 is the base model) in
round order. Greedy answers, 48 new tokens, bf16, as the demo's eval. Prints a markdown table:
per model, the pass rate over all checks, per constraint type, and mean answer length. The
prompt set is drawn with a fixed seed (20261130), so every run scores the same prompts.
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SEED = 20261130


def prompts() -> list[dict]:
    from flywheel.constraints import phrase_constraints, sample_constraints, strip_instructions
    from flywheel.promptfile import load_prompt_file

    rng = random.Random(SEED)
    out = []
    for r in load_prompt_file(ROOT / "data" / "eval_prompts.jsonl"):
        task = strip_instructions(r["prompt"], r["constraints"]) if r["constraints"] \
            else r["prompt"]
        for v in range(2):
            cons = sample_constraints(rng, 1 if rng.random() < 0.6 else 2)
            out.append({"id": f"{r['id']}-v{v}", "constraints": cons,
                        "prompt": f"{task} {phrase_constraints(cons, rng, split='transfer')}"})
    return out


def workspace_models(ws: Path) -> list[tuple[str, str]]:
    from flywheel.catalog.store import read_connection

    con = read_connection(ws / "flywheel.duckdb")  # read-only
    try:
        rows = con.execute("SELECT v.round, m.path FROM models m JOIN versions v "
                           "USING (version_id) ORDER BY v.round").fetchall()
    finally:
        con.close()
    return [(f"round {r}", path) for r, path in rows]


def score(backend, path: str, items: list[dict]) -> dict:
    from flywheel.constraints import verify
    from flywheel.stages.sampling import conversation

    gens = backend.generate(path, [conversation(p["prompt"]) for p in items], n=1,
                            temperature=0.0, max_new_tokens=48, desc="wide transfer")
    per = collections.defaultdict(lambda: [0, 0])
    chars = 0
    for p, [g] in zip(items, gens):
        chars += len(g.text)
        for r in verify(g.text, p["constraints"]):
            per[r.type][0] += r.passed
            per[r.type][1] += 1
    passed = sum(a for a, _ in per.values())
    checks = sum(n for _, n in per.values())
    return {"pass": passed / checks, "checks": checks, "chars": chars / len(items),
            "types": {t: a / n for t, (a, n) in sorted(per.items())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="*")
    ap.add_argument("--workspace", type=Path)
    args = ap.parse_args()
    from flywheel.backends.transformers import TransformersBackend

    named = [(Path(m).name, m) for m in args.models]
    if args.workspace:
        named += workspace_models(args.workspace)
    if not named:
        ap.error("name a model directory or a --workspace")
    items = prompts()
    backend = TransformersBackend(dtype="bfloat16", batch_size=32, progress=False)
    results = [(name, score(backend, path, items)) for name, path in named]
    types = sorted({t for _, r in results for t in r["types"]})
    print(f"\n{len(items)} prompts, {results[0][1]['checks']} checks (seed {SEED})\n")
    print("| model | pass | chars | " + " | ".join(types) + " |")
    print("|---|---|---|" + "---|" * len(types))
    for name, r in results:
        print(f"| {name} | {100 * r['pass']:.1f}% | {r['chars']:.0f} | "
              + " | ".join(f"{100 * r['types'].get(t, 0):.0f}" for t in types) + " |")


if __name__ == "__main__":
    main()
