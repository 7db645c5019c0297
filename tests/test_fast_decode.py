"""The static-cache decoder (CUDA graphs on a GPU) against the eager loop, on CPU without graphs."""

from __future__ import annotations

import pytest
import torch

from lloco_index.backbone import Backbone
from lloco_index.decode_ops import autotune_split, decode_attention
from lloco_index.fast_decode import FastDecodeConfig, FastDecoder
from lloco_index.generation import GenerationConfig, Generator


def _sharpened(model_dir, seed: int) -> Backbone:
    """The tiny LLaMA with larger random weights: outputs vary token to token, so a divergence shows."""
    bb = Backbone.from_pretrained(str(model_dir), device="cpu")
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in bb.model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.15)
    return bb


@pytest.fixture(scope="module")
def sharp_backbone(tiny_model_dir):
    from peft import LoraConfig

    bb = _sharpened(tiny_model_dir, 0)
    for name, seed in (("alpha", 1), ("beta", 2)):
        torch.manual_seed(seed)
        bb.add_adapter(name, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                        init_lora_weights=False))
    bb.model.eval()
    return bb


def _ids(gen: Generator, prompts, cfg, adapters=None) -> list[list[int]]:
    state = None
    for state in gen._decode(prompts, cfg, adapters):
        pass
    return state[0]


def _prompts(bb, lengths=(7, 30, 19)):
    g = torch.Generator().manual_seed(sum(lengths))
    return [[torch.randn(n, bb.hidden_size, generator=g)] for n in lengths]


@pytest.mark.parametrize("split,lean", [(0, True), (4, True), (0, False), (4, False)])
def test_greedy_tokens_match_eager_with_padding(sharp_backbone, split, lean):
    eager, fast = Generator(sharp_backbone, fast=False), Generator(sharp_backbone, fast=True)
    fast.fast.config.split = split  # 4: the split-K matmul attention used for long caches on a GPU
    fast.fast.config.lean = lean  # False: the transformers modules (what other architectures use)
    eager.eos_ids = fast.eos_ids = []
    cfg = GenerationConfig(max_new_tokens=20)
    prompts = _prompts(sharp_backbone)
    want = _ids(eager, prompts, cfg)
    assert len({tuple(r) for r in want}) == 3 and len(set(want[0])) > 5  # a real test: varied output
    assert _ids(fast, prompts, cfg) == want
    assert _ids(fast, prompts[1:2], cfg) == want[1:2]  # alone: trimmed padding, another runner


@pytest.mark.parametrize("lean", [True, False])
def test_mixed_adapters_and_sampling_match_eager(sharp_backbone, lean):
    eager, fast = Generator(sharp_backbone, fast=False), Generator(sharp_backbone, fast=True)
    fast.fast.config.lean = lean
    eager.eos_ids = fast.eos_ids = []
    prompts = _prompts(sharp_backbone, (9, 14, 11, 5))
    adapters = ["alpha", "beta", None, "alpha"]
    greedy = GenerationConfig(max_new_tokens=12)
    mixed = _ids(fast, prompts, greedy, adapters)
    assert mixed == _ids(eager, prompts, greedy, adapters)
    assert mixed[0] != _ids(fast, prompts[:1], greedy, [None])[0]  # the adapter is really applied
    sampled = GenerationConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=5)
    assert _ids(fast, prompts, sampled, "beta") == _ids(eager, prompts, sampled, "beta")


def test_stop_and_stream_behave_like_eager(sharp_backbone):
    eager, fast = Generator(sharp_backbone, fast=False), Generator(sharp_backbone, fast=True)
    cfg = GenerationConfig(max_new_tokens=16)
    prompts = _prompts(sharp_backbone, (8, 12))
    eager.eos_ids = fast.eos_ids = []
    stop_token = _ids(eager, prompts, cfg)[0][5]
    eager.eos_ids = fast.eos_ids = [stop_token]  # row 0 stops at step 5 (or earlier)
    want, got = eager.generate(prompts, cfg), fast.generate(prompts, cfg)
    assert [(g.text, g.new_tokens, g.finish_reason) for g in got] == \
        [(g.text, g.new_tokens, g.finish_reason) for g in want]
    assert want[0].finish_reason == "stop" and want[0].new_tokens <= 5
    assert "".join(fast.stream(prompts[1], cfg)) == want[1].text


def test_runners_are_reused_across_calls(sharp_backbone):
    fast = Generator(sharp_backbone, fast=True)
    fast.eos_ids = []
    cfg = GenerationConfig(max_new_tokens=6)
    first = _ids(fast, _prompts(sharp_backbone, (10,)), cfg)
    pool = list(fast.fast._idle)
    second = _ids(fast, _prompts(sharp_backbone, (10,)), cfg)
    assert first == second and list(fast.fast._idle) == pool and len(pool) == 1
    assert set(fast.fast.last_timing) == {"prefill_s", "decode_s", "attention_split", "lean", "compiled", "cuda_graphs"}
    assert fast.fast.last_timing["compiled"] is False and fast.fast.last_timing["cuda_graphs"] is False  # CPU


@pytest.mark.parametrize("lean", [True, False])
def test_decode_step_never_syncs_with_the_host(sharp_backbone, monkeypatch, lean):
    """A CUDA graph cannot capture a device->host read: the step body must not make one."""
    dec = FastDecoder(sharp_backbone, FastDecodeConfig(lean=lean))
    _, runner = dec._acquire("alpha", 2, 20)
    x = torch.randn(2, 9, sharp_backbone.hidden_size)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    with torch.inference_mode():
        runner.prefill(x, mask, 4, lambda lg: lg.argmax(-1))
    reads = []
    def spy(name, orig):
        return lambda self, *a, **k: (reads.append(name), orig(self, *a, **k))[1]

    for name in ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))
    with torch.inference_mode():
        runner._body()
    monkeypatch.undo()
    assert reads == []
    assert int(runner.slot) == 10 and (runner.mask[:, 0, 0, :10] == 0).sum().item() == 7 + 10
    assert (runner.lean is not None) == lean


def test_split_attention_matches_sdpa():
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(0)
    b, kv_heads, groups, length, d = 3, 2, 3, 64, 16
    q = torch.randn(b, kv_heads * groups, 1, d, generator=g)
    k, v = torch.randn(b, kv_heads, length, d, generator=g), torch.randn(b, kv_heads, length, d, generator=g)
    mask = torch.rand(b, 1, 1, length, generator=g) > 0.4
    mask[:, ..., 0] = True
    module = SimpleNamespace(num_key_value_groups=groups, is_causal=True, training=False)
    ref, _ = decode_attention(module, q, k, v, mask, scaling=d ** -0.5, split=0)
    out, _ = decode_attention(module, q, k, v, mask, scaling=d ** -0.5, split=8)
    assert out.shape == ref.shape == (b, 1, kv_heads * groups, d)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_triton_split_on_cpu_tensors_takes_sdpa():
    """``split=-n`` asks for the Triton kernels; CPU tensors (no interpreter) get SDPA instead of an error."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 4, 1, 16, generator=g), torch.randn(1, 2, 32, 16, generator=g), torch.randn(1, 2, 32, 16)
    mask = torch.zeros(1, 1, 1, 32)
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True, training=False)
    torch.testing.assert_close(decode_attention(module, q, k, v, mask, split=-4)[0],
                               decode_attention(module, q, k, v, mask, split=0)[0])


def test_autotune_picks_a_working_attention(sharp_backbone):
    assert autotune_split(sharp_backbone, 2, 64, candidates=(0, 4, 8, 5)) in (0, 4, 8)  # 5 does not divide 64


def test_autotune_never_picks_a_fast_wrong_attention(sharp_backbone, monkeypatch):
    """A candidate whose output is 20% off (and instant: a stored answer) is rejected, however fast: over a
    long cache the true outputs are small, so the check is relative; an absolute 5e-2 would let it through."""
    import lloco_index.decode_ops as ops

    real, stored = ops.decode_attention, []

    def broken_8(module, q, k, v, mask, split=0, **kw):
        if split == 8:
            stored or stored.append(0.8 * real(module, q, k, v, mask, split=0, **kw)[0])
            return stored[0], None
        return real(module, q, k, v, mask, split=split, **kw)

    monkeypatch.setattr(ops, "decode_attention", broken_8)
    assert autotune_split(sharp_backbone, 1, 512, candidates=(8, 0)) == 0


def _step_ops(bb, adapter, lean) -> int:
    """Operations one decode step dispatches (views excluded): a CPU-side proxy for CUDA kernels."""
    from torch.utils._python_dispatch import TorchDispatchMode

    views = {"view", "_unsafe_view", "t", "transpose", "unsqueeze", "squeeze", "expand", "slice", "select",
             "as_strided", "permute", "alias", "detach", "_reshape_alias", "empty", "empty_strided", "reshape"}

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += func.__name__.split(".")[0] not in views
            return func(*args, **(kwargs or {}))

    _, runner = FastDecoder(bb, FastDecodeConfig(lean=lean))._acquire(adapter, 1, 20)
    with torch.inference_mode():
        runner.prefill(torch.randn(1, 9, bb.hidden_size), torch.ones(1, 9, dtype=torch.long), 4,
                       lambda lg: lg.argmax(-1))
        with Count():
            runner._body()
    return Count.n


def test_lean_step_launches_fewer_kernels(sharp_backbone):
    """The point of lean_llama: fewer small kernels per token (they, not the weights, cost the time)."""
    base_hf, base_lean = _step_ops(sharp_backbone, None, False), _step_ops(sharp_backbone, None, True)
    lora_hf, lora_lean = _step_ops(sharp_backbone, "alpha", False), _step_ops(sharp_backbone, "alpha", True)
    assert base_lean <= 0.8 * base_hf and lora_lean <= 0.7 * lora_hf, (base_hf, base_lean, lora_hf, lora_lean)


def test_fused_projections_keep_the_model_and_its_memory(tiny_model_dir):
    """q/k/v and gate/up become row blocks of one tensor: same values, same logits, no copy kept, and
    the model still trains (the fused weights are plain tensors even when made under inference mode)."""
    from peft import LoraConfig

    bb = _sharpened(tiny_model_dir, 4)
    bb.add_adapter("t", LoraConfig(r=2, target_modules=["q_proj", "k_proj"], init_lora_weights=False))
    ids = torch.tensor([[3, 17, 5, 9]])
    at = bb.model.get_base_model().model.layers[0].self_attn
    with torch.no_grad(), bb.use("t"):
        before, q = bb.model(input_ids=ids).logits, at.q_proj.base_layer.weight.clone()
    with torch.inference_mode():
        FastDecoder(bb)
    qw, kw, vw = (m.base_layer.weight if hasattr(m, "base_layer") else m.weight
                  for m in (at.q_proj, at.k_proj, at.v_proj))
    assert torch.equal(qw, q) and len({w.untyped_storage().data_ptr() for w in (qw, kw, vw)}) == 1
    ptr = qw.untyped_storage().data_ptr()
    FastDecoder(bb)  # already fused: nothing is copied again (graphs hold raw pointers)
    assert qw.untyped_storage().data_ptr() == ptr
    with bb.use("t"):
        after = bb.model(input_ids=ids).logits
        torch.testing.assert_close(after, before)
        after.sum().backward()
    assert all(p.grad is not None for n, p in bb.model.named_parameters() if ".t." in n and "lora_" in n)


def test_unsupported_adapter_falls_back_and_updated_adapter_is_picked_up(tiny_model_dir):
    from peft import LoraConfig

    bb = _sharpened(tiny_model_dir, 3)
    bb.add_adapter("dora", LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, init_lora_weights=False))
    bb.add_adapter("plain", LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False))
    bb.model.eval()
    eager, fast = Generator(bb, fast=False), Generator(bb, fast=True)
    eager.eos_ids = fast.eos_ids = []
    cfg, prompts = GenerationConfig(max_new_tokens=8), _prompts(bb, (6, 11))
    assert _ids(fast, prompts, cfg, "dora") == _ids(eager, prompts, cfg, "dora")
    assert [r.lean_reason for rs in fast.fast._idle.values() for r in rs] == [
        "adapter 'dora' is not vanilla LoRA (DoRA or a LoRA bias)"]
    before = _ids(fast, prompts, cfg, "plain")
    with torch.no_grad():  # an optimizer step changes the adapter in place: no stale copy may be used
        for n, p in bb.model.named_parameters():
            if ".plain." in n and "lora_B" in n:
                p.mul_(-3)
    after = _ids(fast, prompts, cfg, "plain")
    assert after == _ids(eager, prompts, cfg, "plain") and after != before


@pytest.mark.parametrize("fail_when", ["always", "decoding"])
def test_a_failing_lean_forward_falls_back_to_the_transformers_modules(sharp_backbone, monkeypatch, fail_when):
    from lloco_index.lean_llama import LeanLlama

    eager, fast = Generator(sharp_backbone, fast=False), Generator(sharp_backbone, fast=True)
    eager.eos_ids = fast.eos_ids = []
    cfg, prompts = GenerationConfig(max_new_tokens=8), _prompts(sharp_backbone, (5, 9))
    want = _ids(eager, prompts, cfg, "alpha")
    real = LeanLlama.__call__

    def flaky(self, x, *args, **kwargs):
        if fail_when == "always" or x.shape[1] == 1:
            raise RuntimeError("unsupported here")
        return real(self, x, *args, **kwargs)

    monkeypatch.setattr(LeanLlama, "__call__", flaky)
    assert _ids(fast, prompts, cfg, "alpha") == want
    assert fast.fast.graph_errors == ["failed here, transformers modules used: unsupported here"]
    assert fast.fast.last_timing["lean"] is False


def test_compiled_step_matches_eager(sharp_backbone):
    """``FastDecodeConfig.compile``: the step through torch.compile gives the eager loop's greedy tokens (CPU:
    no graph, the compiled step runs directly; on CUDA the same compiled step is what the graph captures)."""
    eager, fast = Generator(sharp_backbone, fast=False), Generator(sharp_backbone, fast=True)
    fast.fast.config.compile = True
    eager.eos_ids = fast.eos_ids = []
    cfg = GenerationConfig(max_new_tokens=12)
    prompts = _prompts(sharp_backbone, (9, 21))
    assert _ids(fast, prompts, cfg) == _ids(eager, prompts, cfg)
    assert all(r.compiled for runners in fast.fast._idle.values() for r in runners)  # it did not fall back


def test_capture_gives_up_the_triton_attention_before_compilation(sharp_backbone, monkeypatch):
    """A compiled step whose Triton attention fails inside torch.compile keeps compilation and takes SDPA."""
    _, runner = FastDecoder(sharp_backbone)._acquire(None, 1, 20)
    runner.split, runner.compiled = -4, True
    tried = []

    def capture():
        tried.append((runner.split, runner.compiled))
        return None if runner.split == 0 else "CompilationError: fp64"

    monkeypatch.setattr(runner, "_capture", capture)
    runner.capture()
    assert tried == [(-4, True), (0, True)] and runner.graph_error is None and runner.compiled


def test_a_compiled_step_that_fails_runs_uncompiled_and_says_so(sharp_backbone, monkeypatch):
    """Same tokens as the eager loop, and the fallback is reported (bench rows must not call it compiled)."""
    import lloco_index.fast_decode as fd

    def no_compiler(fn, **kwargs):
        def fail():
            raise RuntimeError("no compiler here")
        return fail

    monkeypatch.setattr(fd.torch, "compile", no_compiler)
    eager, fast = Generator(sharp_backbone, fast=False), Generator(sharp_backbone, fast=True)
    fast.fast.config.compile = True
    eager.eos_ids = fast.eos_ids = []
    cfg = GenerationConfig(max_new_tokens=6)
    prompts = _prompts(sharp_backbone, (9,))
    assert _ids(fast, prompts, cfg) == _ids(eager, prompts, cfg)
    assert fast.fast.last_timing["compiled"] is False
    assert any(e.startswith("compiled step dropped: no compiler here") for e in fast.fast.graph_errors)
