"""Average training runs that continued one checkpoint ("model soup"), to buy down seed noise.

Why: at a few H100-minutes a run's seed moves its dev score as much as the recipe does, and runs are cheap to
train side by side on one GPU (docs/training.md, sixteenth session). Each LoRA pair is averaged as the weight
change it makes (the mean of B @ A, not of A and of B), then factored back to its rank by SVD, so the result loads
as any run does. Only runs of one starting point make sense to average: their adapters must agree in shape and
configuration, and their compressors in everything but the trained summary embeddings.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from .compressor import CONFIG_NAME, SUMMARY_NAME

ADAPTER_FOLDERS = ("compressor/encoder", "decoder")  # PEFT folders a run may hold


def average_runs(runs: Sequence[str | Path], out: str | Path,
                 weights: Sequence[float] | None = None) -> dict[str, float]:
    """Write the weighted average of ``runs`` (folders with ``compressor/`` and/or ``decoder/``) to ``out``.

    Returns, per adapter, the largest relative error of the rank truncation (0 when the mean change fits the
    rank). ``out`` must not exist yet: nothing already there is overwritten."""
    runs, out = [Path(r) for r in runs], Path(out)
    weights = [1.0] * len(runs) if weights is None else [float(w) for w in weights]
    if len(runs) < 2:
        raise ValueError("average needs at least two runs")
    if len(weights) != len(runs) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"need one weight >= 0 per run ({len(runs)}), not all 0; got {weights}")
    if out.exists():
        raise FileExistsError(f"{out} exists: choose a new folder (nothing is overwritten)")
    parts = [p for p in ("compressor", "decoder") if (runs[0] / p).is_dir()]
    if not parts:
        raise FileNotFoundError(f"{runs[0]}: no compressor/ or decoder/ folder to average")
    for run in runs[1:]:
        if [p for p in ("compressor", "decoder") if (run / p).is_dir()] != parts:
            raise ValueError(f"{run} does not hold the same parts as {runs[0]} ({', '.join(parts)})")
    share = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        errors = {}
        for folder in ADAPTER_FOLDERS:
            if (runs[0] / folder).is_dir():
                (tmp / folder).mkdir(parents=True)
                errors[folder] = _average_adapter([r / folder for r in runs], share, tmp / folder)
        if "compressor" in parts:
            _average_summary([r / "compressor" for r in runs], share, tmp / "compressor")
        (tmp / "average.json").write_text(json.dumps(
            {"runs": [str(r) for r in runs], "weights": weights, "truncation_error": errors}, indent=2))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return errors


def _same_json(folders: list[Path], name: str) -> dict:
    """The folders' config file, which must agree (lists compared as sets: PEFT writes target_modules unordered)."""
    configs = [{k: sorted(v) if isinstance(v, list) else v for k, v in json.loads((f / name).read_text()).items()}
               for f in folders]
    for f, c in zip(folders[1:], configs[1:]):
        if c != configs[0]:
            diff = sorted(k for k in c.keys() | configs[0].keys() if c.get(k) != configs[0].get(k))
            raise ValueError(f"{f / name} differs from {folders[0] / name} in {', '.join(diff)}: "
                             "only runs of one starting point and configuration can be averaged")
    return configs[0]


def _average_adapter(folders: list[Path], share: torch.Tensor, out: Path) -> float:
    """Mean weight change of each LoRA pair, back at the adapter's rank; other tensors are plain means."""
    _same_json(folders, "adapter_config.json")
    shutil.copy(folders[0] / "adapter_config.json", out)
    tensors = [load_file(str(f / "adapter_model.safetensors")) for f in folders]
    for f, t in zip(folders[1:], tensors[1:]):
        if {k: v.shape for k, v in t.items()} != {k: v.shape for k, v in tensors[0].items()}:
            raise ValueError(f"{f}: adapter tensors differ in names or shapes from {folders[0]}'s")
    averaged, worst = {}, 0.0
    for key, first in tensors[0].items():
        if "lora_B" in key:
            continue
        if "lora_A" not in key:
            averaged[key] = sum(s * t[key].double() for s, t in zip(share, tensors)).to(first.dtype)
            continue
        b_key, rank = key.replace("lora_A", "lora_B"), first.shape[0]
        delta = sum(s * (t[b_key].double() @ t[key].double()) for s, t in zip(share, tensors))
        u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
        root = sv[:rank].sqrt()
        averaged[b_key] = (u[:, :rank] * root).to(first.dtype).contiguous()
        averaged[key] = (root[:, None] * vh[:rank]).to(first.dtype).contiguous()
        if sv.square().sum() > 0:
            worst = max(worst, (sv[rank:].square().sum() / sv.square().sum()).sqrt().item())
    save_file(averaged, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return round(worst, 6)


def _average_summary(folders: list[Path], share: torch.Tensor, out: Path) -> None:
    """Summary embeddings are averaged; the vector mean is fit once and never trained, so it must agree."""
    _same_json(folders, CONFIG_NAME)
    shutil.copy(folders[0] / CONFIG_NAME, out)
    tables = [load_file(str(f / SUMMARY_NAME)) for f in folders]
    averaged = {"summary_embeddings": sum(s * t["summary_embeddings"].double() for s, t in zip(share, tables)).float()}
    if "vector_mean" in tables[0]:
        if not all(torch.allclose(t["vector_mean"], tables[0]["vector_mean"]) for t in tables):
            raise ValueError("the runs' vector means differ: they did not continue one compressor")
        averaged["vector_mean"] = tables[0]["vector_mean"]
    save_file(averaged, str(out / SUMMARY_NAME))
