"""Operations the fast decoder swaps into the model for its own passes.

``decode_attention``: one query token against a whole static cache (SDPA, split-K matmuls that
spread a long cache over many thread blocks, or the Triton flash-decoding kernels of ``triton_decode``);
``autotune_split`` picks among them by timing on the device. ``patched``: routes attention through it
and runs RMSNorm as one ``F.rms_norm`` call. ``Clock``: phase timings without a host sync until read.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from functools import partial
from typing import Iterator, Sequence

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface

from .backbone import Backbone

logger = logging.getLogger(__name__)


def decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     split: int = 0, **kwargs):
    """One query token against a whole static cache with a ``[b, 1, 1, L]`` mask (bool, or additive float).

    ``split=0`` is SDPA. ``split=n`` is plain matmuls (HF eager-attention precision: bf16 scores,
    fp32 softmax) with the value product split ``n`` ways along the cache, so a 32k-token cache is
    read by many thread blocks rather than one per head; query heads sharing a KV head (GQA) ride
    along as extra rows instead of repeating the cache. ``split=-n`` is the Triton flash-decoding
    kernels with ``n`` programs per KV head along the cache (additive masks, where Triton is installed).
    Anything a path cannot take goes to SDPA.
    """
    b, h, q, d = query.shape
    hk, length = key.shape[1], key.shape[2]
    scale = d ** -0.5 if scaling is None else scaling
    float_mask = attention_mask is not None and attention_mask.dtype != torch.bool
    kernel = flash_decode_kernel() if split < 0 else None
    triton_here = query.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"  # CPU tensors: the interpreter only
    if kernel is not None and q == 1 and float_mask and d & (d - 1) == 0 and triton_here:
        return kernel(query, key, value, attention_mask, scale, -split), None
    if split <= 0 or q != 1 or length % split or attention_mask is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    g = h // hk
    scores = torch.matmul(query.reshape(b, hk, g, d) * scale, key.transpose(2, 3)).float()
    mask = attention_mask.view(b, 1, 1, length)
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1).to(value.dtype).view(b, hk, g, split, length // split).transpose(2, 3)
    out = torch.matmul(probs, value.view(b, hk, split, length // split, d)).sum(2, dtype=torch.float32)
    return out.to(query.dtype).reshape(b, h, 1, d).transpose(1, 2).contiguous(), None


_KERNEL: list = []  # the looked-up kernel (or None), once; a plain global so torch.compile traces the lookup cleanly


def flash_decode_kernel():
    """``triton_decode.flash_decode``, or None where Triton is missing (CPU builds of torch)."""
    if not _KERNEL:
        try:
            from .triton_decode import flash_decode
        except ImportError:
            flash_decode = None
        _KERNEL.append(flash_decode)
    return _KERNEL[0]


@contextmanager
def patched(bb: Backbone, split: int | None, norms: list) -> Iterator[None]:
    """Under the backbone lock: route attention through ``decode_attention`` with ``split`` (None: leave
    it) and run ``norms`` (RMSNorm modules) as ``F.rms_norm``; everything is restored afterwards."""
    config = bb.model.config
    with bb.lock:
        previous = config._attn_implementation
        if split is not None:
            name = f"lloco_decode_{split}"
            if name not in AttentionInterface._global_mapping:
                AttentionInterface.register(name, lambda *a, **k: decode_attention(*a, split=split, **k))
            config._attn_implementation = name
        for m in norms:
            m.forward = partial(_rms_norm, m)
        try:
            yield
        finally:
            config._attn_implementation = previous
            for m in norms:
                m.__dict__.pop("forward", None)


def _rms_norm(module, hidden: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.rms_norm(hidden, (hidden.shape[-1],), module.weight.to(hidden.dtype),
                                        module.variance_epsilon)


def rms_norms(model) -> list:
    return [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")
            and hasattr(m, "variance_epsilon") and getattr(m, "weight", None) is not None]


def text_config(model):
    cfg = model.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def autotune_split(bb: Backbone, batch: int, length: int,
                   candidates: Sequence[int] = (0, 1, 8, 16, 32, 64, -4, -8, -16, -32)) -> int:
    """Time SDPA, the split-K matmuls and the Triton kernels (negative splits, CUDA only) on one layer's
    shapes; keep the fastest.

    On CUDA each candidate is timed as replays of a captured graph, as the decoder runs it: timed eagerly,
    launch overhead would favour SDPA's one kernel over the other paths' few."""
    cfg = text_config(bb.model)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    module = next(m for m in bb.model.modules() if hasattr(m, "num_key_value_groups"))
    dev, dt = bb.device, bb.dtype
    with torch.inference_mode(), bb.lock:  # no other thread may launch work while a graph is captured
        q = torch.randn(batch, heads, 1, head_dim, device=dev, dtype=dt)
        k = torch.randn(batch, kv_heads, length, head_dim, device=dev, dtype=dt)
        v = torch.randn_like(k)
        mask = torch.zeros(batch, 1, 1, length, dtype=dt, device=dev)  # additive, as the decoder passes it
        times: dict[int, float] = {}
        triton = dev.type == "cuda" and flash_decode_kernel() is not None
        ref = decode_attention(module, q, k, v, mask, split=0)[0].float()
        for s in (c for c in candidates if (triton if c < 0 else length % max(c, 1) == 0)):
            try:
                out = decode_attention(module, q, k, v, mask, split=s)[0].float()
                err = ((out - ref).norm() / ref.norm()).item()  # relative: outputs over a long cache are small
                if not err < 5e-2:  # fast but wrong is never chosen
                    raise RuntimeError(f"differs from SDPA by {err:.3g} (relative)")
                t = _seconds(lambda: decode_attention(module, q, k, v, mask, split=s), dev)
            except Exception as e:  # e.g. a kernel that does not build on this device: not a candidate
                if isinstance(e, torch.cuda.OutOfMemoryError):
                    raise
                logger.warning("decode attention split=%d failed: %s", s, e)
                continue
            times[s] = t
    best = min(times, key=times.get, default=0)
    logger.info("decode attention for batch %d, cache %d: split=%d; us per call: %s", batch, length, best,
                ", ".join(f"{s}={t * 1e6:.1f}" for s, t in times.items()))
    return best


def _seconds(fn, device: torch.device, reps: int = 10) -> float:
    """Seconds per call of ``fn``: graph replays on CUDA (kernel time only), plain calls elsewhere."""
    for _ in range(3):
        fn()
    run = lambda: [fn() for _ in range(reps)]  # noqa: E731
    if device.type == "cuda":
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        graph.replay()
        run = graph.replay
    clock = Clock(device)
    for _ in range(3):
        run()
    clock.mark()
    return clock.spans("t")["t"] / (3 * reps)


class Clock:
    """Phase boundaries: CUDA events on a GPU (no sync until read), wall clock elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []
        self.mark()

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def spans(self, *names: str) -> dict[str, float]:
        if self.cuda:
            self.marks[-1].synchronize()
            gaps = [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        else:
            gaps = [b - a for a, b in zip(self.marks, self.marks[1:])]
        return dict(zip(names, gaps))
