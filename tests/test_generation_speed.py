"""CPU speed-ups of generation and training: nucleus sampling without sorting the whole
vocabulary (`NucleusWarper`, the transformers backend) and TRL's fused LM head scoring only
the labelled positions on the CPU (`score_labelled_positions_only`, the train stage) leave
results as they were (same tokens, same numbers); the draw by the inverse of the cumulative
distribution (`InverseCdfSampler`) draws from the same distribution as transformers'. The
time they save is measured by `bench/cpu_speedups.py`."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper

from flywheel.backends.transformers import (
    InverseCdfSampler,
    NucleusWarper,
    TransformersBackend,
    sampling_processors,
)
from flywheel.stages.sampling import conversation
from flywheel.stages.train import score_labelled_positions_only

IDS = torch.zeros(1, 3, dtype=torch.long)


def _logits(probs: list[float], vocab: int = 2000) -> torch.Tensor:
    """Scores whose softmax puts `probs` on the first tokens and the rest evenly on the
    others (each below the smallest of `probs`)."""
    rest = (1.0 - sum(probs)) / (vocab - len(probs))
    full = torch.tensor(probs + [rest] * (vocab - len(probs)), dtype=torch.float64)
    return full.log().float()[None, :]


def kept(scores: torch.Tensor) -> list[int]:
    return torch.isfinite(scores[0]).nonzero().flatten().tolist()


@pytest.mark.parametrize(("probs", "top_p", "expected"), [
    ([0.5, 0.3, 0.15], 0.9, [0, 1, 2]),   # 0.5 + 0.3 < 0.9: the third completes the nucleus
    ([0.5, 0.3, 0.15], 0.8, [0, 1]),      # 0.5 + 0.3 reaches 0.8: the third is cut
    ([0.95, 0.03], 0.9, [0]),             # one token holds the nucleus
    ([0.2, 0.1], 0.9, "all"),             # the nucleus spans the vocabulary: the full sort
])
def test_the_nucleus_is_transformers_nucleus(probs, top_p, expected):
    scores = _logits(probs)
    ours = NucleusWarper(top_p, k=64)(IDS, scores.clone())
    theirs = TopPLogitsWarper(top_p)(IDS, scores.clone())
    assert kept(ours) == kept(theirs)
    if expected == "all":
        assert len(kept(ours)) > 64  # wider than k: found by the fallback
    else:
        assert kept(ours) == expected
    assert torch.equal(ours[torch.isfinite(ours)], scores[torch.isfinite(ours)])


def test_rows_are_filtered_alone_and_min_tokens_are_kept():
    scores = torch.cat([_logits([0.95, 0.03]), _logits([0.2, 0.1]), _logits([0.5, 0.3])])
    ids = torch.zeros(3, 3, dtype=torch.long)
    ours = NucleusWarper(0.9, k=64, min_tokens_to_keep=2)(ids, scores.clone())
    theirs = TopPLogitsWarper(0.9, min_tokens_to_keep=2)(ids, scores.clone())
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    assert kept(ours[:1]) == [0, 1]  # two kept though the first holds the nucleus


def test_random_logits_keep_the_same_nucleus_size():
    gen = torch.Generator().manual_seed(0)
    # eight peaked rows (a nucleus of tens to hundreds of tokens) and eight flat ones
    scores = torch.cat([torch.randn(8, 49152, generator=gen) * 4,
                        torch.randn(8, 49152, generator=gen)])
    ours = NucleusWarper(0.9)(torch.zeros(16, 3, dtype=torch.long), scores.clone())
    theirs = TopPLogitsWarper(0.9)(torch.zeros(16, 3, dtype=torch.long), scores.clone())
    # the same rule: at most a token at the boundary differs where sums round differently
    diff = (torch.isfinite(ours) != torch.isfinite(theirs)).sum(dim=-1)
    assert int(diff.max()) <= 1
    sizes = torch.isfinite(ours).sum(dim=-1)
    assert int(sizes[:8].max()) < 512 < int(sizes[8:].min())  # the flat rows: the full sort


def test_sampling_with_top_p_is_seeded_and_uses_the_warper(tiny_model, monkeypatch):
    calls = []
    real = NucleusWarper.__call__

    def counting(self, input_ids, scores):
        calls.append(self.top_p)
        return real(self, input_ids, scores)

    monkeypatch.setattr(NucleusWarper, "__call__", counting)
    backend = TransformersBackend(batch_size=4, progress=False)
    convs = [conversation("Name a colour."), conversation("Count to three.")]
    a = backend.generate(str(tiny_model), convs, n=2, temperature=1.0, top_p=0.9,
                         max_new_tokens=6, seed=3)
    b = backend.generate(str(tiny_model), convs, n=2, temperature=1.0, top_p=0.9,
                         max_new_tokens=6, seed=3)
    assert [[g.text for g in r] for r in a] == [[g.text for g in r] for r in b]
    assert calls and set(calls) == {0.9}
    calls.clear()
    backend.generate(str(tiny_model), convs, n=1, temperature=1.0, top_p=1.0,
                     max_new_tokens=4, seed=3)
    assert calls == []  # top_p 1.0: no filtering at all


def test_the_inverse_cdf_draw_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0, 0.0])
    scores = probs.log().expand(40_000, -1).clone()  # 0 -> -inf: never drawn
    out = InverseCdfSampler(torch.Generator().manual_seed(5))(IDS, scores)
    assert bool((torch.isfinite(out).sum(dim=-1) == 1).all())  # one token a row ...
    assert bool((out[torch.isfinite(out)] == 0).all())  # ... that greedy decoding picks
    freq = torch.bincount(out.argmax(dim=-1), minlength=6).float() / 40_000
    assert freq[4:].tolist() == [0.0, 0.0]
    # binomial standard error at 40k draws is at most 0.0025: within 4 of them
    assert torch.allclose(freq, probs, atol=0.01), freq.tolist()
    again = InverseCdfSampler(torch.Generator().manual_seed(5))(IDS, scores)
    assert torch.equal(out, again)  # seeded
    other = InverseCdfSampler(torch.Generator().manual_seed(6))(IDS, scores)
    assert not torch.equal(out, other)


def test_the_draw_follows_temperature_and_the_nucleus():
    scores = _logits([0.5, 0.3, 0.15], vocab=50).expand(20_000, -1).clone()
    gen = torch.Generator().manual_seed(0)
    drawn = sampling_processors(1.0, 0.8, gen)(IDS, scores.clone()).argmax(dim=-1)
    assert set(drawn.tolist()) == {0, 1}  # the nucleus: 0.5 + 0.3 reaches 0.8
    assert abs(float((drawn == 0).float().mean()) - 0.5 / 0.8) < 0.015
    cold = sampling_processors(0.25, 1.0, gen)(IDS, scores.clone()).argmax(dim=-1)
    # temperature 0.25: p ~ p0^4, so the top token takes 0.5^4 / (0.5^4 + 0.3^4 + ...) = 0.88
    want = (torch.tensor([0.5, 0.3, 0.15]) ** 4).tolist()
    share = want[0] / (sum(want) + 47 * ((0.05 / 47) ** 4))
    assert abs(float((cold == 0).float().mean()) - share) < 0.015
    assert [type(p).__name__ for p in sampling_processors(0.7, 0.9, gen)] == [
        "TemperatureLogitsWarper", "NucleusWarper", "InverseCdfSampler"]
    assert [type(p).__name__ for p in sampling_processors(1.0, 1.0, gen)] == [
        "InverseCdfSampler"]


def test_generation_samples_without_torch_multinomial(tiny_model, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.multinomial called")

    monkeypatch.setattr(torch, "multinomial", refuse)
    backend = TransformersBackend(batch_size=4, progress=False)
    convs = [conversation("Name a colour."), conversation("Count to three.")]
    hot = backend.generate(str(tiny_model), convs, n=4, temperature=1.5, top_p=1.0,
                           max_new_tokens=8, seed=3)
    assert len({g.text for row in hot for g in row}) > 1  # sampled: the candidates differ
    greedy = backend.generate(str(tiny_model), convs, n=2, temperature=0.0, max_new_tokens=8)
    assert all(len({g.text for g in row}) == 1 for row in greedy)


def test_trl_scores_labelled_positions_only_on_the_cpu(tiny_model):
    """With the switch on, TRL's fused LM head computes the same log-probabilities for the
    labelled positions (and zero elsewhere) as when it scores every position."""
    import trl.trainer.utils as trl_utils
    from transformers import AutoModelForCausalLM

    cpu = torch.device("cpu")
    before = trl_utils._use_triton  # an earlier training in this process may have switched it
    original = getattr(before, "original", before)
    trl_utils._use_triton = original
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    trl_utils.add_fused_lm_head(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator()
                        .manual_seed(1))
    labels = ids.clone()
    labels[:, :7] = -100  # the prompt
    labels[1, 10:] = -100  # padding
    try:
        assert original(cpu) is False
        every = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
        assert score_labelled_positions_only() is True
        assert trl_utils._use_triton(cpu) is True
        wrapped = trl_utils._use_triton
        assert score_labelled_positions_only() is True and trl_utils._use_triton is wrapped
        labelled = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
    finally:
        trl_utils._use_triton = before
    assert torch.allclose(every, labelled, atol=1e-6)
    assert bool((labelled[:, :6] == 0).all()) and bool((labelled[:, 6] != 0).all())
    assert not math.isnan(float(labelled.sum()))
