"""Training on the tiny random LLaMA: task sampling, answer-only loss, checkpoints, seeding, finetuning, CLI.

Runs are a few steps of tiny configs (segments of 32 tokens -> 4 vectors, <= 3 chunks, eval on 2
examples), so the file stays fast; they check what a real run relies on, not the loss going down.
"""

from __future__ import annotations

import json
import os
import math
import random
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import CORPUS
from lloco_index.backbone import Backbone
from lloco_index.compressor import ENCODER_ADAPTER, CompressorConfig, ContextCompressor
from lloco_index.corpus import Corpus, build_corpus
from lloco_index.generation import Generator
from lloco_index.prompts import SYSTEM_PROMPT, qa_pieces, question_text
from lloco_index.synth import KINDS, MANY_SUBJECTS, make_fact
from lloco_index.bench_utils import Cost, Shape, save_random_model
from lloco_index.train import (AE_QUESTION, DECODER_ADAPTER, NEW_SEGMENT_TOKENS, DecoderBatcher, Example,
                               TaskSampler, TrainConfig, _average_gradients, _lora, answer_loss, cut_vectors,
                               encode_chunks, encoder_backward, exact_token_weights, qa_target, setup_models,
                               step_flops, train_compressor, train_finetune)

# every field a tiny run changes from the production defaults (also the CLI flags of the CLI test)
TINY = dict(segment_tokens=32, summary_tokens=4, encoder_r=2, encoder_alpha=4, decoder_r=2, decoder_alpha=4,
            task_mix="qa:1,cloze:1,ae:1,lm:1", max_chunks=3, segments_per_step=4, grad_segments=2, lm_tokens=16,
            warmup_steps=1, max_steps=3, eval_every=1000, save_every=1000, eval_examples=2, bf16=False)
ADAPTERS = ("compressor/encoder/adapter_model.safetensors", "decoder/adapter_model.safetensors")


@pytest.fixture(scope="module")
def corpus_file(tiny_model_dir, tmp_path_factory) -> Path:
    """The sample texts, repeated so the 2% held-out tail still fits an eval window, as a token .npz."""
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("corpus")
    (tmp / "src.txt").write_text("\n\n".join(p.read_text() for p in CORPUS) * 8)
    build_corpus([tmp / "src.txt"], AutoTokenizer.from_pretrained(tiny_model_dir), tmp / "corpus.npz", 10**6,
                 min_doc_tokens=0)
    return tmp / "corpus.npz"


def tiny_cfg(model_dir: Path, corpus: Path, out_dir: Path, **kw) -> TrainConfig:
    return TrainConfig(out_dir=str(out_dir), base_model=str(model_dir), corpus=str(corpus), **{**TINY, **kw})


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def sampler(tiny_model_dir, corpus_file, tokenizer) -> TaskSampler:
    cfg = tiny_cfg(tiny_model_dir, corpus_file, Path("unused"))
    return TaskSampler(Corpus.load(corpus_file).split()[0], tokenizer, cfg, seed=0)


@pytest.fixture(scope="module")
def models(tiny_model_dir, corpus_file):
    """A fresh backbone with encoder + decoder LoRA and an untrained compressor, as training sets them up."""
    torch.manual_seed(0)
    return setup_models(tiny_cfg(tiny_model_dir, corpus_file, Path("unused")), torch.device("cpu"))


@pytest.fixture(scope="module")
def pretrained(tiny_model_dir, corpus_file, tmp_path_factory) -> tuple[TrainConfig, Path]:
    """One 3-step compressor pretraining run, shared by the checkpoint, seeding and finetune tests."""
    cfg = tiny_cfg(tiny_model_dir, corpus_file, tmp_path_factory.mktemp("pretrain") / "run")
    return cfg, train_compressor(cfg)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _same_tensors(a: Path, b: Path) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


# -- answer-only loss ---------------------------------------------------------------------------
def _batch(models, tokenizer):
    """Two prompts (vectors, and vectors + a text chunk) with answers of different lengths."""
    bb, _ = models
    torch.manual_seed(1)
    h = bb.hidden_size
    vectors = [[torch.randn(4, h, requires_grad=True)],
               [torch.randn(4, h, requires_grad=True), "The ferry leaves at noon.", torch.randn(4, h, requires_grad=True)]]
    questions = ["Who keeps the lighthouse?", "When does the ferry leave?"]
    answers = [tokenizer(" Miriam Okafor", add_special_tokens=False)["input_ids"],
               tokenizer(" noon", add_special_tokens=False)["input_ids"]]
    return vectors, questions, answers


def test_weighted_answer_loss_weighs_each_answer_token_by_its_target(models, tokenizer):
    """With per-vocabulary weights the loss is the weighted mean CE of the answer tokens; the accuracy stays a
    plain share of tokens."""
    bb, _ = models
    vectors, questions, answers = _batch(models, tokenizer)
    x, labels = DecoderBatcher(bb)(vectors, questions, answers)
    weights = torch.rand(bb.model.get_output_embeddings().weight.shape[0]) + 0.5
    loss, acc = answer_loss(bb, x, labels, 3, weights)
    plain, plain_acc = answer_loss(bb, x, labels, 3)
    with torch.no_grad(), bb.use(DECODER_ADAPTER):
        logits = bb.model(inputs_embeds=x).logits.float()
    pos = [(i, t) for i in range(x.shape[0]) for t in range(x.shape[1] - 1) if labels[i, t + 1] != -100]
    ce = torch.stack([F.cross_entropy(logits[i, t], labels[i, t + 1]) for i, t in pos])
    w = torch.stack([weights[labels[i, t + 1]] for i, t in pos])
    torch.testing.assert_close(loss.detach(), (ce * w).sum() / w.sum(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(acc, plain_acc)
    assert not torch.isclose(loss, plain)


def test_exact_token_weights_mark_digits_and_tokens_rare_in_the_corpus(tokenizer):
    vocab = len(tokenizer)
    counts = np.full(vocab - 5, 1000)  # shorter than the vocabulary: missing counts are zeros (rare)
    pieces = tokenizer.convert_ids_to_tokens(list(range(vocab)))
    digits = [i for i, p in enumerate(pieces) if any(c.isdigit() for c in p) and i < vocab - 5]
    common, rare = [i for i, p in enumerate(pieces) if p.isalpha()][:2]
    counts[rare] = 3
    w = exact_token_weights(tokenizer, counts, 4.0, rare_below=100)
    assert w.shape == (vocab,) and digits and (w[digits] == 4).all()
    assert w[common] == 1 and w[rare] == 4 and (w[vocab - 5:] == 4).all()
    assert set(w.tolist()) == {1.0, 4.0}
    with pytest.raises(ValueError, match="exact_token_weight must be > 0"):
        TrainConfig(exact_token_weight=0)


def test_finetune_refuses_corpus_weights(pretrained, tmp_path):
    cfg, pre = pretrained
    with pytest.raises(ValueError, match="compressor training only"):
        train_finetune(replace(cfg, qa_file=str(tmp_path / "qa.jsonl"), init_from=str(pre), exact_token_weight=4))


def test_decoder_batcher_labels_only_answer_and_eos(models, tokenizer):
    bb, _ = models
    vectors, questions, answers = _batch(models, tokenizer)
    x, labels = DecoderBatcher(bb)(vectors, questions, answers)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    gen = Generator(bb)
    assert x.shape[:2] == labels.shape
    for i, (v, q, ans) in enumerate(zip(vectors, questions, answers)):
        start = gen.embed_pieces(gen.chat_pieces(qa_pieces(v, q), system=SYSTEM_PROMPT)).shape[0]
        end = start + len(ans) + 1
        assert labels[i, start:end].tolist() == ans + [eos]
        assert (labels[i, :start] == -100).all() and (labels[i, end:] == -100).all()
        # teacher forcing: the answer tokens themselves are the decoder input there; right padding is zeros
        torch.testing.assert_close(x[i, start:end], bb.embed(torch.tensor(ans + [eos])))
        assert (x[i, end:] == 0).all()


@pytest.mark.parametrize("chunk_tokens", [8192, 3])  # one projection, or several checkpointed chunks
def test_answer_loss_is_cross_entropy_on_answer_tokens(models, tokenizer, chunk_tokens):
    bb, _ = models
    vectors, questions, answers = _batch(models, tokenizer)
    x, labels = DecoderBatcher(bb)(vectors, questions, answers)
    loss, acc = answer_loss(bb, x, labels, chunk_tokens)
    with torch.no_grad(), bb.use(DECODER_ADAPTER):
        logits = bb.model(inputs_embeds=x).logits.float()
    pos = [(i, t) for i in range(x.shape[0]) for t in range(x.shape[1] - 1) if labels[i, t + 1] != -100]
    assert len(pos) == sum(len(a) + 1 for a in answers)
    ce = torch.stack([F.cross_entropy(logits[i, t], labels[i, t + 1]) for i, t in pos]).mean()
    hits = torch.tensor([float(logits[i, t].argmax() == labels[i, t + 1]) for i, t in pos]).mean()
    torch.testing.assert_close(loss.detach(), ce, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(acc, hits)
    loss.backward()  # the loss reaches the compressed vectors (so the encoder can learn from it)
    for v in (p for row in vectors for p in row if isinstance(p, torch.Tensor)):
        assert v.grad is not None and v.grad.abs().sum() > 0


@pytest.mark.parametrize("padded,compile", [(False, False), (True, False), (True, True)])
def test_lean_stack_matches_the_transformers_modules(tiny_model_dir, padded, compile):
    """Training's forward (lean_llama.LeanStack: fused projections, LoRA cast once per pass, optionally
    compiled) gives the hidden states and LoRA gradients of the transformers + PEFT modules, per adapter."""
    from lloco_index.backbone import Backbone
    from lloco_index.compressor import ENCODER_ADAPTER
    from lloco_index.lean_llama import LeanStack

    bb = Backbone.from_pretrained(str(tiny_model_dir), device="cpu")
    bb.add_adapter(ENCODER_ADAPTER, _lora(2, 4, TrainConfig.encoder_targets))
    bb.add_adapter(DECODER_ADAPTER, _lora(2, 4, TrainConfig.decoder_targets))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in bb.model.named_parameters():
            p.requires_grad_("lora_" in n)
            if "lora_B" in n:  # PEFT starts B at zero: make the adapters matter
                p.normal_(0, 0.2)
    x = torch.randn(2, 12, bb.hidden_size)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0  # left padding, as the encoder pads
    mask, positions = (mask, (mask.cumsum(-1) - 1).clamp(min=0)) if padded else (None, None)
    real = mask.bool() if padded else torch.ones(2, 12, dtype=torch.bool)
    for adapter in (ENCODER_ADAPTER, DECODER_ADAPTER):
        lora = [p for n, p in bb.model.named_parameters() if p.requires_grad and f".{adapter}." in n]
        outs = []
        for stack in (None, LeanStack(bb.model, compile=compile)):
            bb.train_stack = stack
            with bb.use(adapter):
                h = bb.hidden_states(x, attention_mask=mask, position_ids=positions)[real]
            outs.append((h, torch.autograd.grad(h.square().sum(), lora)))
        torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)
        for lean_grad, hf_grad in zip(outs[1][1], outs[0][1]):
            torch.testing.assert_close(lean_grad, hf_grad, atol=1e-4, rtol=1e-4)
    bb.train_stack = None


@pytest.mark.parametrize("compile", [False, True])
def test_lean_stack_applies_lora_dropout_as_peft_does(tiny_model_dir, compile, monkeypatch):
    """With LoRA dropout in training mode, a seeded LeanStack pass draws PEFT's masks (one per module, in module
    order) and gives its hidden states and gradients; in eval mode dropout is off in both. Compiled graphs draw
    with their own generator unless inductor's ``fallback_random`` makes them draw as eager does."""
    from lloco_index.backbone import Backbone
    from lloco_index.lean_llama import LeanStack

    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)

    bb = Backbone.from_pretrained(str(tiny_model_dir), device="cpu")
    bb.add_adapter(DECODER_ADAPTER, _lora(2, 4, "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", 0.3))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in bb.model.named_parameters():
            p.requires_grad_("lora_" in n)
            if "lora_B" in n:
                p.normal_(0, 0.2)
    lora = [p for p in bb.model.parameters() if p.requires_grad]
    x = torch.randn(2, 12, bb.hidden_size)
    for training in (True, False):
        bb.model.train(training)
        outs = []
        for stack in (None, LeanStack(bb.model, compile=compile)):
            bb.train_stack = stack
            torch.manual_seed(7)
            with bb.use(DECODER_ADAPTER):
                h = bb.hidden_states(x)
            outs.append((h, torch.autograd.grad(h.square().sum(), lora)))
        torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)
        for lean_grad, hf_grad in zip(outs[1][1], outs[0][1]):
            torch.testing.assert_close(lean_grad, hf_grad, atol=1e-4, rtol=1e-4)
        if training:
            dropped = outs[0][0]
        else:
            assert not torch.allclose(dropped, outs[0][0], atol=1e-3)  # dropout really acted in training mode
    bb.train_stack = None


def test_compiled_lean_stack_compiles_once_for_every_batch_shape(tiny_model_dir):
    """Training steps change shape every step (chunks per context, answer lengths): the two compiled halves
    of a layer must not recompile for each, or compiling eats the run (a P5 run once did 2 steps in 112 s)."""
    from torch._dynamo.utils import counters

    from lloco_index.backbone import Backbone
    from lloco_index.lean_llama import LeanStack

    bb = Backbone.from_pretrained(str(tiny_model_dir), device="cpu")
    bb.add_adapter(DECODER_ADAPTER, _lora(2, 4, TrainConfig.decoder_targets))
    bb.train_stack = LeanStack(bb.model, compile=True)
    graphs = []
    for b, t in ((2, 12), (3, 7), (1, 20), (4, 33)):
        with bb.use(DECODER_ADAPTER):
            bb.hidden_states(torch.randn(b, t, bb.hidden_size, requires_grad=True)).square().sum().backward()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1:] == [graphs[0]] * 3  # the first shape compiled both halves (or found them compiled)


def test_training_takes_the_lean_stack_unless_told_not_to(tiny_model_dir, corpus_file):
    cfg = tiny_cfg(tiny_model_dir, corpus_file, Path("unused"))
    assert setup_models(cfg, torch.device("cpu"))[0].train_stack is not None
    assert setup_models(replace(cfg, decoder_dropout=0.05), torch.device("cpu"))[0].train_stack is not None
    assert setup_models(replace(cfg, lean=False), torch.device("cpu"))[0].train_stack is None


def test_grad_checkpointing_gives_the_same_gradients(tiny_model_dir, corpus_file, tokenizer):
    """Recomputing activations in backward is a memory trade, not a change to what is learned: the
    encoder's layers are recomputed under the encoder adapter although the decoder ran last."""
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        bb, comp = setup_models(tiny_cfg(tiny_model_dir, corpus_file, Path("unused"), grad_checkpointing=ckpt),
                                torch.device("cpu"))
        assert bb.model.is_gradient_checkpointing == ckpt
        c = Corpus.load(corpus_file).window(np.random.default_rng(0), 32)
        vecs, cut = cut_vectors(encode_chunks(comp, [Example([c], AE_QUESTION, c, [0])], grad_budget=1))
        x, labels = DecoderBatcher(bb)(vecs, [AE_QUESTION], [c])
        loss, _ = answer_loss(bb, x, labels, chunk_tokens=5)
        loss.backward()
        encoder_backward(comp, cut)
        named = {n: p.grad for n, p in bb.model.named_parameters() if p.requires_grad}
        assert all(g is not None for g in named.values()) and comp.summary.grad is not None
        grads.append({**named, "summary": comp.summary.grad})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-5, rtol=1e-4)


# -- task sampling ------------------------------------------------------------------------------
def test_qa_answer_is_in_a_grad_chunk(sampler, tokenizer):
    """Over many examples, the asked fact's answer is in a chunk marked for gradients (no later fact
    placed in the same chunk may cut it off)."""
    for n in (1, 2, 3):
        for _ in range(60):
            ex = sampler.qa(n, 32)
            assert len(ex.chunks) == n and ex.grad_chunks and set(ex.grad_chunks) <= set(range(n))
            answer = tokenizer.decode(ex.answer)
            assert any(answer in tokenizer.decode(ex.chunks[j]) for j in ex.grad_chunks), (answer, ex.chunks)


def test_cloze_blank_comes_from_its_grad_chunk(sampler, tokenizer):
    for _ in range(20):
        ex = sampler.cloze(3, 32)
        if ex.question == AE_QUESTION:  # no usable sentence: falls back to autoencoding
            continue
        assert "____" in ex.question and len(ex.grad_chunks) == 1
        assert tokenizer.decode(ex.answer) in tokenizer.decode(ex.chunks[ex.grad_chunks[0]])


def test_ae_answer_is_its_chunk(sampler):
    ex = sampler.ae(1, 32)
    assert ex.chunks == [ex.answer] and len(ex.answer) == 32
    assert ex.question == AE_QUESTION and ex.grad_chunks == [0]


def test_lm_answer_follows_the_chunks_in_the_corpus(sampler):
    ex = sampler.lm(2, 32)
    assert [len(c) for c in ex.chunks] == [32, 32] and len(ex.answer) == 16 and ex.grad_chunks == [0, 1]
    seq = np.asarray(ex.chunks[0] + ex.chunks[1] + ex.answer)
    windows = np.lib.stride_tricks.sliding_window_view(sampler.corpus.tokens, len(seq))
    assert (windows == seq).all(axis=1).any()


def test_expand_gives_one_text_chunk(models, sampler, tokenizer):
    _, comp = models
    expand = TaskSampler(sampler.corpus, tokenizer, replace(sampler.cfg, expand_prob=1.0), seed=3)
    assert expand.qa(1, 32).text_chunks == []  # a single chunk is never given as text
    ex = expand.qa(3, 32)
    assert len(ex.text_chunks) == 1
    ex.text_chunks = [t := 0]  # the first chunk, so that "end" must move it
    (in_place,) = encode_chunks(comp, [ex], grad_budget=1, expand_at="in_place")
    for j, piece in enumerate(in_place):
        if j == t:
            assert piece == tokenizer.decode(ex.chunks[j])
        else:
            assert isinstance(piece, torch.Tensor) and piece.shape == (4, comp.backbone.hidden_size)
    (end,) = encode_chunks(comp, [ex], grad_budget=1)  # default: the text chunk last, as inference places it
    assert end[-1] == in_place[t]
    for a, b in zip(end[:-1], [p for j, p in enumerate(in_place) if j != t]):
        torch.testing.assert_close(a, b)


def test_min_chunks_makes_every_qa_and_cloze_context_long(sampler, tokenizer):
    long = TaskSampler(sampler.corpus, tokenizer, replace(sampler.cfg, min_chunks=3), seed=1)
    seen = {}
    for _ in range(40):
        task, exs = long.step()
        fallback = task == "cloze" and exs[0].question == AE_QUESTION  # no usable sentence: one ae chunk
        seen.setdefault(task, set()).update(len(e.chunks) for e in exs if not fallback)
    assert seen["qa"] == seen["cloze"] == {3}  # max_chunks is 3 in the tiny config
    assert seen["ae"] == {1} and max(seen["lm"]) <= 4
    with pytest.raises(ValueError, match="min_chunks <= max_chunks"):
        replace(sampler.cfg, min_chunks=4)
    with pytest.raises(ValueError, match="min_chunks <= max_chunks"):
        TrainConfig(min_chunks=0)


def test_train_config_rejects_unknown_expand_at():
    assert TrainConfig.from_args({"expand_at": "in_place"}).expand_at == "in_place"
    with pytest.raises(ValueError, match="expand_at must be one of end, in_place"):
        TrainConfig.from_args({"expand_at": "middle"})


def test_sampler_is_deterministic_for_a_seed(sampler, tokenizer):
    def steps(seed: int) -> list:
        s = TaskSampler(sampler.corpus, tokenizer, sampler.cfg, seed=seed)
        return [s.step() for _ in range(6)]

    assert steps(5) == steps(5)
    assert steps(5) != steps(6)


# -- encoding -----------------------------------------------------------------------------------
def test_step_flops_match_what_torch_counts(models, sampler):
    """MFU's numerator against torch's own FLOP counter over one real step (forward + backward). The counter does
    not see the CPU attention kernel, so attention is left out of both sides; it also sees what the model-FLOPs
    convention leaves out (padding, the rank-2 LoRA matmuls, block-diagonal in the lean stack's fused q/k/v, the
    loss's recomputed vocabulary projection), so it counts a little more, never less."""
    from dataclasses import replace as replace_field

    from torch.utils.flop_counter import FlopCounterMode

    bb, comp = models
    c = [sampler.corpus.window(np.random.default_rng(i), 32 if i % 2 else 20) for i in range(6)]
    exs = [Example(c[0:3], "Which word?", c[5][:7], grad_chunks=[0, 2]), Example(c[3:4], AE_QUESTION, c[3], [0]),
           Example(c[4:6], "Which word?", c[1][:3], grad_chunks=[1], text_chunks=[0])]
    with FlopCounterMode(display=False) as counter:
        vecs, cut = cut_vectors(encode_chunks(comp, exs, grad_budget=2))
        x, labels = DecoderBatcher(bb)(vecs, [e.question for e in exs], [e.answer for e in exs])
        loss, _ = answer_loss(bb, x, labels)
        with bb.use(DECODER_ADAPTER):
            loss.backward()
        encoder_backward(comp, cut)
    bb.model.zero_grad(set_to_none=True)
    comp.summary.grad = None
    cost, summary = Cost.of(bb.model), comp.config.summary_tokens
    no_attention = float(step_flops(replace_field(cost, attn_dim=0), summary, exs, 2, labels))
    assert bb.train_stack is not None  # the path training takes
    assert no_attention <= counter.get_total_flops() <= 1.2 * no_attention
    with_attention = float(step_flops(cost, summary, exs, 2, labels))
    assert with_attention > no_attention
    assert float(step_flops(cost, summary, exs, 3, labels)) > with_attention  # a third segment's backward


def test_encode_chunks_grad_budget(models, sampler):
    _, comp = models
    c = [sampler.corpus.window(np.random.default_rng(i), 32 if i % 2 else 20) for i in range(6)]
    exs = [Example(c[0:3], "q", [1], grad_chunks=[0, 2]), Example(c[3:4], "q", [1], grad_chunks=[0]),
           Example(c[4:6], "q", [1], grad_chunks=[1])]
    wanted = [(0, 0), (0, 2), (1, 0), (2, 1)]  # grad chunks in prompt order
    for budget in (0, 2, 10):
        out = encode_chunks(comp, exs, budget)
        with_grad = [(i, j) for i, row in enumerate(out) for j, v in enumerate(row) if v.requires_grad]
        assert with_grad == wanted[:budget]
    for ex, row in zip(exs, out):  # batching by length changes nothing: each equals encoding it alone
        for chunk, v in zip(ex.chunks, row):
            torch.testing.assert_close(v.detach(), comp.encode_segments([chunk])[0], atol=1e-5, rtol=1e-5)


# -- compressor pretraining ---------------------------------------------------------------------
def test_train_compressor_writes_safetensors_checkpoint(pretrained, tiny_model_dir):
    cfg, out = pretrained
    assert (out / "compressor" / "compressor_config.json").is_file()
    assert (out / "compressor" / "summary_embeddings.safetensors").is_file()
    for folder in ("compressor/encoder", "decoder"):
        adapter = json.loads((out / folder / "adapter_config.json").read_text())
        assert adapter["peft_type"] == "LORA" and adapter["base_model_name_or_path"] == cfg.base_model
        weights = _tensors(out / folder / "adapter_model.safetensors")
        assert weights and all(t.dtype == torch.float16 for t in weights.values())
    assert not [f for f in out.rglob("*") if f.suffix in (".bin", ".pt", ".pth", ".pkl")]
    state = json.loads((out / "training_state.json").read_text())
    assert state["train_config"] == json.loads(json.dumps(vars(cfg)))
    assert state["step"] == cfg.max_steps and state["tokens"] > 0
    assert state["peak_tflops_per_s"] > 0 and 0 < state["mfu"] < 1  # measured on this CPU, not assumed
    final = state["eval"][-1]
    assert all(math.isfinite(final[k]) for k in final if k.endswith("_loss"))
    assert {"qa8_loss", "qa32_em", "ae1_acc", "lm2_loss"} <= final.keys()
    comp = ContextCompressor.from_pretrained(Backbone.from_pretrained(str(tiny_model_dir), device="cpu"),
                                             out / "compressor")
    assert comp.config.has_encoder_adapter and comp.config.segment_tokens == 32 and comp.config.summary_tokens == 4
    assert comp.fingerprint() == state["compressor_fingerprint"]  # a store made at train time fits the loaded one


def test_training_shows_a_progress_bar(tiny_model_dir, corpus_file, tmp_path, capfd):
    cfg = tiny_cfg(tiny_model_dir, corpus_file, tmp_path / "run", max_steps=2)
    train_compressor(cfg, held_out_eval=False)
    err = capfd.readouterr().err
    assert "train:   0%" in err and "train: 100%" in err  # percent of max_steps or of max_minutes, whichever leads


def test_a_random_model_of_a_bench_shape_trains_like_a_real_one(tiny_model_dir, corpus_file, tmp_path):
    """``scripts/random_model.py``: random weights of a bench shape plus a real tokenizer make a folder that
    training loads by path (how the 7B-shape MFU is measured where no 7B checkpoint is at hand)."""
    from transformers import AutoTokenizer

    shape = Shape("test", hidden=32, layers=3, heads=4, kv_heads=2, intermediate=96, vocab=50)
    folder = save_random_model(shape, str(tiny_model_dir), tmp_path / "random", torch.device("cpu"))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    bb = Backbone.from_pretrained(str(folder), device="cpu")
    cfg = bb.model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (32, 3, 96)
    assert cfg.vocab_size == len(tok) and bb.tokenizer(" the ferry")["input_ids"] == tok(" the ferry")["input_ids"]
    assert list(folder.glob("*.safetensors")) and not list(folder.glob("*.bin"))
    state = json.loads((train_compressor(tiny_cfg(folder, corpus_file, tmp_path / "run", max_steps=2),
                                         held_out_eval=False) / "training_state.json").read_text())
    assert state["step"] == 2 and state["train_config"]["base_model"] == str(folder) and 0 < state["mfu"] < 1


def test_init_from_loads_saved_adapters(pretrained):
    from peft import get_peft_model_state_dict

    cfg, out = pretrained
    bb, comp = setup_models(replace(cfg, init_from=str(out)), torch.device("cpu"))
    for name, folder in ((ENCODER_ADAPTER, "compressor/encoder"), (DECODER_ADAPTER, "decoder")):
        saved = _tensors(out / folder / "adapter_model.safetensors")
        loaded = get_peft_model_state_dict(bb.model, adapter_name=name)
        assert saved.keys() == loaded.keys()
        for k in saved:
            assert torch.equal(loaded[k].half(), saved[k]), k
    torch.testing.assert_close(comp.summary.detach(), _tensors(out / "compressor/summary_embeddings.safetensors")
                               ["summary_embeddings"], atol=0, rtol=0)
    trainable = [n for n, p in bb.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(ENCODER_ADAPTER in n for n in trainable) and any(f".{DECODER_ADAPTER}." in n for n in trainable)
    assert comp.summary.requires_grad
    assert comp.fingerprint() == json.loads((out / "training_state.json").read_text())["compressor_fingerprint"]


def test_proportional_vectors_turn_on_for_a_continued_compressor_and_trim_training_chunks(pretrained):
    """--proportional_vectors on a continued compressor: same weights, new fingerprint, and a short training chunk
    reaches the decoder with the vectors inference would store for it."""
    cfg, out = pretrained
    _, comp = setup_models(replace(cfg, init_from=str(out), proportional_vectors=True), torch.device("cpu"))
    assert comp.config.proportional_vectors
    assert comp.fingerprint() != json.loads((out / "training_state.json").read_text())["compressor_fingerprint"]
    short, full = list(range(5, 5 + cfg.segment_tokens // 4)), list(range(5, 5 + cfg.segment_tokens))
    (row,) = encode_chunks(comp, [Example([short, full], "q", [1], [0])], grad_budget=1)
    assert [v.shape[0] for v in row] == [cfg.summary_tokens // 4, cfg.summary_tokens]
    torch.testing.assert_close(row[0].detach().float(), comp.compress(comp.backbone.tokenizer.decode(short)).float(),
                               atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="full_chunk_prob"):
        TrainConfig(full_chunk_prob=1.5)


def test_a_continued_compressor_keeps_its_segment_length_unless_told_another(pretrained, tmp_path):
    """--segment_tokens 0 (the default) continues at the saved length, and the training chunks are cut to it;
    another value continues the same weights at that length, under a new fingerprint."""
    cfg, out = pretrained
    saved = json.loads((out / "training_state.json").read_text())["compressor_fingerprint"]
    run = train_compressor(replace(cfg, init_from=str(out), segment_tokens=0, max_steps=1, train_encoder=False,
                                   out_dir=str(tmp_path / "same")), held_out_eval=False)
    state = json.loads((run / "training_state.json").read_text())
    assert state["train_config"]["segment_tokens"] == cfg.segment_tokens and state["compressor_fingerprint"] == saved
    longer = 2 * cfg.segment_tokens
    _, comp = setup_models(replace(cfg, init_from=str(out), segment_tokens=longer), torch.device("cpu"))
    assert comp.config.segment_tokens == longer and comp.fingerprint() != saved
    torch.testing.assert_close(comp.summary.detach(), _tensors(out / "compressor/summary_embeddings.safetensors")
                               ["summary_embeddings"].to(comp.summary.dtype), atol=0, rtol=0)
    _, fresh = setup_models(replace(cfg, segment_tokens=0), torch.device("cpu"))
    assert fresh.config.segment_tokens == NEW_SEGMENT_TOKENS  # a new compressor without the flag


def test_init_from_a_missing_folder_is_an_error_not_a_fresh_start(pretrained, tmp_path):
    cfg, _ = pretrained
    with pytest.raises(FileNotFoundError, match="no compressor/ or decoder/"):
        setup_models(replace(cfg, init_from=str(tmp_path / "typo")), torch.device("cpu"))


# -- averaging runs -----------------------------------------------------------------------------
def _perturbed_copy(run: Path, dst: Path, seed: int) -> Path:
    """``run`` with every LoRA and summary tensor moved a little: a stand-in for another seed's continuation."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("training_state.json"))
    gen = torch.Generator().manual_seed(seed)
    for f in (*(f"{a}/adapter_model.safetensors" for a in ("compressor/encoder", "decoder")),
              "compressor/summary_embeddings.safetensors"):
        t = _tensors(dst / f)
        moved = {k: v if k == "vector_mean" else
                 (v.float() + 0.01 * torch.randn(v.shape, generator=gen)).to(v.dtype) for k, v in t.items()}
        save_file(moved, str(dst / f))
    return dst


def _delta(tensors: dict[str, torch.Tensor], a_key: str) -> torch.Tensor:
    return tensors[a_key.replace("lora_A", "lora_B")].double() @ tensors[a_key].double()


def test_average_runs_keeps_the_mean_weight_change_and_loads_as_a_run(pretrained, tmp_path):
    """A LoRA pair averages as the change B @ A it makes (exact when the mean fits the rank, as with weights 1, 0),
    summary embeddings as a plain mean; the result loads like any run."""
    from lloco_index.average import average_runs

    cfg, run = pretrained
    other = _perturbed_copy(run, tmp_path / "other", seed=1)
    errors = average_runs([run, other], tmp_path / "first_only", weights=[1, 0])
    assert errors == {"compressor/encoder": 0.0, "decoder": 0.0}
    errors = average_runs([run, other], tmp_path / "mean")
    assert set(errors) == {"compressor/encoder", "decoder"} and all(0 <= e < 1 for e in errors.values())
    for folder in ("compressor/encoder", "decoder"):
        first, second = _tensors(run / folder / "adapter_model.safetensors"), _tensors(
            other / folder / "adapter_model.safetensors")
        kept = _tensors(tmp_path / "first_only" / folder / "adapter_model.safetensors")
        a_keys = [k for k in first if "lora_A" in k]
        assert a_keys and kept.keys() == first.keys()
        for k in a_keys:
            torch.testing.assert_close(_delta(kept, k), _delta(first, k), atol=2e-3, rtol=2e-2)
        mean = _tensors(tmp_path / "mean" / folder / "adapter_model.safetensors")
        target = [(_delta(first, k) + _delta(second, k)) / 2 for k in a_keys]
        got = [_delta(mean, k) for k in a_keys]
        err = max(((g - t).norm() / t.norm()).item() for g, t in zip(got, target))
        assert err <= errors[folder] + 2e-2  # the reported truncation error, plus fp16 storage
    summary = "compressor/summary_embeddings.safetensors"
    torch.testing.assert_close(_tensors(tmp_path / "mean" / summary)["summary_embeddings"],
                               (_tensors(run / summary)["summary_embeddings"]
                                + _tensors(other / summary)["summary_embeddings"]) / 2)
    _, comp = setup_models(replace(cfg, init_from=str(tmp_path / "mean")), torch.device("cpu"))
    assert comp.config == ContextCompressor.from_pretrained(comp.backbone, run / "compressor").config
    assert json.loads((tmp_path / "mean" / "average.json").read_text())["weights"] == [1.0, 1.0]


def test_average_runs_refuses_what_cannot_be_averaged_and_overwrites_nothing(pretrained, tmp_path, capsys):
    from lloco_index.average import average_runs
    from lloco_index.cli import main

    _, run = pretrained
    other = _perturbed_copy(run, tmp_path / "other", seed=2)
    config = other / "compressor" / "compressor_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "segment_tokens": 64}))
    with pytest.raises(ValueError, match="differs .* in segment_tokens"):
        average_runs([run, other], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))  # no half-written folder
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="nothing is overwritten"):
        average_runs([run, run], tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="at least two runs"):
        average_runs([run], tmp_path / "one")
    with pytest.raises(ValueError, match="one weight >= 0 per run"):
        average_runs([run, run], tmp_path / "w", weights=[1])
    assert main(["train", "average", "--out", str(tmp_path / "cli"), "--weights", "1,x", str(run), str(run)]) != 0
    assert "--weights takes numbers" in capsys.readouterr().err
    assert main(["train", "average", "--out", str(tmp_path / "cli"), str(run), str(run)]) == 0
    assert (tmp_path / "cli" / "decoder" / "adapter_model.safetensors").is_file()


# -- finetuning ---------------------------------------------------------------------------------
def _write_qa(path: Path, answers: list[list[str]]) -> Path:
    texts = [p.read_text() for p in CORPUS]
    rows = [{"id": f"ex{i}", "documents": [texts[i % 2][:300 + 100 * i]], "question": f"Question {i}?",
             "answers": a} for i, a in enumerate(answers)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_finetune_trains_decoder_only_and_reuses_store(pretrained, tmp_path):
    from lloco_index.store import CompressedStore

    base, pre = pretrained
    qa = _write_qa(tmp_path / "qa.jsonl", [["the museum"], ["1897"], ["Miriam"]])
    cfg = replace(base, out_dir=str(tmp_path / "ft"), qa_file=str(qa), init_from=str(pre), epochs=1, batch_size=2,
                  max_steps=100)
    out = train_finetune(cfg)
    for f in ("compressor/summary_embeddings.safetensors", "compressor/encoder/adapter_model.safetensors"):
        assert _same_tensors(pre / f, out / f), f  # the compressor is frozen
    assert not _same_tensors(pre / "decoder/adapter_model.safetensors", out / "decoder/adapter_model.safetensors")
    state = json.loads((out / "training_state.json").read_text())
    fingerprint = json.loads((pre / "training_state.json").read_text())["compressor_fingerprint"]
    assert state["step"] == 2 and state["compressor_fingerprint"] == fingerprint

    store = CompressedStore(out / "store")
    shards = sorted(p.name for p in (out / "store").rglob("*") if p.is_file() and "shards" in p.parts)
    assert store.fingerprint == fingerprint and store.stats()["chunks"] > 3 and shards
    train_finetune(cfg)  # same documents again: every chunk comes from the store
    assert CompressedStore(out / "store").stats()["chunks"] == store.stats()["chunks"]
    assert sorted(p.name for p in (out / "store").rglob("*") if p.is_file() and "shards" in p.parts) == shards


def test_finetune_asks_multiple_choice_as_evaluation_does():
    from lloco_index.data import QAExample

    mc = QAExample("m", ["doc"], "Which colour? ", ["olive"], choices=["teal", "olive", "ochre"])
    question, answer = qa_target(mc)
    assert question == question_text("Which colour?", ["teal", "olive", "ochre"]) and "B. olive" in question
    assert answer == "B"
    assert qa_target(QAExample("o", ["doc"], "Which colour? ", ["olive", "green"])) == ("Which colour?", "olive")


def test_qa_can_ask_multiple_choice_with_options_of_the_same_kind(sampler, tokenizer):
    mc = TaskSampler(sampler.corpus, tokenizer, replace(sampler.cfg, choice_prob=1.0), seed=2)
    for _ in range(30):
        ex = mc.qa(2, 32)
        letter = tokenizer.decode(ex.answer)
        lines = ex.question.splitlines()
        options = {line[0]: line[3:] for line in lines[1:-1]}
        assert lines[-1] == "Answer with the letter of the correct option." and sorted(options) == list("ABCD")
        assert len(set(options.values())) == 4 and letter in options
        right = options[letter]  # the right option is the span hidden in a grad chunk; the others are not
        assert any(right in tokenizer.decode(ex.chunks[j]) for j in ex.grad_chunks)
        digits = {any(c.isdigit() for c in o) for o in options.values()}
        assert len(digits) == 1, options  # a year among names would give the answer away
    with pytest.raises(ValueError, match="choice_prob"):
        replace(sampler.cfg, choice_prob=1.5)


def test_every_fact_template_answers_with_a_span_of_its_facts():
    """The decoder is taught to copy: an answer that is not in the text would teach it to make answers up."""
    rng = random.Random(0)
    for kind in range(KINDS):
        for _ in range(20):
            fact = make_fact(rng, kind)
            assert fact.kind == kind and any(fact.answer in s for s in fact.sentences), (kind, fact)
    long = [make_fact(rng, 13).answer for _ in range(20)]  # the long two-part answers: 9+ words, a name inside
    assert all(len(a.split()) >= 9 and " and " in a and any(w[0].isupper() for w in a.split()) for a in long), long
    with pytest.raises(ValueError, match=f"0..{KINDS - 1}"):
        make_fact(rng, KINDS)


def test_same_kind_facts_bind_answers_to_different_subjects(sampler, tokenizer):
    """With same_kind_prob every fact of a context is of the asked fact's kind: the question's subject, not the
    fact's kind, has to pick the answer (the dev sets' distractors are like that)."""
    same = TaskSampler(sampler.corpus, tokenizer, replace(sampler.cfg, same_kind_prob=1.0, max_facts=4), seed=4)
    for _ in range(40):
        facts = same._same_kind_facts(4)
        assert len({f.kind for f in facts}) == 1 and facts[0].kind in MANY_SUBJECTS and len(facts) == 4
        assert len({f.answer for f in facts}) == 4 and len({f.question for f in facts}) == 4
    only_numbers = ",".join(f"{k}:0" for k in range(KINDS) if k != 15)  # kind 15: a person's number
    numbers = TaskSampler(sampler.corpus, tokenizer, replace(same.cfg, fact_weights=only_numbers), seed=5)
    labels = re.compile(r"locker number|PIN|phone extension|membership number|ticket number|badge number")
    for _ in range(30):
        ex = numbers.qa(40, 32)
        text = " ".join(tokenizer.decode(c) for c in ex.chunks)
        assert len(labels.findall(text)) >= 2, text  # the asked number and at least one other person's
        assert any(tokenizer.decode(ex.answer) in tokenizer.decode(ex.chunks[j]) for j in ex.grad_chunks)
    with pytest.raises(ValueError, match="same_kind_prob"):
        replace(sampler.cfg, same_kind_prob=2.0)


def test_fact_weights_choose_which_fact_templates_qa_draws(sampler, tokenizer):
    only_two_part = ",".join(f"{k}:0" for k in range(KINDS) if k not in (3, 8, 13))  # these answer "X and Y"
    two_part = TaskSampler(sampler.corpus, tokenizer, replace(sampler.cfg, fact_weights=only_two_part), seed=3)
    answers = [tokenizer.decode(two_part.qa(2, 32).answer) for _ in range(30)]
    assert all(" and " in a for a in answers), answers
    uniform = [tokenizer.decode(TaskSampler(sampler.corpus, tokenizer, sampler.cfg, seed=3).qa(2, 32).answer)
               for _ in range(30)]
    assert not all(" and " in a for a in uniform)
    for bad, match in (("3", "kind:weight"), (f"{KINDS}:2", f"kinds are 0..{KINDS - 1}"), ("3:-1", "weights >= 0"),
                       (",".join(f"{k}:0" for k in range(KINDS)), "weight 0")):
        with pytest.raises(ValueError, match=match):
            replace(sampler.cfg, fact_weights=bad)


def test_finetune_input_errors(pretrained, tmp_path):
    base, pre = pretrained
    with pytest.raises(ValueError, match="--qa_file"):
        train_finetune(replace(base, out_dir=str(tmp_path / "a")))
    qa = _write_qa(tmp_path / "qa.jsonl", [["ok"], []])
    with pytest.raises(ValueError, match="'ex1' has no answer"):
        train_finetune(replace(base, out_dir=str(tmp_path / "b"), qa_file=str(qa), init_from=str(pre)))


# -- configuration and CLI ----------------------------------------------------------------------
def test_train_config_from_args():
    cfg = TrainConfig.from_args({"max_steps": "7", "lr": "1e-3", "expand_prob": "1", "task_mix": "qa:1",
                                 "bf16": "false"})
    assert (cfg.max_steps, cfg.lr, cfg.expand_prob, cfg.task_mix, cfg.bf16) == (7, 1e-3, 1.0, "qa:1", False)
    assert type(cfg.max_steps) is int and type(cfg.expand_prob) is float
    assert cfg.segment_tokens == TrainConfig().segment_tokens  # untouched fields keep their defaults
    for text, value in (("1", True), ("true", True), ("Yes", True), ("0", False), ("False", False), ("no", False)):
        assert TrainConfig.from_args({"bf16": text}).bf16 is value
    with pytest.raises(ValueError, match=r"unknown training option --max_step; valid: .*max_steps"):
        TrainConfig.from_args({"max_step": "3"})
    with pytest.raises(ValueError):
        TrainConfig.from_args({"max_steps": "2.5"})
    with pytest.raises(ValueError, match="--bf16 takes true/false"):
        TrainConfig.from_args({"bf16": "ture"})


def test_cli_run_reproduces_api_run_bit_for_bit(pretrained, tmp_path, capsys):
    """`lloco train compressor` with the same options and seed as the API run: the CLI parses every flag
    to the same config, and training is deterministic for a seed (identical adapter files)."""
    from lloco_index.cli import main

    cfg, first = pretrained
    options = {**TINY, "base_model": cfg.base_model, "corpus": cfg.corpus, "out_dir": str(tmp_path / "cli"),
               "seed": cfg.seed}
    assert main(["train", "compressor", *[a for k, v in options.items() for a in (f"--{k}", str(v))]]) == 0
    assert f"saved to {tmp_path / 'cli'}" in capsys.readouterr().out
    state = json.loads((tmp_path / "cli" / "training_state.json").read_text())
    assert state["train_config"] == json.loads(json.dumps(vars(replace(cfg, out_dir=options["out_dir"]))))
    for f in ADAPTERS + ("compressor/summary_embeddings.safetensors",):
        assert (tmp_path / "cli" / f).read_bytes() == (first / f).read_bytes(), f


def test_cli_train_help_lists_every_option(capsys):
    from dataclasses import fields

    from lloco_index.cli import main

    assert main(["train", "compressor", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"--{f.name} " in out for f in fields(TrainConfig)) and "--grad_checkpointing False" in out
    assert main(["train", "corpus", "-h"]) == 0 and "SOURCE" in capsys.readouterr().out


def test_profile_script_reports_every_phase(tiny_model_dir, corpus_file, tmp_path):
    """scripts/profile_train.py runs the real loop under torch.profiler and names each phase."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    argv = [sys.executable, str(root / "scripts" / "profile_train.py"), "--base_model", str(tiny_model_dir),
            "--corpus", str(corpus_file), "--out_dir", str(tmp_path / "prof")]
    for k, v in {**TINY, "max_steps": 2}.items():
        argv += [f"--{k}", str(v)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)}).stdout
    for phase in ("sample", "encode", "decoder_batch", "decoder_loss", "backward", "optimizer"):
        line = next(x for x in out.splitlines() if x.strip().startswith(f"train/{phase} "))
        assert line.endswith("(2 calls)")
    assert (tmp_path / "prof" / "trace.json").stat().st_size > 0
    argv[argv.index(str(tmp_path / "prof"))] = str(tmp_path / "untraced")
    out = subprocess.run(argv + ["--trace", "false"], check=True, capture_output=True, text=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)}).stdout
    assert "train/encode " in out and not (tmp_path / "untraced" / "trace.json").exists()


def test_op_count_script_shows_the_lean_stack_dispatching_fewer_ops(tiny_model_dir):
    """scripts/count_train_ops.py counts one pass's aten ops per adapter; the lean stack must stay below the
    transformers + PEFT path, forward and backward (what it exists for)."""
    import os
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    counts = {}
    for lean in ("true", "false"):
        argv = [sys.executable, str(root / "scripts" / "count_train_ops.py"), "--base_model", str(tiny_model_dir),
                "--tokens", "8", "--lean", lean] + [a for k, v in TINY.items() if k.endswith(("_r", "_alpha"))
                                                    for a in (f"--{k}", str(v))]
        out = subprocess.run(argv, check=True, capture_output=True, text=True, cwd=root,
                             env={**os.environ, "PYTHONPATH": str(root)}).stdout
        counts[lean] = {m[0]: (int(m[1]), int(m[2])) for m in
                        re.findall(r"^(\S+): forward (\d+) ops \+ \d+ views, backward (\d+) ops", out, re.M)}
    assert set(counts["true"]) == {ENCODER_ADAPTER, DECODER_ADAPTER} == set(counts["false"])
    for adapter, (fwd, bwd) in counts["true"].items():
        assert 0 < fwd < counts["false"][adapter][0] and 0 < bwd < counts["false"][adapter][1], counts


def test_rescale_vectors_sets_the_token_embedding_norm(tiny_model_dir, corpus_file):
    bb, comp = setup_models(tiny_cfg(tiny_model_dir, corpus_file, Path("unused"), rescale_vectors=True),
                            torch.device("cpu"))
    target = bb.model.get_input_embeddings().weight.detach().float().norm(dim=-1).mean().item()
    assert comp.config.vector_norm == pytest.approx(target, abs=1e-4)
    vecs = encode_chunks(comp, [Example([list(range(5, 37))], "q", [1], [0])], 1)[0][0]
    assert torch.allclose(vecs.float().norm(dim=-1), torch.full((vecs.shape[0],), target), rtol=1e-3)
    assert vecs.requires_grad  # the rescale keeps the encoder trainable


def test_vector_ablation_script_scores_four_contexts(pretrained, corpus_file, tmp_path):
    import math
    import os
    import subprocess
    import sys

    cfg, run = pretrained
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "ablation.json"
    subprocess.run([sys.executable, str(root / "scripts" / "vector_ablation.py"), "--corpus", str(corpus_file),
                    "--init_from", str(run), "--n", "3", "--task", "ae", "--device", "cpu", "--out", str(out)],
                   check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)})
    report = json.loads(out.read_text())
    assert report["task"] == "ae" and report["n"] == 3
    assert set(report["results"]) == {"own vectors", "another example's vectors", "chunks as text", "no context"}
    assert all(math.isfinite(r["answer_loss"]) and 0 <= r["answer_token_accuracy"] <= 1
               and math.isfinite(r["exact_token_loss"]) for r in report["results"].values())


def test_center_vectors_fits_saves_and_subtracts_the_mean(tiny_model_dir, corpus_file, tmp_path):
    """A new centring compressor fits its per-slot mean at the start of training; the mean is saved, reloaded,
    part of the fingerprint, and subtracted: the vectors of the fitting segments average to ~0 per slot."""
    cfg = tiny_cfg(tiny_model_dir, corpus_file, tmp_path / "run", center_vectors=True, max_steps=1)
    out = train_compressor(cfg, held_out_eval=False)
    bb = Backbone.from_pretrained(str(tiny_model_dir), device="cpu")
    comp = ContextCompressor.from_pretrained(bb, out / "compressor")
    assert comp.config.center_vectors and comp.vector_mean.shape == comp.summary.shape
    assert comp.vector_mean.abs().sum() > 0  # fitted, not the zero placeholder
    segs = [list(range(5 + i, 5 + i + cfg.segment_tokens)) for i in range(6)]
    raw = comp._summary_states(segs, False, None).float()
    comp.fit_vector_mean(segs)
    assert torch.allclose(comp.encode_segments(segs).float().mean(0), torch.zeros_like(raw[0]), atol=1e-4)
    assert torch.allclose(comp.encode_segments(segs).float(), raw - raw.mean(0), atol=1e-4)
    before = comp.fingerprint()
    comp.vector_mean += 1.0
    comp._fingerprint = None
    assert comp.fingerprint() != before  # another mean, other vectors: another store key


def test_untrained_summary_rows_are_distinct(tiny_model_dir):
    bb = Backbone.from_pretrained(str(tiny_model_dir), device="cpu")
    comp = ContextCompressor.untrained(bb, CompressorConfig(base_model=str(tiny_model_dir), segment_tokens=16,
                                                            summary_tokens=6, hidden_size=bb.hidden_size))
    rows = comp.summary.detach()
    assert len({tuple(r.tolist()) for r in rows}) == 6  # identical rows would start symmetric
    with pytest.raises(ValueError, match="does not center"):
        comp.fit_vector_mean([[5] * 16])


def test_train_decoder_false_freezes_the_decoder_adapter(tiny_model_dir, corpus_file):
    bb, comp = setup_models(tiny_cfg(tiny_model_dir, corpus_file, Path("unused"), train_decoder=False),
                            torch.device("cpu"))
    trainable = [n for n, p in bb.model.named_parameters() if p.requires_grad]
    assert trainable and all(ENCODER_ADAPTER in n for n in trainable)
    assert comp.summary.requires_grad


def test_train_encoder_false_keeps_the_compressor_and_its_stores(pretrained, tmp_path):
    """A decoder-only continuation: the compressor files come out bit for bit as they went in (so its
    fingerprint, and every store built with it, stay valid) while the decoder adapter learns."""
    cfg, start = pretrained
    out = train_compressor(replace(cfg, init_from=str(start), out_dir=str(tmp_path / "run"), train_encoder=False))
    for f in ("compressor/summary_embeddings.safetensors", "compressor/encoder/adapter_model.safetensors"):
        assert _same_tensors(start / f, out / f), f
    assert not _same_tensors(start / "decoder/adapter_model.safetensors", out / "decoder/adapter_model.safetensors")
    states = [json.loads((d / "training_state.json").read_text()) for d in (start, out)]
    assert states[0]["compressor_fingerprint"] == states[1]["compressor_fingerprint"]
    with pytest.raises(ValueError, match="nothing would train"):
        TrainConfig(train_encoder=False, train_decoder=False)


def _two_processes(what: str, options: dict) -> str:
    """``lloco train WHAT`` under ``torchrun --nproc_per_node 2`` on CPU (gloo), as ``accelerate launch --cpu``
    would run it; returns stdout."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "lloco_index.cli", "train", what,
           *[a for k, v in options.items() for a in (f"--{k}", str(v))]]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("saved to") == 1  # process 0 reports and saves
    return r.stdout


def test_two_processes_train_one_model(tiny_model_dir, corpus_file, tmp_path):
    """The replicas start from the same weights and stay identical (gradients averaged by hand), a wall-clock
    stop ends every process at the same step instead of leaving one in an all-reduce, and the tokens of both
    are counted."""
    _two_processes("compressor", {**TINY, "base_model": str(tiny_model_dir), "corpus": str(corpus_file),
                                  "max_steps": 1000, "max_minutes": 0.15, "out_dir": str(tmp_path / "ddp")})
    state = json.loads((tmp_path / "ddp" / "training_state.json").read_text())
    assert state["processes"] == 2 and state["replicas_in_sync"] is True and 1 < state["step"] < 1000


def test_gradients_are_averaged_in_one_collective_and_land_on_their_own_parameters():
    """One all-reduce of a flat buffer: every gradient comes back to its own parameter in its shape and dtype,
    and a parameter this process left untouched takes part as zeros (a peer may have touched it)."""
    class HalfWithZeroPeer:  # what "mean" over two processes gives when the peer's gradients are all zero
        calls = 0

        def reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
            assert op == "mean" and t.dtype == torch.float32
            self.calls += 1
            return t / 2

    params = [torch.zeros(3, 2, requires_grad=True), torch.zeros(4, requires_grad=True),
              torch.zeros(2, 2, dtype=torch.bfloat16, requires_grad=True)]
    params[0].grad, params[2].grad = torch.arange(6.0).view(3, 2), torch.full((2, 2), 4.0, dtype=torch.bfloat16)
    acc = HalfWithZeroPeer()
    _average_gradients(acc, params)
    assert acc.calls == 1
    assert torch.equal(params[0].grad, torch.arange(6.0).view(3, 2) / 2)
    assert torch.equal(params[1].grad, torch.zeros(4))
    assert params[2].grad.dtype == torch.bfloat16 and torch.equal(params[2].grad.float(), torch.full((2, 2), 2.0))


def test_two_processes_finetune_share_one_store(pretrained, tmp_path):
    """Process 0 compresses the documents into the store first; the other finds them all there, and the
    epoch counts the examples of both processes (6 examples, batch 1 per process: 3 steps)."""
    from lloco_index.store import CompressedStore

    base, pre = pretrained
    qa = _write_qa(tmp_path / "qa.jsonl", [["the museum"], ["1897"], ["Miriam"], ["noon"], ["Oslo"], ["blue"]])
    out = tmp_path / "ft"
    _two_processes("finetune", {**TINY, "base_model": base.base_model, "corpus": base.corpus, "qa_file": str(qa),
                                "init_from": str(pre), "epochs": 1, "batch_size": 1, "max_steps": 100,
                                "out_dir": str(out)})
    state = json.loads((out / "training_state.json").read_text())
    assert state["processes"] == 2 and state["replicas_in_sync"] is True and state["step"] == 3
    assert CompressedStore(out / "store").stats()["chunks"] > 6
