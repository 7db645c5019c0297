"""Offline learning: compressor pretraining and LLoCO in-domain decoder finetuning.

Every task is phrased as the same chat QA prompt the product uses at inference
(``prompts.qa_pieces`` + the chat template), with loss on the answer tokens only:

- ``qa``    synthetic facts hidden in real text, spread over 1..``max_chunks`` compressed chunks
            (most of them distractors); the answer must be read out of the right chunk's vectors;
- ``ae``    "Repeat the context word for word." -> the chunk's text (autoencoding);
- ``lm``    "Continue the text." -> the tokens that follow the chunks (language modelling).

``train_compressor`` learns the summary embeddings, an encoder LoRA and a decoder LoRA together;
``train_finetune`` keeps the compressor frozen (vectors cached in a store: compress once, train
many epochs) and learns only a decoder LoRA, as LLoCO does. Read top to bottom: config, model,
batches, loss, loop.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .backbone import Backbone
from .bench_utils import Cost, measure_peak_flops
from .compressor import ENCODER_ADAPTER, CompressorConfig, ContextCompressor
from .corpus import Corpus
from .data import QAExample
from .eval.metrics import gold_choice
from .generation import Generator, end_of_answer_id
from .prompts import SYSTEM_PROMPT, ExpandAt, arrange_expanded, check_expand_at, qa_pieces, question_text
from .synth import KINDS, MANY_SUBJECTS, Fact, insert_sentence, make_fact

logger = logging.getLogger(__name__)
DECODER_ADAPTER = "default"
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
NEW_SEGMENT_TOKENS = 512  # a new compressor's segment length unless --segment_tokens says otherwise
AE_QUESTION = "Repeat the context word for word."
LM_QUESTION = "Continue the text."


@dataclass
class TrainConfig:
    """Hyper-parameters; CLI flags have the same names (``--max_chunks 64``)."""

    out_dir: str = "runs/compressor"
    base_model: str = "smollm2-135m"
    corpus: str = "corpus.npz"
    qa_file: str = ""  # finetune only: QA JSONL
    init_from: str = ""  # folder with compressor/ and decoder/ to continue from
    # text tokens per segment; 0: the --init_from compressor's (512 for a new one). Another value continues that
    # compressor at a new segment length (same weights, new fingerprint: stores are rebuilt)
    segment_tokens: int = 0
    summary_tokens: int = 24
    encoder_r: int = 16
    encoder_alpha: int = 32
    encoder_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    rescale_vectors: bool = False  # new compressors: vectors rescaled to the mean token-embedding norm
    center_vectors: bool = False  # new compressors: subtract the per-slot mean vector (fit on 256 corpus segments)
    # a short chunk keeps only ceil(len / ratio) vectors (CompressorConfig.proportional_vectors); true also turns it
    # on for a compressor continued with --init_from (same weights, new fingerprint: stores are rebuilt)
    proportional_vectors: bool = False
    decoder_r: int = 16
    decoder_alpha: int = 32
    decoder_dropout: float = 0.0
    decoder_targets: str = "q_proj,k_proj,v_proj,o_proj"
    train_decoder: bool = True  # false: the decoder adapter stays as loaded (or zero), only the compressor learns
    # false: the compressor stays as loaded (same fingerprint: stores built with it stay valid), only the decoder
    # learns, and every chunk is encoded without gradients
    train_encoder: bool = True
    task_mix: str = "qa:0.5,ae:0.3,lm:0.2"
    max_chunks: int = 64  # qa/cloze contexts have min_chunks..max_chunks chunks (log-uniform)
    min_chunks: int = 1  # raise it to train mostly on long contexts (the decoder reads them least well)
    max_facts: int = 3  # qa: facts hidden per context
    # qa: chance that the facts are all of one kind, about different people or names (synth.MANY_SUBJECTS kinds),
    # at least two: the answer must be bound to its subject, not picked out as the one fact of its kind
    same_kind_prob: float = 0.0
    # qa: "kind:weight,..." draws those fact templates (synth.make_fact kinds) more or less often; the others
    # weigh 1. E.g. "3:3,8:3" triples the two-part answers that long contexts cut in half. Empty: uniform
    fact_weights: str = ""
    choice_prob: float = 0.0  # qa: chance the question comes with 4 lettered options (answer: the letter)
    expand_prob: float = 0.0  # qa/cloze: chance that one chunk is given as text (teaches `expand` mode)
    expand_at: str = "end"  # where that text chunk goes: "end" (after the vectors, as inference does) or "in_place"
    full_chunk_prob: float = 0.8  # chance that a step's chunks are segment_tokens long (else 1/8 to all of it)
    segments_per_step: int = 64  # encoder segments per optimizer step
    grad_segments: int = 48  # at most this many segments get encoder gradients; others are no-grad distractors
    lm_tokens: int = 128
    lr: float = 4e-4
    summary_lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    max_steps: int = 100000
    max_minutes: float = 8.0  # wall-clock budget: stop (and save) after this
    epochs: int = 3  # finetune only
    batch_size: int = 8  # finetune only
    eval_every: int = 200
    eval_examples: int = 32  # held-out examples per eval task (tests shrink it; eval dominates tiny runs)
    save_every: int = 500
    seed: int = 0
    bf16: bool = True
    grad_checkpointing: bool = False  # recompute layer activations in backward: less memory, ~1/3 more compute
    lean: bool = True  # run the stack through lean_llama.LeanStack (fewer, larger kernels) where the model allows
    # on a GPU, torch.compile the lean stack's token-wise kernels; ignored on CPU. Off by default: on the H100 it
    # gained 0.7 MFU points in autoencoding and lost 0.4 on 256-chunk contexts (docs/training.md)
    compile: bool = False
    loss_chunk_tokens: int = 8192  # answer tokens per vocabulary-projection chunk (bounds the logits' memory)
    # > 1: answer tokens that must be copied exactly (a digit, or seen fewer than rare_token_count times in the
    # corpus: pieces of names and codes) weigh this much more in the loss than the others (exact_token_weights)
    exact_token_weight: float = 1.0
    rare_token_count: int = 100

    def __post_init__(self):
        check_expand_at(self.expand_at)
        if not 1 <= self.min_chunks <= self.max_chunks:
            raise ValueError(f"need 1 <= min_chunks <= max_chunks, got {self.min_chunks} and {self.max_chunks}")
        for name in ("choice_prob", "full_chunk_prob", "same_kind_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} is a probability in [0, 1], got {getattr(self, name)}")
        if not (self.train_encoder or self.train_decoder):
            raise ValueError("train_encoder and train_decoder are both false: nothing would train")
        fact_kind_weights(self.fact_weights)
        if self.exact_token_weight <= 0:
            raise ValueError(f"exact_token_weight must be > 0 (1 = a plain mean), got {self.exact_token_weight}")

    @classmethod
    def from_args(cls, pairs: dict[str, str]) -> "TrainConfig":
        fields = cls.__dataclass_fields__
        for k in pairs:
            if k not in fields:
                raise ValueError(f"unknown training option --{k}; valid: {', '.join(sorted(fields))}")
        return cls(**{k: _parse_bool(k, v) if isinstance(getattr(cls(), k), bool) else type(getattr(cls(), k))(v)
                      for k, v in pairs.items()})


def fact_kind_weights(spec: str) -> list[float] | None:
    """``--fact_weights`` as one weight per fact kind, or None for uniform (the old draws, unchanged)."""
    if not spec:
        return None
    weights = [1.0] * KINDS
    for item in spec.split(","):
        kind, _, weight = item.partition(":")
        try:
            k, w = int(kind), float(weight)
        except ValueError:
            raise ValueError(f"--fact_weights takes kind:weight pairs like 3:3,8:3, got {item!r}") from None
        if not 0 <= k < KINDS or w < 0:
            raise ValueError(f"--fact_weights: kinds are 0..{KINDS - 1} and weights >= 0, got {item!r}")
        weights[k] = w
    if not any(weights):
        raise ValueError("--fact_weights gives every fact kind weight 0")
    return weights


def _parse_bool(name: str, value: str) -> bool:
    """``--bf16 ture`` is a typo to report, not a silent False."""
    v = value.lower()
    if v not in ("1", "true", "yes", "0", "false", "no"):
        raise ValueError(f"--{name} takes true/false (or 1/0, yes/no), got {value!r}")
    return v in ("1", "true", "yes")


def _lora(r: int, alpha: int, targets: str, dropout: float = 0.0):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets.split(","), bias="none")


def setup_models(cfg: TrainConfig, device: torch.device):
    """Backbone with an encoder adapter and a decoder adapter, plus the compressor; fp32 LoRA, bf16 base on GPU.
    Trainable: the LoRA weights ``cfg.train_encoder`` / ``cfg.train_decoder`` name, and the summary embeddings
    with the encoder."""
    train_encoder = cfg.train_encoder
    init = Path(cfg.init_from) if cfg.init_from else None
    if init and not ((init / "compressor").is_dir() or (init / "decoder").is_dir()):
        raise FileNotFoundError(f"--init_from {init}: no compressor/ or decoder/ folder there to continue from")
    bb = Backbone.from_pretrained(cfg.base_model, device=device)
    if init and (init / "compressor").is_dir():
        comp = ContextCompressor.from_pretrained(bb, init / "compressor")
        comp.config = replace(comp.config, segment_tokens=cfg.segment_tokens or comp.config.segment_tokens,
                              proportional_vectors=cfg.proportional_vectors or comp.config.proportional_vectors)
        if comp.encoder_adapter and train_encoder:
            bb.load_adapter(init / "compressor" / "encoder", ENCODER_ADAPTER, trainable=True)
    else:
        norm = bb.model.get_input_embeddings().weight.detach().float().norm(dim=-1).mean().item() \
            if cfg.rescale_vectors else None
        comp = ContextCompressor.untrained(bb, CompressorConfig(
            base_model=cfg.base_model, segment_tokens=cfg.segment_tokens or NEW_SEGMENT_TOKENS,
            summary_tokens=cfg.summary_tokens, hidden_size=bb.hidden_size,
            vector_norm=None if norm is None else round(norm, 4), center_vectors=cfg.center_vectors,
            proportional_vectors=cfg.proportional_vectors))
        if train_encoder:
            bb.add_adapter(ENCODER_ADAPTER, _lora(cfg.encoder_r, cfg.encoder_alpha, cfg.encoder_targets))
    if init and (init / "decoder").is_dir():
        bb.load_adapter(init / "decoder", DECODER_ADAPTER, trainable=True)
    else:
        bb.add_adapter(DECODER_ADAPTER, _lora(cfg.decoder_r, cfg.decoder_alpha, cfg.decoder_targets, cfg.decoder_dropout))
    for n, p in bb.model.named_parameters():  # train exactly the LoRA weights we own (+ summary below)
        p.requires_grad_("lora_" in n and (train_encoder if ENCODER_ADAPTER in n else cfg.train_decoder))
    comp.summary.requires_grad_(train_encoder)
    if cfg.grad_checkpointing:
        bb.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lean:
        use_lean(bb, compile=cfg.compile and device.type == "cuda", checkpoint=cfg.grad_checkpointing)
    bb.model.train()
    return bb, comp


def use_lean(bb: Backbone, compile: bool, checkpoint: bool) -> None:
    """Route the training forward passes through ``LeanStack``, or say why the transformers modules stay."""
    from .lean_llama import LeanStack, support

    reasons = [r for a in bb.adapters if (r := support(bb.model, a))]
    if reasons:
        logger.info("training through the transformers modules: %s", reasons[0])
        return
    bb.train_stack = LeanStack(bb.model, compile=compile, checkpoint=checkpoint)


# -- batches ---------------------------------------------------------------------------------
@dataclass
class Example:
    chunks: list[list[int]]  # token ids of each context chunk, in prompt order
    question: str
    answer: list[int]  # answer token ids (EOS appended by the batcher)
    grad_chunks: list[int] = field(default_factory=list)  # chunks that must carry encoder gradients
    vectors: list[torch.Tensor] | None = None  # finetune: precomputed (frozen compressor) vectors
    text_chunks: list[int] = field(default_factory=list)  # chunks given as plain text (re-expanded), not vectors


class TaskSampler:
    """Draws pretraining examples of the three tasks from a token corpus."""

    def __init__(self, corpus: Corpus, tokenizer, cfg: TrainConfig, seed: int):
        self.corpus, self.tok, self.cfg = corpus, tokenizer, cfg
        self.rng, self.nrng = random.Random(seed), np.random.default_rng(seed)
        mix = [kv.split(":") for kv in cfg.task_mix.split(",")]
        self.tasks, self.weights = [k for k, _ in mix], [float(v) for _, v in mix]
        self.kind_weights = fact_kind_weights(cfg.fact_weights)
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.sentence_end = {i for i, t in enumerate(vocab) if t and (t.endswith(".") or "Ċ" in t or t.endswith("\n"))}

    def step(self) -> tuple[str, list[Example]]:
        """One optimizer step's examples: one task, one chunk count, ~segments_per_step segments."""
        task = self.rng.choices(self.tasks, self.weights)[0]
        lo, hi = (self.cfg.min_chunks, self.cfg.max_chunks) if task in ("qa", "cloze") else (1, 4)
        n_chunks = 1 if task == "ae" else self._log_uniform(lo, hi)
        length = self.cfg.segment_tokens if self.rng.random() < self.cfg.full_chunk_prob else self.rng.randint(self.cfg.segment_tokens // 8, self.cfg.segment_tokens)
        n_ex = max(1, self.cfg.segments_per_step // n_chunks)
        return task, [getattr(self, task)(n_chunks, length) for _ in range(n_ex)]

    def _log_uniform(self, lo: int, hi: int) -> int:
        return min(hi, int(math.exp(self.rng.uniform(math.log(lo), math.log(hi + 1)))))

    def _tokens(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def qa(self, n_chunks: int, length: int) -> Example:
        """1..``max_facts`` facts hidden at sentence boundaries; the question asks about one of them,
        so the encoder must keep every fact, not guess which one matters."""
        n_facts = self.rng.randint(1, self.cfg.max_facts)
        if self.cfg.same_kind_prob and self.rng.random() < self.cfg.same_kind_prob:  # at 0 no draw: old data stay
            facts = self._same_kind_facts(max(2, n_facts))
        else:
            facts = [make_fact(self.rng, self._fact_kind()) for _ in range(n_facts)]
        chunks = [self.corpus.window(self.nrng, length) for _ in range(n_chunks)]
        placed: dict[int, list[list[int]]] = {}
        for sentence in (s for f in facts for s in f.sentences):
            placed.setdefault(self.rng.randrange(n_chunks), []).append(self._tokens(" " + sentence))
        for ci, inserts in placed.items():  # one chunk at a time: trimming room never cuts a fact placed before
            base = chunks[ci][: max(1, len(chunks[ci]) - sum(map(len, inserts)))]
            cuts = [i + 1 for i, t in enumerate(base) if t in self.sentence_end] or [len(base)]
            new, prev = [], 0
            for at, ids in zip(sorted(self.rng.choice(cuts + [0]) for _ in inserts), inserts):
                new += base[prev:at] + ids
                prev = at
            chunks[ci] = new + base[prev:]
        asked = self.rng.choice(facts)
        question, answer = asked.question, asked.answer
        if self.cfg.choice_prob and self.rng.random() < self.cfg.choice_prob:  # at 0 no draw: old data stay
            question, answer = self._multiple_choice(asked)
        return self._maybe_expand(Example(chunks, question, self._tokens(answer), sorted(placed)))

    def _fact_kind(self) -> int | None:
        return None if self.kind_weights is None else self.rng.choices(range(KINDS), self.kind_weights)[0]

    def _same_kind_facts(self, n: int) -> list[Fact]:
        """``n`` facts of one MANY_SUBJECTS kind (drawn with the kind weights) with distinct answers."""
        kinds = sorted(MANY_SUBJECTS)
        weights = None if self.kind_weights is None else [self.kind_weights[k] for k in kinds]
        kind = self.rng.choices(kinds, weights)[0] if weights is None or sum(weights) else self.rng.choice(kinds)
        facts: list[Fact] = []
        for _ in range(20 * n):
            fact = make_fact(self.rng, kind)
            if all(fact.answer != f.answer and fact.question != f.question for f in facts):
                facts.append(fact)
            if len(facts) == n:
                break
        return facts

    def _multiple_choice(self, fact: Fact) -> tuple[str, str]:
        """The question with the answer and 3 wrong options of the same template family (digits where the
        answer has digits), in the layout inference uses (``prompts.question_text``); the answer is the letter."""
        wrong: list[str] = []
        for _ in range(50):
            other = make_fact(self.rng, fact.kind).answer
            if other not in wrong and other != fact.answer and \
                    any(c.isdigit() for c in other) == any(c.isdigit() for c in fact.answer):
                wrong.append(other)
            if len(wrong) == 3:
                break
        options = wrong + [fact.answer]
        self.rng.shuffle(options)
        return question_text(fact.question, options), chr(ord("A") + options.index(fact.answer))

    def _maybe_expand(self, ex: Example) -> Example:
        """Give one chunk as text: usually the one holding the answer, sometimes a distractor, so the
        decoder learns to use re-expanded text but still read the vectors."""
        if len(ex.chunks) > 1 and self.rng.random() < self.cfg.expand_prob:
            right = ex.grad_chunks[0] if ex.grad_chunks else 0
            ex.text_chunks = [right if self.rng.random() < 0.7 else self.rng.randrange(len(ex.chunks))]
        return ex

    def cloze(self, n_chunks: int, length: int) -> Example:
        """Real-text fact recall: a word blanked out of a sentence of one chunk."""
        chunks = [self.corpus.window(self.nrng, length) for _ in range(n_chunks)]
        for _ in range(8):
            ci = self.rng.randrange(n_chunks)
            sentences = [x.strip() for x in _SENTENCE.split(self.tok.decode(chunks[ci])) if len(x.split()) >= 6]
            if not sentences:
                continue
            sent = self.rng.choice(sentences[1:-1] or sentences)  # inner sentences are not cut off
            words = [w for w in _WORD.findall(sent) if len(w) >= 3]
            if not words:
                continue
            rare = [w for w in words if w[0].isupper() or w[0].isdigit()]
            word = self.rng.choice(rare or words)
            blanked = sent.replace(word, "____", 1)
            q = f'Which word is missing from this sentence of the context: "{blanked}"?'
            return self._maybe_expand(Example(chunks, q, self._tokens(word), [ci]))
        return self.ae(1, length)

    def ae(self, n_chunks: int, length: int) -> Example:
        chunk = self.corpus.window(self.nrng, length)
        return Example([chunk], AE_QUESTION, chunk, [0])

    def lm(self, n_chunks: int, length: int) -> Example:
        seq = self.corpus.window(self.nrng, n_chunks * length + self.cfg.lm_tokens)
        chunks = [seq[i * length:(i + 1) * length] for i in range(n_chunks)]
        return Example(chunks, LM_QUESTION, seq[n_chunks * length:], list(range(n_chunks)))


def grad_split(examples: list[Example], grad_budget: int) -> tuple[list[tuple[int, int, list[int]]], list[int]]:
    """The chunks encoded as vectors, as (example, chunk, tokens) in document order, and the indices of those
    encoded with gradients: the first ``grad_budget`` gradient chunks (the others are no-grad distractors)."""
    flat = [(i, j, c) for i, ex in enumerate(examples) for j, c in enumerate(ex.chunks) if j not in ex.text_chunks]
    want = {(i, j) for i, ex in enumerate(examples) for j in ex.grad_chunks}
    return flat, [k for k, (i, j, _) in enumerate(flat) if (i, j) in want][:grad_budget]


def encode_chunks(comp: ContextCompressor, examples: list[Example], grad_budget: int,
                  expand_at: ExpandAt = "end") -> list[list]:
    """Vectors for every chunk (text for ``text_chunks``), in prompt order: text chunks placed by ``expand_at``
    exactly as inference places re-expanded chunks; gradients as ``grad_split`` says."""
    flat, grad_ids = grad_split(examples, grad_budget)
    rest = sorted(set(range(len(flat))) - set(grad_ids))
    out: dict[int, torch.Tensor] = {}
    for ids, grad in ((grad_ids, True), (rest, False)):
        for b in range(0, len(ids), 256):
            part = ids[b:b + 256]
            by_len: dict[int, list[int]] = {}
            for k in part:  # equal lengths per forward pass: no padding needed
                by_len.setdefault(len(flat[k][2]), []).append(k)
            for ks in by_len.values():
                segs = [flat[k][2] for k in ks]
                out.update(zip(ks, comp.kept(comp.encode_segments(segs, grad=grad), segs)))
    vec = {(i, j): out[k] for k, (i, j, _) in enumerate(flat)}
    tok = comp.backbone.tokenizer
    return [[vec[(i, j)] if (i, j) in vec else tok.decode(ex.chunks[j])
             for j in arrange_expanded(range(len(ex.chunks)), ex.text_chunks, expand_at)]
            for i, ex in enumerate(examples)]


def step_flops(cost: Cost, summary_tokens: int, examples: list[Example], grad_budget: int,
               labels: torch.Tensor) -> torch.Tensor:
    """Model FLOPs of one training step: MFU's numerator, in PaLM's convention (what the step needs; activation
    recomputation is not counted). Each encoder segment (tokens + summary slots) runs forward; those with
    gradients also backward. Each decoder row, unpadded, runs forward and backward, with the vocabulary projection
    on its answer tokens only. The base weights are frozen, so a backward multiplies by each weight once (input
    gradients; the LoRA weights' own are negligible) and runs attention twice. A 0-d float64 tensor; from the
    batcher's labels (on the host) it is counted without waiting for the GPU."""
    def flops(tokens, logits, grad: bool):
        f = cost.forward_flops(tokens, logits)
        return 2 * f + 2 * cost.layers * cost.attn_dim * tokens * tokens if grad else f

    labelled = labels != -100
    positions = torch.arange(1, labels.shape[1] + 1, device=labels.device, dtype=torch.float64)
    lengths = (labelled * positions).amax(1)  # a row ends at its last label: padding is not counted
    total = flops(lengths, labelled.sum(1, dtype=torch.float64), True).sum()
    if examples[0].vectors is None:  # finetuning reads precomputed vectors: no encoder
        flat, grad_ids = grad_split(examples, grad_budget)
        grad = set(grad_ids)
        total += sum(flops(len(c) + summary_tokens, 0, k in grad) for k, (_, _, c) in enumerate(flat))
    return total


def cut_vectors(rows: list[list]) -> tuple[list[list], list[tuple[torch.Tensor, torch.Tensor]]]:
    """The decoder's inputs cut off the encoder's graph: every vector that carries gradients becomes a
    detached leaf. Returns the new rows and (encoder output, leaf) pairs for ``encoder_backward``.

    Why: the backbone's active LoRA adapter is global state, and activation checkpointing recomputes
    layers during backward with whatever adapter is active then. Backward in two passes (decoder, then
    encoder under its own adapter) keeps every recomputation on the adapter its forward used."""
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def leaf(v):
        if not isinstance(v, torch.Tensor) or not v.requires_grad:
            return v
        pairs.append((v, v.detach().requires_grad_()))
        return pairs[-1][1]

    return [[leaf(v) for v in row] for row in rows], pairs


def encoder_backward(comp: ContextCompressor, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Second half of the backward pass: the vectors' gradients into the encoder LoRA and summary embeddings."""
    done = [(v, leaf.grad) for v, leaf in pairs if leaf.grad is not None]
    if done:
        with comp.backbone.use(comp.encoder_adapter):
            torch.autograd.backward([v for v, _ in done], [g for _, g in done])


class DecoderBatcher:
    """Builds right-padded decoder inputs ``[chat prompt with vectors] + answer + EOS`` and labels.

    The labels stay on the host, where ``answer_loss`` and ``step_flops`` read them without waiting for the
    GPU. All text of a batch is embedded in one lookup after one copy: a copy per row, each waiting for the
    GPU to drain its queue, left the training loop bound by the host."""

    def __init__(self, bb: Backbone):
        self.bb, self.gen = bb, Generator(bb)
        self.eos = end_of_answer_id(bb.tokenizer)
        self._ids: dict[str, list[int]] = {}  # the chat template's pieces recur in every row

    def _tokens(self, text: str) -> list[int]:
        if (ids := self._ids.get(text)) is None:
            ids = self.bb.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(self._ids) < 10_000:
                self._ids[text] = ids
        return ids

    def __call__(self, vectors: list[list[torch.Tensor]], questions: list[str], answers: list[list[int]]):
        ids: list[int] = []  # every text token of the batch, embedded at once
        rows, label_rows = [], []
        for vecs, q, ans in zip(vectors, questions, answers):
            parts, n = [], 0  # vector tensors and (start, end) spans of ``ids``
            for piece in [*self.gen.chat_pieces(qa_pieces(vecs, q), system=SYSTEM_PROMPT), ans + [self.eos]]:
                if isinstance(piece, torch.Tensor):
                    parts.append(piece)
                else:
                    piece = piece if isinstance(piece, list) else self._tokens(piece)
                    parts.append((len(ids), len(ids) + len(piece)))
                    ids += piece
                n += len(piece)
            rows.append(parts)
            label_rows.append([-100] * (n - len(ans) - 1) + ans + [self.eos])
        emb = self.bb.embed(torch.tensor(ids).to(self.bb.device, non_blocking=True))
        x = torch.nn.utils.rnn.pad_sequence(
            [torch.cat([emb[p[0]:p[1]] if isinstance(p, tuple) else p.to(emb.dtype) for p in parts]) for parts in rows],
            batch_first=True)
        labels = torch.tensor([lab + [-100] * (x.shape[1] - len(lab)) for lab in label_rows])
        return x, labels


def exact_tokens(tokenizer, counts: np.ndarray, rare_below: int) -> torch.Tensor:
    """Which vocabulary entries a reader must copy exactly: any with a digit, and those the corpus (``counts``,
    one per token id; missing ids count 0) holds fewer than ``rare_below`` times: pieces of names and codes."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    counts = np.pad(counts, (0, max(0, len(pieces) - len(counts))))
    digits = np.array([any(c.isdigit() for c in p) for p in pieces])
    return torch.from_numpy(digits | (counts[:len(pieces)] < rare_below))


def exact_token_weights(tokenizer, counts: np.ndarray, weight: float, rare_below: int) -> torch.Tensor:
    """Loss weight per vocabulary entry: ``weight`` for the exact tokens (``exact_tokens``), 1 for the rest.

    The compressor drops exactly these (docs/training.md: wrong years are near misses, names come out misspelt),
    while a plain mean lets the ~88% of tokens the decoder could guess from the language alone steer its gradient."""
    return torch.where(exact_tokens(tokenizer, counts, rare_below), weight, 1.0).float()


def answer_loss(bb: Backbone, x: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 8192,
                token_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean CE over answer tokens (and token accuracy); logits only where there is a label. With
    ``token_weights`` (one per vocabulary entry, on the model's device) the mean is weighted by the target token.

    The vocabulary projection runs ``chunk_tokens`` rows at a time under activation checkpointing, so a
    step of 256 autoencoded 512-token chunks never holds its 131k x 49k fp32 logits (26 GB) at once.
    Labels on the host (the batcher's) select the answer positions without a GPU sync."""
    with bb.use(DECODER_ADAPTER):
        hidden = bb.hidden_states(x)  # right pad: causal only
    labels = labels.cpu()
    rows, cols = (labels[:, 1:] != -100).nonzero(as_tuple=True)  # position j predicts label j + 1
    where = (rows * hidden.shape[1] + cols).to(hidden.device, non_blocking=True)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, where)
    t = labels[rows, cols + 1].to(hidden.device, non_blocking=True)
    head = bb.model.get_output_embeddings()
    w = token_weights[t] if token_weights is not None else torch.ones_like(t, dtype=torch.float32)
    ce = partial(checkpoint, _ce_sum, use_reentrant=False) if torch.is_grad_enabled() else _ce_sum
    parts = [ce(head, h[i:i + chunk_tokens], t[i:i + chunk_tokens], w[i:i + chunk_tokens])
             for i in range(0, t.shape[0], chunk_tokens)]
    return sum(p[0] for p in parts) / w.sum(), sum(p[1] for p in parts) / t.shape[0]


def _ce_sum(head: torch.nn.Module, h: torch.Tensor, t: torch.Tensor,
            w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(h).float()
    ce = F.cross_entropy(logits, t, reduction="none")
    return (ce * w).sum(), (logits.argmax(-1) == t).sum().float().detach()


# -- the loop ---------------------------------------------------------------------------------
def _lr(step: int, cfg: TrainConfig, base: float, progress: float) -> float:
    """Linear warmup, then cosine to 0 over ``progress`` in [0, 1] (steps or wall-clock, whichever is ahead)."""
    if step < cfg.warmup_steps:
        return base * (step + 1) / cfg.warmup_steps
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def save_checkpoint(bb: Backbone, comp: ContextCompressor, out: Path, cfg: TrainConfig, state: dict) -> None:
    """compressor/ (summary + encoder LoRA), decoder/ (PEFT LoRA) and training state, all safetensors/JSON."""
    out.mkdir(parents=True, exist_ok=True)
    comp.save_pretrained(out / "compressor")
    bb.model.save_pretrained(str(out / "decoder_tmp"), selected_adapters=[DECODER_ADAPTER])
    src = out / "decoder_tmp" / DECODER_ADAPTER if (out / "decoder_tmp" / DECODER_ADAPTER).is_dir() else out / "decoder_tmp"
    import shutil

    shutil.rmtree(out / "decoder", ignore_errors=True)
    shutil.move(str(src), str(out / "decoder"))
    shutil.rmtree(out / "decoder_tmp", ignore_errors=True)
    for f in out.rglob("adapter_model.safetensors"):
        _halve(f)
        cfg_file = f.with_name("adapter_config.json")  # name the base model portably, not by cache path
        cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "base_model_name_or_path": cfg.base_model},
                                       indent=2))
    meta = {"train_config": asdict(cfg), "compressor_fingerprint": _saved_fingerprint(comp), **state}
    (out / "training_state.json").write_text(json.dumps(meta, indent=2))


def _halve(path: Path) -> None:
    """Store LoRA weights as fp16: half the size to ship, and PEFT upcasts them again on load."""
    from safetensors.torch import load_file, save_file

    tensors = {k: v.half() if v.dtype == torch.float32 else v for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


@torch.no_grad()
def _saved_fingerprint(comp: ContextCompressor) -> str:
    """The fingerprint the compressor has once loaded from disk: its encoder LoRA is stored as fp16
    (``_halve``), so fingerprint fp16-rounded weights; the in-memory fp32 ones would name no store."""
    lora = [p for n, p in comp.backbone.model.named_parameters()
            if "lora_" in n and ENCODER_ADAPTER in n and p.dtype == torch.float32]
    kept = [p.data for p in lora]
    for p in lora:
        p.data = p.data.half().float()
    comp._fingerprint = None
    try:
        return comp.fingerprint()
    finally:
        for p, d in zip(lora, kept):
            p.data = d
        comp._fingerprint = None


@torch.no_grad()
def evaluate(bb: Backbone, comp: ContextCompressor, sampler: TaskSampler, batcher: DecoderBatcher,
             n: int = 32) -> dict:
    """Held-out teacher-forced answer accuracy per task, plus QA exact match at 8 and 32 chunks (greedy)."""
    bb.model.eval()
    res = {}
    for task, chunks in (("qa", 8), ("qa", 32), ("cloze", 4), ("ae", 1), ("lm", 2)):
        exs = [getattr(sampler, task)(chunks, comp.config.segment_tokens) for _ in range(n)]
        vecs = encode_chunks(comp, exs, 0)
        x, labels = batcher(vecs, [e.question for e in exs], [e.answer for e in exs])
        loss, acc = answer_loss(bb, x, labels)
        res[f"{task}{chunks}_loss"], res[f"{task}{chunks}_acc"] = round(loss.item(), 4), round(acc.item(), 4)
        if task in ("qa", "cloze"):
            gen = Generator(bb)
            prompts = [gen.chat_pieces(qa_pieces(v, e.question), system=SYSTEM_PROMPT) for v, e in zip(vecs, exs)]
            from .generation import GenerationConfig

            outs = gen.generate(prompts, GenerationConfig(max_new_tokens=24), DECODER_ADAPTER)
            gold = [bb.tokenizer.decode(e.answer).strip().lower() for e in exs]
            res[f"{task}{chunks}_em"] = sum(g in o.text.lower() for g, o in zip(gold, outs)) / n
    bb.model.train()
    return res


def train_compressor(cfg: TrainConfig, held_out_eval: bool = True) -> Path:
    """Pretrain summary embeddings + encoder LoRA + decoder LoRA on qa/ae/lm tasks.

    ``held_out_eval=False`` skips the periodic and final held-out evaluation (profiling runs)."""
    from accelerate import Accelerator

    acc = Accelerator(mixed_precision="bf16" if cfg.bf16 and torch.cuda.is_available() else "no")
    if not cfg.train_encoder:  # a frozen encoder needs no gradients for any chunk
        cfg = replace(cfg, grad_segments=0)
    torch.manual_seed(cfg.seed)
    bb, comp = setup_models(cfg, acc.device)
    cfg = replace(cfg, segment_tokens=comp.config.segment_tokens)  # the sampler cuts chunks the compressor's size
    torch.manual_seed(cfg.seed + acc.process_index)  # same initial weights everywhere, different data
    train_c, held_c = Corpus.load(cfg.corpus).split()
    if comp.vector_mean is not None and not comp.vector_mean.any():  # new: fit it (same segments in every process)
        rng = np.random.default_rng(cfg.seed)
        comp.fit_vector_mean([train_c.window(rng, cfg.segment_tokens) for _ in range(256)])
    sampler = TaskSampler(train_c, bb.tokenizer, cfg, cfg.seed + 1000 * acc.process_index)
    weights = None if cfg.exact_token_weight == 1 else exact_token_weights(
        bb.tokenizer, np.bincount(train_c.tokens), cfg.exact_token_weight, cfg.rare_token_count).to(acc.device)
    held = TaskSampler(held_c, bb.tokenizer, replace(cfg, expand_prob=0.0), 12345)  # eval: vectors only
    batcher = DecoderBatcher(bb)
    lora = [p for n, p in bb.model.named_parameters() if p.requires_grad]
    groups = [{"params": lora, "lr": cfg.lr}]
    if cfg.train_encoder:
        groups.append({"params": [comp.summary], "lr": cfg.summary_lr})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, betas=(0.9, 0.95), fused=acc.device.type == "cuda")
    return _loop(cfg, acc, bb, comp, opt, sampler.step, held if held_out_eval else None, batcher, cfg.max_steps,
                 weights)


def qa_target(ex: QAExample) -> tuple[str, str]:
    """The question as the decoder reads it and the answer it learns to give. Multiple choice: the lettered
    options in the question and the letter as the answer, exactly as evaluation asks and scores it."""
    if not ex.choices:
        return question_text(ex.question), ex.answers[0]
    return question_text(ex.question, ex.choices), chr(ord("A") + gold_choice(ex.choices, ex.answers))


def train_finetune(cfg: TrainConfig) -> Path:
    """LLoCO finetuning: frozen compressor, documents compressed once into a store, decoder LoRA only."""
    from accelerate import Accelerator

    from .data import read_qa
    from .pipeline import LLoCO
    from .store import CompressedStore

    if not cfg.qa_file:
        raise ValueError("finetune needs --qa_file FILE.jsonl")
    if cfg.exact_token_weight != 1:
        raise ValueError("exact_token_weight weighs tokens by their corpus counts: compressor training only")
    acc = Accelerator(mixed_precision="bf16" if cfg.bf16 and torch.cuda.is_available() else "no")
    cfg = replace(cfg, train_encoder=False)  # LLoCO finetuning never changes the compressor
    torch.manual_seed(cfg.seed)
    bb, comp = setup_models(cfg, acc.device)
    torch.manual_seed(cfg.seed + acc.process_index)
    examples = []
    with acc.main_process_first():  # process 0 compresses into the store; the others then find every chunk there
        store = CompressedStore(Path(cfg.out_dir) / "store", fingerprint=comp.fingerprint(), create=True,
                                compressor_config=asdict(comp.config))
        lloco = LLoCO(bb, comp, store)
        for ex in read_qa(cfg.qa_file):
            if not ex.answers:
                raise ValueError(f"example {ex.id!r} has no answer to train on")
            keys = lloco.compress_texts([c.text for d in ex.documents for c in lloco.chunk(d)])
            question, answer = qa_target(ex)
            ids = bb.tokenizer(answer, add_special_tokens=False)["input_ids"]
            examples.append(Example([], question, ids, vectors=store.get_many(keys)))
    rng = random.Random(cfg.seed + acc.process_index)  # each process draws its own batches
    steps_per_epoch = math.ceil(len(examples) / (cfg.batch_size * acc.num_processes))
    order: list[Example] = []

    def next_batch() -> tuple[str, list[Example]]:
        if len(order) < cfg.batch_size:
            order.extend(rng.sample(examples, len(examples)))
        batch = order[:cfg.batch_size]
        del order[:cfg.batch_size]
        return "finetune", batch

    lora = [p for p in bb.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": lora, "lr": cfg.lr}], weight_decay=cfg.weight_decay,
                            fused=acc.device.type == "cuda")
    total = min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    return _loop(cfg, acc, bb, comp, opt, next_batch, None, DecoderBatcher(bb), total)


def _phase(name: str):
    """A named range for ``scripts/profile_train.py`` (torch.profiler); costs nothing when not profiling."""
    return torch.profiler.record_function(f"train/{name}")


def _peak_memory() -> str:
    return f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if torch.cuda.is_available() else ""


def _across(acc, value: float, op: str) -> float:
    """One number reduced over all processes (``"sum"`` or ``"mean"``); every process must call it."""
    return acc.reduce(torch.tensor([value], dtype=torch.float64, device=acc.device), op).item()


def _elapsed(acc, t0: float) -> float:
    """Seconds since ``t0``, the same number in every process (their mean): the wall-clock stop and the
    learning rate depend on it, and processes that disagreed would drift apart or, stopping a step apart,
    leave the others waiting in a gradient all-reduce forever."""
    if acc.num_processes == 1:
        return time.time() - t0
    return _across(acc, time.time() - t0, "mean")


def _average_gradients(acc, params: list[torch.Tensor]) -> None:
    """Average the gradients over processes in one all-reduce of one flat fp32 buffer. There is no DDP wrapper
    (the adapters switch between passes), and one collective per LoRA matrix would be ~700 small ones a step.
    A parameter that a process's step left untouched adds zeros, so every process makes the same collective."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = acc.reduce(torch.cat([g.reshape(-1).float() for g in grads]), "mean")
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p).to(p.dtype)


def _in_sync(acc, params: list[torch.Tensor]) -> bool:
    """Whether every process holds the same trainable weights (collective: all processes call it)."""
    same = all(torch.equal(p.detach(), acc.reduce(p.detach().clone(), "mean")) for p in params)
    return _across(acc, float(same), "sum") == acc.num_processes


def _loop(cfg, acc, bb, comp, opt, next_batch, held, batcher, total: int,
          token_weights: torch.Tensor | None = None) -> Path:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # cuDNN attention cost ~2 ms of host time per call in the H100 profile (docs/training.md), more than its
    # kernel: with a few hundred calls a step the loop waited on it. Flash attention launches in microseconds.
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        out = _steps(cfg, acc, bb, comp, opt, next_batch, held, batcher, total, token_weights)
    # Every process waits for process 0's final save, then the process group is torn down explicitly: a process
    # that left while its peer still saved was killed at interpreter exit by gloo ("terminate called without an
    # active exception", SIGABRT) in CI.
    acc.wait_for_everyone()
    acc.end_training()
    return out


def _steps(cfg, acc, bb, comp, opt, next_batch, held, batcher, total: int,
           token_weights: torch.Tensor | None) -> Path:
    from tqdm.auto import tqdm

    out = Path(cfg.out_dir)
    cost, peak = Cost.of(bb.model), measure_peak_flops(acc.device)  # MFU = step_flops / time / peak
    budget = cfg.max_minutes * 60
    bar = tqdm(total=100, desc="train", disable=not acc.is_main_process,  # % of steps or of the time budget
               mininterval=1 if sys.stderr.isatty() else 30,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}")
    t0, tokens, flops, step, log = time.time(), 0, 0.0, 0, []
    mark = warm = (t0, 0, 0.0)  # (time, tokens, flops) at the last log line, and at the first (compiling is over)
    params = [p for g in opt.param_groups for p in g["params"]]
    if acc.num_processes > 1:  # replicas start from process 0's weights, whatever their own initialisation did
        from accelerate.utils import broadcast

        for p in params:
            p.data.copy_(broadcast(p.data.clone(), from_process=0))
    while step < total and (elapsed := _elapsed(acc, t0)) < budget:
        with _phase("sample"):
            task, exs = next_batch()
        progress = max(step / total, elapsed / budget)
        bar.update(int(100 * progress) - bar.n)
        for g, base in zip(opt.param_groups, (cfg.lr, cfg.summary_lr)):
            g["lr"] = _lr(step, cfg, base, progress)
        with acc.autocast():
            with _phase("encode"):
                if exs[0].vectors is None:
                    vecs, cut = cut_vectors(encode_chunks(comp, exs, cfg.grad_segments, cfg.expand_at))
                else:
                    vecs, cut = [[v.to(bb.device, bb.dtype) for v in e.vectors] for e in exs], []
            with _phase("decoder_batch"):
                x, labels = batcher(vecs, [e.question for e in exs], [e.answer for e in exs])
            with _phase("decoder_loss"):
                loss, tok_acc = answer_loss(bb, x, labels, cfg.loss_chunk_tokens, token_weights)
        with _phase("backward"), bb.use(DECODER_ADAPTER):
            acc.backward(loss)
        with _phase("encoder_backward"):
            encoder_backward(comp, cut)
        if acc.num_processes > 1:
            _average_gradients(acc, params)
        with _phase("optimizer"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        tokens += sum(len(c) for e in exs for c in e.chunks) + x.shape[0] * x.shape[1]  # encoder + decoder
        flops += float(step_flops(cost, comp.config.summary_tokens, exs, cfg.grad_segments, labels))
        step += 1
        if step % 20 == 0 and acc.is_main_process:
            loss_v, acc_v = loss.item(), tok_acc.item()  # waits for the GPU: the window below is timed exactly
            now = time.time()
            rate, mfu = (tokens - mark[1]) / (now - mark[0]), (flops - mark[2]) / (now - mark[0]) / peak
            mark, warm = (now, tokens, flops), warm if step > 20 else (now, tokens, flops)
            logger.info("step %d %s loss %.3f acc %.3f | %.0f tok/s, MFU %.1f%% (last 20 steps%s) | %.1f min%s",
                        step, task, loss_v, acc_v, rate, 100 * mfu, ", process 0" if acc.num_processes > 1 else "",
                        (now - t0) / 60, _peak_memory())
            bar.set_postfix_str(f"step {step}, loss {loss_v:.3f}, {rate:.0f} tok/s, MFU {100 * mfu:.1f}%")
        if step % cfg.eval_every == 0 and acc.is_main_process and held is not None:
            with _phase("eval"):
                ev = evaluate(bb, comp, held, batcher, cfg.eval_examples)
            log.append({"step": step, "minutes": round((time.time() - t0) / 60, 2), **ev})
            logger.info("eval %s", ev)
        if step % cfg.save_every == 0 and acc.is_main_process:
            save_checkpoint(bb, comp, out, cfg, {"step": step, "eval": log})
    bar.update(bar.total - bar.n)
    bar.close()
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the time below includes all queued work
    el = time.time() - t0
    after_warm = {"mfu_after_step_20": round((flops - warm[2]) / (t0 + el - warm[0]) / peak, 6)} \
        if warm[0] > t0 and acc.num_processes == 1 else {}  # the first 20 steps compile and tune kernels
    sync = {}
    if acc.num_processes > 1:  # throughput of all processes together; replicas that drifted apart are reported
        tokens, flops = int(_across(acc, tokens, "sum")), _across(acc, flops, "sum")
        peak *= acc.num_processes
        sync = {"processes": acc.num_processes, "replicas_in_sync": _in_sync(acc, params)}
    if acc.is_main_process:
        final = evaluate(bb, comp, held, batcher, cfg.eval_examples) if held is not None else {}
        log.append({"step": step, "minutes": round(el / 60, 2), **final})
        speed = {"tokens_per_s": round(tokens / el), "seconds": round(el), "mfu": round(flops / el / peak, 6),
                 "model_tflops_per_s": round(flops / el / 1e12, 6), "peak_tflops_per_s": round(peak / 1e12, 6),
                 **after_warm}
        save_checkpoint(bb, comp, out, cfg, {"step": step, "eval": log, "tokens": tokens, **sync, **speed})
        logger.info("done: %d steps, %.0f tok/s, MFU %.1f%% (%s after step 20)%s, final eval %s", step, tokens / el,
                    100 * flops / el / peak, f"{100 * after_warm['mfu_after_step_20']:.1f}%" if after_warm else "-",
                    _peak_memory(), final)
    return out
