"""Each round's LoRA adapter, kept beside its merged checkpoint, and stacked relative to the base.

A round trains a LoRA adapter on top of the round's starting model and merges it. Besides the
merged weights, the checkpoint keeps that adapter in `<model>/adapter/` (PEFT's own layout:
`adapter_config.json`, `adapter_model.safetensors`) with a `lineage.json`:

    {"base": "../../base-model", "chain": ["../../model-r1/adapter", "."],
     "absolute": {"base": "/ws/base-model", "chain": ["/ws/model-r1/adapter"]}}

`base` is the root checkpoint the chain starts from (a model without an adapter) and `chain`
the adapter folders from the base to this one, in training order; the last is this adapter
itself ("."). Paths are relative to the folder that holds `lineage.json`, so a workspace moved
as a whole keeps working; `absolute` keeps where the others were when it was written, tried
when a relative path no longer leads anywhere (a model folder moved on its own, with its base
left in place).

Round r's adapter is relative to round r-1's merged model, not to the base. The sum of LoRA
updates is a LoRA update of the summed rank,

    W_r = W_0 + sum_i s_i B_i A_i = W_0 + [s_1 B_1 ... s_r B_r] [A_1; ...; A_r],

so `adapter_for_base` writes the exact adapter relative to the base (A matrices concatenated
along the rank, scaled B matrices beside each other, `r = lora_alpha =` the summed rank, scaling
1) into `<model>/adapter-stacked/`, once. A server that holds the base can then serve any
round's policy as a LoRA adapter (vLLM's `POST /v1/load_lora_adapter`) instead of restarting
on the merged checkpoint. The merged checkpoint and base-plus-stacked-adapter agree up to the
rounding of the merged weights (exactly in float32, to bfloat16's precision for a bf16 run).

Neither folder changes a model's content hash: `model_hash` covers the files at the top of
the checkpoint folder only.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from flywheel.errors import FlywheelError

#: The adapter folder inside a checkpoint, its lineage file, and the stacked adapter's folder.
ADAPTER_DIR = "adapter"
LINEAGE_FILE = "lineage.json"
STACKED_DIR = "adapter-stacked"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

_FIX = ("serve the merged checkpoint instead (restart the server on it), or retrain the "
        "round from a model whose adapters are all in place")


@dataclass(frozen=True)
class Lineage:
    """Where a trained model's adapter comes from: the root `base` checkpoint, the adapter
    folders from it to this model (`chain`), and their summed LoRA rank (`rank`)."""

    base: Path
    chain: list[Path]
    rank: int


def save_adapter(peft_model, folder: Path, *, start: str | Path) -> Path:
    """Save `peft_model`'s adapter into `<folder>/adapter/` with its lineage; return that folder.

    `start` is the model the adapter was trained on: its own lineage (if it has one) is
    extended, else `start` is the base. A start whose lineage no longer resolves (a model of
    its chain deleted) is a base too: the adapter is exact relative to it, and a finished
    training is not lost to bookkeeping. `folder` is the checkpoint being written; it may be a
    temporary sibling of the final folder (renamed afterwards): the relative paths stay right."""
    try:
        start_lineage = lineage(start)
    except FlywheelError:
        start_lineage = None
    if start_lineage is None:
        base, earlier = Path(start).resolve(), []
    else:
        base, earlier = start_lineage.base, start_lineage.chain
    out = Path(folder) / ADAPTER_DIR
    shutil.rmtree(out, ignore_errors=True)
    peft_model.save_pretrained(str(out), save_embedding_layers=False)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (out / name).is_file():
            raise FlywheelError(f"saving the LoRA adapter to {out} wrote no {name}",
                                details=["the trained model is not a single-adapter PEFT "
                                         "LoRA model"])
    here = out.resolve()
    record = {"base": os.path.relpath(base, here),
              "chain": [os.path.relpath(p, here) for p in earlier] + ["."],
              "absolute": {"base": str(base), "chain": [str(p) for p in earlier]}}
    (out / LINEAGE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return out


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FlywheelError(f"{path}: cannot read the {what}: {exc}",
                            details=[_FIX]) from exc
    if not isinstance(data, dict):
        raise FlywheelError(f"{path}: the {what} is not a JSON object", details=[_FIX])
    return data


def _locate(file: Path, rel, absolute, what: str, *, adapter: bool) -> Path:
    """`rel` (relative to `file`'s folder), else `absolute`: the first that exists."""
    marker = CONFIG_FILE if adapter else "config.json"
    tried = []
    for cand in (rel, absolute):
        if not isinstance(cand, str) or not cand:
            continue
        path = (file.parent / cand).resolve()
        tried.append(str(path))
        if (path / marker).is_file():
            return path
    raise FlywheelError(
        f"{file}: the {what} is missing (no {marker} at {' or '.join(tried) or 'no path'})",
        details=["the model it names was moved or deleted: put it back where it was, or "
                 "move the whole workspace together", _FIX])


def _adapter_config(folder: Path) -> dict:
    return _read_json(folder / CONFIG_FILE, "adapter config")


def lineage(model_path: str | Path) -> Lineage | None:
    """The lineage of the model at `model_path`, None for a model without an adapter (the
    base, a checkpoint made outside flywheel, or one made before adapters were kept).

    A lineage that names a missing folder is a FlywheelError naming the lineage file."""
    file = Path(model_path) / ADAPTER_DIR / LINEAGE_FILE
    if not file.is_file():
        return None
    data = _read_json(file, "adapter lineage")
    chain = data.get("chain")
    absolute = data.get("absolute") if isinstance(data.get("absolute"), dict) else {}
    if not isinstance(chain, list) or not chain or chain[-1] != ".":
        raise FlywheelError(f"{file}: 'chain' must be a list of adapter folders ending "
                            "with this one (\".\")", details=[_FIX])
    base = _locate(file, data.get("base"), absolute.get("base"), "base model", adapter=False)
    old = absolute.get("chain") if isinstance(absolute.get("chain"), list) else []
    folders = [_locate(file, rel, old[i] if i < len(old) else None,
                       f"adapter #{i + 1} of its chain ({rel})", adapter=True)
               for i, rel in enumerate(chain[:-1])] + [file.parent.resolve()]
    rank = 0
    for folder in folders:
        r = _adapter_config(folder).get("r")
        if not isinstance(r, int) or r < 1:
            raise FlywheelError(f"{folder / CONFIG_FILE}: 'r' is {r!r}, not a positive rank",
                                details=[_FIX])
        rank += r
    return Lineage(base=base, chain=folders, rank=rank)


def _scaling(folder: Path, config: dict) -> float:
    """The adapter's LoRA scaling, alpha / r (alpha / sqrt(r) with rsLoRA); settings whose
    update is not `scaling * B @ A` on the same modules everywhere are refused."""
    where = folder / CONFIG_FILE
    if config.get("peft_type", "LORA") != "LORA":
        raise FlywheelError(f"{where}: peft_type is {config.get('peft_type')!r}, not LORA",
                            details=[_FIX])
    refused = {"use_dora": "DoRA", "rank_pattern": "a per-module rank",
               "alpha_pattern": "a per-module alpha", "modules_to_save": "fully trained modules",
               "layer_replication": "layer replication", "lora_bias": "a LoRA bias",
               "target_parameters": "LoRA on parameters",
               "trainable_token_indices": "trained token embeddings"}
    for key, what in refused.items():
        if config.get(key):
            raise FlywheelError(f"{where}: {key} is set ({what}): such adapters cannot be "
                                "stacked into one LoRA adapter", details=[_FIX])
    if config.get("bias", "none") != "none":
        raise FlywheelError(f"{where}: bias is {config['bias']!r}: only bias 'none' adapters "
                            "can be stacked", details=[_FIX])
    r, alpha = config["r"], config.get("lora_alpha", 8)
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def _targets(config: dict):
    t = config.get("target_modules")
    return sorted(t) if isinstance(t, list) else t


def stack_adapters(chain: list[Path], base: Path, out: Path) -> int:
    """Write the one LoRA adapter equal to applying `chain`'s adapters in turn to `base` into
    `out` (a new folder); return its rank."""
    from safetensors.torch import load_file, save_file

    configs = [_adapter_config(f) for f in chain]
    first = configs[0]
    for folder, config in zip(chain[1:], configs[1:]):
        if _targets(config) != _targets(first):
            raise FlywheelError(
                f"{folder / CONFIG_FILE}: target_modules {config.get('target_modules')} "
                f"differ from {chain[0] / CONFIG_FILE}'s {first.get('target_modules')}: "
                "adapters on different modules cannot be stacked", details=[_FIX])
    parts: dict[str, list] = {}
    dims: dict[str, int] = {}  # A matrices stack along the rank (rows), B ones side by side
    keys = None
    for folder, config in zip(chain, configs):
        scale = _scaling(folder, config)
        tensors = load_file(str(folder / WEIGHTS_FILE))
        if keys is None:
            keys = set(tensors)
        elif set(tensors) != keys:
            raise FlywheelError(f"{folder / WEIGHTS_FILE}: its tensors differ from "
                                f"{chain[0] / WEIGHTS_FILE}'s: the adapters cannot be stacked",
                                details=[_FIX])
        for key, t in tensors.items():
            if ".lora_B." in key or ".lora_embedding_B" in key:
                dims[key] = 1
                t = (t.double() * scale).to(t.dtype)
            elif ".lora_A." in key or ".lora_embedding_A" in key:
                dims[key] = 0
            else:
                raise FlywheelError(f"{folder / WEIGHTS_FILE}: tensor {key} is not a LoRA A or "
                                    "B matrix: the adapters cannot be stacked", details=[_FIX])
            parts.setdefault(key, []).append(t)
    import torch

    try:
        stacked = {key: torch.cat(ts, dim=dims[key]).contiguous() for key, ts in parts.items()}
    except RuntimeError as exc:
        raise FlywheelError(f"the adapters of {chain[-1]} do not fit together ({exc}): they "
                            "were not trained on one model architecture", details=[_FIX]) from exc
    rank = sum(c["r"] for c in configs)
    config = {**first, "r": rank, "lora_alpha": rank, "use_rslora": False,
              "rank_pattern": {}, "alpha_pattern": {}, "base_model_name_or_path": str(base),
              "revision": None}
    out.mkdir(parents=True)
    save_file(stacked, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return rank


def _complete(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def adapter_for_base(model_path: str | Path, *, max_rank: int | None = None
                     ) -> tuple[Path, Path, int] | None:
    """(base checkpoint, adapter folder relative to that base, its rank) for the model at
    `model_path`, or None when it has no lineage or the rank would exceed `max_rank` (serve
    the merged checkpoint then).

    A chain of one is the model's own adapter; a longer chain is stacked once into
    `<model>/adapter-stacked/` (written to a temporary folder and renamed; reused after)."""
    lin = lineage(model_path)
    if lin is None or (max_rank is not None and lin.rank > max_rank):
        return None
    if len(lin.chain) == 1:
        return lin.base, lin.chain[0], lin.rank
    final = Path(model_path).resolve() / STACKED_DIR
    if not _complete(final):
        tmp = final.with_name(f"{STACKED_DIR}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            stack_adapters(lin.chain, lin.base, tmp)
            if final.exists() and not _complete(final):  # cut short by a kill
                shutil.rmtree(final, ignore_errors=True)
            try:
                tmp.rename(final)
            except OSError:
                if not _complete(final):  # else another process stacked it first
                    raise
        except OSError as exc:
            raise FlywheelError(f"cannot write the stacked adapter {final}: {exc}",
                                details=["make the model folder writable, or serve the "
                                         "merged checkpoint instead"]) from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return lin.base, final, lin.rank
