"""Shared fixtures: a tiny random LLaMA + BPE tokenizer built and saved by the tests themselves."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

CHAT_TEMPLATE = (
    "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}"
)
CORPUS = sorted((Path(__file__).parent.parent / "lloco_index" / "samples").glob("*.txt"))  # sorted: one BPE everywhere


def build_tiny_llama(path: Path, hidden: int = 64, layers: int = 2, vocab: int = 400, max_pos: int = 1024) -> Path:
    """Save a random LlamaForCausalLM and a byte-level BPE tokenizer (trained on the samples) to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([p.read_text() for p in CORPUS], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
                      eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_backbone(tiny_model_dir):
    from lloco_index.backbone import Backbone

    return Backbone.from_pretrained(str(tiny_model_dir), device="cpu")


def make_tiny_lloco(model_dir: Path, store_dir: Path):
    """LLoCO over the tiny model with its own backbone and store (segments of 32 tokens -> 4 vectors)."""
    from lloco_index.backbone import Backbone
    from lloco_index.compressor import CompressorConfig, ContextCompressor
    from lloco_index.pipeline import LLoCO
    from lloco_index.store import CompressedStore

    bb = Backbone.from_pretrained(str(model_dir), device="cpu")
    comp = ContextCompressor.untrained(bb, CompressorConfig(base_model=str(model_dir), segment_tokens=32,
                                                            summary_tokens=4, hidden_size=bb.hidden_size))
    store = CompressedStore(store_dir, fingerprint=comp.fingerprint(), create=True)
    return LLoCO(bb, comp, store)


@pytest.fixture()
def tiny_lloco(tiny_model_dir, tmp_path):
    """A fresh tiny LLoCO with its own store."""
    return make_tiny_lloco(tiny_model_dir, tmp_path / "store")


@pytest.fixture(scope="session")
def default_lloco():
    """The real embedded default model (SmolLM2-135M) with its bundled compressor/adapter."""
    from lloco_index.pipeline import LLoCO

    return LLoCO.from_pretrained("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def rag_lloco(tmp_path_factory):
    """The real default model with a store, built the way the adapters and examples build it (shared_lloco),
    so an example run with the same --store/--device reuses this one object instead of loading again."""
    from lloco_index.integration import shared_lloco

    return shared_lloco("smollm2-135m", tmp_path_factory.mktemp("rag-store"), device="cpu")


@pytest.fixture(scope="session")
def session_tiny_lloco(tiny_model_dir, tmp_path_factory):
    """One tiny LLoCO for tests that only read (e.g. the langchain-tests standard suite)."""
    return make_tiny_lloco(tiny_model_dir, tmp_path_factory.mktemp("tiny-store"))


@pytest.fixture()
def llm_calls():
    """What each LlamaIndex LLM call reported as ``raw`` (the core Answer), via the framework's own
    instrumentation: decoder positions, vectors and chunk keys."""
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.instrumentation.event_handlers import BaseEventHandler
    from llama_index.core.instrumentation.events.llm import LLMChatEndEvent, LLMCompletionEndEvent

    raws: list[dict] = []

    class LLMCalls(BaseEventHandler):
        def handle(self, event, **kwargs) -> None:
            if isinstance(event, (LLMCompletionEndEvent, LLMChatEndEvent)) and event.response.raw:
                raws.append(event.response.raw)

    handler = LLMCalls()
    dispatcher = get_dispatcher()
    dispatcher.add_event_handler(handler)
    yield raws
    dispatcher.event_handlers.remove(handler)
