"""The Triton flash-decoding kernels (``lloco_index/triton_decode.py``) against SDPA, in Triton's CPU interpreter.

The interpreter's ``tl.dot`` reads bf16 as raw bits, so fp32 and fp16 cover the arithmetic here (GQA, padded
query-head rows, splits past the cache end, fully masked blocks, -inf and finfo.min masks); on a GPU the
autotuner checks every candidate against SDPA in the model's dtype before it may be chosen. A subprocess,
because ``TRITON_INTERPRET`` must be set before the kernels are defined."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

CHECK = r"""
from types import SimpleNamespace
import torch
import torch.nn.functional as F
from lloco_index.decode_ops import decode_attention, flash_decode_kernel
from lloco_index.triton_decode import flash_decode

torch.manual_seed(0)
cases = [(1, 8, 8, 128, 320, 300, 8), (2, 6, 2, 64, 300, 260, 4), (1, 9, 3, 64, 1280, 1196, 16),
         (1, 4, 4, 32, 50, 7, 2)]
for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
    for b, h, hk, d, length, filled, splits in cases:
        q = torch.randn(b, h, 1, d, dtype=dtype)
        k, v = torch.randn(b, hk, length, d, dtype=dtype), torch.randn(b, hk, length, d, dtype=dtype)
        mask = torch.zeros(b, 1, 1, length, dtype=dtype)
        mask[..., filled:] = torch.finfo(dtype).min
        mask[-1, ..., filled - 5:] = float("-inf")
        ref = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(h // hk, 1),
                                             v.float().repeat_interleave(h // hk, 1), attn_mask=mask.float())
        out = flash_decode(q, k, v, mask, d ** -0.5, splits)
        assert out.shape == (b, 1, h, d) and out.dtype == dtype
        torch.testing.assert_close(out.float(), ref.transpose(1, 2), atol=tol, rtol=tol)
module = SimpleNamespace(num_key_value_groups=3, is_causal=True, training=False)
q, k, v = torch.randn(2, 6, 1, 64), torch.randn(2, 2, 128, 64), torch.randn(2, 2, 128, 64)
mask = torch.zeros(2, 1, 1, 128)
mask[0, ..., 100:] = float("-inf")
assert flash_decode_kernel() is flash_decode  # split < 0 below runs the kernels, not the SDPA fallback
sdpa, _ = decode_attention(module, q, k, v, mask, split=0)
torch.testing.assert_close(decode_attention(module, q, k, v, mask, split=-4)[0], sdpa, atol=1e-5, rtol=1e-5)
print("ok")
"""


def test_flash_decode_matches_sdpa_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


DECODER = r"""
import sys
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[1])
from conftest import build_tiny_llama
from test_fast_decode import _ids, _prompts, _sharpened
import lloco_index.decode_ops as ops
from lloco_index.generation import GenerationConfig, Generator

kernel, calls = ops.flash_decode_kernel(), []
ops.flash_decode_kernel = lambda: lambda *a: calls.append(1) or kernel(*a)  # count the kernels' runs
bb = _sharpened(build_tiny_llama(Path(sys.argv[2])), 0)
bb.model.eval()
cfg = GenerationConfig(max_new_tokens=12)
prompts = _prompts(bb)
eager = Generator(bb, fast=False)
eager.eos_ids = []
want = _ids(eager, prompts, cfg)
assert len({tuple(r) for r in want}) == 3
for lean in (True, False):
    fast = Generator(bb, fast=True)
    fast.eos_ids = []
    fast.fast.config.split, fast.fast.config.lean = -2, lean
    calls.clear()
    assert _ids(fast, prompts, cfg) == want, lean
    assert fast.fast.last_timing["attention_split"] == -2 and len(calls) >= 11 * 2, len(calls)  # steps x layers
print("ok")
"""


def test_the_fast_decoder_through_the_kernels_matches_eager(tmp_path):
    """The engine's own layouts (q sliced from the fused q|k|v output, the static K/V slabs, left padding),
    through the lean forward and through the transformers modules: the eager loop's greedy tokens."""
    tests = Path(__file__).parent
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", DECODER, str(tests), str(tmp_path / "tiny")], env=env,
                       capture_output=True, text=True, timeout=600, cwd=tests.parent)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
