"""One typed config tree for the whole flywheel, loaded from defaults + YAML + ``--set``.

Every setting is a field of a plain dataclass, with its help text in
``field(metadata={"help": ...})`` (and allowed values in ``metadata["choices"]``),
so the class docstrings, :func:`config_reference` and the README all come from
one place.  A YAML file is a *diff* against the defaults; ``--set a.b=c``
overrides are applied after it.  All problems (unknown keys, wrong types, bad
values) are collected and raised together as one :class:`FlywheelError`.

This module imports only the standard library and PyYAML: it must stay fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flywheel.errors import FlywheelError

__all__ = [
    "Config",
    "catalog_path",
    "fingerprint_problems",
    "shaping",
    "EvalConfig",
    "JudgeConfig",
    "ModelsConfig",
    "PairsConfig",
    "PromptsConfig",
    "RoleConfig",
    "SamplingConfig",
    "TrainConfig",
    "config_reference",
    "dump_yaml",
    "load_config",
    "validate",
]

SET_LABEL = "--set"
DEFAULTS_LABEL = "defaults"

DPO_LOSS_TYPES: tuple[str, ...] = (
    "sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm", "exo_pair", "nca_pair",
)


def _type_name(hint: Any) -> str:
    """``int``, ``float``, ``list[str]``, ... for messages and docs."""
    if typing.get_origin(hint) is list:
        return f"list[{_type_name(typing.get_args(hint)[0])}]"
    return getattr(hint, "__name__", str(hint))


def _default_repr(f: dataclasses.Field) -> str:
    """The repr of a field's default value."""
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    return repr(f.default_factory())  # type: ignore[misc]


def _help_text(f: dataclasses.Field) -> str:
    """A field's help text, with its allowed values appended."""
    text = f.metadata.get("help", "")
    choices = f.metadata.get("choices")
    return f"{text} One of: {', '.join(choices)}." if choices else text


#: How a setting enters the fingerprint of the stage its section configures (every leaf
#: setting declares one; `fingerprint_problems` lists any that does not):
#: it shapes the stage's output, so it is part of the fingerprint;
SHAPES = "shapes"
#: it shapes the output but joined after versions were made: part of the fingerprint only
#: when not at its default, so versions made before it existed keep their fingerprints (a new
#: setting that shapes a stage is declared ADDED);
ADDED = "added"
#: it names a model or file whose content hash (not the path) is part of the fingerprint;
BY_CONTENT = "by-content"
#: it enters the fingerprint through a value derived from it, which the stage names (e.g.
#: train.dtype as the dtype training runs in, after `auto` is resolved);
DERIVED = "derived"
#: it changes how a stage runs, not what it makes (paths, devices, progress bars, checkpoint
#: cadence): never part of the fingerprint.
OPERATIONAL = "operational"
FINGERPRINT_ROLES = (SHAPES, ADDED, BY_CONTENT, DERIVED, OPERATIONAL)


def _meta(doc: str, choices: Sequence[str] = (), *, fp: str, stage: str = "",
          key: str = "") -> dict[str, Any]:
    """Field metadata: help text, the allowed choices where values are restricted, and how the
    setting enters a fingerprint: `fp` (one of FINGERPRINT_ROLES); `stage` where it shapes a
    stage other than its section's (the gate's settings live in `eval`); `key` where the
    fingerprint names it differently."""
    meta: dict[str, Any] = {"help": doc, "fingerprint": fp}
    if choices:
        meta["choices"] = tuple(choices)
    if stage:
        meta["stage"] = stage
    if key:
        meta["key"] = key
    return meta


def _section(doc: str) -> dict[str, Any]:
    """Metadata of a section field of the root (its settings declare their own roles)."""
    return {"help": doc}


def _documented(cls: type) -> type:
    """Append a TRL-style ``Fields:`` list, built from the field metadata, to the docstring."""
    hints = typing.get_type_hints(cls)
    lines = [(cls.__doc__ or "").rstrip(), "", "Fields:"]
    for f in dataclasses.fields(cls):
        lines.append(f"    {f.name} ({_type_name(hints[f.name])}, default {_default_repr(f)}):")
        lines.append(f"        {_help_text(f)}")
    cls.__doc__ = "\n".join(lines)
    return cls


# --------------------------------------------------------------------------- sections


#: The backends a model role can use: in-process (the `models.backend`, loaded from a local
#: checkpoint) or an OpenAI-compatible endpoint.
ROLE_BACKENDS = ("local", "openai")
#: The roles a model plays.
ROLES = ("policy", "judge", "generator")


@_documented
@dataclass
class RoleConfig:
    """One model role (models.policy, models.judge, models.generator): a local checkpoint
    (`path`), or a model served behind an OpenAI-compatible endpoint (`backend: openai`,
    `base_url`, `model`). A plain string is the path: `models.judge: judges/x` means
    `models.judge.path: judges/x`, in YAML and in --set."""

    #: the field a plain string sets
    SHORTHAND: typing.ClassVar[str] = "path"

    path: str = field(
        default="",
        metadata=_meta("Local checkpoint directory (backend local). For the judge and the "
                       "generator, empty = the current policy.", fp=BY_CONTENT),
    )
    backend: str = field(
        default="local",
        metadata=_meta("local: the checkpoint at `path`, run in-process by models.backend; "
                       "openai: the model `model` served at `base_url` (vLLM, llama.cpp, a "
                       "hosted API).", ROLE_BACKENDS, fp=DERIVED),
    )
    base_url: str = field(
        default="",
        metadata=_meta("Endpoint base URL, up to /v1 (e.g. http://127.0.0.1:8000/v1). "
                       "Recorded with every judgment (without credentials); not part of the "
                       "fingerprint, so replicas and ports can change.", fp=OPERATIONAL),
    )
    model: str = field(
        default="",
        metadata=_meta("The served model id, as the endpoint's /v1/models lists it. With what "
                       "the server reports about it, part of the fingerprint.", fp=DERIVED),
    )
    api_key_env: str = field(
        default="",
        metadata=_meta("Name of the environment variable holding the API key (the key itself "
                       "is never in the config, the catalog or a log); empty = no key.",
                       fp=OPERATIONAL),
    )
    concurrency: int = field(
        default=8, metadata=_meta("Requests in flight at once.", fp=OPERATIONAL))
    timeout: float = field(
        default=120.0, metadata=_meta("Seconds to wait for one response.", fp=OPERATIONAL))
    retries: int = field(
        default=5,
        metadata=_meta("Retries per request on 429, 5xx, timeouts, dropped connections and "
                       "malformed responses (exponential backoff with jitter, honouring "
                       "Retry-After).", fp=OPERATIONAL),
    )
    extra: dict = field(
        default_factory=dict,
        metadata=_meta("Extra fields merged into every request body (e.g. {top_k: 20}); part "
                       "of the fingerprint.", fp=DERIVED),
    )
    tokenizer: str = field(
        default="",
        metadata=_meta("Optional local checkpoint whose chat template the served model uses: "
                       "with judge.verdict: logprobs, the verdict is then forced after the "
                       "rationale (as in-process) through /v1/completions; without it the "
                       "probabilities are read at the verdict the judge writes itself.",
                       fp=DERIVED),
    )
    revision: str = field(
        default="",
        metadata=_meta("Pin: the endpoint's identity (logged when a run starts, and kept as "
                       "judge_hash in every judgment) or the served model's root; a run "
                       "refuses to start when the server serves something else.",
                       fp=OPERATIONAL),
    )

    @property
    def endpoint(self) -> bool:
        """Whether this role is served behind an endpoint."""
        return self.backend != "local"


def _role(path: str = "") -> RoleConfig:
    return RoleConfig(path=path)


#: The LoRA ranks vLLM accepts for --max-lora-rank.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@_documented
@dataclass
class VLLMConfig:
    """The managed vLLM server of `models.backend: vllm`: flywheel starts `vllm serve` from
    its own Python environment on a free loopback port, feeds it each round's policy, puts it
    to sleep (or stops it) while training runs, and stops it however the run ends."""

    python: str = field(
        default=".venv-vllm/bin/python",
        metadata=_meta("Interpreter of the environment that has vLLM (vLLM pins versions "
                       "Prefect cannot share): `make setup-vllm` makes .venv-vllm on a GPU "
                       "machine.", fp=OPERATIONAL),
    )
    tensor_parallel_size: int = field(
        default=1, metadata=_meta("GPUs one model is split over (vLLM --tensor-parallel-size).",
                                  fp=OPERATIONAL))
    gpu_memory_utilization: float = field(
        default=0.85,
        metadata=_meta("Share of each GPU's memory vLLM may take for weights and KV cache "
                       "(--gpu-memory-utilization). Lower it when training shares the GPU and "
                       "runs out of memory.", fp=OPERATIONAL),
    )
    max_model_len: int = field(
        default=4096, metadata=_meta("Context length the server allows (--max-model-len).",
                                     fp=OPERATIONAL))
    enable_prefix_caching: bool = field(
        default=True, metadata=_meta("Automatic prefix caching: the n candidates of a prompt "
                                     "and the judge's shared instructions reuse KV blocks.",
                                     fp=OPERATIONAL))
    dtype: str = field(
        default="auto",
        metadata=_meta("Weights dtype of the server (--dtype); auto = models.dtype.",
                       ("auto", "bfloat16", "float16", "float32"), fp=SHAPES),
    )
    extra_args: list[str] = field(
        default_factory=list,
        metadata=_meta("Further `vllm serve` arguments, as a list (e.g. [--quantization, "
                       "fp8]); part of the fingerprint.", fp=SHAPES),
    )
    policy_update: str = field(
        default="restart",
        metadata=_meta("How the server gets each round's policy: restart (on the merged "
                       "checkpoint) or lora (keep the base loaded with --enable-lora and load "
                       "the round's adapter, stacked relative to the base, under a name of its "
                       "own; falls back to a restart when the stacked rank exceeds "
                       "max_lora_rank).", ("restart", "lora"), fp=SHAPES),
    )
    max_lora_rank: int = field(
        default=64,
        metadata=_meta("--max-lora-rank with policy_update: lora (one of "
                       + ", ".join(map(str, VLLM_LORA_RANKS)) + "): at least train.lora_r times "
                       "the rounds whose adapters are stacked.", fp=OPERATIONAL),
    )
    during_training: str = field(
        default="sleep",
        metadata=_meta("What the server does while training uses the GPU: sleep (level 1: "
                       "weights to CPU RAM, KV cache dropped; woken after, in well under a "
                       "second), stop (restarted after), or keep (a GPU of its own or room "
                       "to spare).", ("sleep", "stop", "keep"), fp=OPERATIONAL),
    )
    startup_timeout: float = field(
        default=600.0, metadata=_meta("Seconds to wait for the server's /health after a "
                                      "start.", fp=OPERATIONAL))
    concurrency: int = field(
        default=64, metadata=_meta("Requests in flight at once (vLLM batches them).",
                                   fp=OPERATIONAL))


@_documented
@dataclass
class ModelsConfig:
    """Which models play which role, and how the local ones run."""

    policy: RoleConfig = field(
        default_factory=lambda: _role("models/SmolLM2-135M-Instruct"),
        metadata=_section("The policy: base checkpoint (a local directory); round 1 samples "
                          "from it, every round trains it."),
    )
    judge: RoleConfig = field(
        default_factory=_role,
        metadata=_section("The judge: a fixed checkpoint or endpoint; no path and no endpoint "
                          "= the current policy judges itself (self-rewarding)."),
    )
    generator: RoleConfig = field(
        default_factory=_role,
        metadata=_section("The prompt generator: a fixed checkpoint or endpoint; empty = the "
                          "current policy."),
    )
    backend: str = field(
        default="transformers",
        metadata=_meta("Inference backend of the local roles (the policy, and a judge or "
                       "generator given as a checkpoint): transformers (in-process) or vllm (a "
                       "managed `vllm serve`, see models.vllm).", ("transformers", "vllm"),
                       fp=SHAPES)
    )
    vllm: VLLMConfig = field(
        default_factory=VLLMConfig,
        metadata=_section("The managed vLLM server (models.backend: vllm)."),
    )
    device: str = field(
        default="cpu",
        metadata=_meta("Device for inference and training: cpu; cuda (= cuda:0); cuda:N (the "
                       "N-th GPU torch sees, after CUDA_VISIBLE_DEVICES; one-process training "
                       "uses that GPU, train.num_processes N > 1 GPUs 0 to N-1); auto (cuda:0 "
                       "where torch sees a GPU, else the CPU). A GPU that is not there is an "
                       "error naming this setting.",
                       fp=OPERATIONAL),
    )
    dtype: str = field(
        default="float32",
        metadata=_meta("Dtype models are loaded in for inference, and for training unless "
                       "train.dtype says otherwise. float32: full precision. bfloat16: half "
                       "the memory; trains with bf16 mixed precision (LoRA weights float32) on "
                       "the CPU or a GPU of compute capability 8.0+. float16: GPU only (fp16 "
                       "mixed precision with a gradient scaler).",
                       ("float32", "bfloat16", "float16"), fp=SHAPES),
    )
    batch_size: int = field(default=16, metadata=_meta("Generation batch size.", fp=SHAPES))


@_documented
@dataclass
class PromptsConfig:
    """Self-instruct prompt generation: grow the prompt pool each round."""

    seed_file: str = field(
        default="data/seed_prompts.jsonl",
        metadata=_meta("JSONL file of seed prompts that start the pool.", fp=SHAPES),
    )
    num_new: int = field(default=8, metadata=_meta("New prompts to accept per round.", fp=SHAPES))
    max_attempts: int = field(
        default=24, metadata=_meta("Generation attempts per round at most.", fp=SHAPES)
    )
    few_shot: int = field(default=8, metadata=_meta("Examples drawn from the pool per attempt.",
                                                    fp=SHAPES))
    temperature: float = field(
        default=0.9, metadata=_meta("Sampling temperature for prompt generation.", fp=SHAPES)
    )
    top_p: float = field(
        default=0.95, metadata=_meta("Nucleus-sampling top_p for prompt generation.", fp=SHAPES)
    )
    max_new_tokens: int = field(
        default=64, metadata=_meta("Maximum tokens per generated prompt.", fp=SHAPES)
    )
    min_chars: int = field(
        default=16, metadata=_meta("Generated prompts shorter than this many characters are "
                                   "rejected.", fp=SHAPES)
    )
    max_chars: int = field(
        default=400, metadata=_meta("Generated prompts longer than this many characters are "
                                    "rejected.", fp=SHAPES)
    )
    max_prompt_tokens: int = field(
        default=1024,
        metadata=_meta("Longest prompt in tokens of the policy's tokenizer: longer lines of the "
                       "seed and eval files (and of `flywheel ingest`) are refused with file "
                       "and line; longer self-instruct prompts are dropped and counted.",
                           fp=ADDED),
    )
    dedupe_threshold: float = field(
        default=0.6,
        metadata=_meta("Character 3-gram Jaccard similarity at or above which a new prompt is a "
                       "near-duplicate of the pool (and rejected).", fp=SHAPES),
    )
    constraint_prob: float = field(
        default=0.8,
        metadata=_meta("Probability that a new prompt gets constraints from the constraint "
                       "library.", fp=SHAPES),
    )
    max_constraints: int = field(
        default=1, metadata=_meta("Constraints drawn per new prompt (1 to this many).", fp=SHAPES)
    )
    constraint_types: list[str] = field(
        default_factory=list,
        metadata=_meta("Constraint-library subset to draw from; empty = all.", fp=SHAPES),
    )
    phrasings: str = field(
        default="one",
        metadata=_meta("How a new prompt's constraint instructions are worded: one (each "
                       "type's usual sentence) or varied (one of the type's training "
                       "phrasings, drawn per prompt). The transfer phrasings, held out for "
                       "the eval's transfer split, are never used.", ("one", "varied"),
                       fp=ADDED),
    )
    template: str = field(
        default="self_instruct.j2",
        metadata=_meta("Prompt-generation template: a file name, looked up in prompts/ of the "
                       "current directory, then among the templates shipped with "
                       "flywheel.", fp=SHAPES)
    )


@_documented
@dataclass
class SamplingConfig:
    """Sampling candidate answers from the current policy."""

    n: int = field(default=4, metadata=_meta("Candidate answers per prompt.", fp=SHAPES))
    temperature: float = field(
        default=0.7, metadata=_meta("Sampling temperature for candidates (0 = greedy).", fp=SHAPES)
    )
    top_p: float = field(default=0.9, metadata=_meta("Nucleus-sampling top_p for candidates.",
                                                     fp=SHAPES))
    max_new_tokens: int = field(
        default=96, metadata=_meta("Maximum tokens per candidate answer.", fp=SHAPES)
    )
    prompts_per_round: int = field(
        default=32,
        metadata=_meta("Prompts sampled per round: the round's new prompts first, then a seeded "
                       "draw from the rest of the pool; 0 = the whole pool.", fp=SHAPES),
    )
    balance_types: bool = field(
        default=False,
        metadata=_meta("Draw the pool's prompts so that constraint types are evenly covered: "
                       "each pick takes a prompt of the type the round has fewest of so far "
                       "(prompts without constraints count as one type), instead of a plain "
                       "seeded draw. The round's new prompts still come first.", fp=ADDED),
    )
    explore_budget: int = field(
        default=0,
        metadata=_meta("Exploration: extra candidates per round, in total, for prompts whose "
                       "candidates all pass or all fail their constraints (no verifier pair); "
                       "prompts whose candidates all fail go first; 0 = off. DPO only.",
                       fp=ADDED),
    )
    explore_n: int = field(
        default=2,
        metadata=_meta("Exploration: extra candidates per such prompt per exploration pass.",
                       fp=ADDED),
    )
    explore_rounds: int = field(
        default=2,
        metadata=_meta("Exploration: passes at most; each draws again for the prompts that "
                       "still have no pass and fail, until the budget is spent.", fp=ADDED),
    )
    explore_temperature: float = field(
        default=1.0,
        metadata=_meta("Exploration: sampling temperature of the extra candidates.", fp=ADDED),
    )


@_documented
@dataclass
class JudgeConfig:
    """Scoring candidates: verifiers first, then the LLM judge."""

    mode: str = field(
        default="hybrid",
        metadata=_meta("How the LLM judge compares candidates: pointwise scores, pairwise "
                       "comparisons, or hybrid (pointwise ranks, pairwise confirms).",
                       ("pointwise", "pairwise", "hybrid"), fp=SHAPES),
    )
    verdict: str = field(
        default="text",
        metadata=_meta("How verdicts are read: text parses the judge's text; logprobs uses "
                       "next-token probabilities over the allowed verdicts after the rationale.",
                       ("text", "logprobs"), fp=SHAPES),
    )
    samples: int = field(
        default=3, metadata=_meta("Pointwise judge samples per candidate, averaged.", fp=SHAPES)
    )
    temperature: float = field(
        default=0.7,
        metadata=_meta("Judge sampling temperature when samples > 1 (a single sample is "
                       "greedy).", fp=SHAPES),
    )
    max_new_tokens: int = field(default=160, metadata=_meta("Judge rationale length in tokens.",
                                                            fp=SHAPES))
    verifiers: bool = field(
        default=True,
        metadata=_meta("Check prompts' constraints with verifiers; verifier pass/fail ranks "
                       "first, the LLM judge orders ties.", fp=SHAPES),
    )
    llm_on: str = field(
        default="all",
        metadata=_meta("Which prompts the LLM judge sees: all, or ties (only prompts whose "
                       "candidates the verifiers cannot separate, and prompts without "
                       "constraints; saves most judge time when verifiers decide).",
                       ("all", "ties"), fp=SHAPES),
    )
    pointwise_template: str = field(
        default="pointwise.j2",
        metadata=_meta("Pointwise judge template: a file name, looked up in prompts/ of the "
                       "current directory, then among the templates shipped with "
                       "flywheel.", fp=SHAPES)
    )
    pairwise_template: str = field(
        default="pairwise.j2",
        metadata=_meta("Pairwise judge template: a file name, looked up in prompts/ of the "
                       "current directory, then among the templates shipped with "
                       "flywheel.", fp=SHAPES)
    )
    canary_file: str = field(
        default="data/canary.jsonl",
        metadata=_meta("JSONL canary set judged every round in both orders by the round's "
                       "judge (comparisons with a known right answer: judge drift in "
                       "judge_stats); empty = none.", fp=BY_CONTENT, stage="canary"),
    )


@_documented
@dataclass
class PairsConfig:
    """Turning judged candidates into (chosen, rejected) preference pairs."""

    min_margin: float = field(
        default=1.0,
        metadata=_meta("Minimum LLM-judge score margin between chosen and rejected when the "
                       "verifiers tie.", fp=SHAPES),
    )
    min_verifier_margin: float = field(
        default=0.01,
        metadata=_meta("Minimum verifier pass-fraction margin for a verifier-decided pair.",
                       fp=SHAPES),
    )
    require_agreement: bool = field(
        default=True,
        metadata=_meta("Keep an LLM-decided pair only if the pairwise judge agrees in both "
                       "orders.", fp=SHAPES),
    )
    max_length_ratio: float = field(
        default=0.0,
        metadata=_meta("Drop pairs whose chosen/rejected length ratio exceeds this; 0 = no cap.",
                       fp=SHAPES),
    )
    min_length_ratio: float = field(
        default=0.0,
        metadata=_meta("Drop pairs whose chosen answer is shorter than this times the rejected "
                       "one (in characters); where the prompt bounds length from above "
                       "(max_words, max_sentences) and the rejected answer breaks the bound, "
                       "times the length the bound allows (the rejected length scaled by n over "
                       "its count). Repaired answers too. Keeps 'shorter' from being what every "
                       "pair teaches. 0 = no floor.", fp=ADDED),
    )
    per_prompt: int = field(
        default=1,
        metadata=_meta("DPO pairs per prompt at most: 1 = best vs worst; more adds pairs across "
                       "the verifier split (largest margin first, then the judge's order), "
                       "each kept by the same rules, never the same texts twice, and no "
                       "sample both chosen and rejected.", fp=ADDED),
    )
    repair: list[str] = field(
        default_factory=list,
        metadata=_meta("Constraint types whose answers may be repaired by program where a "
                       "prompt's candidates all fail its constraints: the best candidate, "
                       "rewritten by the types' repairs (lower-cased, closing phrase appended, "
                       "cut to n sentences...) so that it passes every constraint, is chosen "
                       "over itself (rule repair; flywheel.constraints.REPAIRS lists the "
                       "types); [] = off. DPO only.", fp=ADDED),
    )


@_documented
@dataclass
class TrainConfig:
    """LoRA preference training (DPO or SPIN) of the next policy."""

    method: str = field(
        default="dpo",
        metadata=_meta("Training method: dpo on judged pairs, or spin (gold answer = chosen, "
                       "own answer = rejected, previous round = reference).", ("dpo", "spin"),
                           fp=SHAPES),
    )
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata=_meta("TRL DPO loss types (several are combined).", DPO_LOSS_TYPES, fp=SHAPES),
    )
    loss_weights: list[float] = field(
        default_factory=list,
        metadata=_meta("Weights of the train.loss_type losses, one each, all >= 0; [] = 1.0 "
                       "each. [sigmoid, sft] with [1.0, 0.2] is DPO plus an NLL term on the "
                       "chosen answer (RPO).", fp=ADDED),
    )
    sft_epochs: float = field(
        default=0.0,
        metadata=_meta("Epochs of a supervised step before DPO on the round's verified passes "
                       "(the chosen answers of verifier-ruled pairs that pass every "
                       "constraint), in the same LoRA adapter; DPO's reference is then the "
                       "model after it. 0 = no SFT step. Not with train.distributed: fsdp.",
                       fp=ADDED),
    )
    sft_per_prompt: int = field(
        default=0,
        metadata=_meta("The SFT step's examples beyond the verified chosen answers of pairs: up "
                       "to this many of each constrained prompt's sampled candidates that pass "
                       "every constraint (finished ones, best judged first), from prompts whose "
                       "candidates all pass too. 0 = the pairs' chosen answers only.", fp=ADDED),
    )
    sft_repair: bool = field(
        default=False,
        metadata=_meta("With train.sft_per_prompt: a constrained prompt with fewer passing "
                       "candidates than that is topped up with its other finished candidates as "
                       "the repairs of pairs.repair rewrite them (kept only if they then pass "
                       "every constraint, and within the pairs' length ratios), so types the "
                       "policy rarely passes (lowercase, no_commas) get SFT examples too.",
                       fp=ADDED),
    )
    sft_rephrase: bool = field(
        default=False,
        metadata=_meta("The SFT step shows each verified pass once per epoch, each time with "
                       "its prompt's instructions in another of their training phrasings (the "
                       "task and the answer unchanged): as many steps as train.sft_epochs, more "
                       "ways of saying each constraint.", fp=ADDED),
    )
    beta: float = field(
        default=0.1,
        metadata=_meta("DPO beta: strength of the implicit KL penalty toward the reference.",
                       fp=SHAPES),
    )
    learning_rate: float = field(default=5e-5, metadata=_meta("Optimizer learning rate.",
                                                              fp=SHAPES))
    epochs: float = field(default=1.0, metadata=_meta("Training epochs per round.", fp=SHAPES))
    batch_size: int = field(
        default=4, metadata=_meta("Per-device training batch size (pairs).", fp=SHAPES)
    )
    grad_accum: int = field(default=1, metadata=_meta("Gradient accumulation steps.", fp=SHAPES))
    max_length: int = field(
        default=512, metadata=_meta("Maximum prompt + answer length in tokens.", fp=SHAPES)
    )
    warmup_ratio: float = field(
        default=0.0, metadata=_meta("Fraction of training steps used for learning-rate warmup.",
                                    fp=SHAPES)
    )
    lora_r: int = field(default=16, metadata=_meta("LoRA rank.", fp=SHAPES))
    lora_alpha: int = field(default=32, metadata=_meta("LoRA alpha (scaling = alpha / r).",
                                                       fp=SHAPES))
    lora_dropout: float = field(default=0.05, metadata=_meta("LoRA dropout probability.",
                                                             fp=SHAPES))
    lora_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata=_meta("Module names LoRA adapters are attached to.", fp=SHAPES),
    )
    min_pairs: int = field(
        default=1,
        metadata=_meta("Fewer pairs than this: the round trains nothing and keeps the current "
                       "model.", fp=SHAPES),
    )
    data_mix: str = field(
        default="current",
        metadata=_meta("Pairs trained on each round: the round's own (current), or the round's "
                       "plus the previous round's (current+previous, SPIN's recipe).",
                       ("current", "current+previous"), fp=ADDED),
    )
    reference: str = field(
        default="start",
        metadata=_meta("DPO reference policy: the round's starting model (start; the adapter "
                       "disabled) or the round-0 base model (base).", ("start", "base"), fp=ADDED),
    )
    dtype: str = field(
        default="auto",
        metadata=_meta("Precision of training: the policy's weights are loaded in it and, for "
                       "bfloat16 / float16, the step runs under autocast in it (TRL's bf16 / "
                       "fp16); the LoRA adapter stays float32 and the merged checkpoint is saved "
                       "in it. auto = models.dtype. float16 needs a GPU.",
                       ("auto", "float32", "bfloat16", "float16"), fp=DERIVED),
    )
    checkpoint_steps: int = field(
        default=50,
        metadata=_meta("Save a training checkpoint every N optimizer steps, so a killed run "
                       "resumes training from it; 0 = no checkpoints (training restarts).",
                           fp=OPERATIONAL),
    )
    num_processes: int = field(
        default=1,
        metadata=_meta("Training processes: 1 trains inside flywheel; N > 1 runs the same "
                       "training under `accelerate launch`, one process per GPU (GPUs 0 to "
                       "N-1 of those CUDA_VISIBLE_DEVICES leaves), or N CPU processes over gloo "
                       "with models.device: cpu. Each process takes train.batch_size pairs a "
                       "step: the effective batch is batch_size x grad_accum x num_processes. "
                       "A resumed training needs the same number.", fp=ADDED),
    )
    distributed: str = field(
        default="ddp",
        metadata=_meta("How several processes train (num_processes > 1): ddp (each process "
                       "holds the whole model; gradients are averaged) or fsdp (the model, "
                       "gradients and optimizer state are sharded across the processes, for a "
                       "policy that does not fit one GPU).", ("ddp", "fsdp"), fp=OPERATIONAL),
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata=_meta("Recompute activations in the backward pass instead of keeping them "
                       "(non-reentrant, as PEFT needs): less GPU memory, about a third slower.",
                       fp=OPERATIONAL),
    )

    def problems(self, prefix: str = "train.") -> list[tuple[str, str]]:
        """(dotted key, message) for the loss weights and the SFT step where they cannot
        work: weights not one per loss type, negative or all 0, a negative SFT step or one
        under FSDP."""
        out: list[tuple[str, str]] = []
        w = self.loss_weights
        if w and len(w) != len(self.loss_type):
            out.append((f"{prefix}loss_weights", f"has {len(w)} weight{'s' * (len(w) != 1)} "
                        f"for {len(self.loss_type)} loss type"
                        f"{'s' * (len(self.loss_type) != 1)} ({prefix}loss_type: "
                        f"[{', '.join(self.loss_type)}]): give one weight per loss type, or "
                        "[] for 1.0 each"))
        negative = [x for x in w if x < 0]
        if negative:
            out.append((f"{prefix}loss_weights", f"must all be >= 0, got {negative[0]!r}"))
        elif w and not any(w):
            out.append((f"{prefix}loss_weights", "are all 0: nothing would be trained; give "
                        "at least one loss a weight > 0"))
        if self.sft_epochs < 0:
            out.append((f"{prefix}sft_epochs", f"must be >= 0, got {self.sft_epochs!r}"))
        if self.sft_epochs > 0 and self.num_processes > 1 and self.distributed == "fsdp":
            out.append((f"{prefix}sft_epochs", f"needs {prefix}distributed: ddp (or "
                        f"{prefix}num_processes: 1) for now: the SFT step cannot hand an "
                        f"FSDP-sharded model on to DPO; set {prefix}sft_epochs: 0 to train "
                        "with fsdp"))
        return out


@_documented
@dataclass
class EvalConfig:
    """Evaluating each round's model against the previous one."""

    prompts_file: str = field(
        default="data/eval_prompts.jsonl",
        metadata=_meta("JSONL file of held-out eval prompts; lines marked \"split\": "
                       "\"transfer\" form the transfer split (unseen topics and instruction "
                       "phrasings), the others the in-distribution split.", fp=SHAPES),
    )
    max_prompts: int = field(default=0, metadata=_meta("Eval prompts used at most from each "
                                                       "split (the first ones of the file); "
                                                       "0 = all.", fp=SHAPES))
    max_new_tokens: int = field(default=96, metadata=_meta("Maximum tokens per eval answer.",
                                                           fp=SHAPES))
    judge: bool = field(
        default=True,
        metadata=_meta("Judge new vs previous model pairwise in both orders with the LLM judge "
                       "(verifiers decide first where prompts carry constraints).", fp=SHAPES),
    )
    min_win_rate: float = field(
        default=0.0,
        metadata=_meta("Promotion gate: a round's model becomes the next round's policy only "
                       "if its win rate against the current policy (ties count half) is at "
                       "least this; otherwise the round is recorded as rejected and the next "
                       "round starts from the current policy again. 0 = promote every model; "
                       "0.5 = never promote a model that does worse than the current one.",
                           fp=SHAPES, stage="gate"),
    )
    gate_statistic: str = field(
        default="point",
        metadata=_meta("What the gate compares with eval.min_win_rate: the win rate itself "
                       "(point), the low end of its 95% interval (ci_low: promote only when "
                       "clearly better) or the high end (ci_high: reject only when clearly "
                       "worse).", ("point", "ci_low", "ci_high"),
                           fp=SHAPES, stage="gate", key="statistic"),
    )


@_documented
@dataclass
class ReportConfig:
    """The HTML report (`flywheel report`) written at the end of each round."""

    enabled: bool = field(
        default=True,
        metadata=_meta("Write the HTML report (index.html and its figures; `flywheel report`) "
                       "after each round of `flywheel iterate` and link it from the round's "
                       "Prefect artifact.", fp=OPERATIONAL),
    )
    dir: str = field(
        default="",
        metadata=_meta("Folder of the report written after each round; empty = "
                       "<workspace>/report.", fp=OPERATIONAL),
    )


@_documented
@dataclass
class Config:
    """The whole flywheel configuration (root of the tree)."""

    workspace: str = field(
        default="data",
        metadata=_meta("Folder holding the catalog and the model checkpoints it makes.",
                       fp=OPERATIONAL),
    )
    catalog: str = field(
        default="", metadata=_meta("DuckDB catalog file; empty = <workspace>/flywheel.duckdb.",
                                   fp=OPERATIONAL)
    )
    seed: int = field(default=0, metadata=_meta("Global random seed.", fp=SHAPES))
    models: ModelsConfig = field(
        default_factory=ModelsConfig, metadata=_section("Checkpoints and how they run.")
    )
    prompts: PromptsConfig = field(
        default_factory=PromptsConfig, metadata=_section("Self-instruct prompt generation.")
    )
    sampling: SamplingConfig = field(
        default_factory=SamplingConfig, metadata=_section("Candidate sampling.")
    )
    judge: JudgeConfig = field(
        default_factory=JudgeConfig, metadata=_section("Verifiers and LLM judge.")
    )
    pairs: PairsConfig = field(
        default_factory=PairsConfig, metadata=_section("Preference-pair selection.")
    )
    train: TrainConfig = field(
        default_factory=TrainConfig, metadata=_section("LoRA DPO/SPIN training.")
    )
    eval: EvalConfig = field(
        default_factory=EvalConfig, metadata=_section("Round-over-round evaluation.")
    )
    report: ReportConfig = field(
        default_factory=ReportConfig, metadata=_section("The HTML report after each round.")
    )
    progress: bool = field(default=True, metadata=_meta("Show progress bars.", fp=OPERATIONAL))

    def catalog_path(self) -> Path:
        """The DuckDB catalog file: ``catalog`` if set, else ``<workspace>/flywheel.duckdb``."""
        return catalog_path(self.workspace, self.catalog)

    def report_dir(self) -> Path:
        """Where the report of each round is written: ``report.dir`` if set, else
        ``<workspace>/report``."""
        return Path(self.report.dir) if self.report.dir else Path(self.workspace) / "report"

    def models_dir(self) -> Path:
        """Where round checkpoints are written: ``<workspace>/models``."""
        return Path(self.workspace) / "models"

    def request_cache_path(self) -> Path:
        """Where endpoint responses are cached as they arrive:
        ``<workspace>/.flywheel/requests.sqlite3`` (never a version; `flywheel cache clear`)."""
        return Path(self.workspace) / ".flywheel" / "requests.sqlite3"

    def hash_cache_path(self) -> Path:
        """Where model content hashes are cached: ``<workspace>/.flywheel/hashes.json`` (never
        inside a model folder)."""
        return Path(self.workspace) / ".flywheel" / "hashes.json"

    def to_dict(self) -> dict[str, Any]:
        """The whole tree as plain nested dicts/lists/scalars."""
        return dataclasses.asdict(self)

    def section(self, name: str) -> dict[str, Any]:
        """One section (e.g. ``"sampling"``) as a plain dict."""
        if name not in _section_names():
            raise FlywheelError(f"unknown config section {name!r}",
                                details=[f"sections: {', '.join(_section_names())}"])
        return dataclasses.asdict(getattr(self, name))


def catalog_path(workspace: str | Path = "data", catalog: str | Path | None = "") -> Path:
    """The one rule for where the catalog is: ``catalog`` if given, else
    ``<workspace>/flywheel.duckdb``. Every command resolves its catalog through this."""
    return Path(catalog) if catalog else Path(workspace or "data") / "flywheel.duckdb"


# --------------------------------------------------------------------------- introspection


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """Resolved type hints of a config dataclass (cached)."""
    if cls not in _HINTS:
        hints = typing.get_type_hints(cls)
        _HINTS[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    return _HINTS[cls]


def _section_names() -> list[str]:
    """Names of the root's nested sections."""
    return [k for k, h in _hints(Config).items() if dataclasses.is_dataclass(h)]


def _leaves(cls: type = Config, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, type hint) of every leaf setting, in declaration order."""
    out: list[tuple[str, dataclasses.Field, Any]] = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out.extend(_leaves(hint, f"{prefix}{f.name}."))
        else:
            out.append((f"{prefix}{f.name}", f, hint))
    return out


def config_reference() -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default repr, help text) for every setting, in declaration order."""
    defaults = Config()  # a section's own default can differ from its class's (models.policy)
    return [(key, _type_name(hint), repr(_get(defaults, key)), _help_text(f))
            for key, f, hint in _leaves()]


def _is_shorthand_section(dotted: str) -> bool:
    """Whether `dotted` names a section a plain string can set (models.judge = its path)."""
    cls: Any = Config
    for part in dotted.split("."):
        hint = _hints(cls).get(part) if dataclasses.is_dataclass(cls) else None
        if hint is None:
            return False
        cls = hint
    return dataclasses.is_dataclass(cls) and bool(getattr(cls, "SHORTHAND", None))


def _leaf_hint(dotted: str) -> Any:
    """The type hint of a dotted key, or None if the key is not a leaf setting."""
    for key, _, hint in _leaves():
        if key == dotted:
            return hint
    return None


def fingerprint_problems(cls: type = None) -> list[str]:
    """Every leaf setting under `cls` (default: the whole Config) without a valid fingerprint
    role in its metadata: a new setting must say whether it shapes its stage's output."""
    out = []
    for key, f, _ in _leaves(cls or Config):
        role = f.metadata.get("fingerprint")
        if role not in FINGERPRINT_ROLES:
            out.append(f"{key}: declares no fingerprint role (metadata fp=...; one of "
                       f"{', '.join(FINGERPRINT_ROLES)}), got {role!r}")
    return out


def shaping(section: Any, stage: str = "") -> dict[str, Any]:
    """The settings of one config section that shape `stage`'s output, for its fingerprint:
    SHAPES settings always, ADDED ones when not at their default; those declared for another
    stage (``stage=``) only for that stage. Keys are the setting names (or their ``key``)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(section):
        role = f.metadata.get("fingerprint")
        if role not in (SHAPES, ADDED) or f.metadata.get("stage", "") != stage:
            continue
        value = getattr(section, f.name)
        if role == ADDED and value == _default(f):
            continue
        out[f.metadata.get("key") or f.name] = value
    return out


def changed(section: Any, names: Sequence[str] = ()) -> dict[str, Any]:
    """The settings of `section` (or those of them named) that differ from their defaults."""
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)
            if (not names or f.name in names) and getattr(section, f.name) != _default(f)}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


# --------------------------------------------------------------------------- type checks

_SCI_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _describe(value: Any) -> str:
    """``str 'four'``, ``int 3``, ``null``: how a wrong value is shown."""
    if value is None:
        return "null"
    kind = "mapping" if isinstance(value, Mapping) else type(value).__name__
    shown = repr(value)
    return f"{kind} {shown if len(shown) <= 60 else shown[:57] + '...'}"


def _coerce(value: Any, hint: Any) -> tuple[Any, str | None]:
    """Check ``value`` against ``hint``; return (value to store, error or None)."""
    if hint is bool:
        return (value, None) if isinstance(value, bool) else (None, _expected(hint, value))
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return (value, None) if ok else (None, _expected(hint, value))
    if hint is float:
        return _coerce_float(value)
    if hint is str:
        # An empty YAML value (``judge:``) means the empty string.
        if value is None:
            return "", None
        return (value, None) if isinstance(value, str) else (None, _expected(hint, value))
    if typing.get_origin(hint) is list:
        if typing.get_args(hint)[0] is float:
            return _coerce_float_list(value)
        return _coerce_str_list(value)
    if hint is dict or typing.get_origin(hint) is dict:
        if value is None:
            return {}, None
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            return None, f"expected a mapping of names to values, got {_describe(value)}"
        return dict(value), None
    raise TypeError(f"unsupported config type {hint!r}")  # a bug in this module, not user error


def _coerce_float(value: Any) -> tuple[Any, str | None]:
    """Floats accept ints, and strings like ``2e-4`` that YAML 1.1 leaves unparsed."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), None
    if isinstance(value, str) and _SCI_FLOAT.match(value.strip()):
        return float(value), None
    return None, _expected(float, value)


def _coerce_str_list(value: Any) -> tuple[Any, str | None]:
    """A list whose items are all strings."""
    if isinstance(value, str):
        return None, f"expected list[str], got {_describe(value)} (write [{value}])"
    if not isinstance(value, list):
        return None, f"expected list[str], got {_describe(value)}"
    for i, item in enumerate(value):
        if not isinstance(item, str):
            return None, f"expected list[str], but item {i} is {_describe(item)}"
    return list(value), None


def _coerce_float_list(value: Any) -> tuple[Any, str | None]:
    """A list whose items are all numbers (floats, ints, or strings like ``2e-4``)."""
    if not isinstance(value, list):
        return None, f"expected list[float], got {_describe(value)}"
    out = []
    for i, item in enumerate(value):
        number, error = _coerce_float(item)
        if error:
            return None, f"expected list[float], but item {i} is {_describe(item)}"
        out.append(number)
    return out, None


def _expected(hint: Any, value: Any) -> str:
    """``expected int, got str 'four'``."""
    return f"expected {_type_name(hint)}, got {_describe(value)}"


# --------------------------------------------------------------------------- merging


@dataclass
class _Loader:
    """Accumulates problems and remembers which source set each key."""

    problems: list[str] = field(default_factory=list)
    origins: dict[str, str] = field(default_factory=dict)

    def add(self, label: str, message: str) -> None:
        self.problems.append(f"{label}: {message}")

    def merge(self, obj: Any, raw: Mapping, label: str, prefix: str = "") -> None:
        """Apply mapping ``raw`` onto dataclass ``obj`` (recursing into sections)."""
        hints = _hints(type(obj))
        for key, value in raw.items():
            dotted = f"{prefix}{key}"
            if not isinstance(key, str) or key not in hints:
                self.add(label, _unknown_key(type(obj), str(key), prefix))
            elif dataclasses.is_dataclass(hints[key]):
                self._merge_section(getattr(obj, key), value, label, dotted)
            else:
                self._set(obj, key, value, hints[key], label, dotted)

    def _merge_section(self, obj: Any, value: Any, label: str, dotted: str) -> None:
        shorthand = getattr(type(obj), "SHORTHAND", None)
        if shorthand and (value is None or isinstance(value, str)):
            # ``models.judge: judges/x`` sets ``models.judge.path``
            self._set(obj, shorthand, value, str, label, f"{dotted}.{shorthand}")
            return
        if value is None:  # an empty ``sampling:`` block changes nothing
            return
        if not isinstance(value, Mapping):
            self.add(label, f"{dotted}: expected a mapping of settings, got {_describe(value)}")
            return
        self.merge(obj, value, label, dotted + ".")

    def _set(self, obj: Any, key: str, value: Any, hint: Any, label: str, dotted: str) -> None:
        coerced, error = _coerce(value, hint)
        if error:
            self.add(label, f"{dotted}: {error}")
            return
        setattr(obj, key, coerced)
        self.origins[dotted] = label


def _unknown_key(cls: type, key: str, prefix: str) -> str:
    """``sampling.temprature: unknown key; valid keys in 'sampling': ...; did you mean ...?``"""
    names = list(_hints(cls))
    where = f"in {prefix[:-1]!r}" if prefix else "at the top level"
    message = f"{prefix}{key}: unknown key; valid keys {where}: {', '.join(names)}"
    close = [prefix + m for m in difflib.get_close_matches(key, names, n=1, cutoff=0.6)]
    if not close:  # maybe it belongs in another section (``n:`` at the top level)
        close = [k for k, _, _ in _leaves() if k.rsplit(".", 1)[-1] == key]
    if close:
        message += "; did you mean " + " or ".join(repr(c) for c in close) + "?"
    return message


# --------------------------------------------------------------------------- sources


def _read_yaml(path: Path, loader: _Loader) -> Mapping | None:
    """Parse a YAML config file; report problems to ``loader`` and return None on failure."""
    label = str(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "not found"
        loader.add(label, f"config file {what} (resolved to {path.resolve()}); pass an existing "
                          "YAML file to --config, or leave --config out to use the defaults")
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        loader.add(label, _yaml_error(exc))
        return None
    except (OSError, UnicodeDecodeError) as exc:
        loader.add(label, f"cannot read config file: {exc}")
        return None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        loader.add(label, "the top level must be a mapping of sections "
                          f"(e.g. 'sampling: {{n: 4}}'), got {_describe(data)}")
        return None
    return data


def _yaml_error(exc: yaml.YAMLError) -> str:
    """``YAML syntax error at line 3, column 5: ...`` (1-based)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"YAML syntax error{where}: {problem}"


def _override_to_mapping(text: str, loader: _Loader) -> Mapping | None:
    """``"a.b=c"`` -> ``{"a": {"b": parsed c}}``; report malformed overrides."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        loader.add(f"{SET_LABEL} {text}", "expected KEY=VALUE")
        return None
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        loader.add(SET_LABEL, f"{key}: cannot parse value {raw!r}: {_yaml_error(exc)}")
        return None
    if (_leaf_hint(key) is str or _is_shorthand_section(key)) and value is not None \
            and not isinstance(value, str):
        value = raw.strip()  # ``models.policy=123`` means the string "123"
    nested: Any = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return nested


# --------------------------------------------------------------------------- validation


def _is_device(value: str) -> bool:
    """cpu, cuda, cuda:N or auto."""
    return re.fullmatch(r"cpu|auto|cuda(:\d+)?", value) is not None


def _choice_problems(cfg: Config) -> list[tuple[str, str]]:
    """Values outside a field's declared ``choices``."""
    out: list[tuple[str, str]] = []
    for key, f, _ in _leaves():
        choices = f.metadata.get("choices")
        if not choices:
            continue
        value = _get(cfg, key)
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not value:
            out.append((key, f"must not be empty; choose from: {', '.join(choices)}"))
        for v in values:
            if v not in choices:
                out.append((key, f"{v!r} is not one of: {', '.join(choices)}"))
    if not _is_device(cfg.models.device):
        device = cfg.models.device
        out.append(("models.device", f"{device!r} is not one of: cpu, cuda, cuda:N, auto"))
    return out


_POSITIVE = (
    "sampling.explore_n", "sampling.explore_rounds", "pairs.per_prompt",
    "models.batch_size", "prompts.max_new_tokens", "sampling.n", "sampling.max_new_tokens",
    "judge.samples", "judge.max_new_tokens", "train.beta", "train.learning_rate", "train.epochs",
    "train.batch_size", "train.grad_accum", "train.max_length", "train.lora_r", "train.lora_alpha",
    "train.num_processes",
    "eval.max_new_tokens", "prompts.max_constraints", "prompts.max_prompt_tokens",
)
_NON_NEGATIVE = (
    "sampling.explore_budget", "sampling.explore_temperature",
    "seed", "prompts.num_new", "prompts.max_attempts", "prompts.few_shot", "prompts.min_chars",
    "prompts.temperature", "sampling.temperature", "sampling.prompts_per_round",
    "judge.temperature", "pairs.min_margin", "pairs.min_verifier_margin",
    "pairs.max_length_ratio", "pairs.min_length_ratio", "train.min_pairs", "eval.max_prompts",
    "train.checkpoint_steps", "train.sft_per_prompt",
)
_RANGES = (  # key, low, low inclusive, high, high inclusive
    ("prompts.top_p", 0.0, False, 1.0, True),
    ("sampling.top_p", 0.0, False, 1.0, True),
    ("prompts.constraint_prob", 0.0, True, 1.0, True),
    ("prompts.dedupe_threshold", 0.0, False, 1.0, True),
    ("train.lora_dropout", 0.0, True, 1.0, False),
    ("train.warmup_ratio", 0.0, True, 1.0, True),
    ("eval.min_win_rate", 0.0, True, 1.0, True),
)


def _get(cfg: Config, dotted: str) -> Any:
    """The value at a dotted key."""
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _range_problems(cfg: Config) -> list[tuple[str, str]]:
    """Positivity and interval checks."""
    out = [(k, f"must be > 0, got {_get(cfg, k)!r}") for k in _POSITIVE if _get(cfg, k) <= 0]
    out += [(k, f"must be >= 0, got {_get(cfg, k)!r}") for k in _NON_NEGATIVE if _get(cfg, k) < 0]
    for key, low, low_in, high, high_in in _RANGES:
        v = _get(cfg, key)
        if not ((v >= low if low_in else v > low) and (v <= high if high_in else v < high)):
            interval = f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
            out.append((key, f"must be in {interval}, got {v!r}"))
    return out


def _relation_problems(cfg: Config) -> list[tuple[str, str]]:
    """Checks that involve more than one field or non-numeric values."""
    out: list[tuple[str, str]] = []
    p = cfg.prompts
    if p.max_chars < p.min_chars:
        message = f"must be >= prompts.min_chars ({p.min_chars}), got {p.max_chars}"
        out.append(("prompts.max_chars", message))
    if not cfg.workspace:
        out.append(("workspace", "must not be empty"))
    if not cfg.train.lora_targets:
        out.append(("train.lora_targets", "must name at least one module"))
    out += cfg.train.problems()
    return out + _constraint_type_problems(cfg) + _repair_problems(cfg)


def _repair_problems(cfg: Config) -> list[tuple[str, str]]:
    """Names in ``pairs.repair`` that are not constraint types with a repair; train.sft_repair
    without what it works on."""
    if cfg.train.sft_repair and not (cfg.pairs.repair and cfg.train.sft_per_prompt > 0
                                     and cfg.train.sft_epochs > 0):
        return [("train.sft_repair", "repairs candidates for the SFT step's per-prompt "
                 "examples: it needs train.sft_epochs > 0, train.sft_per_prompt > 0 and the "
                 "types to repair in pairs.repair; set them, or set train.sft_repair: false")]
    if not cfg.pairs.repair:
        return []
    try:
        from flywheel.constraints import REPAIRS
    except ImportError:
        return []
    unknown = [t for t in cfg.pairs.repair if t not in REPAIRS]
    if not unknown:
        return []
    return [("pairs.repair", f"no repair for {', '.join(map(repr, unknown))}; types with one: "
                             f"{', '.join(REPAIRS)}")]


def _constraint_type_problems(cfg: Config) -> list[tuple[str, str]]:
    """Unknown names in ``prompts.constraint_types`` (skipped if the library is unavailable)."""
    if not cfg.prompts.constraint_types:
        return []
    try:
        from flywheel.constraints import CONSTRAINTS
    except ImportError:
        return []
    known = sorted({str(getattr(c, "name", c)) for c in CONSTRAINTS})
    unknown = [t for t in cfg.prompts.constraint_types if t not in known]
    if not unknown:
        return []
    names = ", ".join(map(repr, unknown))
    message = f"unknown constraint type(s) {names}; known: {', '.join(known)}"
    return [("prompts.constraint_types", message)]


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _role_problems(cfg: Config) -> list[tuple[str, str]]:
    """Endpoint settings that cannot work: a missing URL or model, endpoint fields on a local
    role, a key variable that is not a variable name (its value is never shown), the policy
    behind a fixed endpoint."""
    out: list[tuple[str, str]] = []
    for role in ROLES:
        r: RoleConfig = getattr(cfg.models, role)
        key = f"models.{role}"
        if not _ENV_NAME.fullmatch(r.api_key_env or "_"):
            out.append((f"{key}.api_key_env", "must name an environment variable (e.g. "
                        "OPENAI_API_KEY) that holds the key, never the key itself"))
        if r.concurrency <= 0:
            out.append((f"{key}.concurrency", f"must be > 0, got {r.concurrency!r}"))
        if r.timeout <= 0:
            out.append((f"{key}.timeout", f"must be > 0, got {r.timeout!r}"))
        if r.retries < 0:
            out.append((f"{key}.retries", f"must be >= 0, got {r.retries!r}"))
        if not r.endpoint:
            stray = [n for n in ("base_url", "model", "revision") if getattr(r, n)]
            if stray:
                out.append((f"{key}.backend", f"is local, but {key}.{stray[0]} is set: set "
                            f"{key}.backend: openai to use the endpoint, or remove "
                            f"{key}.{stray[0]}"))
            continue
        if role == "policy":
            out.append((f"{key}.backend", "the policy is trained every round, and an openai "
                        "endpoint serves a fixed model: keep the policy a local checkpoint "
                        "(models.policy: DIR); put the judge or the prompt generator behind "
                        "an endpoint"))
        if not re.match(r"https?://[^/\s]+", r.base_url):
            out.append((f"{key}.base_url", "must be the endpoint's http(s) URL up to /v1 (e.g. "
                        f"http://127.0.0.1:8000/v1), got {_describe(_redacted(r.base_url))}"))
        if not r.model:
            out.append((f"{key}.model", "must name the served model (as the endpoint's "
                        "/v1/models lists it)"))
        if r.path:
            out.append((f"{key}.path", f"is set, but {key}.backend is openai: the endpoint "
                        "serves the model; remove the path (or set backend: local)"))
    return out


def _vllm_problems(cfg: Config) -> list[tuple[str, str]]:
    """Settings of the managed vLLM server that cannot work."""
    v = cfg.models.vllm
    out: list[tuple[str, str]] = []
    for name in ("tensor_parallel_size", "max_model_len", "startup_timeout", "concurrency"):
        if getattr(v, name) <= 0:
            out.append((f"models.vllm.{name}", f"must be > 0, got {getattr(v, name)!r}"))
    if not 0 < v.gpu_memory_utilization <= 1:
        out.append(("models.vllm.gpu_memory_utilization",
                    f"must be in (0, 1], got {v.gpu_memory_utilization!r}"))
    if v.max_lora_rank not in VLLM_LORA_RANKS:
        out.append(("models.vllm.max_lora_rank", f"must be one of "
                    f"{', '.join(map(str, VLLM_LORA_RANKS))} (what vLLM accepts), got "
                    f"{v.max_lora_rank!r}"))
    elif (cfg.models.backend == "vllm" and v.policy_update == "lora"
          and cfg.train.lora_r > v.max_lora_rank):
        out.append(("models.vllm.max_lora_rank", f"is {v.max_lora_rank}, below train.lora_r "
                    f"({cfg.train.lora_r}): no adapter could be loaded; raise it"))
    if not v.python:
        out.append(("models.vllm.python", "must name the interpreter of the vLLM environment "
                    "(e.g. .venv-vllm/bin/python)"))
    return out


def _redacted(url: str) -> str:
    """A URL without user:password@ and without its query string (the backend's rule,
    imported only when a bad URL is reported)."""
    from flywheel.backends.openai import redact_url

    return redact_url(url)


def _problems(cfg: Config) -> list[tuple[str, str]]:
    """(dotted key, message) for every invalid value."""
    return (_choice_problems(cfg) + _range_problems(cfg) + _relation_problems(cfg)
            + _role_problems(cfg) + _vllm_problems(cfg))


def validate(cfg: Config) -> list[str]:
    """Value checks on a well-typed config: ``["judge.mode: 'best' is not one of: ..."]``."""
    return [f"{key}: {message}" for key, message in _problems(cfg)]


# --------------------------------------------------------------------------- API


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (a diff), then ``a.b=c`` overrides.

    Raises one :class:`FlywheelError` listing every problem found, each prefixed
    with its source (the file name, ``--set`` or ``defaults``).
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    cfg = Config()
    loader = _Loader()
    if path is not None:
        data = _read_yaml(Path(path), loader)
        if data is not None:
            loader.merge(cfg, data, str(path))
    for text in overrides:
        mapping = _override_to_mapping(text, loader)
        if mapping is not None:
            loader.merge(cfg, mapping, SET_LABEL)
    for key, message in _problems(cfg):
        loader.add(_blame(key, loader.origins), f"{key}: {message}")
    if loader.problems:
        n = len(loader.problems)
        raise FlywheelError(f"invalid configuration ({n} problem{'s' if n > 1 else ''}):",
                            details=loader.problems)
    return cfg


def _blame(key: str, origins: Mapping[str, str]) -> str:
    """The source that set ``key``; else the sources that set its section (cross-field checks)."""
    if key in origins:
        return origins[key]
    section = key.rpartition(".")[0] + "."
    related = [label for k, label in origins.items() if section != "." and k.startswith(section)]
    return ", ".join(dict.fromkeys(related or origins.values())) or DEFAULTS_LABEL


def dump_yaml(cfg: Config) -> str:
    """The full config as YAML (loadable again with :func:`load_config`)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False)


def config_from_dict(data: Mapping[str, Any], label: str = "config") -> Config:
    """A Config from a (possibly partial) nested mapping, checked like a YAML file."""
    cfg = Config()
    loader = _Loader()
    loader.merge(cfg, data, label)
    for key, message in _problems(cfg):
        loader.add(label, f"{key}: {message}")
    if loader.problems:
        raise FlywheelError("invalid configuration:", details=loader.problems)
    return cfg
