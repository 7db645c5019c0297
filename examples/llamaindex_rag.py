"""LlamaIndex + LLoCO, fully offline: ingest a folder, query it, stream an answer.

    python examples/llamaindex_rag.py --docs lloco_index/samples --store lloco_store \
        --question "Who founded the lighthouse museum?"

Indexing compresses every chunk into the store (LLoCOIngestor), so queries only look vectors up; the
postprocessor swaps retrieved text for sentinels and LLoCOLLM reads them as vectors.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llama_index.core import SimpleDirectoryReader, VectorStoreIndex
from llama_index.core.ingestion import IngestionPipeline
from llama_index.core.node_parser import SentenceSplitter
from llama_index.embeddings.lloco import default_embed_model
from llama_index.llms.lloco import LLoCOLLM
from llama_index.postprocessor.lloco import LLoCOIngestor, LLoCOPostprocessor, restore_text

from lloco_index.integration import shared_lloco

SAMPLES = Path(__file__).resolve().parent.parent / "lloco_index" / "samples"


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
    embed = default_embed_model()
    docs = SimpleDirectoryReader(args.docs, required_exts=[".txt", ".md"]).load_data()
    pipeline = IngestionPipeline(transformations=[SentenceSplitter(chunk_size=400, chunk_overlap=0),
                                                  LLoCOIngestor(lloco=lloco), embed])
    nodes = pipeline.run(documents=docs)
    print(f"ingested {len(docs)} documents -> {len(nodes)} compressed chunks in {lloco.store.path}")

    index = VectorStoreIndex(nodes, embed_model=embed)
    llm = LLoCOLLM(lloco=lloco, max_new_tokens=args.max_new_tokens)
    post = LLoCOPostprocessor(lloco=lloco, expand=args.expand)
    engine = index.as_query_engine(llm=llm, node_postprocessors=[post], similarity_top_k=args.top_k)
    response = engine.query(args.question)
    print(f"answer: {response.response.strip()}")
    for n in restore_text(response.source_nodes):
        print(f"  source {n.node.metadata.get('file_name')} (score {n.score:.2f}): {n.node.text[:60]!r}...")

    streaming = index.as_query_engine(llm=llm, node_postprocessors=[post], similarity_top_k=args.top_k,
                                      streaming=True)
    print("streamed: ", end="", flush=True)
    for delta in streaming.query(args.question).response_gen:
        print(delta, end="", flush=True)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
