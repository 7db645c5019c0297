"""Decode attention as two Triton kernels (flash-decoding): one query token against a static KV cache.

Why: at batch 1 a 7B decode step reads a ~1,300-slot cache in every layer, and cuDNN SDPA took 13 us per
layer where the bytes take ~7 us at copy bandwidth. Here each (batch, KV head) is spread over ``splits``
programs along the cache; each reads its slice of K and V once, for all query heads of that KV head (GQA),
with an online softmax in fp32. A second kernel merges the splits.

Imported only where Triton is installed (CUDA builds of torch); ``TRITON_INTERPRET=1`` runs it on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 32  # cache slots per inner step


@triton.jit
def _flash_decode_split(Q, K, V, Mask, Acc, Stats, length, per_split, scale,
                        sqb, sqh, skb, skh, skn, svb, svh, svn, smb,
                        KV_HEADS: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                        BLOCK_N: tl.constexpr, SPLITS: tl.constexpr):
    """Program (b * KV_HEADS + kv head, split): unnormalised output and (max, sum) over one slice of the cache.

    The loop has no data-dependent branch, so Triton pipelines the next block's loads behind this block's math."""
    row, s = tl.program_id(0), tl.program_id(1)
    b, hk = row // KV_HEADS, row % KV_HEADS
    g, d = tl.arange(0, BLOCK_G), tl.arange(0, D)
    q = tl.load(Q + b * sqb + (hk * G + g)[:, None] * sqh + d[None, :], mask=(g < G)[:, None], other=0.0)
    m_i = tl.full([BLOCK_G], -1e30, tl.float32)  # finite: a slice that is all masked gives weights of 0, not NaN
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    lo = s * per_split
    hi = tl.minimum(lo + per_split, length)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        inside = n < hi
        bias = tl.load(Mask + b * smb + n, mask=inside, other=float("-inf")).to(tl.float32)
        k = tl.load(K + b * skb + hk * skh + n[:, None] * skn + d[None, :], mask=inside[:, None], other=0.0)
        v = tl.load(V + b * svb + hk * svh + n[:, None] * svn + d[None, :], mask=inside[:, None], other=0.0)
        scores = (tl.dot(q, tl.trans(k)) * scale).to(tl.float32) + bias[None, :]  # fp32 even if scale comes as fp64
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        m_i = m_new
    out = (row * SPLITS + s) * BLOCK_G + g
    tl.store(Acc + out[:, None] * D + d[None, :], acc)
    tl.store(Stats + out * 2, m_i)
    tl.store(Stats + out * 2 + 1, l_i)


@triton.jit
def _flash_decode_merge(Acc, Stats, Out, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                        SPLITS: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program (b * KV_HEADS + kv head, query head in group): weighted sum of the splits, into [b, 1, h, d]."""
    row, g = tl.program_id(0), tl.program_id(1)
    s, d = tl.arange(0, BLOCK_S), tl.arange(0, D)
    at = (row * SPLITS + s) * BLOCK_G + g
    m = tl.load(Stats + at * 2, mask=s < SPLITS, other=-1e30)
    w = tl.exp(m - tl.max(m, 0))
    total = tl.sum(w * tl.load(Stats + at * 2 + 1, mask=s < SPLITS, other=0.0), 0)
    acc = tl.load(Acc + at[:, None] * D + d[None, :], mask=(s < SPLITS)[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / total
    tl.store(Out + (row * G + g) * D + d, out.to(Out.dtype.element_ty))


def flash_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                 scale: float, splits: int, block_n: int = BLOCK_N, num_warps: int = 4) -> torch.Tensor:
    """``query`` [b, h, 1, d], ``key``/``value`` [b, h_kv, L, d] (any strides), ``mask`` additive [b, 1, 1, L];
    about ``splits`` programs per KV head along the cache, each reading ``block_n`` slots per inner step.
    Returns [b, 1, h, d], the layout attention modules hand to ``o_proj``."""
    b, h, _, d = query.shape
    hk, length = key.shape[1], key.shape[2]
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    g = h // hk
    block_g = max(16, triton.next_power_of_2(g))  # tl.dot needs 16 rows; padding rows are masked out
    per_split = triton.cdiv(triton.cdiv(length, max(1, splits)), block_n) * block_n  # whole blocks per program
    splits = triton.cdiv(length, per_split)  # only programs that have slots
    mask = mask.reshape(b, length)
    acc = torch.empty(b * hk * splits * block_g, d, device=query.device, dtype=torch.float32)
    stats = torch.empty(b * hk * splits * block_g, 2, device=query.device, dtype=torch.float32)
    out = torch.empty(b, 1, h, d, device=query.device, dtype=query.dtype)
    _flash_decode_split[(b * hk, splits)](query, key, value, mask, acc, stats, length, per_split, scale,
                                          query.stride(0), query.stride(1), key.stride(0), key.stride(1),
                                          key.stride(2), value.stride(0), value.stride(1), value.stride(2),
                                          mask.stride(0), KV_HEADS=hk, G=g, BLOCK_G=block_g, D=d, BLOCK_N=block_n,
                                          SPLITS=splits, num_warps=num_warps)
    _flash_decode_merge[(b * hk, g)](acc, stats, out, G=g, BLOCK_G=block_g, D=d, SPLITS=splits,
                                     BLOCK_S=triton.next_power_of_2(splits))
    return out
