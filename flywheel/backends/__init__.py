"""Inference backends behind one small protocol, chosen by a short name per role."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from flywheel.errors import FlywheelError

Conversation = list[dict[str, str]]


@dataclass(frozen=True)
class Generation:
    """One generated completion."""

    text: str
    finish_reason: str  # "stop" (end-of-turn token) or "length" (hit max_new_tokens)
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Overflow:
    """A conversation too long for the model: its prompt leaves no room for the reply."""

    tokens: int  # the prompt's tokens, chat template included
    context: int  # the model's context length (positions it can attend to)
    reserved: int  # tokens kept for the reply (max_new_tokens, plus any forced prefix)

    @property
    def limit(self) -> int:
        """The longest prompt that fits: the context less the reply's tokens."""
        return self.context - self.reserved


class Backend(Protocol):
    """What every backend offers the stages: generation, and letting go of what it holds."""

    def generate(
        self,
        model: str,
        conversations: list[Conversation],
        *,
        n: int = 1,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_new_tokens: int = 64,
        seed: int = 0,
        desc: str = "generate",
    ) -> list[list[Generation]]:
        """`n` completions per conversation (temperature 0 = greedy)."""
        ...

    def release(self) -> None:
        """Free the loaded models (before training needs the memory)."""
        ...


@runtime_checkable
class VerdictProbabilities(Protocol):
    """An optional capability: verdicts read from the model's next-token probabilities
    (`judge.verdict: logprobs`)."""

    def rationale_then_probs(
        self,
        model: str,
        conversations: list[Conversation],
        *,
        forced_prefix: str,
        candidates: list[str],
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int = 0,
        stop=None,
        desc: str = "judge",
    ) -> list[tuple[str, str, dict[str, float]]]:
        """A rationale, then P(next token = candidate) after rationale + `forced_prefix`.

        Returns (raw generated text, rationale kept before any verdict `stop` finds, probs).
        """
        ...


@runtime_checkable
class CountsTokens(Protocol):
    """An optional capability: telling, before sending, which prompts overflow the context."""

    def overflows(
        self,
        model: str,
        conversations: list[Conversation],
        *,
        max_new_tokens: int,
        forced_prefix: str = "",
    ) -> list[Overflow | None]:
        """Per conversation, None when its prompt plus `max_new_tokens` (and `forced_prefix`)
        fits the model's context, else the `Overflow` (nothing is generated)."""
        ...


#: The backends, by name: "module:Class", imported when first used (heavy imports stay lazy).
BACKENDS: dict[str, str] = {
    "transformers": "flywheel.backends.transformers:TransformersBackend",
    "openai": "flywheel.backends.openai:OpenAIBackend",
    "vllm": "flywheel.backends.vllm:VLLMBackend",
}

#: Backends whose models run behind a network service (a request can fail for a moment and
#: is worth retrying); the in-process ones are not listed.
REMOTE_BACKENDS: frozenset[str] = frozenset({"openai"})


def get_backend(name: str, **kwargs) -> Backend:
    """A new backend of the class registered under `name`, made with `kwargs`."""
    import importlib

    if name not in BACKENDS:
        raise FlywheelError(f"unknown backend {name!r}",
                            details=[f"backends: {', '.join(BACKENDS)}"])
    module, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)(**kwargs)


def is_remote(name: str) -> bool:
    """Whether backend `name` generates through a remote service."""
    return name in REMOTE_BACKENDS
