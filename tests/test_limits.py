"""Prompt length limits in tokens (`flywheel.limits`), the self-instruct drop count, and model
content hashes cached in the workspace instead of the model folder."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest

from flywheel import limits
from flywheel.config import PromptsConfig, config_reference, load_config
from flywheel.errors import FlywheelError
from flywheel.limits import KEY, TokenCounter, counter, too_long
from flywheel.modelprep import model_hash
from flywheel.stages.prompts import accept_tasks


@pytest.fixture(scope="module")
def tok(tiny_model):
    """SmolLM2's tokenizer (the tiny model carries it), loaded through flywheel.limits."""
    return counter(tiny_model).tokenizer


def _n(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


# -- too_long ---------------------------------------------------------------------------------
def test_too_long_names_where_count_limit_and_fix(tiny_model, tok):
    long = "Explain the water cycle in detail. " * 40
    items = [("data/seeds.jsonl line 1", "What is rain?"),
             ("data/seeds.jsonl line 7", long),
             ("data/seeds.jsonl line 9", "Name three rivers.")]
    out = too_long(items, 50, tiny_model)
    n = _n(tok, long)
    assert n > 50
    assert out == [f"data/seeds.jsonl line 7: the prompt is {n:,} tokens, over the limit of 50 "
                   f"({KEY}) — shorten it, or raise the limit with --set {KEY}=N"]


def test_too_long_is_empty_when_everything_fits_and_counts_exactly_at_the_limit(tiny_model,
                                                                                 tok):
    text = "word " * 30
    n = _n(tok, text)
    assert too_long([("x", text)], n, tiny_model) == []
    assert too_long([("x", text)], n - 1, tiny_model)[0].startswith(f"x: the prompt is {n} ")
    assert too_long([], 10, tiny_model) == []


def test_every_over_long_item_is_reported_in_order(tiny_model):
    items = [(f"f line {i}", ("a b " * 100 if i % 2 else "ok")) for i in range(1, 8)]
    out = too_long(items, 20, tiny_model)
    assert [line.split(":")[0] for line in out] == ["f line 1", "f line 3", "f line 5",
                                                    "f line 7"]


def test_smollm2_is_byte_level_and_its_longest_piece_is_81_bytes(tiny_model, tok):
    """The two shortcuts rest on facts about the tokenizer, checked here: it is byte-level BPE
    without a normalizer (a token never covers less than one byte), and its longest piece is
    81 bytes, so "over 64x the limit in characters" would NOT prove a text too long."""
    c = counter(tiny_model)
    assert c.byte_level and c.max_piece_bytes == 81
    assert _n(tok, "\n" + " " * 80) == 1  # 81 bytes, one token
    indented = ("\n" + " " * 80) * 10
    assert len(indented) > 64 * 10 and _n(tok, indented) == 10  # over 64x the limit in chars,
    assert too_long([("x", indented)], 10, tiny_model) == []  # yet within it
    rng = random.Random(0)
    alphabet = [chr(i) for i in [*range(32, 127), *range(0xA0, 0x800), 0x4E2D, 0x1F600,
                                 0x200B, 0x301, 0xFEFF]] + ["\n", "\t", "<|im_start|>"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 120)))
        assert _n(tok, text) <= len(text.encode("utf-8")), text


def test_a_megabyte_is_over_without_being_tokenized_and_its_bound_is_a_true_lower_bound(
        tiny_model, tok, monkeypatch):
    text = "y" * (1 << 20)
    c = counter(tiny_model)
    seen = []
    real = c.tokenizer

    class Spy:
        def __call__(self, texts, **kw):
            seen.extend(texts)
            return real(texts, **kw)

    monkeypatch.setattr(c, "tokenizer", Spy())
    out = too_long([("seeds line 2", text), ("seeds line 3", "short")], 1024, tiny_model)
    assert seen == []  # neither the megabyte nor the short line (<= 1024 bytes) was tokenized
    lower = -(-len(text) // 81)
    assert out == [f"seeds line 2: the prompt is at least {lower:,} tokens, over the limit of "
                   f"1,024 ({KEY}) — shorten it, or raise the limit with --set {KEY}=N"]
    assert lower <= _n(real, text)


def test_texts_between_the_bounds_are_tokenized(tiny_model):
    c = counter(tiny_model)
    seen = []
    real = c.tokenizer

    def spy(texts, **kw):
        seen.extend(texts)
        return real(texts, **kw)

    c2 = TokenCounter(spy, c.byte_level, c.max_piece_bytes)
    middle = "rain " * 300  # 1500 bytes: more than the limit, less than 81x it
    assert c2.over(["short", middle], 1024) == []
    assert seen == [middle]


def test_no_tokenizer_counts_utf8_bytes_and_says_so():
    out = too_long([("in.jsonl line 3", "é" * 600), ("in.jsonl line 4", "e" * 600)], 1000, None)
    assert len(out) == 1 and out[0].startswith("in.jsonl line 3: the prompt is 1,200 UTF-8 bytes")
    assert "no tokenizer was available" in out[0] and "can only over-count" in out[0]
    assert f"--set {KEY}=N" in out[0]


def test_a_tokenizer_that_is_not_byte_level_is_counted_in_full():
    """A tokenizer that can make more tokens than bytes gets no shortcut."""
    def two_per_char(texts, **kw):
        return {"input_ids": [[0, 0] * len(t) for t in texts]}

    c = TokenCounter(two_per_char)
    assert c.over(["abc", "abcdef"], 8) == [(1, 12, False)]


def test_a_folder_without_a_tokenizer_is_named(tiny_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(FlywheelError) as err:
        too_long([("x", "hi")], 10, folder)
    text = str(err.value)
    assert f"cannot load the tokenizer of {folder}" in text
    assert "no tokenizer file there" in text and "save_pretrained" in text


def test_tokenizers_are_loaded_once(tiny_model, monkeypatch):
    counter(tiny_model)
    import transformers

    def boom(*a, **kw):
        raise AssertionError("loaded again")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", boom)
    assert counter(str(tiny_model)) is counter(Path(tiny_model))


def test_a_limit_must_be_positive(tiny_model):
    with pytest.raises(ValueError):
        too_long([("x", "hi")], 0, tiny_model)


# -- the config key ---------------------------------------------------------------------------
def test_config_key_has_a_default_help_and_a_check():
    assert load_config(None, []).prompts.max_prompt_tokens == 1024
    assert load_config(None, [f"{KEY}=4096"]).prompts.max_prompt_tokens == 4096
    ref = {key: (typ, default, doc) for key, typ, default, doc in config_reference()}
    typ, default, doc = ref[KEY]
    assert (typ, default) == ("int", "1024") and "tokens" in doc
    for bad in ("0", "-5"):
        with pytest.raises(FlywheelError) as err:
            load_config(None, [f"{KEY}={bad}"])
        assert f"{KEY}: must be > 0, got {bad}" in str(err.value)
    with pytest.raises(FlywheelError) as err:
        load_config(None, [f"{KEY}=lots"])
    assert f"{KEY}: expected int" in str(err.value)


def test_the_default_limit_leaves_the_prompts_fingerprint_alone(monkeypatch):
    """Prompts versions made before the limit existed keep their ids: the default limit is not
    in the stage's params (the fingerprint below was computed by the code before it); any
    other value is, so changing it recomputes the stage."""
    from flywheel import pipeline
    from flywheel.catalog import fingerprint

    captured = {}
    monkeypatch.setattr(pipeline, "model_hash", lambda *a, **kw: "0123456789abcdef")
    monkeypatch.setattr(pipeline, "_stage", lambda ctx, kind, r, params, parents, compute, code:
                        captured.setdefault(len(captured), params) and "v")

    class Ctx:
        pass

    def params(*sets):
        ctx = Ctx()
        ctx.cfg = load_config(None, ["models.generator=/gen", *sets])
        pipeline.generate_prompts(ctx, 1, ["prompts-r0-x"], "model-r0-y")
        return captured[len(captured) - 1]

    default = params()
    assert "max_prompt_tokens" not in default
    assert fingerprint("prompts", default, ["a" * 20, "b" * 20]) == "139f12400eb906130586"
    # it joined the fingerprint after prompts versions were made: declared ADDED
    from flywheel.config import ADDED

    meta = {f.name: f.metadata for f in dataclasses.fields(PromptsConfig)}
    assert meta["max_prompt_tokens"]["fingerprint"] == ADDED
    assert params(f"{KEY}=2048")["max_prompt_tokens"] == 2048


# -- self-instruct: over-long prompts dropped and counted -------------------------------------
def _pcfg(**kw) -> PromptsConfig:
    base = {"num_new": 10, "min_chars": 10, "max_chars": 10_000, "dedupe_threshold": 0.6,
            "constraint_prob": 0.0, "max_constraints": 1, "constraint_types": []}
    return PromptsConfig(**{**base, **kw})


RAW = ["Explain how a rainbow forms.",
       "Describe, step by step and with every detail you know, " + "the history of " * 40
       + "the printing press.",
       "Describe the life cycle of a butterfly.",
       "List " + "many many " * 60 + "reasons to learn chess."]


def test_accept_tasks_drops_and_counts_over_long_prompts(tiny_model, tok):
    fits = counter(tiny_model).fits(40)
    rows, stats = accept_tasks(RAW, [["a"], ["b"], ["c"], ["d"]], [], [], _pcfg(),
                               random.Random(0), "m", fits=fits)
    assert list(rows.text) == [RAW[0], RAW[2]]
    assert [list(e) for e in rows.examples] == [["a"], ["c"]]
    assert stats == {"accepted": 2, "over_max_prompt_tokens": 2}
    assert all(_n(tok, t) <= 40 for t in rows.text)
    # without a limit the same outputs are all accepted
    rows, stats = accept_tasks(RAW, [[]] * 4, [], [], _pcfg(), random.Random(0), "m")
    assert len(rows) == 4 and stats == {"accepted": 4}


def test_the_limit_applies_to_the_prompt_with_its_constraint_sentence():
    raw = ["Explain how a rainbow forms in simple terms."]
    cfg = _pcfg(constraint_prob=1.0)
    rows, _ = accept_tasks(raw, [[]], [], [], cfg, random.Random(3), "m")
    full = rows.text[0]
    assert len(full) > len(raw[0])  # a constraint sentence was added
    seen = []
    rows, stats = accept_tasks(raw, [[]], [], [], cfg, random.Random(3), "m",
                               fits=lambda t: seen.append(t) or len(t) <= len(raw[0]))
    assert seen == [full] and rows.empty and stats == {"over_max_prompt_tokens": 1}


def test_a_dropped_prompt_does_not_block_a_later_near_duplicate():
    raw = ["Explain how a rainbow forms, please.", "Explain how a rainbow forms."]
    rows, stats = accept_tasks(raw, [[], []], [], [], _pcfg(), random.Random(0), "m",
                               fits=lambda t: t != raw[0])
    assert list(rows.text) == [raw[1]]
    assert stats == {"over_max_prompt_tokens": 1, "accepted": 1}


def test_self_instruct_counts_its_drops_in_the_version_params(tiny_model, tmp_path):
    """The pipeline wires the policy's tokenizer and the configured limit into self-instruct;
    the drop count lands in the prompts version's params."""
    from flywheel import pipeline
    from flywheel.backends import Generation

    cfg = load_config(None, [f"models.policy={tiny_model}", f"workspace={tmp_path / 'ws'}",
                             "prompts.num_new=4", "prompts.max_attempts=4",
                             "prompts.max_chars=10000", "prompts.constraint_prob=0",
                             f"{KEY}=40", "progress=false"])
    ctx = pipeline.context(cfg)
    ctx.catalog.init()

    class Backend:
        def generate(self, path, conversations, **kw):
            assert path == str(tiny_model)
            return [[Generation(RAW[i], "stop", 1, 1)] for i in range(len(conversations))]

    ctx._backend = Backend()
    seeds, base = pipeline.seed_prompts(ctx), pipeline.base_model(ctx)
    v = pipeline.generate_prompts(ctx, 1, [seeds], base)
    stats = ctx.catalog.get(v).params["stats"]
    assert stats == {"accepted": 2, "over_max_prompt_tokens": 2}
    assert sorted(ctx.catalog.rows("prompts", v).text) == sorted([RAW[0], RAW[2]])


# -- model hashes: the same value, cached in the workspace ------------------------------------
def _reference_hash(folder: Path) -> str:
    """The content hash as model versions have always recorded it."""
    h = hashlib.sha256()
    for p in sorted(p for p in folder.iterdir() if p.suffix in {".safetensors", ".bin",
                                                               ".json"}):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _listing(folder: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_model_hash_is_unchanged_and_cached_in_the_workspace(tiny_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    before = _listing(folder)
    cache = tmp_path / "ws" / ".flywheel" / "hashes.json"
    digest = model_hash(folder, cache)
    assert digest == _reference_hash(folder) == model_hash(folder)
    assert _listing(folder) == before  # nothing written into the model folder
    saved = json.loads(cache.read_text())
    assert list(saved) == [str(folder.resolve())] and saved[str(folder.resolve())]["hash"] == \
        digest
    # the cache is what answers while the files are unchanged ...
    saved[str(folder.resolve())]["hash"] = "cached-value"
    cache.write_text(json.dumps(saved))
    assert model_hash(folder, cache) == "cached-value"
    assert model_hash(folder, cache, fresh=True) == digest
    # ... and a changed file is hashed again
    with (folder / "config.json").open("a") as fh:
        fh.write("\n")
    assert model_hash(folder, cache) == _reference_hash(folder) != digest


def test_an_unwritable_or_damaged_cache_only_costs_time(tiny_model, tmp_path):
    blocked = tmp_path / "ws"
    blocked.mkdir()
    (blocked / ".flywheel").write_text("a file where the cache folder would go")
    digest = model_hash(tiny_model, blocked / ".flywheel" / "hashes.json")
    assert digest == _reference_hash(Path(tiny_model))
    damaged = tmp_path / "hashes.json"
    damaged.write_text("{not json")
    assert model_hash(tiny_model, damaged) == digest
    assert str(Path(tiny_model).resolve()) in json.loads(damaged.read_text())


def test_the_pipeline_caches_hashes_in_the_workspace_not_the_model_folder(tiny_model,
                                                                          tmp_path):
    from flywheel import pipeline

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    before = _listing(folder)
    ws = tmp_path / "ws"
    cfg = load_config(None, [f"models.policy={folder}", f"models.judge={folder}",
                             f"workspace={ws}"])
    pipeline.preflight(cfg)
    assert not ws.exists()  # preflight writes nothing, not even the cache
    ctx = pipeline.context(cfg)
    ctx.catalog.init()
    base = pipeline.base_model(ctx)
    _, judge = pipeline._judge(ctx, base)
    assert ctx.catalog.rows("model", base).content_hash[0] == judge.content_hash == \
        _reference_hash(folder)
    assert _listing(folder) == before
    assert not (folder / ".flywheel-hash").exists()
    assert json.loads(cfg.hash_cache_path().read_text())[str(folder.resolve())]["hash"] == \
        judge.content_hash
    assert cfg.hash_cache_path() == ws / ".flywheel" / "hashes.json"


def test_limits_module_stays_light():
    import subprocess
    import sys

    code = ("import sys, flywheel.limits, flywheel.modelprep, flywheel.promptfile\n"
            "print([m for m in ('torch', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(limits.__file__).parent.parent).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(("normalizer", "pre", "byte_level"), [
    (None, {"type": "ByteLevel"}, True),
    (None, {"type": "Sequence", "pretokenizers": [{"type": "Split"}, {"type": "ByteLevel"}]},
     True),
    ({"type": "NFC"}, {"type": "ByteLevel"}, False),  # NFC can expand a character
    (None, {"type": "Metaspace"}, False),  # SentencePiece style
    (None, {"type": "Sequence", "pretokenizers": []}, False),
])
def test_only_byte_level_bpe_without_a_normalizer_gets_the_shortcuts(normalizer, pre,
                                                                     byte_level):
    spec = {"normalizer": normalizer, "pre_tokenizer": pre,
            "model": {"type": "BPE", "vocab": {"a": 0, "ĠĠĠĠ": 1}},
            "added_tokens": [{"content": "<|im_start|>"}]}

    class Backend:
        def to_str(self):
            return json.dumps(spec)

    class Tok:
        backend_tokenizer = Backend()

    assert limits._describe_tokenizer(Tok()) == ((True, 12) if byte_level else (False, 0))
