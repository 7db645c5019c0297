"""Compressor, store and generator on the tiny random LLaMA."""

from __future__ import annotations

import torch
import pytest

from lloco_index.backbone import UnknownAdapterError
from lloco_index.cli import SAMPLES
from lloco_index.compressor import CompressorConfig, ContextCompressor
from lloco_index.generation import GenerationConfig, PromptTooLongError
from lloco_index.pipeline import LLoCO
from lloco_index.prompts import qa_pieces
from lloco_index.store import CompressedStore, StoreError

TEXT = " ".join(f"Room {i} of the lighthouse holds {i * 7} lenses." for i in range(30))


def test_compress_shapes_and_segments(tiny_lloco):
    comp = tiny_lloco.compressor
    n_seg = len(comp.segments(TEXT))
    assert n_seg > 1
    v = comp.compress(TEXT)
    assert v.shape == (n_seg * 4, tiny_lloco.backbone.hidden_size)
    assert v.dtype == torch.float16


def test_compress_is_deterministic_and_batch_invariant(tiny_lloco):
    comp = tiny_lloco.compressor
    alone = comp.compress("Biscuit the cat sleeps in the lens workshop.")
    batched = comp.compress(["short", "Biscuit the cat sleeps in the lens workshop.", TEXT], batch_size=3)
    torch.testing.assert_close(batched[1], alone, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(comp.compress("short"), batched[0], atol=1e-3, rtol=1e-3)


def test_summary_vectors_are_final_normed_hidden_states(tiny_lloco):
    """Reference computation: run the full causal LM with hidden states and take the last K rows."""
    comp, bb = tiny_lloco.compressor, tiny_lloco.backbone
    ids = comp.segments("Miriam Okafor founded the museum.")[0]
    embeds = torch.cat([bb.embed(torch.tensor(ids)), comp.summary.detach()]).unsqueeze(0)
    with torch.no_grad():
        ref = bb.model(inputs_embeds=embeds, output_hidden_states=True).hidden_states[-1][0, -4:]
    torch.testing.assert_close(comp.encode_segments([ids])[0], ref, atol=1e-5, rtol=1e-5)


def test_save_load_roundtrip_keeps_fingerprint(tiny_lloco, tmp_path):
    comp = tiny_lloco.compressor
    comp.save_pretrained(tmp_path / "c")
    again = ContextCompressor.from_pretrained(tiny_lloco.backbone, tmp_path / "c")
    assert again.fingerprint() == comp.fingerprint()
    torch.testing.assert_close(again.compress(TEXT), comp.compress(TEXT))
    again.summary.data += 1
    again._fingerprint = None
    assert again.fingerprint() != comp.fingerprint()


def test_proportional_vectors_trim_short_segments_exactly(tiny_lloco):
    """A short segment keeps ceil(len / ratio) vectors, and they are the first rows of its fixed-count vectors."""
    comp = tiny_lloco.compressor  # 32 tokens -> 4 vectors
    prop = ContextCompressor(tiny_lloco.backbone, CompressorConfig(**{**vars(comp.config), "proportional_vectors": True}),
                             comp.summary.detach())
    assert [prop.config.vectors_for(n) for n in (1, 8, 9, 31, 32)] == [1, 1, 2, 4, 4]
    assert comp.config.vectors_for(1) == 4
    text = TEXT.rsplit(" Room", 1)[0]  # 29 sentences: the last segment has 8 tokens
    lengths = [len(s) for s in comp.segments(text)]
    assert lengths[-1] <= 8, "the text must end in a short segment"
    for accumulate in (False, True):
        fixed, trimmed = comp.compress(text, accumulate=accumulate), prop.compress(text, accumulate=accumulate)
        assert trimmed.shape[0] == 4 * (len(lengths) - 1) + prop.config.vectors_for(lengths[-1]) < fixed.shape[0]
        torch.testing.assert_close(trimmed, fixed[:trimmed.shape[0]], atol=1e-3, rtol=1e-3)
    assert prop.fingerprint() != comp.fingerprint()  # a store of full-count vectors is not served trimmed ones
    with pytest.raises(ValueError, match="proportional_vectors"):
        CompressorConfig(**{**vars(comp.config), "proportional_vectors": "yes"})


def test_store_rejects_other_compressor(tiny_lloco):
    with pytest.raises(StoreError, match="made by another compressor"):
        CompressedStore(tiny_lloco.store.path, fingerprint="0" * 32)


def test_ingest_twice_adds_nothing(tiny_lloco, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT)
    first = tiny_lloco.ingest([doc])
    assert first.new_chunks == first.chunks > 1
    second = tiny_lloco.ingest([doc])
    assert second.new_chunks == 0 and second.chunks == first.chunks


def test_forged_sentinel_is_plain_text(tiny_lloco):
    store = tiny_lloco.store
    keys = tiny_lloco.compress_texts(["alpha beta", "gamma delta"])
    real = store.sentinel(keys[0])
    forged = f"<lloco:{keys[1]}:{'0' * 16}>"
    pieces, used = tiny_lloco.resolve(f"A {real} B {forged} C")
    assert used == [keys[0]]
    assert sum(isinstance(p, torch.Tensor) for p in pieces) == 1
    assert any(forged in p for p in pieces if isinstance(p, str))


def test_decoder_receives_vectors_not_text(tiny_lloco):
    keys = tiny_lloco.compress_texts([TEXT[:120]])
    ans = tiny_lloco._answer_keys("How many steps?", keys, GenerationConfig(max_new_tokens=2), None)
    pieces = tiny_lloco._pieces("How many steps?", keys)
    text_only = sum(tiny_lloco.generator.count_positions([p]) for p in pieces if isinstance(p, str))
    n_vec = 4 * len(tiny_lloco.compressor.segments(TEXT[:120]))
    assert ans.context_vectors == n_vec
    assert ans.prompt_tokens == text_only + n_vec
    assert ans.source_tokens == len(tiny_lloco.backbone.tokenizer(TEXT[:120])["input_ids"])


def test_vectors_are_spliced_in_order(tiny_lloco):
    gen = tiny_lloco.generator
    a, b = torch.zeros(3, tiny_lloco.backbone.hidden_size), torch.ones(2, tiny_lloco.backbone.hidden_size)
    pieces = gen.chat_pieces(qa_pieces([a, b], "Q?"))
    tensors = [p for p in pieces if isinstance(p, torch.Tensor)]
    assert [t.shape[0] for t in tensors] == [3, 2]
    emb = gen.embed_pieces(pieces)
    assert emb.shape[0] == gen.count_positions(pieces)


def test_generate_stream_and_batch_agree(tiny_lloco):
    gen = tiny_lloco.generator
    cfg = GenerationConfig(max_new_tokens=8)
    p1 = gen.chat_pieces(qa_pieces(["The cat is Biscuit."], "Name?"))
    p2 = gen.chat_pieces(qa_pieces([], "Where is the museum located today?"))
    single = gen.generate([p1], cfg)[0]
    batch = gen.generate([p1, p2], cfg)
    assert batch[0].text == single.text
    assert "".join(gen.stream(p1, cfg)) == single.text
    assert single.new_tokens <= 8 and single.finish_reason in ("stop", "length")


def test_score_is_the_answer_log_probability_row_by_row(tiny_lloco):
    """Batched, left-padded scores equal a plain unpadded forward pass over each prompt + answer + end token."""
    from lloco_index.generation import end_of_answer_id

    bb, gen = tiny_lloco.backbone, tiny_lloco.generator
    torch.manual_seed(0)
    prompts = [gen.chat_pieces(qa_pieces([torch.randn(3, bb.hidden_size)], "Name?")),
               gen.chat_pieces(qa_pieces(["The cat is Biscuit, a very old cat."], "What is the cat called?"))]
    options = [["Biscuit", "an old grey cat", ""], ["Tom"]]
    scores = gen.score(prompts, options)
    assert [len(s) for s in scores] == [3, 1]
    for pieces, opts, got in zip(prompts, options, scores):
        for answer, value in zip(opts, got):
            ids = bb.tokenizer(answer, add_special_tokens=False)["input_ids"] + [end_of_answer_id(bb.tokenizer)]
            x = torch.cat([gen.embed_pieces(pieces), bb.embed(torch.tensor(ids))])[None]
            with torch.no_grad():
                logp = torch.log_softmax(bb.model(inputs_embeds=x).logits[0, -len(ids) - 1:-1].float(), -1)
            assert value == pytest.approx(logp[torch.arange(len(ids)), ids].sum().item(), abs=1e-3)
    assert gen.score(prompts[:1], options[:1])[0] == pytest.approx(scores[0], abs=1e-3)  # unpadded alone
    with pytest.raises(ValueError, match="one list of options per prompt"):
        gen.score(prompts, options[:1])


def test_choose_ranks_the_options_by_likelihood(tiny_lloco):
    with pytest.raises(StoreError, match="empty"):  # no documents given: retrieval from the (empty) store
        tiny_lloco.choose("What is the museum cat called?", ["Biscuit", "Rex"])
    docs = ["The museum cat is called Biscuit. It sleeps by the lighthouse lamp."]
    a = tiny_lloco.choose("What is the museum cat called?", ["Biscuit", "Rex", "Tom"], docs)
    assert a.finish_reason == "choice" and len(a.choice_scores) == 3 and a.context_vectors > 0
    assert a.answer == ["Biscuit", "Rex", "Tom"][a.choice_scores.index(max(a.choice_scores))]
    assert a.choice_scores == pytest.approx(
        tiny_lloco.generator.score([tiny_lloco._pieces("What is the museum cat called?", a.chunks)],
                                   [["Biscuit", "Rex", "Tom"]], tiny_lloco.adapter)[0], abs=1e-4)
    with pytest.raises(ValueError, match="at least two non-empty choices"):
        tiny_lloco.choose("Q?", ["only one"], docs)
    tiny_lloco.ingest([SAMPLES / "lighthouse_museum.txt"])
    r = tiny_lloco.choose("What is the museum cat called?", ["Biscuit", "Rex"], top_k=2, expand=1)
    ranked = [k for k, _ in tiny_lloco.retrieve("What is the museum cat called?", 2)]
    assert sorted(r.chunks) == sorted(ranked) and r.chunks[-1] == ranked[0]  # the best one as text, last
    assert len(ranked) == 2 and r.context_vectors > 0
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        tiny_lloco.choose("Q?", ["a", "b"], top_k=0)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        tiny_lloco.choose("Q?", ["a", "b"], docs, top_k=0)


def test_cli_answer_and_ask_with_choices(tiny_model_dir, tmp_path, capsys):
    """``--choices`` prints the most likely option and every option's score; what does not combine is refused."""
    import json

    from lloco_index.cli import main

    doc, store = tmp_path / "doc.txt", tmp_path / "store"
    doc.write_text("The museum cat is called Biscuit. It sleeps by the lighthouse lamp.")
    base = ["--model", str(tiny_model_dir), "--device", "cpu"]
    options = ["Biscuit", "Rex", "Tom"]
    assert main(["answer", "What is the cat called?", "--context", str(doc), "--choices", *options, *base,
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["finish_reason"] == "choice" and out["answer"] == options[out["choice_scores"].index(max(out["choice_scores"]))]
    assert main(["ingest", str(doc), "--store", str(store), *base]) == 0
    capsys.readouterr()
    assert main(["ask", "What is the cat called?", "--store", str(store), "--top-k", "2", "--choices", *options,
                 *base]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] in options and [line.split()[-1] for line in lines[1:4]] == options
    assert main(["ask", "Q?", "--store", str(store), "--choices", "a", "b", "--stream", *base]) == 2
    assert main(["answer", "Q?", "--context", str(doc), "--choices", "a", "b", "--accumulate", *base]) == 2
    assert "does not take --accumulate" in capsys.readouterr().err


def test_sampling_is_seeded(tiny_lloco):
    gen = tiny_lloco.generator
    p = gen.chat_pieces(qa_pieces([], "Tell me about the museum."))
    cfg = GenerationConfig(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    assert gen.generate([p], cfg)[0].text == gen.generate([p], cfg)[0].text


def test_prompt_too_long_is_refused(tiny_lloco):
    gen = tiny_lloco.generator
    huge = torch.zeros(2000, tiny_lloco.backbone.hidden_size)
    with pytest.raises(PromptTooLongError, match="decoder window is 1024"):
        gen.generate([gen.chat_pieces(qa_pieces([huge], "Q?"))])


def test_unknown_adapter(tiny_lloco):
    with pytest.raises(UnknownAdapterError, match="unknown adapter 'nope'"):
        tiny_lloco.ask("steps?", adapter="nope") if tiny_lloco.store.chunks() else tiny_lloco.answer("q", ["x y"], adapter="nope")


def test_mixed_adapter_batch_matches_single_runs(tiny_lloco, tmp_path):
    from peft import LoraConfig

    bb, gen = tiny_lloco.backbone, tiny_lloco.generator
    for name, seed in (("alpha", 1), ("beta", 2)):
        torch.manual_seed(seed)
        bb.add_adapter(name, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    bb.model.eval()
    cfg = GenerationConfig(max_new_tokens=6)
    p = gen.chat_pieces(qa_pieces(["The cat is Biscuit."], "Name?"))
    singles = [gen.generate([p], cfg, name)[0].text for name in ("alpha", "beta", None)]
    mixed = [g.text for g in gen.generate([p, p, p], cfg, ["alpha", "beta", None])]
    assert mixed == singles
    assert len(set(singles)) > 1  # the adapters really change the output


def test_answer_top_k_keeps_the_relevant_chunks_in_document_order(tiny_lloco):
    para = [f"Paragraph {i} talks about gardening and weather in plain words." for i in range(24)]
    doc = " ".join(para[:12] + ["The lighthouse keeper's cat is called Biscuit."] + para[12:])
    cfg = GenerationConfig(max_new_tokens=2)
    whole = tiny_lloco.answer("What is the lighthouse keeper's cat called?", [doc], config=cfg)
    picked = tiny_lloco.answer("What is the lighthouse keeper's cat called?", [doc], config=cfg, top_k=2)
    assert len(whole.chunks) > 2 and len(picked.chunks) == 2
    assert picked.prompt_tokens < whole.prompt_tokens
    assert any("Biscuit" in c.text for c in tiny_lloco.store.chunks(picked.chunks))
    assert [whole.chunks.index(k) for k in picked.chunks] == sorted(whole.chunks.index(k) for k in picked.chunks)
    with pytest.raises(ValueError, match="top_k"):
        tiny_lloco.answer("q?", [doc], top_k=0)
    with pytest.raises(ValueError, match="accumulate"):
        tiny_lloco.answer("q?", [doc], top_k=2, accumulate=True)


def test_expanded_chunk_goes_last_or_in_place(tiny_lloco):
    para = [f"Paragraph {i} talks about gardening and weather in plain words." for i in range(24)]
    doc = " ".join(para[:6] + ["The lighthouse keeper's cat is called Biscuit."] + para[6:])
    q, cfg = "What is the lighthouse keeper's cat called?", GenerationConfig(max_new_tokens=2)
    end = tiny_lloco.answer(q, [doc], config=cfg, expand=1)
    text = [c.text for c in tiny_lloco.store.chunks([end.chunks[-1]])][0]
    assert "Biscuit" in text  # the re-expanded chunk comes last, just before the question
    tiny_lloco.expand_at = "in_place"
    kept = tiny_lloco.answer(q, [doc], config=cfg, expand=1)
    assert kept.chunks == tiny_lloco.answer(q, [doc], config=cfg).chunks  # document order, as without expand
    assert sorted(kept.chunks) == sorted(end.chunks) and kept.chunks != end.chunks
    assert kept.prompt_tokens == end.prompt_tokens and kept.context_vectors == end.context_vectors
    with pytest.raises(ValueError, match="expand_at"):
        LLoCO(tiny_lloco.backbone, tiny_lloco.compressor, expand_at="middle")


def test_fingerprint_is_the_same_in_fp32_and_bf16(tiny_lloco):
    """A store ingested on a GPU (bf16) must serve the same compressor on a CPU (fp32)."""
    comp = tiny_lloco.compressor
    fp32 = comp.fingerprint()
    tiny_lloco.backbone.model.to(torch.bfloat16)
    comp.summary.data = comp.summary.data.to(torch.bfloat16)
    comp._fingerprint = None
    assert comp.fingerprint() == fp32
    comp.summary.data += 0.5  # a real change still shows
    comp._fingerprint = None
    assert comp.fingerprint() != fp32


def test_vector_norm_rescales_every_vector(tiny_lloco, tmp_path):
    comp = tiny_lloco.compressor
    plain = comp.compress("The museum opened in 1921 on the harbour. Biscuit the cat sleeps there.")
    scaled_cfg = CompressorConfig(**{**vars(comp.config), "vector_norm": 3.0})
    scaled = ContextCompressor(tiny_lloco.backbone, scaled_cfg, comp.summary.detach())
    vecs = scaled.compress("The museum opened in 1921 on the harbour. Biscuit the cat sleeps there.")
    assert torch.allclose(vecs.float().norm(dim=-1), torch.full((vecs.shape[0],), 3.0), atol=1e-3)
    assert torch.allclose(vecs.float() / 3.0, plain.float() / plain.float().norm(dim=-1, keepdim=True), atol=1e-3)
    assert scaled.fingerprint() != comp.fingerprint()  # a store of plain vectors is not served rescaled ones
    scaled.save_pretrained(tmp_path / "c")
    assert CompressorConfig.from_json(tmp_path / "c" / "compressor_config.json").vector_norm == 3.0
    for bad in (0, -1.0, "3", True):
        with pytest.raises(ValueError, match="vector_norm"):
            CompressorConfig(**{**vars(comp.config), "vector_norm": bad})


def test_dtype_names_resolve_and_bad_ones_are_refused():
    from lloco_index.models import resolve_dtype

    assert resolve_dtype("bf16") is resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("float32") is torch.float32 and resolve_dtype(None) is None
    assert resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="use one of"):
        resolve_dtype("int8")
