"""Published checkpoints: AutoCompressor folders and pickle -> safetensors conversion.

An AutoCompressor checkpoint (``princeton-nlp/AutoCompressor-Llama-2-7b-6k``) is a plain
LlamaForCausalLM checkpoint plus one extra tensor: ``LlamaAutoCompressorModel`` subclasses
``LlamaForCausalLM`` and sets ``self.embed_summary = nn.Embedding(summary_length, hidden)`` at top
level, so the state dict holds ``embed_summary.weight`` beside ``model.*`` and ``lm_head.*``, and
``config.json`` adds ``summary_length``, ``accumulate_summary`` and ``segment_gradient_checkpointing``.
transformers loads the LLaMA part and drops ``embed_summary.weight``; we read that tensor here.

Weights are only ever read from safetensors. Pickled files (``*.bin``) can run code when loaded,
so ``convert_checkpoint`` is the one place that opens them, with ``torch.load(weights_only=True)``,
which only rebuilds tensors, and only when the user asks for it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

SUMMARY_KEY = "embed_summary.weight"
LLOCO_SEGMENT_TOKENS = 1536  # LLoCO's preproc_embs.py: segment_lengths=1536 (6144 / 4 training steps)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# pickled weight files and their safetensors names, as transformers and PEFT write them
_WEIGHT_NAMES = {"pytorch_model": "model", "adapter_model": "adapter_model"}


def pickle_hint(path: str | Path) -> str:
    """The one-line fix for a folder whose weights are pickles."""
    return (f"pickled weights are never loaded (they can run code); convert them once with "
            f"`lloco convert-checkpoint {path} {path}-safetensors` and use the new folder")


def read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a model folder)")
    return json.loads(file.read_text())


def is_autocompressor(path: str | Path) -> bool:
    """A checkpoint folder saved by AutoCompressors' ``LlamaAutoCompressorModel`` (or LLoCO's copy)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        return False
    cfg = read_config(path)
    return "summary_length" in cfg and any("AutoCompressor" in a for a in cfg.get("architectures") or [])


def read_summary_embeddings(path: str | Path):
    """``embed_summary.weight`` ``[summary_length, hidden]`` of an AutoCompressor folder (float32)."""
    from safetensors import safe_open

    path = Path(path)
    cfg = read_config(path)
    if cfg.get("model_type") != "llama":
        raise ValueError(f"{path}: only LLaMA AutoCompressors are supported (model_type={cfg.get('model_type')!r}); "
                         "the OPT ones give summary tokens no positions, which this compressor does not reproduce")
    if int(cfg.get("summary_length", 0)) < 1:
        raise ValueError(f"{path}: config.json has no summary_length >= 1; not an AutoCompressor checkpoint")
    file = _file_holding(path, SUMMARY_KEY)
    with safe_open(str(file), "pt") as f:
        if SUMMARY_KEY not in f.keys():
            raise ValueError(f"{file}: no {SUMMARY_KEY} tensor; not an AutoCompressor checkpoint")
        table = f.get_tensor(SUMMARY_KEY).float()
    expected = (int(cfg["summary_length"]), int(cfg["hidden_size"]))
    if tuple(table.shape) != expected:
        raise ValueError(f"{file}: {SUMMARY_KEY} has shape {tuple(table.shape)}, config.json says {expected}")
    return table


def _file_holding(path: Path, key: str) -> Path:
    """The safetensors file of ``path`` that holds ``key`` (single file or sharded with an index)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        if key not in weight_map:
            raise ValueError(f"{index}: no {key} in the weight map; not an AutoCompressor checkpoint")
        return path / weight_map[key]
    if (path / "model.safetensors").is_file():
        return path / "model.safetensors"
    if any(f.suffix in PICKLE_SUFFIXES for f in path.iterdir()):
        raise ValueError(f"{path}: {pickle_hint(path)}")
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def convert_checkpoint(src: str | Path, dst: str | Path) -> list[str]:
    """Copy a model or PEFT adapter folder to ``dst`` with its pickled weights rewritten as safetensors.

    ``pytorch_model[-0000k-of-0000n].bin`` becomes ``model[-0000k-of-0000n].safetensors`` (with the
    index rewritten), ``adapter_model.bin`` becomes ``adapter_model.safetensors``; other pickles
    (``training_args.bin``, optimizer states) are skipped, every other file is copied. Each pickle is
    opened with ``torch.load(weights_only=True, mmap=True)``: tensors only, one shard in memory at a
    time. ``dst`` is written to a temporary folder and renamed, so a failure leaves nothing behind.

    Returns the names of the written safetensors files.
    """
    import torch
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"no such folder: {src}")
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty; choose a new folder")
    weights = {f: _safetensors_name(f.name) for f in sorted(src.iterdir()) if _safetensors_name(f.name)}
    if not weights:
        raise ValueError(f"{src}: no pickled weights (pytorch_model*.bin or adapter_model.bin) to convert")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}-"))
    try:
        for f in sorted(src.iterdir()):
            if f.is_file() and f.suffix not in PICKLE_SUFFIXES and f.name != "pytorch_model.bin.index.json":
                shutil.copy2(f, tmp / f.name)
        for f, name in weights.items():
            state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
                raise ValueError(f"{f}: not a state dict of tensors; refusing to convert it")
            save_file(_unshare(state), str(tmp / name), metadata={"format": "pt"})
            del state
        old_index = src / "pytorch_model.bin.index.json"
        if old_index.is_file():
            index = json.loads(old_index.read_text())
            index["weight_map"] = {k: _safetensors_name(v) for k, v in index["weight_map"].items()}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
        if dst.exists():
            dst.rmdir()
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return sorted(weights.values())


def _safetensors_name(name: str) -> str | None:
    """``pytorch_model-00001-of-00002.bin`` -> ``model-00001-of-00002.safetensors``; None for other files."""
    stem, suffix = os.path.splitext(name)
    for old, new in _WEIGHT_NAMES.items():
        if suffix == ".bin" and (stem == old or stem.startswith(old + "-")):
            return new + stem[len(old):] + ".safetensors"
    return None


def _unshare(state: dict) -> dict:
    """safetensors refuses tensors that share memory (tied weights); give each its own copy."""
    seen: set[int] = set()
    out = {}
    for k, t in state.items():
        ref = t.untyped_storage().data_ptr()
        out[k] = t.clone().contiguous() if ref in seen or not t.is_contiguous() else t
        seen.add(ref)
    return out
