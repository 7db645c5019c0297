"""End to end on a real VectorStoreIndex (local MiniLM embeddings) with the real default model (SmolLM2-135M).

The untrained default compressor gives poor answers: these tests check what the decoder receives
(vectors, not chunk text) in every response mode, streaming, async and chat, never answer quality.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from llama_index.core import SimpleDirectoryReader, VectorStoreIndex
from llama_index.core.node_parser import SentenceSplitter
from llama_index.embeddings.lloco import default_embed_model
from llama_index.llms.lloco import LLoCOLLM
from llama_index.postprocessor.lloco import LLoCOPostprocessor, restore_text

SAMPLES = Path(__file__).parent.parent / "lloco_index" / "samples"
QUESTION = "Who founded the lighthouse museum?"


@pytest.fixture(scope="module")
def rag(rag_lloco):
    docs = SimpleDirectoryReader(str(SAMPLES)).load_data()
    index = VectorStoreIndex.from_documents(docs, embed_model=default_embed_model(),
                                            transformations=[SentenceSplitter(chunk_size=200, chunk_overlap=0)])
    return index, LLoCOLLM(lloco=rag_lloco, max_new_tokens=8), LLoCOPostprocessor(lloco=rag_lloco)


def engine(rag, **kw):
    index, llm, pp = rag
    return index.as_query_engine(llm=llm, node_postprocessors=[pp], similarity_top_k=2, **kw)


def check_vectors(raw: dict, store) -> None:
    """The decoder read the chunks as vectors: positions = prompt text + vectors, far fewer than the chunk text."""
    n_vec = sum(c.n_vectors for c in store.chunks(raw["chunks"]))
    assert raw["chunks"] and raw["context_vectors"] == n_vec
    assert raw["source_tokens"] > 2 * n_vec  # what the vectors stand for (200-token chunks -> 24 vectors each)
    assert raw["prompt_tokens"] > n_vec


# calls per mode with 2 retrieved chunks: (number of LLM calls, chunks per call)
MODES = {"compact": (1, 2), "simple_summarize": (1, 2), "tree_summarize": (1, 2), "refine": (2, 1),
         "accumulate": (2, 1)}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_response_mode_sends_vectors(rag, rag_lloco, llm_calls, mode):
    response = engine(rag, response_mode=mode).query(QUESTION)
    n_calls, per_call = MODES[mode]
    keys = [n.node.metadata["lloco_key"] for n in response.source_nodes]
    assert isinstance(response.response, str) and response.response
    assert len(llm_calls) == n_calls and all(len(r["chunks"]) == per_call for r in llm_calls)
    assert sorted(k for r in llm_calls for k in r["chunks"]) == sorted(keys)
    for raw in llm_calls:
        check_vectors(raw, rag_lloco.store)
    originals = restore_text(response.source_nodes)
    assert all(n.node.text.strip() and "<lloco:" not in n.node.text for n in originals)
    assert [n.node_id for n in originals] == [n.node_id for n in response.source_nodes]


def test_streaming_query_yields_token_deltas(rag):
    response = engine(rag, streaming=True).query(QUESTION)
    deltas = list(response.response_gen)
    assert len(deltas) > 1 and all(isinstance(d, str) for d in deltas)
    assert len(response.source_nodes) == 2


def test_async_query_and_async_streaming(rag, rag_lloco, llm_calls):
    async def run():
        answer = await engine(rag).aquery(QUESTION)
        streamed = await engine(rag, streaming=True).aquery(QUESTION)
        return answer, [d async for d in streamed.async_response_gen()]

    answer, deltas = asyncio.run(run())
    assert answer.response and len(deltas) > 1
    check_vectors(llm_calls[0], rag_lloco.store)


def test_context_chat_engine(rag, rag_lloco, llm_calls):
    index, llm, pp = rag
    chat = index.as_chat_engine(chat_mode="context", llm=llm, node_postprocessors=[pp], similarity_top_k=2)
    first = chat.chat(QUESTION)
    assert first.response and len(llm_calls) == 1
    check_vectors(llm_calls[0], rag_lloco.store)
    assert len(llm_calls[0]["chunks"]) == 2  # the context sits in the system turn, as vectors
    deltas = list(chat.stream_chat("When was it founded?").response_gen)
    assert len(deltas) > 1
