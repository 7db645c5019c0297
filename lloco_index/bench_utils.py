"""Pieces of ``lloco bench``: model shapes, device ceilings, timers, roofline arithmetic, tables.

Ceilings are measured on the device at start (a large bf16 matmul, a large device-to-device copy),
never taken from a datasheet; every roofline below is relative to those two numbers.
"""

from __future__ import annotations

import math
import statistics
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from .backbone import Backbone

if TYPE_CHECKING:
    from .bench import BenchConfig


@dataclass(frozen=True)
class Shape:
    """A benchmarked decoder: a random-weight LLaMA of given dimensions, or the embedded default model."""

    name: str
    hidden: int = 0
    layers: int = 0
    heads: int = 0
    kv_heads: int = 0
    intermediate: int = 0
    vocab: int = 0
    ratios: tuple[tuple[int, int], ...] = ((1536, 50),)  # (segment tokens, summary vectors) per LLoCO case
    lengths: tuple[int, ...] = (4096, 16384, 32768)  # default source lengths
    compress_batches: tuple[int, ...] = (4, 8, 16)  # default segments per encoder forward

    @property
    def random(self) -> bool:
        return self.hidden > 0


SHAPES = {
    "7b": Shape("7b", 4096, 32, 32, 32, 11008, 32000, lengths=(4096, 16384, 32768, 65536, 131072)),
    "default": Shape("default", ratios=((512, 24), (1536, 50)), compress_batches=(16, 64, 256)),
    "tiny": Shape("tiny", 64, 2, 4, 2, 128, 512, lengths=(512, 2048), compress_batches=(2, 8)),
}


class StubTokenizer:
    """Random-weight shapes have no vocabulary: the bench feeds ids/embeddings and never reads text."""

    pad_token_id = 0
    eos_token_id = None
    unk_token_id = None
    chat_template = None

    def convert_tokens_to_ids(self, token: str) -> None:
        return None

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def build_backbone(shape: Shape, device: torch.device, max_positions: int) -> Backbone:
    """The default model as shipped, or a random LLaMA built directly on ``device`` (seconds, not minutes).

    Random shapes get linear RoPE scaling past 4096 positions (timing only); for the default model the
    window check is raised to ``max_positions`` so long full contexts can be timed past its 8k window.
    """
    if not shape.random:
        bb = Backbone.from_pretrained("smollm2-135m", device=device)
        bb.model.config.max_position_embeddings = max(bb.context_window, max_positions)
        return bb
    return Backbone(random_llama(shape, device, max_positions), StubTokenizer(), f"random-llama-{shape.name}")


def random_llama(shape: Shape, device: torch.device, max_positions: int = 4096, vocab: int | None = None):
    """A LlamaForCausalLM of ``shape`` with random weights (seed 0), bf16 on CUDA, fp32 elsewhere.
    ``vocab`` replaces the shape's vocabulary size (to match a real tokenizer)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    factor = max(1.0, max_positions / 4096)
    rope = {"rope_type": "linear", "factor": factor, "rope_theta": 10000.0} if factor > 1 else \
        {"rope_type": "default", "rope_theta": 10000.0}
    cfg = LlamaConfig(hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.kv_heads, intermediate_size=shape.intermediate,
                      vocab_size=vocab or shape.vocab, max_position_embeddings=max(4096, max_positions),
                      rope_parameters=rope, attn_implementation="sdpa", pad_token_id=0, tie_word_embeddings=False)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def save_random_model(shape: Shape, tokenizer_from: str, out: str | Path, device: torch.device) -> Path:
    """A model folder that ``lloco train`` and ``Backbone.from_pretrained`` load like any other: random weights
    of ``shape`` (safetensors) with the tokenizer of ``tokenizer_from`` (an embedded name or a folder), whose
    vocabulary sets the embedding size. For timing training at a shape no real checkpoint here has (LLaMA-2-7B)."""
    from transformers import AutoTokenizer

    from .models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path(tokenizer_from))
    model = random_llama(shape, device, vocab=len(tok))
    model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.config.bos_token_id, model.config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@dataclass
class Ctx:
    """What the sections share: the config, the measured ceilings, the current shape's model and cost."""

    cfg: BenchConfig
    device: torch.device
    peak: float
    bandwidth: float
    start: float
    shape: Shape = field(default=None)
    bb: object = None
    cost: Cost = None

    def left(self) -> float:
        return self.cfg.budget_s - (time.perf_counter() - self.start)

    def fits(self, nbytes: float) -> tuple[bool, str]:
        """Whether ``nbytes`` more device memory is free (CPU: always)."""
        if self.device.type != "cuda":
            return True, ""
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info(self.device)[0]
        ok = nbytes * 1.1 < free
        return ok, "" if ok else f"needs ~{nbytes / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"

    def rand_ids(self, n: int, batch: int | None = None) -> torch.Tensor:
        vocab = self.bb.model.get_input_embeddings().weight.shape[0]
        return torch.randint(1, vocab, (n,) if batch is None else (batch, n), device=self.device)

    def vectors(self, n: int) -> torch.Tensor:
        """Stand-in compressed vectors (random, at the embedding scale)."""
        return torch.randn(n, self.bb.hidden_size, device=self.device, dtype=self.bb.dtype) * 0.02

    def lloco_positions(self, source: int, seg: int, k: int) -> int:
        return math.ceil(source / seg) * k


def say(msg: str) -> None:
    print(msg, flush=True)


def attempt(row: dict, label: str, fn: Callable[[], list[float]]) -> list[float] | None:
    """Run one measurement; on failure note the error in ``row`` and let the section go on."""
    try:
        return fn()
    except Exception as e:  # one shot on the device: a failed case must not cost the others
        row["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        traceback.print_exc()
        say(f"{label}: ERROR {row['error']}")
        return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 1) -> list[float]:
    """Seconds per call: CUDA events around each call on a GPU, wall clock on CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def measure_peak_flops(device: torch.device) -> float:
    """FLOP/s of a large matmul in the benchmark dtype (bf16 on GPU, fp32 on CPU), random inputs."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    t = median(timed(lambda: a @ b, device, reps=20, warmup=50))  # warm-up long enough for clocks to settle
    return 2 * n ** 3 / t


def measure_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written."""
    n_bytes = (1 << 30) if device.type == "cuda" else (1 << 26)
    src = torch.randn(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    t = median(timed(lambda: dst.copy_(src), device, reps=20, warmup=20))
    return 2 * n_bytes / t


@dataclass
class Cost:
    """FLOP and byte counts of one decoder, from its modules (LoRA excluded)."""

    linear_params: int  # Linear weights inside the layers: 2 FLOPs per weight per token
    head_params: int  # the vocabulary projection (run on one position per prompt)
    layers: int
    attn_dim: int  # query heads * head dim
    kv_dim: int  # KV heads * head dim
    dtype_bytes: int

    @classmethod
    def of(cls, model) -> "Cost":
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head = model.get_output_embeddings().weight
        linear = sum(m.weight.numel() for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and "lora_" not in n and m.weight is not head)
        return cls(linear, head.numel(), cfg.num_hidden_layers, cfg.num_attention_heads * head_dim,
                   kv_heads * head_dim, head.element_size())

    def forward_flops(self, tokens: int, logits: int = 1) -> float:
        """One causal forward over ``tokens`` positions (attention counted causally: half of T x T)."""
        return 2 * self.linear_params * tokens + 2 * self.head_params * logits \
            + 2 * self.layers * self.attn_dim * tokens * tokens

    def decode_bytes(self, context: int) -> float:
        """Bytes one decode step must read for one sequence: all weights plus the KV cache so far."""
        return (self.linear_params + self.head_params) * self.dtype_bytes \
            + 2 * self.layers * self.kv_dim * context * self.dtype_bytes

    def kv_bytes(self, positions: int, batch: int = 1) -> float:
        return 2 * self.layers * self.kv_dim * positions * self.dtype_bytes * batch

    def roofline(self, positions: int, new_tokens: int, peak: float, bandwidth: float) -> tuple[float, float]:
        """(prefill, decode) floors in seconds: FLOPs / peak, and (new_tokens - 1) steps of bytes / bandwidth."""
        steps = max(new_tokens - 1, 0)
        return self.forward_flops(positions) / peak, steps * self.decode_bytes(positions + new_tokens // 2) / bandwidth


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def summary_tables(report: dict) -> str:
    """Markdown tables of a ``lloco bench`` report, partial or whole (also ``lloco bench --render FILE``)."""
    meta = report["meta"]
    parts = [f"\n## {meta['device']}: {meta['peak_tflops']:.1f} TFLOP/s, {meta['bandwidth_gbs']:.0f} GB/s (measured)"]
    for name, res in report["shapes"].items():
        parts.append(f"\n### {name} ({res.get('model', {}).get('name', '?')}) {res.get('skipped', '')}")
        lat = res.get("latency", {})
        if lat:
            ms = [{**r, "ms": r["latency_s"] * 1e3, "roof ms": r["roofline_s"] * 1e3} if "latency_s" in r else r
                  for r in lat.get("rows", [])]
            parts.append(markdown_table(ms, ["source_tokens", "case", "positions", "engine", "lean", "ms", "roof ms",
                                             "x_roofline", "prefill_x_roofline", "decode_x_roofline", "ms_per_token",
                                             "skipped", "error"]))
            parts.append(markdown_table(lat.get("speedups", []),
                                        ["source_tokens", "case", "engine", "speedup", "speedup_vs_eager_full"]))
            agree = lat.get("engine_agreement", {})
            parts.append(f"fast vs eager greedy tokens: {agree.get('common_prefix_tokens', '?')}/"
                         f"{agree.get('new_tokens', '?')} identical before the first difference "
                         f"{agree.get('error', '')}; CUDA graph errors: {lat.get('graph_errors') or 'none'}")
        for section, cols in (("compress", ["segment", "summary", "batch", "source_tokens_per_s", "tflops", "mfu"]),
                              ("serve", ["mode", "questions", "adapters", "questions_per_s", "new_tokens_per_s"]),
                              ("finetune", ["case", "batch", "positions", "examples_per_s", "positions_per_s"])):
            if res.get(section, {}).get("rows"):
                parts.append(markdown_table(res[section]["rows"], cols + ["skipped", "error"]))
        if res.get("finetune", {}).get("throughput_ratio"):
            parts.append(f"finetuning throughput ratio (compressed / {res['finetune']['ratio_full_case']}): "
                         f"{res['finetune']['throughput_ratio']:.2f}x")
        for section, err in res["errors"].items():
            parts.append(f"ERROR in {section}: {err}")
    return "\n".join(parts)
