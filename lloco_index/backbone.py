"""One base model shared by the compressor (encoder) and the decoder, with named PEFT LoRA adapters.

Encoder and decoder are the same LLaMA-family weights (as in LLoCO, where the AutoCompressor is
both); only which LoRA adapter is active differs. Sharing saves a full model copy in memory.
Every forward pass runs under ``lock`` because the active adapter is global model state.
"""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from .models import DEFAULT_MODEL, hub_snapshot, is_hub_id, load_base_model

BASE = "__base__"  # PEFT's name for "no adapter" in mixed-adapter batches


class UnknownAdapterError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want a plain sentence
        return str(self.args[0])


class Backbone:
    """A causal LM plus tokenizer, with LoRA adapters loaded by name."""

    def __init__(self, model, tokenizer, name_or_path: str):
        self.model = model
        self.tokenizer = tokenizer
        self.name_or_path = name_or_path
        self.lock = threading.RLock()
        self._peft = False
        self._active: str | None = None  # the adapter ``use`` has switched to
        self.train_stack = None  # a lean_llama.LeanStack while training: ``hidden_states`` runs through it

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_MODEL, device=None, dtype=None) -> "Backbone":
        model, tokenizer = load_base_model(name_or_path, device=device, dtype=dtype)
        return cls(model, tokenizer, name_or_path)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    @property
    def context_window(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    @property
    def adapters(self) -> list[str]:
        return sorted(self.model.peft_config) if self._peft else []

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids.to(self.device))

    def load_adapter(self, path: str | Path, name: str, trainable: bool = False) -> None:
        """Load a PEFT LoRA adapter (local folder or hub id) under ``name`` after checking it fits this base model."""
        from peft import PeftModel

        from .checkpoints import pickle_hint

        path = Path(path)
        if is_hub_id(str(path)):
            path = Path(hub_snapshot(str(path)))
        cfg_file = path / "adapter_config.json"
        if not cfg_file.is_file():
            raise UnknownAdapterError(f"adapter not found: {path} has no adapter_config.json")
        if not (path / "adapter_model.safetensors").is_file():
            raise ValueError(f"{path}: adapter weights must be in adapter_model.safetensors; {pickle_hint(path)}")
        _check_adapter_shapes(path, self.model)
        with self.lock:
            if self._peft:
                if name in self.model.peft_config:
                    self.model.delete_adapter(name)
                self.model.load_adapter(str(path), adapter_name=name, is_trainable=trainable)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name,
                                                       is_trainable=trainable)
                self._peft = True
            self.model.eval()

    def add_adapter(self, name: str, lora_config) -> None:
        """Attach a fresh (trainable) LoRA adapter, e.g. for training."""
        from peft import get_peft_model

        with self.lock:
            if self._peft:
                self.model.add_adapter(name, lora_config)
            else:
                self.model = get_peft_model(self.model, lora_config, adapter_name=name)
                self._peft = True

    def unload_adapter(self, name: str) -> None:
        self._require(name)
        with self.lock:
            self.model.delete_adapter(name)

    def _require(self, name: str | None) -> None:
        if name not in (None, BASE) and name not in self.adapters:
            raise UnknownAdapterError(f"unknown adapter {name!r}; loaded adapters: {self.adapters or 'none'}")

    @contextmanager
    def use(self, name: str | None) -> Iterator[None]:
        """Run the enclosed forward passes with adapter ``name`` (``None``: the plain base model)."""
        self._require(name)
        with self.lock, self._activate(None if name == BASE else name):
            if not self._peft:
                yield
            elif name in (None, BASE):
                with self.model.disable_adapter():
                    yield
            else:
                trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
                self.model.set_adapter(name)
                for n, p in self.model.named_parameters():  # set_adapter freezes the others
                    p.requires_grad_(n in trainable)
                yield

    @contextmanager
    def _activate(self, name: str | None) -> Iterator[None]:
        outer, self._active = self._active, name
        try:
            yield
        finally:
            self._active = outer

    def hidden_states(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder stack's hidden states after the final norm, under the adapter ``use`` chose; no
        vocabulary projection (for a small model the costliest matmul). Pass a mask only for padded rows."""
        if self.train_stack is not None:
            return self.train_stack(embeds, self._active, attention_mask, position_ids)
        return self.model.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask,
                                        position_ids=position_ids, use_cache=False).last_hidden_state

    def forward_mixed(self, adapters: list[str | None], **kwargs):
        """One forward pass where row i uses adapter ``adapters[i]`` (PEFT mixed-batch LoRA)."""
        for a in set(adapters):
            self._require(a)
        with self.lock:
            if len(set(adapters)) == 1:
                with self.use(adapters[0]):
                    return self.model(**kwargs)
            names = [BASE if a is None else a for a in adapters]
            return self.model(adapter_names=names, **kwargs)


def _check_adapter_shapes(path: Path, model) -> None:
    """Refuse an adapter made for another base model with a clear message instead of a shape crash."""
    from safetensors import SafetensorError, safe_open

    try:
        cfg = json.loads((path / "adapter_config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: adapter_config.json is not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"{path}: not a LoRA adapter (peft_type={cfg.get('peft_type') if isinstance(cfg, dict) else cfg!r})")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    modules = dict(base.named_modules())
    other = (f"{path}: adapter was trained for another base model "
             f"(base_model_name_or_path={cfg.get('base_model_name_or_path')!r}); module {{}} does not match")
    try:
        with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
            for key in f.keys():
                part = ".lora_A." if ".lora_A." in key else ".lora_B." if ".lora_B." in key else None
                if part is None:
                    continue
                mod_name = key.split(part)[0].removeprefix("base_model.model.")
                mod = modules.get(mod_name)
                shape = f.get_slice(key).get_shape()
                # lora_A is [r, in_features], lora_B is [out_features, r]
                want, got = ((getattr(mod, "in_features", None), shape[1]) if part == ".lora_A." else
                             (getattr(mod, "out_features", None), shape[0]))
                if mod is None or len(shape) != 2 or want not in (None, got):
                    raise ValueError(other.format(mod_name))
    except SafetensorError as e:
        raise ValueError(f"{path}: adapter_model.safetensors is unreadable ({e})") from None
