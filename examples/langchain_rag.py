"""LangChain + LLoCO, fully offline: ingest a folder, query it with an LCEL chain, stream an answer.

    python examples/langchain_rag.py --docs lloco_index/samples --store lloco_store \
        --question "Who founded the lighthouse museum?"

LLoCOIngestor compresses the split documents into the store before indexing; at query time the
compressor swaps retrieved text for sentinels and LLoCOLLM reads them as vectors.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import PromptTemplate
from langchain_core.runnables import RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_text_splitters import RecursiveCharacterTextSplitter

from langchain_lloco import LLoCODocumentCompressor, LLoCOIngestor, LLoCOLLM, default_embeddings
from lloco_index.chunking import iter_text_files, read_text_file
from lloco_index.integration import shared_lloco

SAMPLES = Path(__file__).resolve().parent.parent / "lloco_index" / "samples"
PROMPT = PromptTemplate.from_template("Context:\n{context}\n\nQuestion: {question}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", default=str(SAMPLES), help="folder of .txt/.md files")
    ap.add_argument("--store", default="lloco_store", help="compressed store folder (created if missing)")
    ap.add_argument("--question", default="Who founded the lighthouse museum?")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default=None, help="cuda/cpu (default: CUDA when available)")
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--expand", type=int, default=1, help="best retrieved chunks kept as text (0: all vectors)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args(argv)

    lloco = shared_lloco(args.model, args.store, device=args.device)  # one model + store for every component
    docs = [Document(page_content=read_text_file(f), metadata={"source": str(f)}) for f in iter_text_files([args.docs])]
    chunks = RecursiveCharacterTextSplitter(chunk_size=1500, chunk_overlap=0).split_documents(docs)
    chunks = LLoCOIngestor(lloco=lloco).transform_documents(chunks)
    print(f"ingested {len(docs)} documents -> {len(chunks)} compressed chunks in {lloco.store.path}")

    retriever = InMemoryVectorStore.from_documents(chunks, default_embeddings()).as_retriever(
        search_kwargs={"k": args.top_k})
    join = lambda found: "\n\n".join(d.page_content for d in found)  # noqa: E731
    compressor = LLoCODocumentCompressor(lloco=lloco, expand=args.expand)
    chain = ({"context": retriever | compressor | join, "question": RunnablePassthrough()}
             | PROMPT | LLoCOLLM(lloco=lloco, max_tokens=args.max_new_tokens) | StrOutputParser())
    print(f"answer: {chain.invoke(args.question).strip()}")
    print("streamed: ", end="", flush=True)
    for delta in chain.stream(args.question):
        print(delta, end="", flush=True)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
