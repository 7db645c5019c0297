"""A lean LLaMA forward for the fast decoder: the model's own weights, fewer and larger kernels.

At batch 1 a decode step is ~1,000 small kernels around the weight reads; on an H100 they cost
more than the reads (8 ms/token where the weights take 4.5 ms). Compared with the transformers
modules this forward launches about a third fewer per layer, with the same arithmetic:

- q, k and v are one GEMM, and so are gate and up: their weights are laid out once as row blocks of
  one tensor (the modules' weights become views of it, so no memory is added), and one long GEMV
  reads memory faster than three short ones (cuBLAS on an H100: 69-71% of copy bandwidth at 4096x4096,
  89% at 12288x4096; docs/benchmarks.md);
- RMSNorm is one ``F.rms_norm``; the residual adds ride in o_proj's and down_proj's GEMMs (``addmm_``);
- rotary runs once over q and k together, as ``roll`` + ``addcmul`` (rotate_half(x) = roll(x) * sign);
- a LoRA adapter costs two GEMMs per projection (``x @ A``, then ``addmm`` into the output with the
  scaled B) instead of PEFT's cast/A/B/scale/add and its per-module Python, in the model dtype;
- decode attends over the static cache with an additive float mask (no bool-to-float conversion).

Only plain LLaMA layers are handled (``support`` says why not otherwise); the fast decoder falls
back to the transformers modules for anything else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from .decode_ops import decode_attention


@dataclass
class _Proj:
    """A Linear's weight and bias, plus the adapter's A and scaled B in the model dtype, if any.

    ``dropout``: ``(rank, p)`` of each module whose A rows make up ``a``, with p its LoRA dropout while
    training (empty when every p is 0: then no kernel is added). Only ``LeanStack`` (training) applies it."""

    w: torch.Tensor
    bias: torch.Tensor | None
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    dropout: tuple[tuple[int, float], ...] = ()

    def __call__(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W.T (+ bias) (+ add) (+ x @ A.T @ B.T)`` for 2-D ``x``; ``add`` is updated in place
        (one GEMM accumulating into it, where an out-of-place ``addmm`` would first copy it)."""
        if add is not None and self.bias is None:
            y = add.addmm_(x, self.w.t())
        else:
            y = F.linear(x, self.w, self.bias)
            y = y if add is None else y.add_(add)
        if self.a is not None:
            y.addmm_(x @ self.a.t(), self.b.t())
        return y


def _proj(module, adapter: str | None, dtype: torch.dtype) -> _Proj:
    base = getattr(module, "base_layer", module)
    p = _Proj(base.weight, base.bias)
    if adapter is not None and adapter in getattr(module, "lora_A", {}):
        p.a = module.lora_A[adapter].weight.to(dtype)
        p.b = (module.lora_B[adapter].weight * module.scaling[adapter]).to(dtype)
        drop = module.lora_dropout[adapter]  # nn.Dropout, or nn.Identity for p = 0
        if drop.training and getattr(drop, "p", 0.0) > 0:
            p.dropout = ((p.a.shape[0], drop.p),)
    return p


def _fused(modules: list, adapter: str | None, dtype: torch.dtype) -> _Proj:
    """One projection computing ``modules``' outputs side by side: ``[x W1.T | x W2.T | ...]``.

    The weights are moved once into row blocks of one tensor and each module's weight becomes a view
    of its block (same values, no extra memory; a second call finds them fused already). An adapter's
    A matrices are stacked and its scaled B matrices set block-diagonally, so LoRA stays two GEMMs."""
    parts = [_proj(m, adapter, dtype) for m in modules]
    bases = [getattr(m, "base_layer", m) for m in modules]
    ws = [b.weight for b in bases]
    with torch.no_grad(), torch.inference_mode(False):  # a plain tensor: the model can still train
        if not _adjacent(ws):
            fused = torch.cat([w.detach() for w in ws])
            start = 0
            for w in ws:
                w.data = fused[start:start + w.shape[0]]
                start += w.shape[0]
        first = ws[0]
        weight = first.detach().new_empty(0).set_(first.untyped_storage(), first.storage_offset(),
                                                  (sum(w.shape[0] for w in ws), first.shape[1]))
        bias = None if all(b.bias is None for b in bases) else torch.cat(
            [b.bias if b.bias is not None else b.weight.new_zeros(b.weight.shape[0]) for b in bases])
    out = _Proj(weight, bias)
    if any(q.a is not None for q in parts):
        in_f = first.shape[1]
        out.a = torch.cat([q.a if q.a is not None else weight.new_zeros(0, in_f) for q in parts])
        out.b = torch.block_diag(*[q.b if q.b is not None else weight.new_zeros(w.shape[0], 0)
                                   for q, w in zip(parts, ws)])
        if any(q.dropout for q in parts):
            out.dropout = tuple(q.dropout[0] if q.dropout else (0 if q.a is None else q.a.shape[0], 0.0)
                                for q in parts)
    return out


def _adjacent(ws: list[torch.Tensor]) -> bool:
    """True when the weights already are consecutive row blocks of one storage."""
    ptr, offset = ws[0].untyped_storage().data_ptr(), ws[0].storage_offset()
    for w in ws:
        if not w.is_contiguous() or w.untyped_storage().data_ptr() != ptr or w.storage_offset() != offset:
            return False
        offset += w.numel()
    return True


def fuse_projections(model) -> None:
    """Lay out each layer's q/k/v and gate/up weights as row blocks of one tensor, in place.

    Values are unchanged and the modules keep working (their weights become views). Done once, before
    any CUDA graph is captured: a graph keeps raw pointers, and the weights' old storage is freed here."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in base.model.layers:
        at, mlp = layer.self_attn, layer.mlp
        for group in ([at.q_proj, at.k_proj, at.v_proj], [mlp.gate_proj, mlp.up_proj]):
            _fused(group, None, base.model.embed_tokens.weight.dtype)


def support(model, adapter: str | None) -> str | None:
    """None when ``LeanLlama`` can run this model with this adapter, else the reason it cannot."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    if getattr(cfg, "model_type", None) != "llama" or getattr(cfg, "pretraining_tp", 1) != 1:
        return f"model type {getattr(cfg, 'model_type', None)!r} (only plain llama)"
    if not hasattr(base, "model") or not hasattr(base.model, "rotary_emb"):
        return "no LlamaModel inside"
    for layer in base.model.layers:
        for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj,
                  layer.mlp.up_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
            w = getattr(m, "base_layer", m).weight
            if type(w) not in (torch.Tensor, torch.nn.Parameter) or not w.dtype.is_floating_point or w.is_meta:
                return f"weights are not plain {w.dtype} tensors (quantized or not loaded)"
    for m in (m for m in model.modules() if hasattr(m, "lora_A")):
        if getattr(m, "merged", False):
            return "an adapter is merged into the weights"
        if adapter in m.lora_A and (adapter in getattr(m, "lora_variant", {}) or m.lora_B[adapter].bias is not None):
            return f"adapter {adapter!r} is not vanilla LoRA (DoRA or a LoRA bias)"
    for name, mod in (("embed_tokens", base.get_input_embeddings()), ("lm_head", base.get_output_embeddings())):
        if adapter is not None and any(adapter in getattr(mod, d, {}) for d in ("lora_A", "lora_embedding_A")):
            return f"adapter {adapter!r} adapts {name}"
    return None


class LeanLlama:
    """Forward of a (PEFT-wrapped or plain) LlamaForCausalLM with one adapter or none."""

    def __init__(self, model, adapter: str | None):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        inner, cfg = base.model, base.config
        dtype = inner.embed_tokens.weight.dtype
        self.embed = inner.embed_tokens.weight
        self.rotary = inner.rotary_emb
        self.norm = (inner.norm.weight, inner.norm.variance_epsilon)
        self.head = _proj(base.lm_head, adapter, dtype)
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.act = ACT2FN[cfg.hidden_act]
        self.layers = []
        for layer in inner.layers[:cfg.num_hidden_layers]:
            at, mlp = layer.self_attn, layer.mlp
            self.layers.append({
                "ln1": (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
                "ln2": (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon),
                "qkv": _fused([at.q_proj, at.k_proj, at.v_proj], adapter, dtype),
                "o_proj": _proj(at.o_proj, adapter, dtype),
                "gate_up": _fused([mlp.gate_proj, mlp.up_proj], adapter, dtype),
                "down_proj": _proj(mlp.down_proj, adapter, dtype),
                "scaling": at.scaling, "module": at})

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, cache, mask: torch.Tensor | None,
                 split: int = 0) -> torch.Tensor:
        """Logits ``[b, vocab]`` of the last position of ``x`` ``[b, T, hidden]`` (consumed: the residual
        stream is accumulated in place, possibly in ``x``'s storage).

        ``mask``: None = causal without padding (flash); ``[b, 1, T, T]`` bool for a padded prompt;
        ``[b, 1, 1, L]`` additive float for one decode token over the whole static cache.
        """
        b, t, hidden = x.shape
        cos, sin = _rope_tables(self.rotary, x, positions, self.head_dim)
        h = x.reshape(b * t, hidden)
        for i, p in enumerate(self.layers):
            y = F.rms_norm(h, (hidden,), *p["ln1"])
            qk, v = _rope_qk(p["qkv"](y).view(b, t, -1), cos, sin, self.heads, self.kv_heads, self.head_dim)
            q, k, v = _split_heads(qk, v, self.heads)
            keys, values = cache.layers[i].update(k, v)
            out = self._attend(p, q, keys, values, mask, split)
            h = p["o_proj"](out.reshape(b * t, -1), add=h)
            y = F.rms_norm(h, (hidden,), *p["ln2"])
            gate, up = p["gate_up"](y).chunk(2, dim=-1)
            h = p["down_proj"](self.act(gate) * up, add=h)
        last = h.view(b, t, hidden)[:, -1]
        return self.head(F.rms_norm(last, (hidden,), *self.norm))

    def _attend(self, p: dict, q, keys, values, mask, split: int) -> torch.Tensor:
        """``[b, t, heads, head_dim]`` attention output."""
        if q.shape[2] == 1 and mask is not None and mask.dtype != torch.bool:
            out, _ = decode_attention(p["module"], q, keys, values, mask, scaling=p["scaling"], split=split)
            return out
        return _prefill_attention(q, keys, values, mask, p["scaling"]).transpose(1, 2)


def _rope_tables(rotary, x: torch.Tensor, positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin ``[b, t, 1, head_dim]``: rotate_half(x) * sin = roll(x) * signed sin."""
    cos, sin = rotary(x, positions)  # [b, t, head_dim] in x's dtype
    half = head_dim // 2
    return cos.unsqueeze(2), torch.cat([-sin[..., :half], sin[..., half:]], -1).unsqueeze(2)


def _rope_qk(qkv: torch.Tensor, cos, sin, heads: int, kv_heads: int, head_dim: int):
    """Rotated q and k together ``[..., heads + kv_heads, d]`` and v ``[..., kv_heads, d]`` from a fused
    ``[..., (heads + 2 kv) d]`` projection (any leading dimensions; ``cos``/``sin`` broadcast over heads)."""
    lead, qk_width = qkv.shape[:-1], (heads + kv_heads) * head_dim
    qk = qkv[..., :qk_width].view(*lead, heads + kv_heads, head_dim)
    v = qkv[..., qk_width:].view(*lead, kv_heads, head_dim)
    return torch.addcmul(qk * cos, qk.roll(head_dim // 2, dims=-1), sin), v


def _split_heads(qk: torch.Tensor, v: torch.Tensor, heads: int):
    """q ``[b, heads, t, d]``, k and v ``[b, kv_heads, t, d]`` from ``_rope_qk``'s ``[b, t, ..., d]`` outputs."""
    qk = qk.transpose(1, 2)
    return qk[:, :heads], qk[:, heads:], v.transpose(1, 2)


def _prefill_attention(q, keys, values, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """Causal attention ``[b, heads, t, d]``: flash when ``mask`` is None, else with a ``prefill_mask``."""
    groups = q.shape[1] // keys.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=scaling, enable_gqa=groups > 1)
    if groups > 1:  # a mask takes the math kernel with enable_gqa: repeat the cache instead
        keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling)


class LeanStack:
    """The decoder stack for training: final-norm hidden states of whole sequences, differentiable.

    Through the transformers modules and PEFT a pass costs thousands of small kernels and a cast of the
    fp32 LoRA weights per activation. Here the adapter's weights are cast once per pass (differentiably:
    gradients reach the fp32 weights), q/k/v and gate/up are one GEMM each, and with ``compile`` the
    token-wise parts of a layer (norms, projections, rotary, MLP, residuals) are two ``torch.compile``d
    functions of ``[tokens, hidden]`` tensors: one graph for every layer (the weights are arguments) and
    every batch shape. Attention runs between them, uncompiled."""

    def __init__(self, model, compile: bool = False, checkpoint: bool = False):
        self.model, self.checkpoint = model, checkpoint
        # compiled as plain functions (a functools.partial would share one graph cache between the two):
        # a graph each per (adapter's LoRA targets, grad mode) variant
        self.attn_in, self.attn_out = ((torch.compile(_attn_in, dynamic=True), torch.compile(_attn_out_mlp, dynamic=True))
                                       if compile else (_attn_in, _attn_out_mlp))

    def __call__(self, x: torch.Tensor, adapter: str | None, mask: torch.Tensor | None = None,
                 positions: torch.Tensor | None = None) -> torch.Tensor:
        """``[b, T, hidden]`` hidden states after the final norm. ``mask`` ``[b, T]`` (1 = token) only
        when rows are padded, with their ``positions``; None is causal flash attention from position 0.
        Runs in the model's dtype whatever autocast says (the weights are cast already)."""
        b, t, hidden = x.shape
        with torch.autocast(x.device.type, enabled=False):
            lean = LeanLlama(self.model, adapter)  # weights as they are now, in this pass's graph
            if positions is None:
                positions = torch.arange(t, device=x.device).unsqueeze(0)
            cos, sin = (c.expand(b, -1, -1, -1).reshape(b * t, 1, -1)
                        for c in _rope_tables(lean.rotary, x, positions, lean.head_dim))
            attn_mask = None if mask is None else prefill_mask(mask)
            h = x.reshape(b * t, hidden).clone()  # not a view of the input: compiled graphs would guard on its base
            for p in lean.layers:
                args = (h, lean, (b, t), cos, sin, attn_mask, p)
                if self.checkpoint and torch.is_grad_enabled():
                    h = torch.utils.checkpoint.checkpoint(self._layer, *args, use_reentrant=False)
                else:
                    h = self._layer(*args)
            return F.rms_norm(h, (hidden,), *lean.norm).view(b, t, hidden)

    def _layer(self, h: torch.Tensor, lean: LeanLlama, bt: tuple[int, int], cos, sin, mask, p: dict) -> torch.Tensor:
        qk, v = self.attn_in(h, cos, sin, *p["ln1"], _parts(p["qkv"]), lean.heads, lean.kv_heads, lean.head_dim)
        (b, t), d = bt, lean.head_dim
        q, k, v = _split_heads(qk.view(b, t, -1, d), v.view(b, t, -1, d), lean.heads)
        out = _prefill_attention(q, k, v, mask, p["scaling"])
        # [b * t, heads * d], always a copy: the attention kernels return a layout where this is sometimes a view,
        # and a compiled graph guards on a view's base (a second graph for the same shapes)
        out = out.transpose(1, 2).reshape(b * t, -1).clone()
        return self.attn_out(h, out, *p["ln2"], _parts(p["o_proj"]), _parts(p["gate_up"]), _parts(p["down_proj"]),
                             lean.act)


def _parts(p: _Proj) -> tuple:
    return p.w, p.bias, p.a, p.b, p.dropout


def _linear(x: torch.Tensor, w, bias, a, b, dropout: tuple[tuple[int, float], ...] = ()) -> torch.Tensor:
    """``_Proj`` out of place (autograd keeps every input it saved). With ``dropout``, as PEFT: each module's
    LoRA reads its own dropped-out copy of ``x`` (in module order, so a seeded run draws PEFT's masks)."""
    y = F.linear(x, w, bias)
    if a is None:
        return y
    if not dropout:
        return y + F.linear(F.linear(x, a), b)
    blocks = a.split([r for r, _ in dropout])
    return y + F.linear(torch.cat([F.linear(F.dropout(x, p) if p else x, ai) for ai, (_, p) in zip(blocks, dropout)],
                                  -1), b)


def _attn_in(h, cos, sin, ln1, eps: float, qkv, heads: int, kv_heads: int, head_dim: int):
    """Tokens ``[n, hidden]`` -> rotated q and k ``[n, heads + kv_heads, d]`` and v ``[n, kv_heads, d]``."""
    return _rope_qk(_linear(F.rms_norm(h, (h.shape[-1],), ln1, eps), *qkv), cos, sin, heads, kv_heads, head_dim)


def _attn_out_mlp(h, attn, ln2, eps: float, o_proj, gate_up, down_proj, act) -> torch.Tensor:
    """The rest of a layer, token by token: output projection, residual, MLP, residual."""
    h = h + _linear(attn, *o_proj)
    gate, up = _linear(F.rms_norm(h, (h.shape[-1],), ln2, eps), *gate_up).chunk(2, dim=-1)
    return h + _linear(act(gate) * up, *down_proj)


def prefill_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """None when no row is padded (causal flash attention); else ``[b, 1, T, T]`` bool: causal, padding
    keys hidden, and each padding query sees itself so no row is empty (its output is never used)."""
    if bool(mask.all()):
        return None
    t = mask.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()
    full = causal & mask.bool()[:, None, None, :]
    return full | torch.eye(t, dtype=torch.bool, device=mask.device)
