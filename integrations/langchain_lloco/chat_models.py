"""``ChatLLoCO``: a LangChain chat model over LLoCO; sentinels in any message become compressed vectors."""

from __future__ import annotations

from typing import Any, AsyncIterator, Iterator, Optional

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field

from langchain_lloco._common import GenerationParams
from langchain_lloco.llms import generation_info
from lloco_index.integration import aiter_locked, run_locked

_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool"}


class ChatLLoCO(GenerationParams, BaseChatModel):
    """Messages rendered with the decoder's chat template; no tool calling (the decoder was not trained for it).

    Example::

        chat = ChatLLoCO(lloco=lloco, max_tokens=64)
        chat.invoke([("system", "Context: " + sentinel), ("human", "Who founded the museum?")]).content
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    streaming: bool = Field(default=False, description="stream tokens (to callbacks) even in invoke")

    @property
    def _llm_type(self) -> str:
        return "lloco-chat"

    def _generate(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                  run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> ChatResult:
        a = self.lloco.complete(_turns(messages), self._config(stop))
        usage = {"input_tokens": a.prompt_tokens, "output_tokens": a.new_tokens,
                 "total_tokens": a.prompt_tokens + a.new_tokens}
        msg = AIMessage(content=a.answer, usage_metadata=usage, response_metadata={"model_name": self.model})
        return ChatResult(generations=[ChatGeneration(message=msg, generation_info=generation_info(a))])

    async def _agenerate(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                         run_manager: Optional[AsyncCallbackManagerForLLMRun] = None, **kwargs: Any) -> ChatResult:
        return await run_locked(self.lloco.backbone.lock, self._generate, messages, stop)

    def _stream(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                run_manager: Optional[CallbackManagerForLLMRun] = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        for delta in self.lloco.complete(_turns(messages), self._config(stop), stream=True):
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
            if run_manager:
                run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk

    async def _astream(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                       run_manager: Optional[AsyncCallbackManagerForLLMRun] = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        async for chunk in aiter_locked(self.lloco.backbone.lock, lambda: self._stream(messages, stop)):
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk


def _turns(messages: list[BaseMessage]) -> list[tuple[str, str]]:
    turns = []
    for m in messages:
        role = m.role if isinstance(m, ChatMessage) else _ROLES.get(m.type)
        if role is None:
            raise ValueError(f"ChatLLoCO cannot take {m.type!r} messages; use system, human, ai or tool messages")
        turns.append((role, m.text))
    return turns
