"""Property-based tests (hypothesis): chunker, key scheme, prompt builder, sentinel parser."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lloco_index.chunking import chunk_text
from lloco_index.generation import Generator
from lloco_index.prompts import qa_pieces
from lloco_index.store import CompressedStore, KeyRef, chunk_key, escape_sentinels

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# pieces that stress tokenizers and boundaries: combining marks, ZWJ emoji, RTL, CJK, CRLF, BOM, separators
EDGE = ["a", "b", " ", "  ", ".", "!", "?", "\n", "\n\n", "\r\n", "\t", "é", "e\u0301", "😀", "👩\u200d👩\u200d👧",
        "日本語", "مرحبا", "\u200b", "\ufeff", "\u2028", "\x01", "word ", "Sentence one. ", "<lloco:", ":"]
texts = st.one_of(st.lists(st.sampled_from(EDGE), max_size=200).map("".join), st.text(max_size=300))


@pytest.fixture(scope="module")
def tokenizer(tiny_backbone):
    return tiny_backbone.tokenizer


@SETTINGS
@given(text=texts, segment=st.integers(4, 48), window=st.sampled_from([7, 64, 1 << 20]))
def test_chunks_cover_text_exactly_and_fit_segment(tokenizer, text, segment, window):
    chunks = chunk_text(text, tokenizer, segment, window_chars=window)
    assert "".join(c.text for c in chunks) == text
    pos = 0
    for c in chunks:
        assert c.text and c.start_char == pos
        assert c.n_tokens == len(tokenizer(c.text, add_special_tokens=False)["input_ids"]) <= segment
        pos += len(c.text)


@SETTINGS
@given(text=st.text(min_size=1, max_size=300), segment=st.integers(4, 48))
def test_window_size_only_matters_at_window_edges(tokenizer, text, segment):
    """A window larger than the text changes nothing: same chunks as one big window."""
    assert chunk_text(text, tokenizer, segment, window_chars=len(text)) == chunk_text(text, tokenizer, segment)


def test_lone_surrogate_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="unpaired surrogate"):
        chunk_text("ok \ud800 not ok", tokenizer, 32)


fingerprints = st.text("0123456789abcdef", min_size=32, max_size=32)


@SETTINGS
@given(fp=fingerprints, a=st.text(), b=st.text())
def test_key_scheme(fp, a, b):
    key = chunk_key(fp, a)
    assert re.fullmatch(r"[0-9a-f]{32}", key) and key == chunk_key(fp, a)
    assert (chunk_key(fp, b) == key) == (a == b)  # content address: equal iff same text
    other = "0" * 32 if fp != "0" * 32 else "1" * 32
    assert chunk_key(other, a) != key  # another compressor never shares keys


@given(text=st.text(st.characters(categories=["Cs"]), min_size=1, max_size=5))
def test_key_scheme_accepts_any_python_string(text):
    assert len(chunk_key("0" * 32, text)) == 32


pieces = st.lists(st.one_of(st.text(max_size=20), st.integers(1, 5)), max_size=8)


@SETTINGS
@given(contexts=pieces, question=st.text(max_size=30), system=st.one_of(st.none(), st.text(max_size=20)))
def test_prompt_builder_keeps_vectors_in_order(tiny_backbone, contexts, question, system):
    """Vectors come out as the very same tensors, in the same order; text around them is kept."""
    gen = Generator(tiny_backbone)
    hidden = tiny_backbone.hidden_size
    ctx = [torch.full((c, hidden), float(i)) if isinstance(c, int) else c for i, c in enumerate(contexts)]
    tensors = [c for c in ctx if isinstance(c, torch.Tensor)]
    built = gen.chat_pieces(qa_pieces(ctx, question), system=system)
    out = [p for p in built if isinstance(p, torch.Tensor)]
    assert len(out) == len(tensors) and all(a is b for a, b in zip(out, tensors))
    assert all(p != "" for p in built if isinstance(p, str))
    text = "".join(p for p in built if isinstance(p, str))
    assert f"Question: {question.strip()}" in text
    assert all(c in text for c in ctx if isinstance(c, str))
    assert gen.embed_pieces(built).shape[0] == gen.count_positions(built)


@pytest.fixture(scope="module")
def sentinel_store(tmp_path_factory):
    store = CompressedStore(tmp_path_factory.mktemp("sent") / "s", fingerprint="a" * 32, create=True)
    store.put_many([(store.key_for(t), torch.zeros(2, 4), t, 1) for t in ("one", "two", "three")])
    return store


@SETTINGS
@given(data=st.data())
def test_sentinel_parser(sentinel_store, data):
    """Valid sentinels become KeyRefs in order; forged, unknown or partial ones stay text; nothing is lost."""
    store = sentinel_store
    keys = [store.key_for(t) for t in ("one", "two", "three")]
    unknown = store.key_for("never stored")
    parts = data.draw(st.lists(st.one_of(
        st.text(max_size=15).map(lambda t: ("text", t)),
        st.sampled_from(keys).map(lambda k: ("valid", k)),
        st.sampled_from(keys).map(lambda k: ("forged", k)),
        st.just(("unknown", unknown)),
        st.sampled_from(keys).map(lambda k: ("partial", k)),
    ), max_size=10))
    prompt, expected = "", []
    for kind, v in parts:
        if kind == "valid":
            prompt += store.sentinel(v)
            expected.append(v)
        elif kind == "forged":
            prompt += f"<lloco:{v}:{'0123456789abcdef'}>"
        elif kind == "unknown":
            prompt += store.sentinel(v)
        elif kind == "partial":  # the separator before the tag dropped: no neighbour can complete it
            sentinel = store.sentinel(v)
            prompt += sentinel[:39] + sentinel[40:]
        else:
            prompt += v
    out = store.split_sentinels(prompt)
    assert [p.key for p in out if isinstance(p, KeyRef)] == expected
    assert "".join(store.sentinel(p.key) if isinstance(p, KeyRef) else p for p in out) == prompt
    assert all(p != "" for p in out)


@SETTINGS
@given(before=st.text(max_size=20), after=st.text(max_size=20), key_i=st.integers(0, 2))
def test_escaped_text_never_loads_vectors(sentinel_store, before, after, key_i):
    """A real sentinel copied into a document or question is inert once escaped."""
    store = sentinel_store
    text = before + store.sentinel(store.key_for(("one", "two", "three")[key_i])) + after
    safe = escape_sentinels(text)
    assert "<lloco:" not in safe and escape_sentinels(safe) == safe
    assert store.split_sentinels(safe) == ([safe] if safe else [])
