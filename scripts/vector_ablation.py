"""How much do the compressed vectors tell the decoder about the answer? A teacher-forced ablation.

    python3 scripts/vector_ablation.py --corpus corpus.npz [--task qa|cloze|ae|lm] [--n 24] [--chunks 1] [--out F]

Held-out examples of a training task (default qa: one invented fact hidden in real text; the training sampler
on the corpus' held-out tail) are scored with the answer teacher-forced, under four contexts: the example's own vectors, another
example's vectors (same shapes, wrong content), the chunks as plain text, and no context. If own and
another's vectors score alike, the vectors carry the gist of the text but not its facts. The exact-token loss is
the same loss over the answer tokens that must be copied exactly (digits, and tokens rare in the corpus:
``train.exact_tokens``), the ones the compressor loses first.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from lloco_index.compressor import CONFIG_NAME, CompressorConfig
from lloco_index.corpus import Corpus
from lloco_index.pipeline import bundled
from lloco_index.train import (DecoderBatcher, TaskSampler, TrainConfig, answer_loss, encode_chunks,
                               exact_tokens, setup_models)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--init_from", default=str(bundled("smollm2-135m", "compressor").parent),
                    help="folder with compressor/ and decoder/ (default: the bundled defaults)")
    ap.add_argument("--n", type=int, default=24, help="questions")
    ap.add_argument("--chunks", type=int, default=1, help="context chunks per question (one holds the fact)")
    ap.add_argument("--task", default="qa", choices=["qa", "cloze", "ae", "lm"],
                    help="qa: invented facts; cloze: a blanked word; ae: repeat the chunk; lm: continue it")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    base = CompressorConfig.from_json(Path(args.init_from) / "compressor" / CONFIG_NAME).base_model
    cfg = TrainConfig(init_from=args.init_from, base_model=base, corpus=args.corpus, max_facts=1,
                      train_encoder=False)
    bb, comp = setup_models(cfg, torch.device(args.device))
    bb.model.eval()
    train, held = Corpus.load(args.corpus).split()
    exact = exact_tokens(bb.tokenizer, np.bincount(train.tokens), cfg.rare_token_count).float()
    sampler = TaskSampler(held, bb.tokenizer, replace(cfg, segment_tokens=comp.config.segment_tokens), seed=7)
    exs = [getattr(sampler, args.task)(args.chunks, comp.config.segment_tokens) for _ in range(args.n)]
    own = encode_chunks(comp, exs, 0)
    contexts = {
        "own vectors": own,
        "another example's vectors": own[1:] + own[:1],
        "chunks as text": [[bb.tokenizer.decode(c) for c in e.chunks] for e in exs],
        "no context": [[] for _ in exs],
    }
    batcher, rows = DecoderBatcher(bb), {}
    for name, ctx in contexts.items():
        x, labels = batcher(ctx, [e.question for e in exs], [e.answer for e in exs])
        loss, acc = answer_loss(bb, x, labels)
        exact_loss, _ = answer_loss(bb, x, labels, token_weights=exact.to(x.device))
        rows[name] = {"answer_loss": round(loss.item(), 4), "answer_token_accuracy": round(acc.item(), 4),
                      "exact_token_loss": round(exact_loss.item(), 4)}
        print(f"{name:<28} answer loss {loss.item():.3f}   answer-token accuracy {acc.item():.3f}   "
              f"exact-token loss {exact_loss.item():.3f}")
    if args.out:
        args.out.write_text(json.dumps({"init_from": args.init_from, "task": args.task, "n": args.n, "chunks": args.chunks,
                                        "compressor": comp.fingerprint(), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
