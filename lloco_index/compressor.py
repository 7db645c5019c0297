"""AutoCompressor-style context compressor: a text segment -> ``summary_tokens`` soft-prompt vectors.

Each segment is followed by ``summary_tokens`` learned embeddings (their own table, like
AutoCompressor's ``embed_summary``); the encoder (base model + optional encoder LoRA) runs over
``[segment, summary]`` and the final hidden states (after the final norm) at the summary positions
are the segment's compressed form (optionally centred and rescaled: ``center_vectors``,
``vector_norm``, for base models whose final-norm outputs dwarf their token embeddings). Segments
are compressed independently, so any retrieved subset of chunks can be assembled in any order.
``compress(..., accumulate=True)`` is AutoCompressor's recurrent mode for whole documents instead:
segment i also sees the vectors of segments 0..i-1 in front of it, so its vectors depend on
everything before it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .backbone import Backbone
from .generation import check_cancelled

ENCODER_ADAPTER = "lloco_encoder"
CONFIG_NAME = "compressor_config.json"
SUMMARY_NAME = "summary_embeddings.safetensors"
FORMAT_VERSION = 1


@dataclass
class CompressorConfig:
    """How text becomes vectors. Saved with the compressor; part of the store fingerprint."""

    base_model: str = field(default="smollm2-135m", metadata={"help": "embedded name, local folder or hub id"})
    segment_tokens: int = field(default=512, metadata={"help": "max text tokens per segment"})
    summary_tokens: int = field(default=24, metadata={"help": "vectors per segment (512/24 = 21.3x)"})
    hidden_size: int = field(default=576, metadata={"help": "must equal the base model's hidden size"})
    has_encoder_adapter: bool = field(default=False, metadata={"help": "an encoder LoRA is in encoder/"})
    store_dtype: str = field(default="float16", metadata={"help": "dtype of cached vectors"})
    center_vectors: bool = field(default=False, metadata={
        "help": "subtract a stored per-slot mean vector (the part every segment shares) before any rescaling"})
    vector_norm: float | None = field(default=None, metadata={
        "help": "rescale each vector to this L2 norm (e.g. the mean token-embedding norm); None keeps the final "
                "hidden states as they are, as AutoCompressor does"})
    proportional_vectors: bool = field(default=False, metadata={
        "help": "a segment shorter than segment_tokens keeps only its first ceil(len / ratio) vectors, so a short "
                "chunk (a document's tail, a paragraph) costs what its length does, not a full segment's vectors"})
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        for name in ("segment_tokens", "summary_tokens", "hidden_size"):
            if type(getattr(self, name)) is not int:
                raise ValueError(f"compressor config: {name} must be an integer, got {getattr(self, name)!r}")
        if self.segment_tokens < 1 or self.summary_tokens < 1:
            raise ValueError("segment_tokens and summary_tokens must be >= 1")
        for name in ("center_vectors", "proportional_vectors"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"compressor config: {name} must be true or false, got {getattr(self, name)!r}")
        norm = self.vector_norm
        if norm is not None and not (isinstance(norm, (int, float)) and not isinstance(norm, bool) and norm > 0):
            raise ValueError(f"compressor config: vector_norm must be a positive number or null, got {norm!r}")
        if self.store_dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"store_dtype must be float16, bfloat16 or float32, got {self.store_dtype!r}")

    @property
    def ratio(self) -> float:
        """Text tokens per vector for a full segment."""
        return self.segment_tokens / self.summary_tokens

    def vectors_for(self, n_tokens: int) -> int:
        """Vectors kept for a segment of ``n_tokens`` text tokens.

        Trimming is exact: the summary slots attend causally, so a segment's first k vectors are the same
        whether or not the later slots follow them."""
        if not self.proportional_vectors:
            return self.summary_tokens
        return min(self.summary_tokens, max(1, -(-n_tokens * self.summary_tokens // self.segment_tokens)))

    @classmethod
    def from_json(cls, path: Path) -> "CompressorConfig":
        raw = json.loads(Path(path).read_text())
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        if raw.get("format_version", 1) > FORMAT_VERSION:
            raise ValueError(f"{path}: made by a newer lloco-index (format {raw['format_version']}); upgrade")
        return cls(**known)


class ContextCompressor:
    """Compress texts into ``[n_vectors, hidden]`` tensors: ``summary_tokens`` per segment (fewer for a short
    one with ``proportional_vectors``).

    Example::

        comp = ContextCompressor.from_pretrained(backbone)           # bundled default
        vecs = comp.compress("A long text ...")                       # Tensor [24, 576]
    """

    def __init__(self, backbone: Backbone, config: CompressorConfig, summary_embeddings: torch.Tensor,
                 vector_mean: torch.Tensor | None = None):
        shape = (config.summary_tokens, backbone.hidden_size)
        if summary_embeddings.shape != shape:
            raise ValueError(f"summary embeddings have shape {tuple(summary_embeddings.shape)}, expected "
                             f"{shape} for this base model")
        if config.center_vectors and vector_mean is not None and vector_mean.shape != shape:
            raise ValueError(f"vector mean has shape {tuple(vector_mean.shape)}, expected {shape}")
        self.backbone = backbone
        self.config = config
        self.summary = torch.nn.Parameter(summary_embeddings.to(backbone.device, torch.float32))
        self.vector_mean: torch.Tensor | None = None  # zeros until fit_vector_mean
        if config.center_vectors:
            mean = torch.zeros(shape) if vector_mean is None else vector_mean
            self.vector_mean = mean.to(backbone.device, torch.float32)
        self._fingerprint: str | None = None

    @classmethod
    def untrained(cls, backbone: Backbone, config: CompressorConfig | None = None) -> "ContextCompressor":
        """Summary embeddings initialised to the embeddings of distinct tokens spread over the vocabulary.

        AutoCompressor starts every row at the EOS embedding. Identical rows give near-identical vectors and
        gradients (SmolLM2 at init: 0.95 mean cosine between one segment's vectors, 0.79 with distinct rows).
        A vector mean (``center_vectors``) starts at zero: see ``fit_vector_mean``.
        """
        config = config or CompressorConfig(base_model=backbone.name_or_path, hidden_size=backbone.hidden_size)
        table = backbone.model.get_input_embeddings().weight.detach().float()
        ids = torch.linspace(table.shape[0] // 8, table.shape[0] - 1, config.summary_tokens).long()
        return cls(backbone, config, table[ids].clone())

    @classmethod
    def from_autocompressor(cls, backbone: Backbone, path: str | Path,
                            segment_tokens: int = 1536) -> "ContextCompressor":
        """The compressor of an AutoCompressor checkpoint folder that ``backbone`` was loaded from.

        Its LoRA is merged into the weights, so there is no encoder adapter: only the
        ``embed_summary`` table is read. ``segment_tokens`` defaults to LLoCO's 1536.
        """
        from .checkpoints import read_summary_embeddings

        table = read_summary_embeddings(path)
        config = CompressorConfig(base_model=backbone.name_or_path, segment_tokens=segment_tokens,
                                  summary_tokens=table.shape[0], hidden_size=backbone.hidden_size,
                                  store_dtype="bfloat16")  # the model's own dtype on GPU: lossless
        return cls(backbone, config, table)

    @classmethod
    def from_pretrained(cls, backbone: Backbone, path: str | Path) -> "ContextCompressor":
        path = Path(path)
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{path}: not a compressor folder (no {CONFIG_NAME})")
        config = CompressorConfig.from_json(path / CONFIG_NAME)
        if config.hidden_size != backbone.hidden_size:
            raise ValueError(f"{path}: compressor was trained for hidden size {config.hidden_size}, "
                             f"base model {backbone.name_or_path!r} has {backbone.hidden_size}")
        try:
            tensors = load_file(str(path / SUMMARY_NAME))
            summary = tensors["summary_embeddings"]
            mean = tensors["vector_mean"] if config.center_vectors else None
        except (OSError, SafetensorError, KeyError) as e:
            raise ValueError(f"{path}: {SUMMARY_NAME} is missing or unreadable ({e}); "
                             "compressor weights are read from safetensors only") from None
        if config.has_encoder_adapter:
            backbone.load_adapter(path / "encoder", ENCODER_ADAPTER)
        return cls(backbone, config, summary, mean)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.config.has_encoder_adapter = ENCODER_ADAPTER in self.backbone.adapters
        if self.config.has_encoder_adapter:
            self.backbone.model.save_pretrained(str(path / "encoder"), selected_adapters=[ENCODER_ADAPTER])
            nested = path / "encoder" / ENCODER_ADAPTER  # PEFT nests non-default adapter names
            if nested.is_dir():
                for f in nested.iterdir():
                    f.replace(path / "encoder" / f.name)
                nested.rmdir()
        tensors = {"summary_embeddings": self.summary.detach().float().cpu().contiguous()}
        if self.vector_mean is not None:
            tensors["vector_mean"] = self.vector_mean.float().cpu().contiguous()
        save_file(tensors, str(path / SUMMARY_NAME))
        (path / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2, sort_keys=True))
        self._fingerprint = None

    @property
    def encoder_adapter(self) -> str | None:
        return ENCODER_ADAPTER if ENCODER_ADAPTER in self.backbone.adapters else None

    def fingerprint(self) -> str:
        """Hash of config, summary embeddings, encoder adapter and a sample of base weights.

        Two compressors with the same fingerprint produce the same vectors (up to the compute dtype), so a
        store keyed by it can never serve vectors from another compressor. Weights are hashed rounded to
        bf16, so the same compressor has the same fingerprint in fp32 on a CPU and in bf16 on a GPU: a
        store ingested on a GPU serves a CPU.
        """
        if self._fingerprint is None:
            cfg = asdict(self.config)
            if not cfg["proportional_vectors"]:  # absent before it existed: fixed-count stores keep their fingerprint
                del cfg["proportional_vectors"]
            h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
            h.update(_canonical(self.summary))
            if self.vector_mean is not None:
                h.update(_canonical(self.vector_mean))
            for name, p in sorted(self.backbone.model.named_parameters()):
                if "lora_" in name and ENCODER_ADAPTER not in name:
                    continue  # decoder adapters do not change the vectors
                h.update(name.encode() + str(tuple(p.shape)).encode())
                h.update(_canonical(p.flatten()[:2048]))
            self._fingerprint = h.hexdigest()[:32]
        return self._fingerprint

    def segments(self, text: str) -> list[list[int]]:
        ids = self.backbone.tokenizer(text, add_special_tokens=False)["input_ids"]
        n = self.config.segment_tokens
        return [ids[i:i + n] for i in range(0, len(ids), n)]

    def encode_segments(self, segments: list[list[int]], grad: bool = False,
                        prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Encode token-id segments (one batch) into ``[B, summary_tokens, hidden]``.

        Left-padded so the summary positions are the last ``summary_tokens`` of every row, with
        positions counted from each row's first real token. ``prefix`` ``[B, P, hidden]`` are
        vectors placed before each segment (accumulate mode). ``grad=True`` is the training path.
        """
        return self._adapt(self._summary_states(segments, grad, prefix))

    def kept(self, vectors: torch.Tensor, segments: list[list[int]]) -> list[torch.Tensor]:
        """Each segment's rows of an ``encode_segments`` batch: all of them, or the first
        ``config.vectors_for(len)`` of a short one (``proportional_vectors``)."""
        return [v[:self.config.vectors_for(len(s))] for v, s in zip(vectors, segments)]

    def _summary_states(self, segments: list[list[int]], grad: bool, prefix: torch.Tensor | None) -> torch.Tensor:
        """The encoder's final hidden states (after the final norm) at the summary positions."""
        bb, k = self.backbone, self.config.summary_tokens
        width = max(len(s) for s in segments)
        n_prefix = 0 if prefix is None else prefix.shape[1]
        pad = bb.tokenizer.pad_token_id
        # built on the host, copied without waiting for the GPU (a blocking copy would drain its queue)
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in segments]).to(bb.device, non_blocking=True)
        padded = any(len(s) < width for s in segments)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * (n_prefix + len(s) + k) for s in segments]
                            ).to(bb.device, non_blocking=True) if padded else None
        summary = self.summary.to(bb.dtype).unsqueeze(0).expand(len(segments), -1, -1)
        tokens = bb.embed(ids)
        if prefix is not None:  # padding goes before the prefix: [pad, prefix, segment, summary]
            prefix = prefix.to(bb.device, tokens.dtype)
            tokens = torch.stack([torch.cat([t[:width - len(s)], p, t[width - len(s):]])
                                  for t, p, s in zip(tokens, prefix, segments)])
        embeds = torch.cat([tokens, summary], dim=1)
        positions = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)  # counted from the first token
        with bb.use(self.encoder_adapter), torch.set_grad_enabled(grad):
            # the decoder stack alone: hidden states after the final norm, no vocabulary projection
            out = bb.hidden_states(embeds, attention_mask=mask, position_ids=positions)
        return out[:, -k:]

    def _adapt(self, vectors: torch.Tensor) -> torch.Tensor:
        """Final hidden states at the summary positions -> the vectors the decoder reads."""
        if self.vector_mean is not None:  # SmolLM2: ~83% of a vector's norm is shared by every segment
            vectors = vectors - self.vector_mean.to(vectors.dtype)
        if self.config.vector_norm is not None:  # final-norm outputs can dwarf token embeddings (SmolLM2: 53 vs 3.2)
            vectors = vectors * (self.config.vector_norm / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-6))
        return vectors

    @torch.no_grad()
    def fit_vector_mean(self, segments: list[list[int]], batch_size: int = 32) -> None:
        """Set the per-slot mean that ``center_vectors`` subtracts, from full-length sample segments."""
        if not self.config.center_vectors:
            raise ValueError("this compressor does not center its vectors (center_vectors is false)")
        total = sum(self._summary_states(segments[i:i + batch_size], False, None).float().sum(0)
                    for i in range(0, len(segments), batch_size))
        self.vector_mean = total / len(segments)
        self._fingerprint = None

    @torch.inference_mode()
    def compress(self, texts: str | list[str], batch_size: int = 16, show_progress_bar: bool = False,
                 accumulate: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Compress each text (any length: several segments) into a CPU tensor in ``store_dtype``.

        Segments are sorted by length so batches carry little padding; results come back in input order.
        ``accumulate=True``: AutoCompressor's recurrent mode (each segment sees the vectors of the
        previous segments of its text), as LLoCO compresses whole documents.
        """
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        per_text = [self.segments(t) for t in texts]
        for i, s in enumerate(per_text):
            if not s:
                raise ValueError(f"text {i} is empty: nothing to compress")
        run = self._accumulated if accumulate else self._independent
        dtype = getattr(torch, self.config.store_dtype)
        out = [v.to("cpu", dtype) for v in run(per_text, batch_size, show_progress_bar)]
        return out[0] if single else out

    def _independent(self, per_text: list[list[list[int]]], batch_size: int, progress: bool) -> list[torch.Tensor]:
        owners = [i for i, s in enumerate(per_text) for _ in s]
        segs = [seg for s in per_text for seg in s]
        order = sorted(range(len(segs)), key=lambda j: len(segs[j]), reverse=True)
        outs: list[torch.Tensor | None] = [None] * len(segs)
        from tqdm.auto import tqdm

        for b in tqdm(range(0, len(order), batch_size), disable=not progress, desc="compress"):
            check_cancelled()
            idx = order[b:b + batch_size]
            batch = [segs[j] for j in idx]
            for j, v in zip(idx, self.kept(self.encode_segments(batch).to("cpu"), batch)):
                outs[j] = v.clone()
        return [torch.cat([outs[j] for j in range(len(segs)) if owners[j] == i]) for i in range(len(per_text))]

    def _accumulated(self, per_text: list[list[list[int]]], batch_size: int, progress: bool) -> list[torch.Tensor]:
        """Step i encodes segment i of every text that has one, behind that text's vectors so far."""
        bb = self.backbone
        memory = [torch.zeros(0, bb.hidden_size, device=bb.device, dtype=bb.dtype) for _ in per_text]
        from tqdm.auto import tqdm

        for step in tqdm(range(max(map(len, per_text))), disable=not progress, desc="compress (accumulate)"):
            active = [i for i, s in enumerate(per_text) if len(s) > step]
            for b in range(0, len(active), batch_size):
                idx = active[b:b + batch_size]
                # all [step * k, hidden]: only a text's last segment can be short (proportional_vectors)
                prefix = torch.stack([memory[i] for i in idx]) if step else None
                segs = [per_text[i][step] for i in idx]
                for i, v in zip(idx, self.kept(self.encode_segments(segs, prefix=prefix), segs)):
                    memory[i] = torch.cat([memory[i], v])
        return [m.to("cpu") for m in memory]


def _canonical(t: torch.Tensor) -> bytes:
    """Bytes of ``t`` rounded to bf16 (then widened), whatever dtype and device it is held in."""
    return t.detach().to(torch.bfloat16).float().cpu().numpy().tobytes()
