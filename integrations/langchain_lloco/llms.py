"""``LLoCOLLM``: a LangChain text LLM whose prompts may carry ``<lloco:KEY:TAG>`` sentinels."""

from __future__ import annotations

from typing import Any, AsyncIterator, Iterator, Optional

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseLLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult
from pydantic import ConfigDict, Field

from langchain_lloco._common import GenerationParams
from lloco_index.integration import aiter_locked, run_locked
from lloco_index.pipeline import Answer


class LLoCOLLM(GenerationParams, BaseLLM):
    """Sentinels (from ``LLoCODocumentCompressor``) become compressed vectors; ``batch`` is one decoder pass.

    Example::

        llm = LLoCOLLM(lloco=lloco, max_tokens=64)           # or LLoCOLLM(store="lloco_store")
        chain = {"context": retriever | compressor | join, "question": RunnablePassthrough()} | prompt | llm
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    batch_size: int = Field(default=8, gt=0, description="prompts per batched decoder pass")

    @property
    def _llm_type(self) -> str:
        return "lloco"

    def _generate(self, prompts: list[str], stop: Optional[list[str]] = None,
                  run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> LLMResult:
        cfg, answers = self._config(stop), []
        for i in range(0, len(prompts), self.batch_size):
            answers += self.lloco.complete_batch(prompts[i:i + self.batch_size], cfg)
        usage = {"prompt_tokens": sum(a.prompt_tokens for a in answers),
                 "completion_tokens": sum(a.new_tokens for a in answers)}
        return LLMResult(generations=[[Generation(text=a.answer, generation_info=generation_info(a))]
                                      for a in answers], llm_output={"token_usage": usage, "model_name": self.model})

    async def _agenerate(self, prompts: list[str], stop: Optional[list[str]] = None,
                         run_manager: Optional[AsyncCallbackManagerForLLMRun] = None, **kwargs: Any) -> LLMResult:
        return await run_locked(self.lloco.backbone.lock, self._generate, prompts, stop)

    def _stream(self, prompt: str, stop: Optional[list[str]] = None,
                run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> Iterator[GenerationChunk]:
        for delta in self.lloco.complete(prompt, self._config(stop), stream=True):
            chunk = GenerationChunk(text=delta)
            if run_manager:
                run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk

    async def _astream(self, prompt: str, stop: Optional[list[str]] = None,
                       run_manager: Optional[AsyncCallbackManagerForLLMRun] = None,
                       **kwargs: Any) -> AsyncIterator[GenerationChunk]:
        async for chunk in aiter_locked(self.lloco.backbone.lock, lambda: self._stream(prompt, stop)):
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk


def generation_info(a: Answer) -> dict[str, Any]:
    """What the decoder really read: positions (vectors included), vectors, and the text they stand for."""
    return {"finish_reason": a.finish_reason, "prompt_tokens": a.prompt_tokens, "context_vectors": a.context_vectors,
            "source_tokens": a.source_tokens, "chunks": a.chunks}
