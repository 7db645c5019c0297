"""LCEL chains over a real vector store (local MiniLM) with the real default model (SmolLM2-135M).

Checks what the decoder reads (vectors in place of the retrieved chunks), never answer quality.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate, PromptTemplate
from langchain_core.runnables import RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_text_splitters import RecursiveCharacterTextSplitter

from langchain_lloco import ChatLLoCO, LLoCODocumentCompressor, LLoCOIngestor, LLoCOLLM, default_embeddings

SAMPLES = Path(__file__).parent.parent / "lloco_index" / "samples"
QUESTIONS = ["Who founded the lighthouse museum?", "What is the museum cat called?"]


class DecoderInputs(BaseCallbackHandler):
    """Records generation_info of every LLM call (positions, vectors, chunk keys)."""

    def __init__(self) -> None:
        self.infos: list[dict] = []

    def on_llm_end(self, response, **kwargs) -> None:
        self.infos += [g.generation_info for gens in response.generations for g in gens]


@pytest.fixture(scope="module")
def retriever(rag_lloco):
    docs = [Document(page_content=p.read_text(), metadata={"source": p.name}) for p in sorted(SAMPLES.glob("*.txt"))]
    chunks = RecursiveCharacterTextSplitter(chunk_size=800, chunk_overlap=0).split_documents(docs)
    chunks = LLoCOIngestor(lloco=rag_lloco).transform_documents(chunks)  # offline: compressed before any query
    return InMemoryVectorStore.from_documents(chunks, default_embeddings()).as_retriever(search_kwargs={"k": 2})


def join(docs: list[Document]) -> str:
    return "\n\n".join(d.page_content for d in docs)


def context(retriever, lloco):
    return {"context": retriever | LLoCODocumentCompressor(lloco=lloco) | join, "question": RunnablePassthrough()}


def test_lcel_chain_invoke_batch_stream_async(retriever, rag_lloco):
    prompt = PromptTemplate.from_template("Context:\n{context}\n\nQuestion: {question}")
    chain = context(retriever, rag_lloco) | prompt | LLoCOLLM(lloco=rag_lloco, max_tokens=8) | StrOutputParser()
    seen = DecoderInputs()
    answer = chain.invoke(QUESTIONS[0], config={"callbacks": [seen]})
    assert isinstance(answer, str) and answer
    info = seen.infos[0]
    n_vec = sum(c.n_vectors for c in rag_lloco.store.chunks(info["chunks"]))
    assert len(info["chunks"]) == 2 and info["context_vectors"] == n_vec
    assert info["source_tokens"] > 3 * n_vec  # ~200-token chunks read as 24 vectors each

    batch = chain.batch(QUESTIONS, config={"callbacks": [seen]})
    assert len(batch) == 2 and all(isinstance(b, str) for b in batch) and len(seen.infos) == 3
    deltas = list(chain.stream(QUESTIONS[0]))
    assert len(deltas) > 1 and "".join(deltas).strip() == answer

    async def run():
        return await chain.ainvoke(QUESTIONS[0]), [d async for d in chain.astream(QUESTIONS[0])]

    aanswer, adeltas = asyncio.run(run())
    assert aanswer == answer and adeltas == deltas


def test_chat_model_chain(retriever, rag_lloco):
    prompt = ChatPromptTemplate.from_messages([("system", "Answer from the context.\n{context}"),
                                               ("human", "{question}")])
    msg = (context(retriever, rag_lloco) | prompt | ChatLLoCO(lloco=rag_lloco, max_tokens=8)).invoke(QUESTIONS[0])
    assert msg.content and len(msg.response_metadata["chunks"]) == 2
    assert msg.usage_metadata["input_tokens"] == msg.response_metadata["prompt_tokens"]
