"""Where a batch-1 decode step of the fast engine goes: GEMVs, the step's kernels, the prefill, a compiled step.

    python3 scripts/profile_decode.py --shape 7b --context 1164 --out $OUT/profile_decode.json [--try-compile]

``gemv``: each distinct projection weight shape the engine reads (q/k/v and gate/up fused) at batch 1, cycling
over >= 512 MiB of the model's own weights (past L2), replayed from a CUDA graph: us, GB/s of weight bytes read,
fraction of the measured copy bandwidth; on CUDA also through torch.compile (max-autotune) and as FP8 weights
(``torch._scaled_mm``, 16 input rows).
``step``: ``--context`` random vector positions prefilled (1164 = LLoCO at 32k source tokens), then the engine's
decode as ``lloco bench`` times it and bare graph replays; a few eager steps under torch.profiler give device
time per kernel category, against the replayed step (the gap is idle time between the graph's kernels).
``prefill``: the same prompt's prefill under torch.profiler: kernels by category, GEMM TFLOP/s.
``attention`` (CUDA): one layer's decode attention over the step's cache, timed as the autotuner does (10 calls
per graph replay, so graph launch latency is spread): SDPA against the Triton kernels for a grid of splits x
block sizes x warps, in GB/s of the K/V bytes read.
``compiled_step`` (``--try-compile``): the step body through torch.compile captured in a CUDA graph: ms/token,
kernels by category inside the graph, greedy tokens against the uncompiled graph. Sections are guarded; the JSON
is rewritten after each. On CPU
(``--shape tiny --device cpu``) it runs in seconds: aten op self time instead of kernels, CUDA-only parts skipped.
"""

from __future__ import annotations

import argparse, json, re, signal, sys, time, traceback  # noqa: E401
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from lloco_index.bench_utils import (SHAPES, Cost, Ctx, attempt, build_backbone, markdown_table, measure_bandwidth,
                                     median, say, sync, timed)
from lloco_index.decode_ops import Clock, _seconds, flash_decode_kernel, text_config
from lloco_index.fast_decode import COMPILE_OPTIONS, FastDecoder, _Runner
from lloco_index.lean_llama import LeanLlama, support

CATEGORIES = [(re.compile(p, re.I), c) for p, c in (  # first match wins: CUDA kernel names, or aten ops on CPU
    ("flash|fmha|attention|softmax", "attention"),
    (r"gemm|gemv|nvjet|cutlass|xmma|splitk|::(add|b)?mm_?$", "gemm/gemv"),
    ("norm|roll|catarray|::cat$|silu|addcmul|pow|rsqrt", "norm/rotary/elementwise"),
    ("copy|index|memcpy|memset|embedding", "copy/cache update"), ("argmax|reduce", "argmax/other"),
    ("elementwise|mul|add|neg|div", "norm/rotary/elementwise"))]


def argmax(logits: torch.Tensor) -> torch.Tensor:  # the engine's greedy sampler
    return logits.argmax(-1)


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """TimeoutError after ``seconds`` (main thread): the only way to cap a torch.compile in progress."""
    def alarm(*_): raise TimeoutError(f"over its {seconds:.0f} s cap")  # noqa: E704
    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def device_seconds(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median seconds of ``fn()``: replays of a CUDA graph of it on a GPU (no launch overhead), else calls."""
    if device.type != "cuda":
        return median(timed(fn, device, reps, warmup=2))
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn(), fn()
    torch.cuda.current_stream(device).wait_stream(side)
    with torch.cuda.graph(graph := torch.cuda.CUDAGraph()):
        fn()
    return median(timed(graph.replay, device, reps, warmup=3))


def section_gemv(ctx: Ctx, out: dict, args: argparse.Namespace, shared: dict) -> None:
    dev, cuda, groups, rows = ctx.device, ctx.device.type == "cuda", {}, out.setdefault("rows", [])
    for name, w in engine_weights(ctx.bb.model):
        groups.setdefault(tuple(w.shape), []).append((name, w.detach()))
    cap_end = time.perf_counter() + args.compile_cap_s
    fp8 = cuda and hasattr(torch, "float8_e4m3fn") and torch.cuda.get_device_capability(dev) >= (8, 9)
    if not fp8:
        out["skipped"] = "fp8: needs compute capability 8.9+" if cuda else "torch.compile and fp8 variants: needs CUDA"
    for (n_out, n_in), g in groups.items():
        ws = [w for _, w in g][:-(-(512 << 20) // g[0][1].nbytes)]
        x, linear_us = torch.randn(1, n_in, device=dev, dtype=ws[0].dtype), None
        base = {"weights": ",".join(sorted({n for n, _ in g})), "shape": f"{n_out}x{n_in}", "per_step": len(g)}

        def compiled() -> Callable[[], list]:
            lin = torch.compile(lambda a, b: F.linear(a, b), **COMPILE_OPTIONS)
            with deadline(cap_end - time.perf_counter()):
                lin(x, ws[0]), sync(dev)
            return lambda: [lin(x, w) for w in ws]

        def scaled() -> Callable[[], list]:  # per-tensor scales (max -> 448); x's quantisation is not timed
            q8 = torch.zeros(16, n_in, device=dev, dtype=torch.float8_e4m3fn)
            q8[:1], one = x.to(q8.dtype), torch.ones((), device=dev)
            w8 = [((w.float() / s).to(q8.dtype), s) for w in ws for s in [w.abs().amax().float() / 448]]
            return lambda: [torch._scaled_mm(q8, w.t(), scale_a=one, scale_b=s, out_dtype=x.dtype) for w, s in w8]

        variants = [("F.linear", lambda: lambda: [F.linear(x, w) for w in ws], ws[0].nbytes)] + \
            [("torch.compile", compiled, ws[0].nbytes)] * cuda + [("fp8 _scaled_mm", scaled, ws[0].numel())] * fp8
        for variant, make, nbytes in variants:
            row = {**base, "variant": variant, "cycled": len(ws)}
            if variant == "torch.compile" and time.perf_counter() > cap_end:
                row["skipped"] = "--compile-cap-s spent"
            elif (t := attempt(row, f"  gemv {base['shape']} {variant}",
                               lambda: device_seconds(make(), dev, 4 * args.reps) / len(ws))) is not None:
                linear_us = linear_us or t * 1e6
                row.update(us=t * 1e6, gbs=nbytes / t / 1e9, of_copy_bw=nbytes / t / ctx.bandwidth,
                           speedup_vs_linear=linear_us / (t * 1e6))
            rows.append(row)
    for variant in ("F.linear", "torch.compile", "fp8 _scaled_mm"):  # every projection of a step, back to back
        if len(done := [r["per_step"] * r["us"] for r in rows if r["variant"] == variant and "us" in r]) == len(groups):
            out.setdefault("us_per_step", {})[variant] = sum(done)
    say(markdown_table(rows, ["weights", "shape", "per_step", "variant", "us", "gbs", "of_copy_bw",
                              "speedup_vs_linear", "skipped", "error"]))
    say(f"  every projection of a step, back to back (us): {out.get('us_per_step')} {out.get('skipped', '')}")


def engine_weights(model) -> list[tuple[str, torch.Tensor]]:
    """The weight matrices a decode step reads, as the engine lays them out (fused q/k/v and gate/up)."""
    if support(model, None) is not None:
        return [(n.rsplit(".", 1)[-1], m.weight) for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and "lora_" not in n]
    lean = LeanLlama(model, None)
    return [(n, layer[n].w) for layer in lean.layers for n in ("qkv", "o_proj", "gate_up", "down_proj")] + \
        [("lm_head", lean.head.w)]


def kernel_profile(fn: Callable[[], object], steps: int, device: torch.device) -> dict:
    """Per step of ``fn`` (``steps`` steps): CUDA kernel time (CPU: aten op self time) and launches by category."""
    cuda, cats, top = device.type == "cuda", {}, []
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        fn()
        sync(device)
    for e in (e for e in prof.key_averages() if (e.device_type != DeviceType.CPU) == cuda):
        us = (e.self_device_time_total if cuda else e.self_cpu_time_total) / steps
        top.append({"name": e.key[:100], "us_per_step": us, "calls_per_step": e.count / steps,
                    "category": next((c for p, c in CATEGORIES if p.search(e.key)), "argmax/other")})
        c = cats.setdefault(top[-1]["category"], {"us_per_step": 0.0, "launches_per_step": 0.0})
        c["us_per_step"], c["launches_per_step"] = c["us_per_step"] + us, c["launches_per_step"] + e.count / steps
    total = sum(c["us_per_step"] for c in cats.values())
    return {"unit": "CUDA kernels" if cuda else "CPU aten ops, self time", "us_per_step": total,
            "launches_per_step": sum(c["launches_per_step"] for c in cats.values()),
            "categories": {k: {**c, "share": c["us_per_step"] / (total or 1)} for k, c in sorted(cats.items())},
            "top": sorted(top, key=lambda r: -r["us_per_step"])[:15]}


def say_profile(prof: dict) -> None:
    """A ``kernel_profile`` as two tables: by category, then the top kernels."""
    say(markdown_table([{"category": c, **v} for c, v in prof["categories"].items()],
                       ["category", "us_per_step", "launches_per_step", "share"]))
    say(markdown_table(prof["top"], ["name", "category", "us_per_step", "calls_per_step"]))


def restore(runner: _Runner, state: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The decode state (tok, pos, slot, mask) after prefill: saved, or put back (``state``)."""
    tensors = (runner.tok, runner.pos, runner.slot, runner.mask)
    return [t.clone() for t in tensors] if state is None else [t.copy_(s) for t, s in zip(tensors, state)]


def replay(runner: _Runner, state: list[torch.Tensor], steps: int, reps: int) -> tuple[float, list[int]]:
    """Median seconds per step of ``steps`` graph replays (eager ``_body`` without a graph) from ``state``,
    and the greedy tokens of those steps through ``_Runner.step`` (as the engine decodes)."""
    times, body = [], runner.graph.replay if runner.graph is not None else runner.body
    for _ in range(reps):
        restore(runner, state)
        clock = Clock(runner.tok.device)
        for _ in range(steps):
            body()
        clock.mark()
        times.append(clock.spans("t")["t"] / steps)
    restore(runner, state)
    for i in range(1, steps + 1):
        runner.step(i, argmax, greedy=True)
    restore(runner, state)
    return median(times), runner.out[0, :steps + 1].tolist()


def section_step(ctx: Ctx, out: dict, args: argparse.Namespace, shared: dict) -> None:
    dev, n, cost, dec, engine = ctx.device, args.new_tokens, ctx.cost, FastDecoder(ctx.bb), []
    shared.update(x=ctx.vectors(args.context)[None], mask=torch.ones(1, args.context, dtype=torch.long, device=dev))
    for _ in range(args.reps + 1):  # the first decode captures the graph: not counted
        list(dec.decode(shared["x"], shared["mask"], [None], n, argmax, greedy=True))
        engine.append(dec.last_timing["decode_s"] / (n - 1))
    with torch.inference_mode():
        runner = shared["runner"] = dec._acquire(None, 1, args.context + n - 1)[1]  # the runner those decodes used
        runner.prefill(shared["x"], shared["mask"], n, argmax)
        step_s, shared["tokens"] = replay(runner, state := restore(runner), n - 1, args.reps)
        runner._body()  # warm-up
        prof = out["eager_profile"] = kernel_profile(lambda: [runner._body() for _ in range(3)], 3, dev)
        if runner.graph is not None:  # the same kernels inside the graph, if the profiler sees them there
            restore(runner, state)
            out["graph_profile"] = kernel_profile(lambda: [runner.graph.replay() for _ in range(3)], 3, dev)
        restore(runner, state)
    weights, kv = (cost.linear_params + cost.head_params) * cost.dtype_bytes, cost.kv_bytes(runner.length)
    shared["step_s"], shared["weights"], kernel_ms = step_s, weights, prof["us_per_step"] / 1e3
    out.update(engine_ms_per_token=1e3 * median(engine[1:]), step_ms=1e3 * step_s, graph=runner.graph is not None,
               graph_error=runner.graph_error, lean=runner.lean is not None, attention_split=runner.split,
               cache_slots=runner.length, weight_bytes=weights, kv_bytes=kv,  # attention reads every slot (masked)
               all_param_bytes=sum(p.nbytes for p in ctx.bb.model.parameters()),  # + embedding table, not read
               weights_of_copy_bw=weights / step_s / ctx.bandwidth,
               weights_kv_of_copy_bw=(weights + kv) / step_s / ctx.bandwidth, kernel_ms_per_step=kernel_ms,
               gap_ms=1e3 * step_s - kernel_ms if dev.type == "cuda" else None,
               graph_kernel_ms_per_step=out.get("graph_profile", {}).get("us_per_step", 0) / 1e3 or None)
    say_profile(prof)
    say(f"  engine decode {out['engine_ms_per_token']:.3f} ms/token; bare {'replay' if out['graph'] else 'eager'} step"
        f" {out['step_ms']:.3f} ms: {out['weights_of_copy_bw']:.1%} of copy bandwidth for the weights "
        f"({weights / 1e9:.2f} GB), {out['weights_kv_of_copy_bw']:.1%} with the KV cache ({kv / 1e9:.2f} GB); "
        f"{prof['unit']} {kernel_ms:.3f} ms over {prof['launches_per_step']:.0f} launches (inside the graph: "
        f"{out['graph_kernel_ms_per_step']} ms), gap {out['gap_ms']} ms")


def section_prefill(ctx: Ctx, out: dict, args: argparse.Namespace, shared: dict) -> None:
    """Where the prompt's prefill goes (eager, as the engine runs it): kernels by category, and the
    GEMMs' rate against the layers' Linear FLOPs."""
    runner, dev = shared["runner"], ctx.device
    with torch.inference_mode():
        prefill = lambda: runner.prefill(shared["x"], shared["mask"], args.new_tokens, argmax)  # noqa: E731
        prefill()  # warm-up
        wall = median(timed(prefill, dev, args.reps, warmup=1))
        prof = out["profile"] = kernel_profile(prefill, 1, dev)
    gemm_s = prof["categories"].get("gemm/gemv", {}).get("us_per_step", 0.0) / 1e6
    flops = 2 * ctx.cost.linear_params * args.context
    out.update(ms=1e3 * wall, kernel_ms=prof["us_per_step"] / 1e3, gemm_ms=1e3 * gemm_s,
               gemm_tflops=flops / gemm_s / 1e12 if gemm_s else None, positions=args.context)
    say_profile(prof)
    say(f"  prefill of {args.context} positions: {out['ms']:.2f} ms wall, kernels {out['kernel_ms']:.2f} ms, "
        f"GEMMs {out['gemm_ms']:.2f} ms = {out['gemm_tflops'] or 0:.0f} TFLOP/s on the Linear layers")


def section_attention(ctx: Ctx, out: dict, args: argparse.Namespace, shared: dict) -> None:
    """Which Triton launch shape reads the cache fastest (the autotuner only varies the splits)."""
    kernel = flash_decode_kernel()
    if ctx.device.type != "cuda" or kernel is None:
        out["skipped"] = "needs CUDA and Triton"
        return
    cfg, length, dev, dt = text_config(ctx.bb.model), shared["runner"].length, ctx.device, ctx.bb.dtype
    heads, kv_heads = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    with torch.inference_mode():
        q = torch.randn(1, heads, 1, d, device=dev, dtype=dt)
        k, v = torch.randn(2, 1, kv_heads, length, d, device=dev, dtype=dt).unbind(0)
        mask = torch.zeros(1, 1, 1, length, device=dev, dtype=dt)
        sdpa = partial(F.scaled_dot_product_attention, q, k, v, attn_mask=mask, enable_gqa=heads != kv_heads)
        ref, kv_bytes = sdpa().transpose(1, 2), 2 * k.nbytes
        rows = [{"variant": "sdpa", "us": 1e6 * _seconds(sdpa, dev)}]  # 10 calls a graph, as the autotuner times
        for splits in (8, 16, 32, 64):
            for block_n in (16, 32, 64, 128):
                for warps in (2, 4, 8):
                    row = {"variant": "triton", "splits": splits, "block_n": block_n, "num_warps": warps}
                    run = partial(kernel, q, k, v, mask, d ** -0.5, splits, block_n, warps)
                    attempt(row, f"splits={splits} block_n={block_n} warps={warps}", lambda: row.update(
                        rel_err=((run().float() - ref.float()).norm() / ref.float().norm()).item(),
                        us=1e6 * _seconds(run, dev)))
                    rows.append(row)
    for row in rows:
        row["gbs"] = kv_bytes / row["us"] / 1e3 if row.get("us") else None
    out.update(cache_slots=length, kv_bytes_per_layer=kv_bytes, rows=rows,
               best=min((r for r in rows if r.get("us")), key=lambda r: r["us"]))
    say(markdown_table(sorted((r for r in rows if r.get("us")), key=lambda r: r["us"])[:12],
                       ["variant", "splits", "block_n", "num_warps", "us", "gbs", "rel_err"]))


def section_compiled_step(ctx: Ctx, out: dict, args: argparse.Namespace, shared: dict) -> None:
    if not args.try_compile or ctx.device.type != "cuda":
        out["skipped"] = "needs CUDA" if args.try_compile else "opt-in: --try-compile"
        return
    base, n, t0 = shared["runner"], args.new_tokens, time.perf_counter()
    with torch.inference_mode():
        config = replace(FastDecoder(ctx.bb).config, compile=True)  # the engine's own compiled step
        runner = _Runner(ctx.bb, None, 1, base.length, True, base.split, config)
        runner.prefill(shared["x"], shared["mask"], n, argmax)
        state = restore(runner)
        with deadline(args.compile_cap_s):
            runner.capture()  # as the engine does: a failure gives up the Triton attention, then compilation
        out.update(compile_and_capture_s=time.perf_counter() - t0, graph_error=runner.graph_error,
                   attention_split=runner.split)
        if runner.graph is None or not runner.compiled:
            raise RuntimeError(f"compile/capture: {runner.graph_error or 'fell back to the uncompiled step'}")
        step_s, tokens = replay(runner, state, n - 1, args.reps)
        out["graph_profile"] = kernel_profile(lambda: [runner.graph.replay() for _ in range(3)], 3, ctx.device)
        restore(runner, state)
    say_profile(out["graph_profile"])
    same = next((i for i, (a, b) in enumerate(zip(tokens, shared["tokens"])) if a != b), len(tokens))
    out.update(step_ms=1e3 * step_s, speedup=shared["step_s"] / step_s, tokens_equal=tokens == shared["tokens"],
               common_prefix_tokens=same, weights_of_copy_bw=shared["weights"] / step_s / ctx.bandwidth)
    say(f"  compiled step {out['step_ms']:.3f} ms ({out['speedup']:.2f}x, {out['weights_of_copy_bw']:.1%} of copy "
        f"bandwidth); greedy tokens {same}/{len(tokens)} identical before the first difference")


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--context", type=int, default=1164, help="prefilled vector positions")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens per timed decode, as in lloco bench")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--try-compile", action="store_true", help="also time the step body through torch.compile")
    ap.add_argument("--compile-cap-s", type=float, default=120.0, help="cap on each torch.compile experiment")
    ap.add_argument("--out", default="profile_decode.json")
    args = ap.parse_args(argv)
    if args.new_tokens < 8:  # the profiled steps run past the timed ones: keep them inside the cache
        ap.error("--new-tokens must be at least 8")
    dev, start, out = torch.device(args.device), time.perf_counter(), Path(args.out)
    report = {"meta": {"command": " ".join(["python3", "scripts/profile_decode.py", *argv]), "torch": torch.__version__,
                       "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", **vars(args)}}
    bw, shape = measure_bandwidth(dev), SHAPES[args.shape]
    bb = build_backbone(shape, dev, args.context + args.new_tokens + 256)
    ctx = Ctx(None, dev, 0.0, bw, start, shape, bb, Cost.of(bb.model))  # no BenchConfig: its budget is not used
    report["meta"].update(bandwidth_gbs=bw / 1e9, model=bb.name_or_path, dtype=str(bb.dtype))
    say(f"{report['meta']['device']}: {bw / 1e9:.0f} GB/s copy (measured); {bb.name_or_path} {bb.dtype}")
    shared: dict = {}
    for section, fn in (("gemv", section_gemv), ("step", section_step), ("prefill", section_prefill),
                        ("attention", section_attention), ("compiled_step", section_compiled_step)):
        say(f"[{section}]")
        try:
            fn(ctx, report.setdefault(section, {}), args, shared)  # partial results survive an error
        except Exception as e:
            report[section]["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
            traceback.print_exc()
        report["meta"]["elapsed_s"] = time.perf_counter() - start
        out.write_text(json.dumps(report, indent=1, default=str))
    say(f"wrote {out} ({report['meta']['elapsed_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
