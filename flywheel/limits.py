"""Prompt length limits, in tokens of the model that will read the prompts.

`too_long` is the one check: seed files, eval files (preflight), `flywheel ingest` and
self-instruct all call it with ``prompts.max_prompt_tokens``. Counting uses the tokenizer of a
checkpoint folder (loaded once per process, without touching any hub).

Counting does not tokenize megabytes needlessly. For a byte-level BPE tokenizer without a
normalizer (SmolLM2's, GPT-2's; read from the tokenizer's own description) every token covers at
least one UTF-8 byte and at most the longest piece of the vocabulary, so

- a text of at most ``max_tokens`` bytes cannot be over the limit (not tokenized), and
- a text of more than ``max_tokens`` x (longest piece, in bytes) bytes cannot be under it
  (not tokenized either; its count is reported as a lower bound).

SmolLM2's longest piece is 81 bytes (a run of spaces after a newline), so a fixed "64 x the
limit" shortcut would be wrong for it; the bound is read from each vocabulary. Other tokenizers
are counted in full. With no tokenizer at all, the UTF-8 byte count stands in for the token
count: a conservative bound (it can only over-count for byte-level BPE), and the message says so.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flywheel.errors import FlywheelError

KEY = "prompts.max_prompt_tokens"
#: texts tokenized per call (bounds the memory of one batch)
_BATCH = 256


@dataclass
class TokenCounter:
    """Counts prompt tokens with one tokenizer (or, without one, UTF-8 bytes)."""

    tokenizer: Any = None
    byte_level: bool = False  # every token covers >= 1 byte: bytes bound the count from above
    max_piece_bytes: int = 0  # the longest vocabulary piece, in bytes (0: unknown)

    @property
    def exact(self) -> bool:
        return self.tokenizer is not None

    def bounds(self, text: str, max_tokens: int) -> tuple[int, bool] | None:
        """(count, is_lower_bound) when the bytes alone decide against ``max_tokens``;
        None when the text must be tokenized."""
        n_bytes = len(text.encode("utf-8"))
        if self.tokenizer is None:
            return n_bytes, False
        if self.byte_level and n_bytes <= max_tokens:
            return n_bytes, False  # an upper bound, and within the limit: enough
        if self.byte_level and self.max_piece_bytes and \
                n_bytes > max_tokens * self.max_piece_bytes:
            return -(-n_bytes // self.max_piece_bytes), True
        return None

    def count(self, texts: Sequence[str]) -> list[int]:
        """The exact token count of each text (no special tokens added); UTF-8 bytes without a
        tokenizer."""
        if self.tokenizer is None:
            return [len(t.encode("utf-8")) for t in texts]
        out: list[int] = []
        for i in range(0, len(texts), _BATCH):
            batch = list(texts[i:i + _BATCH])
            ids = self.tokenizer(batch, add_special_tokens=False)["input_ids"]
            out += [len(x) for x in ids]
        return out

    def over(self, texts: Sequence[str], max_tokens: int) -> list[tuple[int, int, bool]]:
        """(index, count, count_is_lower_bound) of every text over ``max_tokens``."""
        found: list[tuple[int, int, bool]] = []
        todo: list[int] = []
        for i, text in enumerate(texts):
            bound = self.bounds(text, max_tokens)
            if bound is None:
                todo.append(i)
            elif bound[0] > max_tokens:
                found.append((i, bound[0], bound[1]))
        for i, n in zip(todo, self.count([texts[i] for i in todo])):
            if n > max_tokens:
                found.append((i, n, False))
        return sorted(found)

    def fits(self, max_tokens: int) -> Callable[[str], bool]:
        """A predicate: is this text within ``max_tokens``? (for stages that must not import
        the catalog or load a tokenizer themselves)"""
        return lambda text: not self.over([text], max_tokens)


_COUNTERS: dict[str, TokenCounter] = {}
#: pre-tokenizers that only split text (and ByteLevel, which maps each byte to one symbol)
_SPLITTERS = {"ByteLevel", "Split", "Digits", "Punctuation"}


def _describe_tokenizer(tok: Any) -> tuple[bool, int]:
    """(byte_level, longest piece in bytes) of a fast tokenizer; (False, 0) when unsure."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return False, 0
    try:
        spec = json.loads(backend.to_str())
    except Exception:  # not serialisable: count in full
        return False, 0
    pre = spec.get("pre_tokenizer") or {}
    steps = (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else [pre]
    kinds = {step.get("type") for step in steps}
    model = spec.get("model") or {}
    # splitting never adds bytes; a normalizer might (NFC/NFKC can expand a character)
    byte_level = (spec.get("normalizer") is None and "ByteLevel" in kinds
                  and kinds <= _SPLITTERS and model.get("type") == "BPE")
    if not byte_level:
        return False, 0
    # byte-level pieces spell one byte per character; added tokens are matched as written
    longest = max((len(p) for p in model.get("vocab") or {}), default=0)
    added = [len(a.get("content", "").encode("utf-8")) for a in spec.get("added_tokens") or []]
    return True, max([longest, *added])


#: files a tokenizer is loaded from (any one may do, with tokenizer_config.json)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


def _why(folder: Path, exc: Exception) -> str:
    """Why a tokenizer did not load, in one short line."""
    if folder.is_dir() and not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        return f"no tokenizer file there ({', '.join(_TOKENIZER_FILES)})"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def load_tokenizer(folder: str | Path) -> Any:
    """The tokenizer of a checkpoint folder (cached per process); a FlywheelError naming the
    folder when it cannot be loaded."""
    return counter(folder).tokenizer


def counter(tokenizer: str | Path | None) -> TokenCounter:
    """The counter for a checkpoint folder's tokenizer, or the byte counter for None."""
    if tokenizer is None or str(tokenizer) == "":
        return TokenCounter()
    key = str(Path(tokenizer).resolve())
    if key not in _COUNTERS:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(key, local_files_only=True)
        except Exception as exc:
            raise FlywheelError(
                f"cannot load the tokenizer of {tokenizer}: {_why(Path(key), exc)}",
                details=[f"{tokenizer} needs tokenizer.json and tokenizer_config.json beside "
                         "config.json: save them there with tokenizer.save_pretrained(folder), "
                         "or copy them from the checkpoint it was made from"]) from exc
        byte_level, longest = _describe_tokenizer(tok)
        _COUNTERS[key] = TokenCounter(tok, byte_level, longest)
    return _COUNTERS[key]


def too_long(items: Sequence[tuple[str, str]], max_tokens: int,
             tokenizer: str | Path | None) -> list[str]:
    """One error line per (where, text) item over ``max_tokens`` tokens, naming where, the
    count, the limit and the fix; [] when every item fits.

    ``tokenizer`` is a checkpoint folder (its tokenizer counts) or None: then UTF-8 bytes are
    counted, which never under-counts a byte-level BPE tokenizer. A tokenizer that cannot be
    loaded raises a FlywheelError naming the folder.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
    c = counter(tokenizer)
    texts = [text for _, text in items]
    unit = "tokens" if c.exact else ("UTF-8 bytes (no tokenizer was available: bytes stand in "
                                     "for tokens, which can only over-count for a byte-level "
                                     "BPE tokenizer)")
    out = []
    for i, n, lower in c.over(texts, max_tokens):
        count = f"at least {n:,}" if lower else f"{n:,}"
        out.append(f"{items[i][0]}: the prompt is {count} {unit}, over the limit of "
                   f"{max_tokens:,} ({KEY}) — shorten it, or raise the limit with "
                   f"--set {KEY}=N")
    return out
