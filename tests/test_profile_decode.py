"""scripts/profile_decode.py on the tiny random shape, CPU: every section reports (or says why it is skipped)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from lloco_index.bench_utils import SHAPES, Cost, build_backbone

ROOT = Path(__file__).resolve().parents[1]


def test_profile_decode_tiny_cpu(tmp_path):
    out = tmp_path / "profile_decode.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "profile_decode.py"), "--shape", "tiny", "--device", "cpu",
           "--context", "200", "--new-tokens", "8", "--reps", "2", "--try-compile", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["meta"]["bandwidth_gbs"] > 0 and report["meta"]["shape"] == "tiny"
    assert set(report) == {"meta", "gemv", "step", "prefill", "attention", "compiled_step"}
    assert not any("error" in report[s] for s in ("gemv", "step", "prefill", "attention", "compiled_step"))

    gemv = report["gemv"]
    # as the engine reads them: q|k|v 128x64, o 64x64, gate|up 256x64, down 64x128, vocabulary head 512x64
    assert {r["shape"] for r in gemv["rows"]} == {"128x64", "64x64", "256x64", "64x128", "512x64"}
    assert sum(r["per_step"] for r in gemv["rows"]) == 2 * 4 + 1  # 4 GEMMs per layer + the vocabulary head
    for r in gemv["rows"]:
        assert r["variant"] == "F.linear" and "error" not in r
        assert r["us"] > 0 and r["gbs"] > 0 and r["of_copy_bw"] > 0
    assert gemv["us_per_step"]["F.linear"] > 0 and "needs CUDA" in gemv["skipped"]

    step = report["step"]
    assert step["engine_ms_per_token"] > 0 and step["step_ms"] > 0 and step["weights_of_copy_bw"] > 0
    assert step["graph"] is False and step["lean"] is True and step["cache_slots"] == 256
    cost = Cost.of(build_backbone(SHAPES["tiny"], torch.device("meta"), 512).model)
    assert step["weight_bytes"] == (cost.linear_params + cost.head_params) * 4  # fp32 on CPU
    assert step["kv_bytes"] == cost.kv_bytes(256) and step["all_param_bytes"] > step["weight_bytes"]
    prof = step["eager_profile"]
    assert prof["us_per_step"] > 0 and prof["launches_per_step"] > 0 and prof["top"]
    cats = prof["categories"]
    for cat in ("gemm/gemv", "attention", "norm/rotary/elementwise", "copy/cache update"):
        assert cats[cat]["us_per_step"] > 0 and cats[cat]["launches_per_step"] > 0, cat
    assert abs(sum(c["share"] for c in cats.values()) - 1) < 1e-6
    assert cats["gemm/gemv"]["launches_per_step"] >= 2 * 4 + 1  # every projection is one (add)mm at least
    prefill = report["prefill"]
    assert prefill["positions"] == 200 and prefill["ms"] > 0 and prefill["gemm_ms"] > 0 and prefill["gemm_tflops"] > 0
    assert prefill["profile"]["categories"]["gemm/gemv"]["launches_per_step"] >= 2 * 4  # the prompt's GEMMs
    assert report["compiled_step"] == {"skipped": "needs CUDA"}
    assert report["attention"] == {"skipped": "needs CUDA and Triton"}
    assert "| category |" in run.stdout and "gemm/gemv" in run.stdout
