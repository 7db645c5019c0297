"""``lloco bench`` smoke run on the tiny random shape (code path and report structure; not timed)."""

from __future__ import annotations

import json

import pytest

from lloco_index.bench import BenchConfig
from lloco_index.bench_utils import SHAPES, Cost, build_backbone
from lloco_index.cli import main


def test_bench_tiny_runs_every_section(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--model-shape", "tiny", "--device", "cpu", "--lengths", "256,1024", "--new-tokens", "3",
                 "--reps", "1", "--serve-questions", "4", "--serve-source", "512", "--finetune-source", "512",
                 "--compress-batches", "2", "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["meta"]["peak_tflops"] > 0 and report["meta"]["bandwidth_gbs"] > 0
    res = report["shapes"]["tiny"]
    assert res["errors"] == {}
    assert res["model"]["random_weights"] is True
    lat = res["latency"]["rows"]
    assert {(r["source_tokens"], r["case"], r["engine"]) for r in lat} == {
        (s, c, e) for s in (256, 1024) for c in ("full", "lloco 1536->50") for e in ("fast", "eager")} | {
        (s, "lloco 1536->50", e) for s in (256, 1024) for e in ("fast+lora", "fast-hf")}
    assert all(r["lean"] == (r["engine"] != "fast-hf") for r in lat if r["engine"] != "eager")
    for r in lat:
        assert r["latency_s"] > 0 and r["roofline_s"] > 0 and r["x_roofline"] > 0
    full = next(r for r in lat if r["case"] == "full" and r["source_tokens"] == 1024)
    assert full["positions"] == 1024 + 64 and full["prefill_s"] > 0 and full["ms_per_token"] > 0
    assert sorted((s["source_tokens"], s["engine"]) for s in res["latency"]["speedups"]) == [
        (s, e) for s in (256, 1024) for e in ("fast", "fast+lora", "fast-hf")]
    assert all(s["speedup"] > 0 and s["speedup_vs_eager_full"] > 0 for s in res["latency"]["speedups"])
    assert res["latency"]["engine_agreement"]["tokens_equal"] is True  # fp32 on CPU: same greedy tokens
    assert res["latency"]["graph_errors"] == []
    comp = res["compress"]["rows"][0]
    assert comp["batch"] == 2 and comp["source_tokens_per_s"] > 0 and 0 < comp["mfu"]
    assert full["prefill_x_roofline"] > 0 and full["decode_x_roofline"] > 0
    serve = res["serve"]["rows"]
    assert len(serve) == 3 and all(r["questions_per_s"] > 0 for r in serve)
    ft = res["finetune"]
    assert [(r["case"], r["batch"]) for r in ft["rows"]] == [("compressed", 8), ("compressed", 1), ("full 512", 1)]
    assert ft["throughput_ratio"] > 0
    printed = capsys.readouterr().out
    assert "| source_tokens | case |" in printed and "finetuning throughput ratio" in printed
    assert main(["bench", "--render", str(out)]) == 0
    assert capsys.readouterr().out.strip() == printed[printed.index("\n## "):].strip()


def test_cost_counts_a_7b_shape_without_allocating():
    """The roofline arithmetic on the real 7B dimensions (meta device: no memory)."""
    import torch

    bb = build_backbone(SHAPES["7b"], torch.device("meta"), 32768 + 96)
    cost = Cost.of(bb.model)
    assert cost.linear_params == 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008)
    assert cost.head_params == 32000 * 4096 and cost.dtype_bytes == 4  # fp32 off CUDA
    t = 32768 + 64
    assert cost.forward_flops(t) == pytest.approx(2 * cost.linear_params * t + 2 * cost.head_params
                                                  + 2 * 32 * 4096 * t * t)
    assert cost.kv_bytes(1000) == 2 * 32 * 4096 * 1000 * 4


def test_bench_rejects_unknown_shape():
    with pytest.raises(ValueError, match="unknown shape"):
        BenchConfig(shapes=("13b",))


def test_bench_failures_are_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    """One shot on the device: a failing case or check is written down, the other measurements still run."""
    from lloco_index import bench
    from lloco_index.generation import Generator

    def broken(*args, **kwargs):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(Generator, "_eager_steps", broken)
    monkeypatch.setattr(bench, "_agreement", broken)
    report = bench.run_bench(BenchConfig(shapes=("tiny",), sections=("latency", "compress"), lengths=(256,),
                                         new_tokens=3, reps=1, compress_batches=(2,), device="cpu",
                                         out=str(tmp_path / "b.json")))
    res = report["shapes"]["tiny"]
    assert res["errors"] == {}
    assert "simulated kernel failure" in res["latency"]["engine_agreement"]["error"]
    rows = {(r["case"], r["engine"]): r for r in res["latency"]["rows"]}
    assert "simulated kernel failure" in rows[("full", "eager")]["error"]
    assert rows[("full", "fast")]["latency_s"] > 0 and rows[("lloco 1536->50", "fast+lora")]["latency_s"] > 0
    assert res["compress"]["rows"][0]["source_tokens_per_s"] > 0
    assert json.loads((tmp_path / "b.json").read_text())["shapes"]["tiny"]["compress"]["rows"]


def test_bench_compile_times_both_sides_on_the_compiled_engine(tmp_path, monkeypatch):
    """``--compile`` adds fast-compiled rows for full and LLoCO and compares them with each other (same engine).
    torch.compile is replaced by the identity here: the compiled step itself is tested in test_fast_decode."""
    import torch

    from lloco_index import bench

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    report = bench.run_bench(BenchConfig(shapes=("tiny",), sections=("latency",), lengths=(256,), new_tokens=3,
                                         reps=1, compile=True, device="cpu", out=str(tmp_path / "b.json")))
    lat = report["shapes"]["tiny"]["latency"]
    rows = {(r["case"], r["engine"]): r["latency_s"] for r in lat["rows"] if "latency_s" in r}
    assert ("full", "fast-compiled") in rows and ("lloco 1536->50", "fast-compiled") in rows
    s = next(s for s in lat["speedups"] if s["engine"] == "fast-compiled")
    assert s["speedup"] == pytest.approx(rows[("full", "fast-compiled")] / rows[("lloco 1536->50", "fast-compiled")])
