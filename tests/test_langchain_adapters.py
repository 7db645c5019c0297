"""LangChain adapters on the tiny model: document bookkeeping, batching, streaming, async, standard suites."""

from __future__ import annotations

import asyncio

import pytest
from langchain_classic.retrievers import ContextualCompressionRetriever
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, FunctionMessage, HumanMessage, SystemMessage
from langchain_core.retrievers import BaseRetriever
from langchain_tests.unit_tests import ChatModelUnitTests, EmbeddingsUnitTests
from pydantic import ValidationError

from langchain_lloco import ChatLLoCO, LLoCODocumentCompressor, LLoCOIngestor, LLoCOLLM, LocalEmbeddings
from lloco_index.generation import PromptTooLongError

TEXTS = ["Biscuit the cat sleeps in the lens workshop.", "The museum opened in 1921 on the harbour.",
         "Miriam Okafor restored the great lens."]


def docs() -> list[Document]:
    return [Document(id=f"d{i}", page_content=t, metadata={"source": f"f{i}.txt"}) for i, t in enumerate(TEXTS)]


class FixedRetriever(BaseRetriever):
    documents: list[Document]

    def _get_relevant_documents(self, query: str, *, run_manager=None) -> list[Document]:
        return self.documents


def test_compressor_swaps_text_and_keeps_id_and_metadata(tiny_lloco):
    out = LLoCODocumentCompressor(lloco=tiny_lloco).compress_documents(docs(), "who?")
    for d, orig in zip(out, docs()):
        key = d.metadata["lloco_key"]
        assert d.id == orig.id and d.metadata["source"] == orig.metadata["source"]
        assert d.page_content == tiny_lloco.store.sentinel(key) and d.metadata["lloco_text"] == orig.page_content


def test_compressor_in_lcel_and_contextual_compression_retriever(tiny_lloco):
    comp = LLoCODocumentCompressor(lloco=tiny_lloco)
    retriever = FixedRetriever(documents=docs())
    piped = (retriever | comp).invoke("who?")
    wrapped = ContextualCompressionRetriever(base_compressor=comp, base_retriever=retriever).invoke("who?")
    assert [d.page_content for d in piped] == [d.page_content for d in wrapped]
    assert all(d.page_content.startswith("<lloco:") for d in piped)
    assert [d.page_content for d in asyncio.run((retriever | comp).ainvoke("who?"))] == [d.page_content for d in piped]
    assert comp.compress_documents(piped) == piped  # already swapped: unchanged


def test_ingestor_precompresses_so_queries_compress_nothing(tiny_lloco, monkeypatch):
    chunks = LLoCOIngestor(lloco=tiny_lloco).transform_documents(docs() + [Document(page_content=" ")])
    assert [d.page_content for d in chunks][:3] == TEXTS and tiny_lloco.store.stats()["chunks"] == 3
    monkeypatch.setattr(tiny_lloco.compressor, "compress", lambda *a, **k: pytest.fail("compressed at query time"))
    assert len(LLoCODocumentCompressor(lloco=tiny_lloco).compress_documents(chunks[:3])) == 3


def test_unknown_settings_are_rejected(tiny_lloco):
    with pytest.raises(ValidationError, match="max_token_count"):
        LLoCOLLM(lloco=tiny_lloco, max_token_count=5)


def test_too_long_is_refused_through_lcel(tiny_lloco):
    """Prompt positions + max_tokens beyond the 1024-position window: a clear error, no truncation."""
    chain = FixedRetriever(documents=docs()) | LLoCODocumentCompressor(lloco=tiny_lloco) \
        | (lambda found: " ".join(d.page_content for d in found)) | LLoCOLLM(lloco=tiny_lloco, max_tokens=1020)
    with pytest.raises(PromptTooLongError, match=r"\+ 1020 new tokens, but the decoder window is 1024"):
        chain.invoke("who?")


def test_llm_generate_is_batched_and_reports_positions(tiny_lloco, monkeypatch):
    sentinels = [d.page_content for d in LLoCODocumentCompressor(lloco=tiny_lloco).compress_documents(docs())]
    prompts = [f"Context: {s}\nQuestion: what?" for s in sentinels]
    sizes = []
    real = tiny_lloco.generator.generate
    monkeypatch.setattr(tiny_lloco.generator, "generate", lambda b, *a: sizes.append(len(b)) or real(b, *a))
    llm = LLoCOLLM(lloco=tiny_lloco, max_tokens=4, batch_size=2)
    result = llm.generate(prompts)
    assert sizes == [2, 1]
    infos = [g[0].generation_info for g in result.generations]
    assert all(i["context_vectors"] == 4 and i["prompt_tokens"] > 4 and len(i["chunks"]) == 1 for i in infos)
    assert result.llm_output["token_usage"]["prompt_tokens"] == sum(i["prompt_tokens"] for i in infos)
    assert llm.batch(prompts[:2]) == [g[0].text for g in result.generations[:2]]
    assert sizes[-1] == 2  # Runnable.batch -> one decoder pass


def test_llm_stream_and_async(tiny_lloco):
    llm = LLoCOLLM(lloco=tiny_lloco, max_tokens=10)
    prompt = "Question: where does the cat sleep?"
    chunks = list(llm.stream(prompt))
    assert len(chunks) > 1 and "".join(chunks).strip() == llm.invoke(prompt)

    async def run():
        return await llm.ainvoke(prompt), [c async for c in llm.astream(prompt)], await llm.abatch([prompt] * 2)

    text, achunks, batch = asyncio.run(run())
    assert text == llm.invoke(prompt) and achunks == chunks and batch == [text, text]


def test_chat_model_roles_usage_and_stream(tiny_lloco):
    (sentinel,) = [d.page_content for d in LLoCODocumentCompressor(lloco=tiny_lloco).compress_documents(docs()[:1])]
    chat = ChatLLoCO(lloco=tiny_lloco, max_tokens=6)
    msgs = [SystemMessage(f"Context: {sentinel}"), HumanMessage("Who?"), AIMessage("A cat."), HumanMessage("Where?")]
    msg = chat.invoke(msgs)
    assert msg.usage_metadata["input_tokens"] > 4 and msg.usage_metadata["output_tokens"] <= 6
    assert msg.response_metadata["context_vectors"] == 4
    assert "".join(c.content for c in chat.stream(msgs)).strip() == msg.content
    assert asyncio.run(chat.ainvoke(msgs)).content == msg.content
    with pytest.raises(ValueError, match="cannot take 'function' messages"):
        chat.invoke([FunctionMessage(name="f", content="x")])


class TestChatLLoCOStandard(ChatModelUnitTests):
    """langchain-tests' standard unit suite. Tool calling and structured output are skipped by the suite
    itself (has_tool_calling is False: the decoder was not trained for tool calls); serialization is skipped
    (is_lc_serializable is False: the model object is not JSON)."""

    @pytest.fixture(autouse=True)
    def _tiny(self, session_tiny_lloco):
        type(self).lloco = session_tiny_lloco

    @property
    def chat_model_class(self) -> type[ChatLLoCO]:
        return ChatLLoCO

    @property
    def chat_model_params(self) -> dict:
        return {"lloco": self.lloco}

    @property
    def standard_chat_model_params(self) -> dict:
        """A local model has no API key, timeout or retries: those standard params would be rejected
        (``extra="forbid"`` catches misspelled settings), so only temperature, max_tokens and stop are sent."""
        return {"temperature": 0, "max_tokens": 100, "stop": []}


class TestLocalEmbeddingsStandard(EmbeddingsUnitTests):
    @property
    def embeddings_class(self) -> type[LocalEmbeddings]:
        return LocalEmbeddings


def test_compressor_expand_keeps_the_first_documents_as_text(tiny_lloco):
    out = LLoCODocumentCompressor(lloco=tiny_lloco, expand=1).compress_documents(docs(), "who?")
    assert out[-1] == docs()[0]  # the retriever's best stays as it was, moved nearest the question
    assert all(d.page_content == tiny_lloco.store.sentinel(d.metadata["lloco_key"]) for d in out[:-1])
    assert [d.id for d in out] == ["d1", "d2", "d0"]
    tiny_lloco.expand_at = "in_place"
    out = LLoCODocumentCompressor(lloco=tiny_lloco, expand=1).compress_documents(docs(), "who?")
    assert [d.id for d in out] == ["d0", "d1", "d2"] and out[0] == docs()[0]
    with pytest.raises(ValidationError):
        LLoCODocumentCompressor(lloco=tiny_lloco, expand=-1)
