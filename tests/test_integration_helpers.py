"""Framework-free helpers behind the adapters (lloco_index.integration) and the chat/batch core paths."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from lloco_index.generation import GenerationConfig
from lloco_index.integration import (aiter_locked, compress_to_sentinels, default_embedding_path, embed_texts,
                                     run_locked, shared_lloco)

CFG = GenerationConfig(max_new_tokens=6)


def test_compress_to_sentinels_skips_blank_and_reuses_cache(tiny_lloco, monkeypatch):
    refs = compress_to_sentinels(tiny_lloco, ["The cat sleeps.", None, "  ", "The lens is old."])
    assert refs[1] is None and refs[2] is None
    assert [r[1] for r in (refs[0], refs[3])] == [tiny_lloco.store.sentinel(r[0]) for r in (refs[0], refs[3])]
    calls = []
    monkeypatch.setattr(tiny_lloco.compressor, "compress", lambda *a, **k: calls.append(a) or [])
    assert compress_to_sentinels(tiny_lloco, ["The lens is old."]) == [refs[3]]
    assert calls == []  # cached: nothing compressed again


def test_chat_messages_put_vectors_in_any_turn(tiny_lloco):
    key, sentinel = compress_to_sentinels(tiny_lloco, ["Biscuit the cat sleeps in the lens workshop."])[0]
    msgs = [("system", f"Context: {sentinel}"), ("user", "Who sleeps there?")]
    ans = tiny_lloco.complete(msgs, CFG)
    assert ans.chunks == [key] and ans.context_vectors == 4
    pieces, keys = tiny_lloco._prompt_pieces(msgs)
    text = "".join(p for p in pieces if isinstance(p, str))
    assert keys == [key] and text.startswith("<|im_start|>system\nContext: ") and "<|im_start|>user" in text
    assert text.endswith("<|im_start|>assistant\n") and tiny_lloco.system_prompt not in text
    default_sys = "".join(p for p in tiny_lloco._prompt_pieces([("user", "hi")])[0] if isinstance(p, str))
    assert tiny_lloco.system_prompt in default_sys  # added only when no system message is given


def test_complete_batch_is_one_pass_and_matches_single(tiny_lloco, monkeypatch):
    (_, s1), (_, s2) = compress_to_sentinels(tiny_lloco, ["The cat is Biscuit.", "The museum opened in 1921."])
    prompts = [f"Context: {s1}\nName?", f"Context: {s2}\nWhen?"]
    singles = [tiny_lloco.complete(p, CFG).answer for p in prompts]
    calls = []
    real = tiny_lloco.generator.generate
    monkeypatch.setattr(tiny_lloco.generator, "generate", lambda b, *a: calls.append(len(b)) or real(b, *a))
    batch = tiny_lloco.complete_batch(prompts, CFG)
    assert calls == [2] and [a.answer for a in batch] == singles
    assert all(a.context_vectors == 4 and a.new_tokens <= 6 and a.finish_reason for a in batch)


async def test_run_locked_keeps_event_loop_free(tiny_lloco):
    lock = tiny_lloco.backbone.lock
    held, release = threading.Event(), threading.Event()

    def hold():  # another request owns the model
        with lock:
            held.set()
            release.wait(10)

    threading.Thread(target=hold).start()
    held.wait(10)
    task = asyncio.ensure_future(run_locked(lock, tiny_lloco.complete, "Hello", CFG))
    await asyncio.sleep(0.05)  # the loop runs while the call waits for the lock
    assert not task.done()
    release.set()
    assert isinstance((await task).answer, str)


async def test_aiter_locked_streams_items_and_errors():
    lock = threading.RLock()
    assert [x async for x in aiter_locked(lock, lambda: iter(range(5)))] == [0, 1, 2, 3, 4]

    def boom():
        yield 1
        raise ValueError("bad step")

    got = []
    with pytest.raises(ValueError, match="bad step"):
        async for x in aiter_locked(lock, boom):
            got.append(x)
    assert got == [1]


def test_shared_lloco_needs_a_store():
    with pytest.raises(ValueError, match="no store given: pass store=DIR"):
        shared_lloco("smollm2-135m")


def test_default_embeddings_are_local_and_normalised():
    assert (default_embedding_path() / "model.safetensors").is_file()
    a, b, c = torch.tensor(embed_texts(["The cat sleeps.", "A cat is sleeping.", "Tax law of 1921."]))
    assert a.shape == (384,) and torch.allclose(a.norm(), torch.tensor(1.0), atol=1e-4)
    assert a @ b > a @ c  # a real sentence model, not a hash
