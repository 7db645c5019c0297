"""``LLoCOLLM``: a LlamaIndex LLM whose prompts may carry ``<lloco:KEY:TAG>`` sentinels.

The postprocessor puts sentinels where chunk text was; this LLM swaps each verified sentinel for the
chunk's compressed vectors and generates with the LoRA-adapted decoder, so every response mode,
chat engine and prompt template works unchanged while the decoder reads a few vectors per chunk.
"""

from __future__ import annotations

from typing import Any, Iterator, List, Optional, Sequence, Union

from llama_index.core.base.llms.types import (ChatMessage, ChatResponse, ChatResponseAsyncGen, ChatResponseGen,
                                              CompletionResponse, CompletionResponseAsyncGen,
                                              CompletionResponseGen, LLMMetadata, MessageRole)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM

from lloco_index.integration import aiter_locked, generation_config, run_locked, shared_lloco
from lloco_index.models import DEFAULT_MODEL
from lloco_index.pipeline import LLoCO

Prompt = Union[str, List[tuple]]  # one user turn, or chat (role, text) turns


class LLoCOLLM(CustomLLM):
    """Generate from prompts whose sentinels become compressed context vectors.

    Example::

        llm = LLoCOLLM(lloco=lloco, max_new_tokens=64)      # or LLoCOLLM(store="lloco_store")
        llm.complete("Context: " + lloco.store.sentinel(key) + "\\nQuestion: who?").text
    """

    model: str = Field(default=DEFAULT_MODEL, description="base model (name or folder) when no lloco= is given")
    store: Optional[str] = Field(default=None, description="compressed store folder when no lloco= is given")
    adapter: Optional[str] = Field(default=None, description="decoder LoRA folder; None: bundled, 'base': none")
    device: Optional[str] = Field(default=None, description="cuda/cpu; None: CUDA when available")
    max_new_tokens: int = Field(default=256, gt=0, description="tokens generated at most per call")
    temperature: float = Field(default=0.0, ge=0.0, description="0 = greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    stop: List[str] = Field(default_factory=list, description="strings that end generation")
    is_chat_model: bool = Field(default=False, description="let LlamaIndex send chat messages, not prompts")

    _lloco: LLoCO = PrivateAttr()

    def __init__(self, lloco: Optional[LLoCO] = None, **kwargs: Any) -> None:
        if lloco is not None:  # report what is really used
            kwargs.setdefault("model", lloco.backbone.name_or_path)
            kwargs.setdefault("store", str(lloco.store.path) if lloco.store else None)
        if kwargs.get("store") is not None:
            kwargs["store"] = str(kwargs["store"])  # a Path is fine too
        super().__init__(**kwargs)
        self._lloco = lloco or shared_lloco(self.model, self.store, self.adapter, self.device)

    @classmethod
    def class_name(cls) -> str:
        return "LLoCOLLM"

    @property
    def lloco(self) -> LLoCO:
        return self._lloco

    @property
    def metadata(self) -> LLMMetadata:
        """``context_window`` counts decoder positions (text tokens + vectors), which the core enforces."""
        return LLMMetadata(context_window=self._lloco.backbone.context_window, num_output=self.max_new_tokens,
                           is_chat_model=self.is_chat_model, model_name=self.model)

    # -- the two blocking primitives everything else wraps ------------------------------------
    def _answer(self, prompt: Prompt):
        cfg = generation_config(self.max_new_tokens, self.temperature, self.top_p, self.stop)
        return self._lloco.complete(prompt, cfg)

    def _deltas(self, prompt: Prompt) -> Iterator[tuple[str, str]]:
        cfg = generation_config(self.max_new_tokens, self.temperature, self.top_p, self.stop)
        text = ""
        for delta in self._lloco.complete(prompt, cfg, stream=True):
            text += delta
            yield text, delta

    def _prompt(self, prompt: str, formatted: bool) -> str:
        return prompt if formatted else self.completion_to_prompt(prompt)

    def _completion(self, prompt: str, formatted: bool) -> CompletionResponse:
        ans = self._answer(self._prompt(prompt, formatted))
        return CompletionResponse(text=ans.answer, raw=ans.to_dict())

    def _completion_stream(self, prompt: str, formatted: bool) -> CompletionResponseGen:
        for text, delta in self._deltas(self._prompt(prompt, formatted)):
            yield CompletionResponse(text=text, delta=delta)

    def _chat(self, messages: Sequence[ChatMessage]) -> ChatResponse:
        ans = self._answer(_turns(messages))
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=ans.answer), raw=ans.to_dict())

    def _chat_stream(self, messages: Sequence[ChatMessage]) -> ChatResponseGen:
        for text, delta in self._deltas(_turns(messages)):
            yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta)

    # -- LlamaIndex API: sync ------------------------------------------------------------------
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self._completion(prompt, formatted)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return self._completion_stream(prompt, formatted)

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._chat(messages)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._chat_stream(messages)

    # -- async: worker thread + the backbone lock, so the event loop never blocks ---------------
    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await run_locked(self._lloco.backbone.lock, self._completion, prompt, formatted)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False,
                               **kwargs: Any) -> CompletionResponseAsyncGen:
        return aiter_locked(self._lloco.backbone.lock, lambda: self._completion_stream(prompt, formatted))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await run_locked(self._lloco.backbone.lock, self._chat, messages)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return aiter_locked(self._lloco.backbone.lock, lambda: self._chat_stream(messages))


def _turns(messages: Sequence[ChatMessage]) -> List[tuple]:
    return [(m.role.value, m.content or "") for m in messages]
