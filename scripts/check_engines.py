"""Why fast and eager greedy tokens can part in bf16: compare each engine's logits with fp32 ones.

Checks that in fp32 the engines give the same greedy tokens, then teacher-forces the fp32 greedy
answer of the default model through the eager loop, the fast engine's
lean forward and its transformers-modules forward, all in bf16, and prints the fp32 top-1/top-2
margin per step next to each engine's relative logit error and argmax agreement. CPU is enough:

    PYTHONPATH=$PWD python3 scripts/check_engines.py [--tokens 12] [--device cpu]
"""

from __future__ import annotations

import argparse

import torch

from lloco_index.backbone import Backbone
from lloco_index.fast_decode import FastDecodeConfig, FastDecoder
from lloco_index.generation import GenerationConfig, Generator

PROMPT = "Explain in a few sentences how a lighthouse lens focuses light."


def eager_logits(bb: Backbone, x: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        emb = torch.cat([x, bb.embed(torch.tensor([tokens[:-1]]))], 1)
        return bb.model(inputs_embeds=emb).logits[0, x.shape[1] - 1:].float()


def fast_logits(bb: Backbone, x: torch.Tensor, tokens: list[int], lean: bool) -> torch.Tensor:
    _, runner = FastDecoder(bb, FastDecodeConfig(lean=lean))._acquire(None, 1, x.shape[1] + len(tokens))
    out: list[torch.Tensor] = []
    with torch.inference_mode():
        runner.prefill(x.clone(), torch.ones(1, x.shape[1], dtype=torch.long, device=x.device), len(tokens),
                       lambda lg: (out.append(lg.float().clone()), lg.argmax(-1))[1])
        for t in tokens[:-1]:
            runner.tok.fill_(t)
            runner._body()
            out.append(runner.logits.clone())
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    ref = Backbone.from_pretrained("smollm2-135m", device=args.device, dtype=torch.float32)
    gen = Generator(ref, fast=False)
    gen.eos_ids = []
    pieces = gen.chat_pieces([PROMPT])
    state = None
    for state in gen._decode([pieces], GenerationConfig(max_new_tokens=args.tokens), None):
        pass
    tokens = state[0][0]
    for lean in (True, False):  # in fp32 the engines agree token for token
        fast = Generator(ref, fast=True)
        fast.fast.config.lean, fast.eos_ids = lean, []
        for state in fast._decode([pieces], GenerationConfig(max_new_tokens=args.tokens), None):
            pass
        print(f"fp32 fast ({'lean' if lean else 'transformers'}) greedy tokens equal to eager: {state[0][0] == tokens}")
    want = eager_logits(ref, gen.embed_pieces(pieces)[None], tokens)
    top2 = want.topk(2, -1).values
    print("fp32 top-1 minus top-2 logit per step:", [round(float(a - b), 3) for a, b in top2])
    bf = Backbone.from_pretrained("smollm2-135m", device=args.device, dtype=torch.bfloat16)
    x = Generator(bf, fast=False).embed_pieces(pieces)[None]
    for name, got in (("bf16 eager", eager_logits(bf, x, tokens)),
                      ("bf16 fast, lean", fast_logits(bf, x, tokens, True)),
                      ("bf16 fast, transformers", fast_logits(bf, x, tokens, False))):
        err = (got - want).norm(dim=-1) / want.norm(dim=-1)
        agree = "".join("." if a == b else "X" for a, b in zip(got.argmax(-1).tolist(), want.argmax(-1).tolist()))
        print(f"{name:24s} logit error vs fp32: mean {err.mean():.4f} max {err.max():.4f}; argmax per step {agree}")


if __name__ == "__main__":
    main()
