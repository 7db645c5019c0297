"""``lloco bench``: full context vs LLoCO-compressed context on one GPU, side by side (timing only).

Sections (each guarded: an error is recorded and the next section runs; JSON is rewritten after each):

- ``latency``  prefill + N new tokens for one question, full context (S + Q positions) vs LLoCO
               (ceil(S / segment) * summary + Q positions), on the fast engine (static cache + CUDA
               graphs) and the eager one, each against its roofline.
- ``compress`` encoder throughput (source tokens/s) and MFU on full segments, several batch sizes.
- ``serve``    questions/s for a batch over compressed contexts on several LoRA adapters.
- ``finetune`` LoRA (r=8, q/k/v/o) training steps/s on compressed vs full contexts.

Random-weight shapes time kernels only; EOS is ignored so every run produces exactly N tokens.
"""

from __future__ import annotations

import json
import platform
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from .bench_utils import (SHAPES, Cost, Ctx, attempt, build_backbone, measure_bandwidth, measure_peak_flops, median,
                          say, summary_tables, sync, timed)
from .generation import GenerationConfig, Generator

SECTIONS = ("latency", "compress", "serve", "finetune")  # run in this order (finetune changes model state last)
QKVO = "q_proj,k_proj,v_proj,o_proj"
LATENCY_ADAPTER = "bench_lloco"


@dataclass
class BenchConfig:
    shapes: tuple[str, ...] = ("7b",)
    sections: tuple[str, ...] = SECTIONS
    lengths: tuple[int, ...] = ()  # source tokens; empty: the shape's defaults
    new_tokens: int = 32
    question_tokens: int = 64
    reps: int = 3
    eager_max: int = 32768  # time the eager engine only up to this many source tokens
    serve_questions: int = 32
    serve_adapters: int = 4
    serve_source: int = 32768  # source tokens behind each served question's compressed context
    compress_batches: tuple[int, ...] = ()  # segments per forward; empty: the shape's defaults
    finetune_batch: int = 8
    finetune_source: int = 32768
    answer_tokens: int = 32  # finetuning: tokens with a loss after each prompt
    budget_s: float = 450.0  # stop starting new measurements after this
    compile: bool = False  # latency: also time full and LLoCO on the fast engine with a torch.compile'd step
    device: str | None = None
    out: str = "bench.json"

    def __post_init__(self) -> None:
        unknown = [s for s in self.shapes if s not in SHAPES] + [s for s in self.sections if s not in SECTIONS]
        if unknown:
            raise ValueError(f"unknown shape/section {unknown}; shapes: {sorted(SHAPES)}, sections: {SECTIONS}")
        if self.new_tokens < 2 or self.reps < 1 or self.serve_adapters < 1:
            raise ValueError("need --new-tokens >= 2, --reps >= 1 and at least one adapter")


def _generators(bb, **fast_options) -> tuple[Generator, Generator]:
    fast, eager = Generator(bb, fast=True), Generator(bb, fast=False)
    for k, v in fast_options.items():
        setattr(fast.fast.config, k, v)
    fast.eos_ids = eager.eos_ids = []  # exactly N tokens per run
    return fast, eager


def _prompt(ctx: Ctx, case: str, ctx_pos: int) -> Callable[[], list]:
    """One question's decoder input: full = embedded token ids; LLoCO = vectors + embedded question."""
    bb, q = ctx.bb, ctx.cfg.question_tokens
    if case == "full":
        ids = ctx.rand_ids(ctx_pos + q)
        return lambda: [bb.embed(ids)]
    vecs, q_ids = ctx.vectors(ctx_pos), ctx.rand_ids(q)
    return lambda: [torch.cat([vecs, bb.embed(q_ids)])]


def _answer_row(ctx: Ctx, row: dict, gen: Generator, pieces: Callable[[], list], adapter: str | None = None) -> dict:
    """Time one answer (prefill + N new tokens) against its roofline, or say why it was skipped."""
    c, cost, positions = ctx.cfg, ctx.cost, row["positions"]
    eager = gen.fast is None
    ok, why = ctx.fits(cost.kv_bytes(positions + c.new_tokens + 256) * (1.2 if eager else 1)
                       + 64 * positions * ctx.bb.hidden_size)  # + prefill activations, generously
    if eager and row["source_tokens"] > c.eager_max:
        row["skipped"] = f"eager engine timed up to {c.eager_max} source tokens"
    elif not ok:
        row["skipped"] = why
    elif ctx.left() < 0:
        row["skipped"] = "time budget spent"
    label = f"  latency {row['case']} S={row['source_tokens']} {row['engine']}"
    if "skipped" in row:
        say(f"{label}: skipped ({row['skipped']})")
        return row
    results, gen_cfg = [], GenerationConfig(max_new_tokens=c.new_tokens)
    reps = c.reps if positions < 20000 else max(2, c.reps - 1)
    times = attempt(row, label, lambda: timed(lambda: results.append(gen.generate([pieces()], gen_cfg, adapter)[0]),
                                               ctx.device, reps))
    if gen.fast is not None:
        gen.fast.clear()  # free this case's cache before the next one
    if times is None:
        return row
    if any(r.new_tokens != c.new_tokens for r in results):
        row["error"] = "engine stopped before N tokens"
        return row
    pre_roof, dec_roof = cost.roofline(positions, c.new_tokens, ctx.peak, ctx.bandwidth)
    row.update(latency_s=median(times), times_s=times, roofline_s=pre_roof + dec_roof, roofline_prefill_s=pre_roof,
               roofline_decode_s=dec_roof)
    row["x_roofline"] = row["latency_s"] / row["roofline_s"]
    if not eager:
        t = gen.fast.last_timing
        row.update(prefill_s=t["prefill_s"], decode_s=t["decode_s"],
                   ms_per_token=1e3 * t["decode_s"] / (c.new_tokens - 1),
                   prefill_x_roofline=t["prefill_s"] / pre_roof, decode_x_roofline=t["decode_s"] / dec_roof,
                   attention_split=t["attention_split"], lean=t["lean"], cuda_graphs=t["cuda_graphs"])
        if gen.fast.config.compile and not t["compiled"]:  # timed, but not what the engine label says
            row["error"] = "torch.compile failed: timed uncompiled (graph_errors says why)"
    say(f"{label}: {row['latency_s'] * 1e3:.1f} ms "
        f"({row['x_roofline']:.2f}x roofline {row['roofline_s'] * 1e3:.1f} ms)")
    return row


def _agreement(ctx: Ctx, fast: Generator, eager: Generator) -> dict:
    """Greedy tokens of both engines for one prompt (real text on the default model). bf16 rounding can
    flip a near-tie, most often with random weights, so this reports the common prefix, not a pass/fail."""
    bb = ctx.bb
    if ctx.shape.random:
        pieces = [bb.embed(ctx.rand_ids(256))]
    else:
        pieces = eager.chat_pieces(["Explain in a few sentences how a lighthouse lens focuses light."])
    cfg = GenerationConfig(max_new_tokens=ctx.cfg.new_tokens)
    ids = []
    for gen in (fast, eager):
        state = None
        for state in gen._decode([pieces], cfg, None):
            pass
        ids.append(state[0][0])
    fast.fast.clear()
    same = next((i for i, (a, b) in enumerate(zip(*ids)) if a != b), len(ids[0]))
    say(f"  fast vs eager greedy tokens: {same}/{len(ids[0])} identical before the first difference")
    return {"new_tokens": len(ids[0]), "common_prefix_tokens": same, "tokens_equal": ids[0] == ids[1]}


def section_latency(ctx: Ctx, out: dict) -> None:
    from peft import LoraConfig

    c, bb = ctx.cfg, ctx.bb
    fast, eager = _generators(bb)
    fast_hf, _ = _generators(bb, lean=False)  # the same engine through the transformers modules, for reference
    compiled = [("fast-compiled", _generators(bb, compile=True)[0])] if c.compile else []
    out.update(rows=[], speedups=[], engine_agreement={}, graph_errors=fast.fast.graph_errors)
    agreement = attempt(out["engine_agreement"], "  fast vs eager agreement", lambda: _agreement(ctx, fast, eager))
    out["engine_agreement"].update(agreement or {})
    lengths = c.lengths or ctx.shape.lengths
    lloco_cases = [(f"lloco {seg}->{k}", seg, k) for seg, k in ctx.shape.ratios]
    rows = out["rows"]
    for source in lengths:
        cases = [("full", source)] + [(n, ctx.lloco_positions(source, seg, k)) for n, seg, k in lloco_cases]
        for case, ctx_pos in cases:
            pieces = _prompt(ctx, case, ctx_pos)
            engines = [("fast", fast), ("eager", eager)] + ([("fast-hf", fast_hf)] if case != "full" else []) + compiled
            for engine, gen in engines:
                row = {"source_tokens": source, "case": case, "positions": ctx_pos + c.question_tokens,
                       "engine": engine}
                rows.append(_answer_row(ctx, row, gen, pieces))
    # as deployed, LLoCO answers through its LoRA decoder adapter (PEFT, unmerged): time those cases again with one
    bb.add_adapter(LATENCY_ADAPTER, LoraConfig(r=8, lora_alpha=16, target_modules=QKVO.split(","),
                                               init_lora_weights=False))
    bb.model.eval()
    for source in lengths:
        for case, seg, k in lloco_cases:
            ctx_pos = ctx.lloco_positions(source, seg, k)
            row = {"source_tokens": source, "case": case, "positions": ctx_pos + c.question_tokens,
                   "engine": "fast+lora"}
            rows.append(_answer_row(ctx, row, fast, _prompt(ctx, case, ctx_pos), LATENCY_ADAPTER))
    lat = {(r["source_tokens"], r["case"], r["engine"]): r["latency_s"] for r in rows if "latency_s" in r}
    speedups = out["speedups"]
    for (source, case, engine), t in lat.items():
        vs = engine if (source, "full", engine) in lat else "fast"  # the same engine where it was timed
        if case != "full" and engine != "eager" and (source, "full", vs) in lat:
            s = {"source_tokens": source, "case": case, "engine": engine, "speedup": lat[(source, "full", vs)] / t}
            if (source, "full", "eager") in lat:
                s["speedup_vs_eager_full"] = lat[(source, "full", "eager")] / t
            speedups.append(s)
            say(f"  speed-up {case} ({engine}) vs full ({vs}) at S={source}: {s['speedup']:.2f}x")
    out["graph_errors"] = [e for g in (fast, fast_hf, *(g for _, g in compiled)) for e in g.fast.graph_errors]


def section_compress(ctx: Ctx, out: dict) -> None:
    from .compressor import CompressorConfig, ContextCompressor

    c, bb, cost = ctx.cfg, ctx.bb, ctx.cost
    rows = out.setdefault("rows", [])
    for seg, k in ctx.shape.ratios[:1]:
        comp = ContextCompressor(bb, CompressorConfig(base_model=bb.name_or_path, segment_tokens=seg, summary_tokens=k,
                                                      hidden_size=bb.hidden_size), ctx.vectors(k).float())
        for batch in c.compress_batches or ctx.shape.compress_batches:
            if ctx.left() < 0:
                rows.append({"segment": seg, "summary": k, "batch": batch, "skipped": "time budget spent"})
                continue
            segs = ctx.rand_ids(seg, batch).tolist()
            row = {"segment": seg, "summary": k, "batch": batch}
            with torch.inference_mode():
                times = attempt(row, f"  compress batch {batch}", lambda: timed(lambda: comp.encode_segments(segs),
                                                                                  ctx.device, c.reps))
            if times is None:
                rows.append(row)
                continue
            t = median(times)
            flops = batch * cost.forward_flops(seg + k, logits=0)
            rows.append({**row, "seconds": t, "times_s": times,
                         "source_tokens_per_s": batch * seg / t, "tflops": flops / t / 1e12,
                         "mfu": flops / t / ctx.peak})
            say(f"  compress {seg}->{k} batch {batch}: {batch * seg / t:,.0f} source tokens/s, "
                 f"MFU {rows[-1]['mfu']:.1%}")


def section_serve(ctx: Ctx, out: dict) -> None:
    from peft import LoraConfig

    c, bb = ctx.cfg, ctx.bb
    names = [f"bench_serve_{i}" for i in range(c.serve_adapters)]
    torch.manual_seed(0)
    for name in names:
        if name not in bb.adapters:
            bb.add_adapter(name, LoraConfig(r=8, lora_alpha=16, target_modules=QKVO.split(","),
                                            init_lora_weights=False))
    bb.model.eval()
    fast, eager = _generators(bb, max_runners=2 * c.serve_adapters + 2)
    seg, k = ctx.shape.ratios[0]
    n_ctx = ctx.lloco_positions(c.serve_source, seg, k)
    prompts = [[torch.cat([ctx.vectors(n_ctx), bb.embed(ctx.rand_ids(c.question_tokens - 16 + (7 * i) % 33))])]
               for i in range(c.serve_questions)]
    adapters = [names[i % len(names)] for i in range(c.serve_questions)]
    gen_cfg = GenerationConfig(max_new_tokens=c.new_tokens)

    def one_by_one():
        for p, a in zip(prompts, adapters):
            fast.generate([p], gen_cfg, [a])

    modes = [("fast engine, one batch (a CUDA graph per adapter group)",
              lambda: fast.generate(prompts, gen_cfg, adapters)),
             ("eager engine, one batch (PEFT mixed-adapter forward)",
              lambda: eager.generate(prompts, gen_cfg, adapters)),
             ("fast engine, one question at a time", one_by_one)]
    rows = out.setdefault("rows", [])
    out["graph_errors"] = fast.fast.graph_errors
    for mode, fn in modes:
        row = {"mode": mode, "questions": c.serve_questions, "adapters": len(names), "context_positions": n_ctx}
        if ctx.left() < 0:
            rows.append({**row, "skipped": "time budget spent"})
            continue
        times = attempt(row, f"  serve {mode}", lambda: timed(fn, ctx.device, 1 if "one question" in mode else c.reps))
        fast.fast.clear()
        if times is None:
            rows.append(row)
            continue
        t = median(times)
        rows.append({**row, "seconds": t, "times_s": times, "questions_per_s": c.serve_questions / t,
                     "new_tokens_per_s": c.serve_questions * c.new_tokens / t})
        say(f"  serve {mode}: {c.serve_questions / t:.2f} questions/s")


def section_finetune(ctx: Ctx, out: dict) -> None:
    from .train import DECODER_ADAPTER, _lora, answer_loss

    c, bb = ctx.cfg, ctx.bb
    if DECODER_ADAPTER not in bb.adapters:
        bb.add_adapter(DECODER_ADAPTER, _lora(8, 16, QKVO))
    for n, p in bb.model.named_parameters():
        p.requires_grad_("lora_" in n and f".{DECODER_ADAPTER}." in n)
    params = [p for p in bb.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    bb.model.train()
    bb.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if ctx.device.type == "cuda" else nullcontext()

    def batch_for(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.full(x.shape[:2], -100)  # on the host, as the training batcher gives them (no sync)
        labels[:, -c.answer_tokens:] = ctx.rand_ids(c.answer_tokens, x.shape[0]).cpu()
        return x, labels

    def step(x, labels):
        with autocast:
            loss, _ = answer_loss(bb, x, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seg, k = ctx.shape.ratios[0]
    extra = c.question_tokens + c.answer_tokens
    n_comp = ctx.lloco_positions(c.finetune_source, seg, k) + extra
    comp_x = torch.stack([ctx.vectors(n_comp) for _ in range(c.finetune_batch)])
    attempts = [("compressed", c.finetune_batch, n_comp, lambda: batch_for(comp_x)),
                ("compressed", 1, n_comp, lambda: batch_for(comp_x[:1]))]
    for source in (c.finetune_source, c.finetune_source // 2, c.finetune_source // 4):
        attempts.append((f"full {source}", 1, source + extra,
                         lambda source=source: batch_for(bb.embed(ctx.rand_ids(source + extra))[None])))
    out.update(rows=[], gradient_checkpointing=True, lora="r=8, alpha=16, q/k/v/o")
    rows, full_done = out["rows"], False
    try:
        for name, batch, positions, make in attempts:
            if name.startswith("full") and full_done:
                break
            row = {"case": name, "batch": batch, "positions": positions, "source_tokens":
                   c.finetune_source if name == "compressed" else positions - extra}
            if ctx.left() < 0:
                rows.append({**row, "skipped": "time budget spent"})
                continue
            reps = c.reps if batch * positions < 20000 else 2
            times = attempt(row, f"  finetune {name}", lambda: timed(lambda: step(*make()), ctx.device, reps))
            if times is None:  # out of memory on a full context: the next, shorter one is tried
                opt.zero_grad(set_to_none=True)
                rows.append(row)
                if ctx.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            t = median(times)
            full_done = full_done or name.startswith("full")
            rows.append({**row, "seconds_per_step": t, "times_s": times, "examples_per_s": batch / t,
                         "positions_per_s": batch * positions / t,
                         "source_tokens_per_s": batch * row["source_tokens"] / t})
            say(f"  finetune {name}: {batch / t:.3f} examples/s ({batch * positions / t:,.0f} positions/s)")
    finally:
        bb.model.gradient_checkpointing_disable()
        bb.model.eval()
        for p in params:
            p.requires_grad_(False)
    comp = max((r["examples_per_s"] for r in rows if r["case"] == "compressed" and "examples_per_s" in r), default=None)
    full = next((r for r in rows if r["case"].startswith("full") and "examples_per_s" in r), None)
    ratio = comp / full["examples_per_s"] if full and comp else None
    out.update(throughput_ratio=ratio, ratio_full_case=full["case"] if full else None)


SECTION_FUNCS = {"latency": section_latency, "compress": section_compress, "serve": section_serve,
                 "finetune": section_finetune}


def run_bench(cfg: BenchConfig) -> dict:
    """Run every requested shape and section; print tables; write ``cfg.out`` after each section."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    start = time.perf_counter()
    import transformers

    report = {"meta": {"command": " ".join(["lloco"] + sys.argv[1:]) if sys.argv else "", "config": asdict(cfg),
                       "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                       or "cpu", "torch": torch.__version__, "transformers": transformers.__version__,
                       "note": "random-weight shapes: timing only"}, "shapes": {}}
    peak, bw = measure_peak_flops(device), measure_bandwidth(device)
    report["meta"].update(peak_tflops=peak / 1e12, bandwidth_gbs=bw / 1e9)
    say(f"device {report['meta']['device']}: measured {peak / 1e12:.1f} TFLOP/s matmul, {bw / 1e9:.0f} GB/s copy")
    ctx = Ctx(cfg, device, peak, bw, start)
    out = Path(cfg.out)
    for name in cfg.shapes:
        shape = SHAPES[name]
        lengths = cfg.lengths or shape.lengths
        res: dict = {"errors": {}}
        report["shapes"][name] = res
        if ctx.left() < 0:
            res["skipped"] = "time budget spent"
            continue
        try:
            t0 = time.perf_counter()
            bb = build_backbone(shape, device, max(lengths + (cfg.serve_source, cfg.finetune_source))
                                + cfg.question_tokens + cfg.new_tokens + cfg.answer_tokens + 512)
            sync(device)
            ctx.shape, ctx.bb, ctx.cost = shape, bb, Cost.of(bb.model)
            res["model"] = {"name": bb.name_or_path, "random_weights": shape.random, "dtype": str(bb.dtype),
                            "build_s": time.perf_counter() - t0, **asdict(ctx.cost)}
            say(f"shape {name}: {bb.name_or_path}, {ctx.cost.linear_params / 1e9:.2f}B layer weights, "
                 f"built in {res['model']['build_s']:.1f}s")
        except Exception as e:
            res["errors"]["build"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            out.write_text(json.dumps(report, indent=1, default=str))
            continue
        for section in (s for s in SECTIONS if s in cfg.sections):
            say(f"[{name}] {section}")
            try:
                SECTION_FUNCS[section](ctx, res.setdefault(section, {}))  # partial results survive an error
            except Exception as e:  # record and go on: one shot on the device
                res["errors"][section] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            report["meta"]["elapsed_s"] = time.perf_counter() - start
            out.write_text(json.dumps(report, indent=1, default=str))
        ctx.bb = bb = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    say(summary_tables(report))
    return report
