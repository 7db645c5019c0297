"""Save a random-weight LLaMA of a benchmark shape with a real tokenizer, as a model folder training can load.

    python3 scripts/random_model.py --shape 7b --tokenizer smollm2-135m --out /root/m7b
    lloco train compressor --base_model /root/m7b --segment_tokens 1536 --summary_tokens 50 ...

Why: the trainer's MFU at the paper's LLaMA-2-7B shape, where no real checkpoint is at hand. The weights are
random, so losses mean nothing; the FLOPs and the time are those of the real shape (its vocabulary is the
tokenizer's). On a GPU the model is built there in bf16 (seconds); a 7B folder is ~14 GB.
"""

from __future__ import annotations

import argparse

import torch

from lloco_index.bench_utils import SHAPES, save_random_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="7b", choices=sorted(s for s in SHAPES if SHAPES[s].random))
    ap.add_argument("--tokenizer", default="smollm2-135m", help="embedded model name or model folder")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(save_random_model(SHAPES[args.shape], args.tokenizer, args.out, device))


if __name__ == "__main__":
    main()
