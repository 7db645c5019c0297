"""Pydantic fields shared by the LangChain classes: one ``LLoCO`` (given, or built from names and shared)."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, Field, model_validator

from lloco_index.generation import GenerationConfig
from lloco_index.integration import generation_config, shared_lloco
from lloco_index.models import DEFAULT_MODEL


class LLoCOBacked(BaseModel):
    """``lloco=`` a ready LLoCO, or ``model``/``store`` (objects built from the same names share one)."""

    lloco: Any = Field(default=None, exclude=True, description="a ready LLoCO; built from model/store when None")
    model: str = Field(default=DEFAULT_MODEL, description="base model (name or folder) when no lloco= is given")
    store: Optional[str] = Field(default=None, description="compressed store folder when no lloco= is given")
    adapter: Optional[str] = Field(default=None, description="decoder LoRA folder; None: bundled, 'base': none")
    device: Optional[str] = Field(default=None, description="cuda/cpu; None: CUDA when available")

    @model_validator(mode="before")
    @classmethod
    def _build_lloco(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        if values.get("store") is not None:
            values = {**values, "store": str(values["store"])}  # a Path is fine too
        lloco = values.get("lloco")
        if lloco is None:
            return {**values, "lloco": shared_lloco(values.get("model", DEFAULT_MODEL), values.get("store"),
                                                    values.get("adapter"), values.get("device"))}
        store = str(lloco.store.path) if lloco.store is not None else None
        return {"model": lloco.backbone.name_or_path, "store": store, **values}


class GenerationParams(LLoCOBacked):
    """Sampling settings (LangChain's standard names) shared by the LLM and the chat model."""

    max_tokens: int = Field(default=256, gt=0, description="tokens generated at most per call")
    temperature: float = Field(default=0.0, ge=0.0, description="0 = greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    stop: Optional[list[str]] = Field(default=None, description="strings that end generation")

    def _config(self, stop: Optional[list[str]] = None) -> GenerationConfig:
        return generation_config(self.max_tokens, self.temperature, self.top_p, stop if stop is not None else self.stop)

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "store": self.store, "adapter": self.lloco.adapter,
                "max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p}
