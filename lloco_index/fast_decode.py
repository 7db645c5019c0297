"""Fast decoding: a static KV cache and one CUDA graph per (adapter, batch, cache length).

The eager loop in ``generation`` grows a DynamicCache and launches every kernel of every layer from
Python for each token: a 7B model decodes at ~30 ms/token where reading its weights takes ~4 ms.
Here the prompt is prefilled eagerly into preallocated K/V buffers (unpadded rows keep SDPA's flash
path) and each further token is one replay of a captured graph: mask update, forward, greedy argmax
and position advance all run on the device; the host syncs only every ``sync_every`` tokens.

PEFT's mixed-adapter forward indexes rows with Python lists, which a graph cannot capture, so rows
are decoded in one group per adapter (each group its own graph; a step over G adapters reads the
base weights G times). On CPU the same code runs without graphs, which is what the tests check.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .backbone import Backbone
from .decode_ops import Clock, autotune_split, patched, rms_norms, text_config
from .lean_llama import LeanLlama, fuse_projections, prefill_mask, support

logger = logging.getLogger(__name__)
Sampler = Callable[[torch.Tensor], torch.Tensor]  # float logits [b, vocab] -> token ids [b]


COMPILE_OPTIONS = {"mode": "max-autotune-no-cudagraphs", "dynamic": False}  # our own graph captures the step


@dataclass
class FastDecodeConfig:
    use_cuda_graph: bool = True  # ignored off CUDA
    sync_every: int = 8  # host syncs (stop checks) every this many tokens
    cache_bucket: int = 256  # cache lengths are rounded up to this, so graphs are reused across prompts
    max_runners: int = 4  # idle (cache + graph) sets kept for reuse
    split: int | None = None  # decode attention: 0 SDPA, n n-way split-K matmuls, -n Triton kernels; None: autotune
    autotune_min_len: int = 1024  # CUDA caches at least this long try the other attention paths
    fused_norm: bool = True  # RMSNorm as one F.rms_norm call (one fused kernel on CUDA instead of ~8)
    lean: bool = True  # LLaMA layers through lean_llama (fewer kernels); other models through transformers
    compile: bool = False  # the step through torch.compile (max-autotune) before capture; a compile per cache size


class _SlabLayer(CacheLayerMixin):
    """One layer's K/V in fixed buffers. Prefill appends at a host offset and returns the filled
    prefix (so an unpadded prompt keeps flash attention); decode writes at the device index ``slot``
    and returns the whole buffer, whose unused slots the 4-D mask hides: every shape stays static."""

    is_compileable = False
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self.filled = 0
        self.slot: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Buffers are allocated up front."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.slot is not None:
            self.keys.index_copy_(2, self.slot, key_states)
            self.values.index_copy_(2, self.slot, value_states)
            return self.keys, self.values
        end = self.filled + key_states.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"prompt of {end} positions does not fit a cache of {self.keys.shape[2]}")
        self.keys[:, :, self.filled:end] = key_states
        self.values[:, :, self.filled:end] = value_states
        self.filled = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return (self.keys.shape[2], 0) if self.slot is not None else (self.filled + query_length, 0)

    def get_seq_length(self) -> int:
        return self.filled

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class SlabCache(Cache):
    """Preallocated ``[batch, kv_heads, length, head_dim]`` K/V per layer (zeros: masked slots stay finite)."""

    def __init__(self, layers: int, batch: int, kv_heads: int, length: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (batch, kv_heads, length, head_dim)
        super().__init__(layers=[_SlabLayer(torch.zeros(shape, dtype=dtype, device=device),
                                            torch.zeros(shape, dtype=dtype, device=device)) for _ in range(layers)])

    def begin_prefill(self) -> None:
        for layer in self.layers:
            layer.filled, layer.slot = 0, None

    def begin_decode(self, slot: torch.Tensor) -> None:
        for layer in self.layers:
            layer.slot = slot


class _Runner:
    """Static buffers, cache and (lazily captured) graph for one adapter, batch size and cache length."""

    def __init__(self, bb: Backbone, adapter: str | None, batch: int, length: int, use_graph: bool, split: int,
                 config: FastDecodeConfig):
        cfg = text_config(bb.model)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        dev = bb.device
        self.bb, self.adapter, self.batch, self.length, self.split = bb, adapter, batch, length, split
        self.norms = rms_norms(bb.model) if config.fused_norm else []
        self.lean_reason = support(bb.model, adapter) if config.lean else "disabled"
        self.lean = LeanLlama(bb.model, adapter) if self.lean_reason is None else None
        self.cache = SlabCache(cfg.num_hidden_layers, batch, kv_heads, length, head_dim, bb.dtype, dev)
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)
        self.mask = torch.zeros(batch, 1, 1, length, dtype=bb.dtype, device=dev)  # additive: 0 or dtype min
        vocab = bb.model.get_output_embeddings().weight.shape[0]
        self.logits = torch.zeros(batch, vocab, dtype=torch.float32, device=dev)
        self.out = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.use_graph = use_graph
        # Triton GEMVs tuned per weight shape and fused elementwise ops: 7.15 -> 6.08 ms/token on the 7B shape
        self.compiled = config.compile
        self.body = torch.compile(self._body, **COMPILE_OPTIONS) if config.compile else self._body
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_error: str | None = None
        self.fallbacks: list[str] = []  # what was given up and why (the Triton attention, compilation)

    def prefill(self, x: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, sample: Sampler) -> None:
        """Prompt -> cache, first token -> ``tok``; positions and mask ready for the first replay."""
        b, width = mask.shape
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        self.cache.begin_prefill()
        logits = None
        if self.lean is not None:
            try:
                logits = self.lean(x.clone(), pos, self.cache, prefill_mask(mask))
            except Exception as e:  # never lose an answer to the lean path: the transformers modules take over
                self._drop_lean(e)
                self.cache.begin_prefill()
        if logits is None:
            with patched(self.bb, None, self.norms):
                logits = self.bb.forward_mixed([self.adapter] * b, inputs_embeds=x, attention_mask=mask,
                                               position_ids=pos, past_key_values=self.cache, use_cache=True,
                                               logits_to_keep=1).logits[:, -1]
        self.cache.begin_decode(self.slot)
        self.mask.fill_(torch.finfo(self.mask.dtype).min)
        self.mask[:, 0, 0, :width].masked_fill_(mask.bool(), 0.0)
        self.slot.fill_(width)
        self.pos.copy_(pos[:, -1:] + 1)
        self.out = torch.zeros(b, max_new_tokens, dtype=torch.long, device=self.tok.device)
        self.tok.copy_(sample(logits.float())[:, None])
        self.out[:, 0] = self.tok[:, 0]

    def _body(self) -> None:
        """One decode step, entirely on the device (this is what the graph captures)."""
        self.mask.index_fill_(3, self.slot, 0.0)
        if self.lean is not None:
            logits = self.lean(self.lean.embed_ids(self.tok), self.pos, self.cache, self.mask, self.split)
        else:
            with patched(self.bb, self.split, self.norms):
                logits = self.bb.forward_mixed([self.adapter] * self.batch, input_ids=self.tok,
                                               attention_mask=self.mask, position_ids=self.pos,
                                               past_key_values=self.cache, use_cache=True).logits[:, -1]
        self.logits.copy_(logits)
        self.tok.copy_(self.logits.argmax(-1, keepdim=True))
        self.pos.add_(1)
        self.slot.add_(1)

    def _drop_compiled(self, error: Exception | str) -> None:
        self.body, self.compiled = self._body, False
        self.fallbacks.append(f"compiled step dropped: {error}")
        logger.warning("compiled decode step failed, running it uncompiled: %s", error)

    def _drop_lean(self, error: Exception | str) -> None:
        self.lean, self.lean_reason = None, f"failed here, transformers modules used: {error}"
        logger.warning("lean LLaMA forward %s", self.lean_reason)

    def _capture(self) -> str | None:
        """Warm up on a side stream, capture one step, then restore the state the warm-up advanced.
        Returns the error that made capture fail (decoding then runs eagerly, still static-cache)."""
        state = (self.tok, self.pos, self.slot, self.mask)
        saved = [t.clone() for t in state]
        self.bb.lock.acquire()  # no other thread may launch work while the stream is being captured
        try:
            stream = torch.cuda.Stream(device=self.tok.device)
            stream.wait_stream(torch.cuda.current_stream(self.tok.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.body()
            torch.cuda.current_stream(self.tok.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.body()
            self.graph = graph
            return None
        except Exception as e:
            logger.warning("CUDA graph capture failed: %s", e)
            torch.cuda.synchronize()
            return f"{type(e).__name__}: {e}"
        finally:
            self.bb.lock.release()
            for t, s in zip(state, saved):
                t.copy_(s)

    def capture(self) -> None:
        """Capture the step's graph, each failure giving up one thing: the Triton attention inside
        torch.compile (SDPA instead), then compilation, then the lean forward."""
        self.graph_error = self._capture()
        if self.graph_error and self.compiled and self.split < 0:
            self.fallbacks.append(f"Triton attention dropped from the compiled step: {self.graph_error}")
            logger.warning("compiled step with the Triton attention failed, using SDPA: %s", self.graph_error)
            self.split = 0
            self.graph_error = self._capture()
        if self.graph_error and self.compiled:  # retry uncompiled
            self._drop_compiled(f"capture: {self.graph_error}")
            self.graph_error = self._capture()
        if self.graph_error and self.lean is not None:  # retry through the transformers modules
            self._drop_lean(f"capture: {self.graph_error}")
            self.graph_error = self._capture()

    def step(self, index: int, sample: Sampler, greedy: bool) -> None:
        if self.use_graph and self.graph is None and self.graph_error is None:
            self.capture()
        if self.graph is not None:
            self.graph.replay()
        else:
            try:
                self.body()
            except Exception as e:  # a failed step stops before advancing any state: redo it
                if self.compiled:
                    self._drop_compiled(e)
                elif self.lean is None:
                    raise
                else:
                    self._drop_lean(e)
                self.body()
        if not greedy:
            self.tok.copy_(sample(self.logits)[:, None])
        self.out[:, index] = self.tok[:, 0]


class FastDecoder:
    """Static-cache decoding with the same inputs as the eager loop (left-padded embeddings + mask).

    Example::

        dec = FastDecoder(backbone)
        for column in dec.decode(x, mask, [None] * len(x), 32, lambda lg: lg.argmax(-1), greedy=True):
            ...  # one new token id per row
    """

    def __init__(self, backbone: Backbone, config: FastDecodeConfig | None = None):
        self.bb = backbone
        self.config = config or FastDecodeConfig()
        self._idle: OrderedDict[tuple, list[_Runner]] = OrderedDict()
        self._pool_lock = threading.Lock()  # a runner serves one decode at a time
        self._splits: dict[tuple[int, int], int] = {}
        self.last_timing: dict = {}  # phase times and what ran (attention, lean, compiled, graphs) of the last decode
        self.graph_errors: list[str] = []  # capture, lean-forward and compile failures (all fall back)
        if self.config.lean and support(backbone.model, None) is None:
            with backbone.lock:  # before any graph of this model is captured: fusing frees the old weights
                fuse_projections(backbone.model)

    @property
    def uses_graphs(self) -> bool:
        return self.bb.device.type == "cuda" and self.config.use_cuda_graph

    def clear(self) -> None:
        """Drop idle caches and graphs (frees their device memory)."""
        with self._pool_lock:
            self._idle.clear()
        if self.bb.device.type == "cuda":
            torch.cuda.empty_cache()

    def decode(self, x: torch.Tensor, mask: torch.Tensor, adapters: Sequence[str | None], max_new_tokens: int,
               sample: Sampler, greedy: bool, sync_every: int | None = None) -> Iterator[list[int]]:
        """Yield ``max_new_tokens`` columns (one token id per row); rows are grouped by adapter."""
        sync = max(1, sync_every or self.config.sync_every)
        groups: dict[str | None, list[int]] = {}
        for i, a in enumerate(adapters):
            groups.setdefault(a, []).append(i)
        runners: list[tuple[list[int], tuple, _Runner]] = []
        clock = Clock(self.bb.device)
        try:
            with torch.inference_mode():
                for adapter, rows in groups.items():
                    idx = torch.tensor(rows, device=x.device)
                    sub_mask = mask[idx]
                    width = int(sub_mask.sum(-1).max())  # drop columns that are padding in every row
                    key, runner = self._acquire(adapter, len(rows), width + max_new_tokens - 1)
                    runners.append((rows, key, runner))
                    runner.prefill(x[idx][:, -width:], sub_mask[:, -width:], max_new_tokens, sample)
            clock.mark()
            done, produced = 0, 1
            while done < max_new_tokens:
                target = min(max_new_tokens, done + sync)
                with torch.inference_mode():
                    for index in range(produced, target):
                        for _, _, runner in runners:
                            runner.step(index, sample, greedy)
                produced = max(produced, target)
                columns = [[0] * len(adapters) for _ in range(target - done)]
                for rows, _, runner in runners:
                    for r, values in zip(rows, runner.out[:, done:target].tolist()):
                        for j, v in enumerate(values):
                            columns[j][r] = v
                if target == max_new_tokens:
                    clock.mark()
                    self.last_timing = {**clock.spans("prefill_s", "decode_s"),
                                        "attention_split": runners[0][2].split,  # the first adapter group's
                                        "lean": all(r.lean is not None for _, _, r in runners),
                                        "compiled": all(r.compiled for _, _, r in runners),
                                        "cuda_graphs": all(r.graph is not None for _, _, r in runners)}
                yield from columns
                done = target
        finally:
            for _, key, runner in runners:
                failed_lean = runner.lean_reason if (runner.lean_reason or "").startswith("failed") else None
                for error in (runner.graph_error, failed_lean, *runner.fallbacks):
                    if error and error not in self.graph_errors:
                        self.graph_errors.append(error)
                self._release(key, runner)

    def _acquire(self, adapter: str | None, batch: int, positions: int) -> tuple[tuple, _Runner]:
        bucket = self.config.cache_bucket
        length = -(-max(positions, 1) // bucket) * bucket
        key = (adapter, self._adapter_signature(adapter), batch, length)
        with self._pool_lock:
            idle = self._idle.get(key)
            if idle:
                return key, idle.pop()
        split = self._split_for(batch, length)
        try:
            runner = _Runner(self.bb, adapter, batch, length, self.uses_graphs, split, self.config)
        except torch.cuda.OutOfMemoryError:
            self.clear()
            runner = _Runner(self.bb, adapter, batch, length, self.uses_graphs, split, self.config)
        return key, runner

    def _release(self, key: tuple, runner: _Runner) -> None:
        with self._pool_lock:
            self._idle.setdefault(key, []).append(runner)
            self._idle.move_to_end(key)
            while sum(len(v) for v in self._idle.values()) > self.config.max_runners:
                oldest = next(iter(self._idle))
                self._idle[oldest].pop(0)
                if not self._idle[oldest]:
                    del self._idle[oldest]

    def _adapter_signature(self, adapter: str | None) -> tuple:
        """Graphs hold raw pointers to LoRA weights and the lean forward copies them: a reloaded or
        updated (trained in place) adapter must not reuse an old runner."""
        if adapter is None:
            return ()
        return tuple((p.data_ptr(), p._version) for n, p in self.bb.model.named_parameters() if f".{adapter}." in n)

    def _split_for(self, batch: int, length: int) -> int:
        if self.config.split is not None:
            return self.config.split
        if self.bb.device.type != "cuda" or length < self.config.autotune_min_len:
            return 0
        if (batch, length) not in self._splits:
            self._splits[(batch, length)] = autotune_split(self.bb, batch, length)
        return self._splits[(batch, length)]
