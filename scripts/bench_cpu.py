"""CPU figures for the core (issue 2): cached model load, compression throughput, warm `ask` latency.

    python3 scripts/bench_cpu.py [--reps 5] [--dtypes float32,bfloat16] [--out bench_cpu.json]

Runs the public API on the embedded default model with its bundled compressor/adapter, over the
Paul Graham essays (shared/data/haystack) or any folder given with --corpus. Prints one JSON object.
A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def measure(args: argparse.Namespace, dtype: str) -> dict:
    """Cached model load, compression of the essays' chunks, warm ``ask`` latency, with the model in ``dtype``."""
    from lloco_index import GenerationConfig, LLoCO

    t0 = time.perf_counter()
    lloco = LLoCO.from_pretrained("smollm2-135m", store=tempfile.mkdtemp(prefix="lloco-bench-"), device="cpu",
                                  dtype=dtype)
    load_s = time.perf_counter() - t0

    files = sorted(p for p in Path(args.corpus).glob("*.txt") if p.name[0].islower())[:args.files]
    texts = [c.text for f in files for c in lloco.chunk(f.read_text())]
    n_tok = sum(len(lloco.backbone.tokenizer(t)["input_ids"]) for t in texts)
    t0 = time.perf_counter()
    lloco.compress_texts(texts)
    compress_s = time.perf_counter() - t0

    cfg = GenerationConfig(max_new_tokens=32)
    questions = ["What does the essay say about startups?", "Why do people procrastinate?",
                 "What is the best way to learn?", "How should founders pick an idea?"]
    lloco.ask(questions[0], top_k=5, config=cfg)  # warm-up
    lat, positions, new = [], [], []
    for i in range(args.reps):
        t0 = time.perf_counter()
        a = lloco.ask(questions[i % len(questions)], top_k=5, config=cfg)
        lat.append(time.perf_counter() - t0)
        positions.append(a.prompt_tokens)
        new.append(a.new_tokens)
    return {
        "load_cached_model_s": round(load_s, 2),
        "compress": {"chunks": len(texts), "source_tokens": n_tok, "seconds": round(compress_s, 2),
                     "source_tokens_per_s": round(n_tok / compress_s)},
        "ask_top5_32_new_tokens": {"reps": args.reps, "median_s": round(statistics.median(lat), 3),
                                   "min_s": round(min(lat), 3), "max_s": round(max(lat), 3),
                                   "mean_prompt_positions": statistics.mean(positions),
                                   "mean_new_tokens": statistics.mean(new)},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default=str(Path(__file__).resolve().parents[2] / "shared/data/haystack/paul_graham"))
    ap.add_argument("--files", type=int, default=4, help="essays to ingest")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="model dtypes to measure, one after the other")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from lloco_index.models import load_base_model

    load_base_model("smollm2-135m", device="cpu")  # make sure the converted copy exists (first run converts)
    report = {"device": "cpu", "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
              "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "avx512_bf16": torch.cpu._is_avx512_bf16_supported(), "amx": torch.cpu._is_amx_tile_supported(),
              "load_average": os.getloadavg(),
              **{dtype: measure(args, dtype) for dtype in args.dtypes.split(",")}}
    print(json.dumps(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
