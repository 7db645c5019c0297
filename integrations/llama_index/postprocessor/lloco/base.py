"""Compress LlamaIndex nodes with LLoCO: at query time (postprocessor) or at indexing time (ingestion).

``LLoCOPostprocessor`` swaps each retrieved node's text for a ``<lloco:KEY:TAG>`` sentinel that
``LLoCOLLM`` resolves to the node's compressed vectors (from the store both share), so the stock
synthesizers and chat engines carry vectors without knowing it. Ids, scores, relationships and
metadata are kept; the original text stays in the excluded ``lloco_text`` metadata key.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

from llama_index.core.bridge.pydantic import BaseModel, Field, PrivateAttr
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import BaseNode, MetadataMode, NodeWithScore, QueryBundle, TransformComponent

from lloco_index.integration import KEY_KEY, TEXT_KEY, compress_to_sentinels, require_store, shared_lloco
from lloco_index.models import DEFAULT_MODEL
from lloco_index.pipeline import LLoCO
from lloco_index.prompts import arrange_expanded

_OURS = (KEY_KEY, TEXT_KEY)  # metadata keys this module adds (hidden from the LLM and the embedder)


class _UsesLLoCO(BaseModel):
    """Fields shared by the compressing components: a ready ``lloco=`` or the names to build it."""

    model: str = Field(default=DEFAULT_MODEL, description="base model (name or folder) when no lloco= is given")
    store: Optional[str] = Field(default=None, description="compressed store folder when no lloco= is given")
    device: Optional[str] = Field(default=None, description="cuda/cpu when no lloco= is given; None: auto")
    batch_size: int = Field(default=16, gt=0, description="chunks compressed per forward pass")

    _lloco: LLoCO = PrivateAttr()

    def __init__(self, lloco: Optional[LLoCO] = None, **kwargs: Any) -> None:
        if lloco is not None:
            require_store(lloco, type(self).__name__)
            kwargs.setdefault("model", lloco.backbone.name_or_path)
            kwargs.setdefault("store", str(lloco.store.path))
        if kwargs.get("store") is not None:
            kwargs["store"] = str(kwargs["store"])  # a Path is fine too
        super().__init__(**kwargs)
        self._lloco = lloco or shared_lloco(self.model, self.store, device=self.device)

    @property
    def lloco(self) -> LLoCO:
        return self._lloco

    def _compress(self, nodes: Sequence[BaseNode]) -> List[Optional[tuple]]:
        """``(key, sentinel)`` per node (None: empty or already swapped); missing ones are compressed."""
        texts = [None if TEXT_KEY in n.metadata else _text(n) for n in nodes]
        return compress_to_sentinels(self._lloco, texts, self.batch_size)


class LLoCOPostprocessor(_UsesLLoCO, BaseNodePostprocessor):
    """Replace retrieved nodes' text with sentinels for ``LLoCOLLM`` (same store); ``expand=1`` keeps the
    best node as text, the mode docs/quality.md measures best, placed where ``lloco.expand_at`` says (default:
    after the compressed nodes, nearest the question).

    Example::

        qe = index.as_query_engine(llm=LLoCOLLM(lloco=lloco), node_postprocessors=[LLoCOPostprocessor(lloco=lloco)])
        response = qe.query("Who founded the museum?")
        restore_text(response.source_nodes)[0].text      # the original chunk text
    """

    expand: int = Field(default=0, ge=0, description="the N highest-scoring nodes stay as text (selective "
                        "re-expansion: the facts compression blurs), the others become vectors")

    @classmethod
    def class_name(cls) -> str:
        return "LLoCOPostprocessor"

    def _postprocess_nodes(self, nodes: List[NodeWithScore],
                           query_bundle: Optional[QueryBundle] = None) -> List[NodeWithScore]:
        keep = set(sorted(range(len(nodes)), key=lambda i: -(nodes[i].score or 0.0))[:self.expand])
        todo = [i for i in range(len(nodes)) if i not in keep]
        refs = dict(zip(todo, self._compress([nodes[i].node for i in todo])))
        return [nodes[i] if refs.get(i) is None else NodeWithScore(node=_swap(nodes[i].node, *refs[i]),
                                                                   score=nodes[i].score)
                for i in arrange_expanded(range(len(nodes)), keep, self.lloco.expand_at)]


class LLoCOIngestor(_UsesLLoCO, TransformComponent):
    """IngestionPipeline step: compress nodes into the store at indexing time (nodes pass through unchanged),
    so queries only look vectors up.

    Example::

        IngestionPipeline(transformations=[SentenceSplitter(chunk_size=400), LLoCOIngestor(lloco=lloco),
                                           default_embed_model()]).run(documents=docs)
    """

    @classmethod
    def class_name(cls) -> str:
        return "LLoCOIngestor"

    def __call__(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        self._compress(nodes)
        return nodes


def restore_text(nodes: Sequence[NodeWithScore]) -> List[NodeWithScore]:
    """Copies of postprocessed nodes with their original text back (e.g. ``response.source_nodes``)."""
    out = []
    for n in nodes:
        if TEXT_KEY not in n.node.metadata:
            out.append(n)
            continue
        node = n.node.model_copy()
        meta = dict(node.metadata)
        node.set_content(meta.pop(TEXT_KEY))
        meta.pop(KEY_KEY, None)
        node.metadata = meta
        node.excluded_llm_metadata_keys = [k for k in node.excluded_llm_metadata_keys if k not in _OURS]
        node.excluded_embed_metadata_keys = [k for k in node.excluded_embed_metadata_keys if k not in _OURS]
        out.append(NodeWithScore(node=node, score=n.score))
    return out


def _text(node: BaseNode) -> str:
    return node.get_content(metadata_mode=MetadataMode.NONE)


def _swap(node: BaseNode, key: str, sentinel: str) -> BaseNode:
    """A copy (same id, relationships, metadata) whose text is the sentinel; lloco keys hidden from LLM/embed."""
    new = node.model_copy()
    new.set_content(sentinel)
    new.metadata = {**node.metadata, KEY_KEY: key, TEXT_KEY: _text(node)}
    new.excluded_llm_metadata_keys = [*node.excluded_llm_metadata_keys, *_OURS]
    new.excluded_embed_metadata_keys = [*node.excluded_embed_metadata_keys, *_OURS]
    return new
