"""Generate from an ordered mix of text pieces and compressed vectors.

Text is embedded with the decoder's own embedding table, vectors are spliced in between, and all
positions are ordinary consecutive ones (as LLoCO feeds AutoCompressor summaries). Batches are
left-padded; each row may use a different LoRA adapter (PEFT mixed-batch forward).
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterator, Sequence, Union

import torch

from .backbone import Backbone

Piece = Union[str, torch.Tensor]
_MARK = "\x00lloco{}\x00"  # placeholder that no tokenizer merges with neighbours and no user types


class PromptTooLongError(RuntimeError):
    """The assembled prompt does not fit the decoder's context window (never silently truncated).

    Not a ValueError: LlamaIndex's refine/compact synthesizers catch ValueError and return an empty
    response, which would turn this refusal into a silent non-answer."""


class RequestCancelled(Exception):
    """The caller cancelled the request (``cancel_scope``); work stopped at the next token or batch."""


_CANCEL: ContextVar[threading.Event | None] = ContextVar("lloco_cancel", default=None)


@contextmanager
def cancel_scope(event: threading.Event) -> Iterator[None]:
    """Within this block (in this thread), setting ``event`` stops generation and compression early
    with ``RequestCancelled``, freeing the KV cache, instead of running to ``max_new_tokens``."""
    token = _CANCEL.set(event)
    try:
        yield
    finally:
        _CANCEL.reset(token)


def check_cancelled() -> None:
    event = _CANCEL.get()
    if event is not None and event.is_set():
        raise RequestCancelled("request cancelled")


@dataclass
class GenerationConfig:
    max_new_tokens: int = field(default=64, metadata={"help": "tokens to generate at most"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    stop: tuple[str, ...] = field(default=(), metadata={"help": "strings that end generation"})
    seed: int = field(default=0, metadata={"help": "sampling seed (ignored when greedy)"})

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("need temperature >= 0 and 0 < top_p <= 1")
        self.stop = tuple(self.stop)


@dataclass
class Generation:
    text: str
    prompt_tokens: int  # decoder input positions, vectors included
    new_tokens: int
    finish_reason: str  # "stop" (EOS or stop string) or "length"


def end_of_answer_id(tokenizer) -> int:
    """The token that closes an answer: the chat template's ``<|im_end|>``, else EOS. Training puts it after every
    answer (``train.DecoderBatcher``), so scoring an option with it asks for the complete answer, not a prefix."""
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return eot if isinstance(eot, int) and eot != tokenizer.unk_token_id else tokenizer.eos_token_id


class Generator:
    """Decoder side of LLoCO over a shared ``Backbone``.

    ``fast`` selects the static-cache decoder of ``fast_decode`` (CUDA graphs on a GPU); default: on
    for CUDA unless ``LLOCO_FAST_DECODE=0``. Its greedy tokens are the eager loop's (in fp32; in bf16 a
    near-tie can round the other way, as between any two kernel choices).
    """

    def __init__(self, backbone: Backbone, fast: bool | None = None):
        self.backbone = backbone
        if fast is None:
            fast = backbone.device.type == "cuda" and os.environ.get("LLOCO_FAST_DECODE", "1") != "0"
        self.fast = None
        if fast:
            from .fast_decode import FastDecoder

            self.fast = FastDecoder(backbone)
        tok = backbone.tokenizer
        eos = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
        gen_eos = getattr(getattr(backbone.model, "generation_config", None), "eos_token_id", None)
        eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self.eos_ids = sorted(i for i in eos if isinstance(i, int) and i != tok.unk_token_id and i >= 0)

    def chat_pieces(self, user: Sequence[Piece], system: str | None = None) -> list[Piece]:
        """Wrap pieces in the model's chat template (vectors stay in place inside the user turn)."""
        tok = self.backbone.tokenizer
        tensors = [p for p in user if isinstance(p, torch.Tensor)]
        content, j = "", 0
        for p in user:
            if isinstance(p, torch.Tensor):
                content += _MARK.format(j)
                j += 1
            else:
                content += p
        if not tok.chat_template:
            return list(user)
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
        rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        out: list[Piece] = []
        for i, t in enumerate(tensors):
            before, rendered = rendered.split(_MARK.format(i), 1)
            out += [before, t]
        out.append(rendered)
        return [p for p in out if not (isinstance(p, str) and p == "")]

    def embed_pieces(self, pieces: Sequence[Piece]) -> torch.Tensor:
        """``[positions, hidden]`` decoder input for one prompt."""
        bb = self.backbone
        parts = []
        for p in pieces:
            if isinstance(p, torch.Tensor):
                if p.ndim != 2 or p.shape[1] != bb.hidden_size:
                    raise ValueError(f"vectors must be [n, {bb.hidden_size}], got {tuple(p.shape)}")
                parts.append(p.to(bb.device, bb.dtype))
            else:
                ids = bb.tokenizer(p, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
                parts.append(bb.embed(ids).to(bb.dtype))
        return torch.cat(parts) if parts else torch.zeros(0, bb.hidden_size, device=bb.device, dtype=bb.dtype)

    def count_positions(self, pieces: Sequence[Piece]) -> int:
        tok = self.backbone.tokenizer
        return sum(p.shape[0] if isinstance(p, torch.Tensor) else len(tok(p, add_special_tokens=False)["input_ids"])
                   for p in pieces)

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[Piece]], config: GenerationConfig | None = None,
                 adapters: Sequence[str | None] | str | None = None) -> list[Generation]:
        """Generate for a batch of prompts (each a piece list, already chat-wrapped if wanted)."""
        config = config or GenerationConfig()
        texts = [""] * len(prompts)
        state = None
        for state in self._decode(prompts, config, adapters):
            pass
        ids, lengths, reasons = state
        tok = self.backbone.tokenizer
        for i in range(len(prompts)):
            texts[i] = _apply_stop(tok.decode(ids[i], skip_special_tokens=True), config.stop)[0]
        return [Generation(texts[i], lengths[i], len(ids[i]), reasons[i]) for i in range(len(prompts))]

    @torch.inference_mode()
    def score(self, prompts: Sequence[Sequence[Piece]], options: Sequence[Sequence[str]],
              adapters: Sequence[str | None] | str | None = None) -> list[list[float]]:
        """For each prompt, the log-probability of each of its options as the complete answer (the option's
        tokens, then ``end_of_answer_id``).

        Why: ranking the options of a multiple-choice question by likelihood (as lm-evaluation-harness does) asks
        what the decoder knows, not whether a small decoder writes the letter it was asked for. Each prompt is
        read once; its KV cache is copied to its options, which are then scored in one batched pass."""
        bb = self.backbone
        if len(options) != len(prompts):
            raise ValueError("need one list of options per prompt")
        adapters = _adapter_names(adapters, len(prompts))
        end = end_of_answer_id(bb.tokenizer)
        targets = [[bb.tokenizer(o, add_special_tokens=False)["input_ids"] + [end] for o in opts] for opts in options]
        x, mask, lengths = self._left_pad([self.embed_pieces(p) for p in prompts])
        for n, ts in zip(lengths, targets):
            if ts and n + max(map(len, ts)) > bb.context_window:
                raise PromptTooLongError(f"prompt and answer need {n + max(map(len, ts))} positions; the decoder "
                                         f"window is {bb.context_window}")
        rows = [i for i, ts in enumerate(targets) for _ in ts]
        flat = [t for ts in targets for t in ts]
        if not flat:
            return [[] for _ in prompts]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = bb.forward_mixed(adapters, inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=True,
                               logits_to_keep=1)
        at = torch.tensor(rows, device=bb.device)
        first = torch.log_softmax(out.logits[:, -1].float(), -1)[at]  # predicts each option's first token
        cache = out.past_key_values
        cache.reorder_cache(at)  # one copy of the prompt's cache per option
        width = max(map(len, flat))
        ids = torch.tensor([t + [end] * (width - len(t)) for t in flat], device=bb.device)  # padding is masked
        tail = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in flat], device=bb.device)
        logits = bb.forward_mixed([adapters[r] for r in rows], input_ids=ids, attention_mask=torch.cat([mask[at], tail], 1),
                                  position_ids=pos[at, -1:] + 1 + torch.arange(width, device=bb.device),
                                  past_key_values=cache).logits.float()
        logp = torch.cat([first[:, None], torch.log_softmax(logits[:, :-1], -1)], 1).gather(-1, ids[..., None])[..., 0]
        sums = (logp * tail).sum(-1).tolist()
        it = iter(sums)
        return [[next(it) for _ in ts] for ts in targets]

    def stream(self, pieces: Sequence[Piece], config: GenerationConfig | None = None,
               adapter: str | None = None) -> Iterator[str]:
        """Yield text deltas for one prompt as tokens are produced."""
        config = config or GenerationConfig()
        tok = self.backbone.tokenizer
        sent = ""
        with torch.inference_mode():
            for ids, _, reasons in self._decode([pieces], config, [adapter], sync_every=1):
                text, stopped = _apply_stop(tok.decode(ids[0], skip_special_tokens=True), config.stop)
                if not stopped:  # hold back a possible partial stop string or partial UTF-8 char
                    text = _hold_back(text, config.stop)
                if len(text) > len(sent):
                    yield text[len(sent):]
                    sent = text
                if stopped or reasons[0]:
                    break

    def _decode(self, prompts, config: GenerationConfig, adapters, sync_every: int | None = None):
        """Core loop: yields ``(generated ids per row, prompt positions per row, finish reasons)``."""
        bb = self.backbone
        adapters = _adapter_names(adapters, len(prompts))
        x, mask, lengths = self._left_pad([self.embed_pieces(p) for p in prompts])
        limit = bb.context_window
        for n in lengths:
            if n + config.max_new_tokens > limit:
                raise PromptTooLongError(
                    f"prompt needs {n} positions + {config.max_new_tokens} new tokens, but the decoder window is "
                    f"{limit}; use fewer chunks (--top-k) or fewer/shorter documents")
        b = len(prompts)
        rng = torch.Generator(device=bb.device).manual_seed(config.seed)

        def sample(logits: torch.Tensor) -> torch.Tensor:
            return _sample(logits, config, rng)

        if self.fast is not None:
            steps = self.fast.decode(x, mask, list(adapters), config.max_new_tokens, sample,
                                     greedy=config.temperature == 0, sync_every=sync_every)
        else:
            steps = self._eager_steps(x, mask, list(adapters), sample)
        tok = bb.tokenizer
        ids: list[list[int]] = [[] for _ in range(b)]
        reasons: list[str | None] = [None] * b
        try:
            for step, nxt in enumerate(steps):
                check_cancelled()
                for i in range(b):
                    if reasons[i]:
                        continue
                    t = nxt[i]
                    if t in self.eos_ids:
                        reasons[i] = "stop"
                        continue
                    ids[i].append(t)
                    if config.stop and _apply_stop(tok.decode(ids[i][-16:], skip_special_tokens=True), config.stop)[1]:
                        reasons[i] = "stop"
                    elif step == config.max_new_tokens - 1:
                        reasons[i] = "length"
                yield ids, lengths, reasons
                if all(reasons):
                    return
        finally:
            steps.close()

    def _left_pad(self, embeds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """``[batch, width, hidden]`` inputs, their attention mask and each row's length: rows end together."""
        bb = self.backbone
        lengths = [e.shape[0] for e in embeds]
        width = max(lengths)
        x = torch.zeros(len(embeds), width, bb.hidden_size, device=bb.device, dtype=bb.dtype)
        mask = torch.zeros(len(embeds), width, device=bb.device, dtype=torch.long)
        for i, e in enumerate(embeds):
            x[i, width - e.shape[0]:] = e
            mask[i, width - e.shape[0]:] = 1
        return x, mask, lengths

    def _eager_steps(self, x: torch.Tensor, mask: torch.Tensor, adapters: list[str | None],
                     sample) -> Iterator[list[int]]:
        """Next token of every row, step after step (DynamicCache; PEFT mixed-adapter batches)."""
        bb = self.backbone
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = bb.forward_mixed(adapters, inputs_embeds=x, attention_mask=mask, position_ids=pos,
                               use_cache=True, logits_to_keep=1)
        pos = pos[:, -1:]
        while True:
            nxt = sample(out.logits[:, -1].float())
            yield nxt.tolist()
            # finished rows keep decoding in lockstep; their extra tokens are ignored
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            pos = pos + 1
            out = bb.forward_mixed(adapters, input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                                   past_key_values=out.past_key_values, use_cache=True)


def _adapter_names(adapters: Sequence[str | None] | str | None, n: int) -> list[str | None]:
    """One adapter name per row (``None``: the base model)."""
    if adapters is None or isinstance(adapters, str):
        return [adapters] * n
    if len(adapters) != n:
        raise ValueError("need one adapter name per prompt")
    return list(adapters)


def _sample(logits: torch.Tensor, config: GenerationConfig, rng: torch.Generator) -> torch.Tensor:
    if config.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / config.temperature, dim=-1)
    if config.top_p < 1:
        sorted_p, idx = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < config.top_p
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p * keep)
    return torch.multinomial(probs, 1, generator=rng)[:, 0]


def _apply_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _hold_back(text: str, stop: tuple[str, ...]) -> str:
    text = text.rstrip("\ufffd")
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                return text[:-k]
    return text
