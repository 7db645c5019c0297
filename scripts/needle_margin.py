"""How sure is the decoder of the needle's whole answer? Log-probabilities of its half and whole forms.

    python3 scripts/needle_margin.py --haystack DIR [--lengths 128000] [--depths 25 50 75] [--expand 1]
        [--adapter DIR] [--store DIR] [--device cpu]

A whole-document needle miss that stops at "eat a sandwich" is one greedy choice, at the word after it. This
scores each form as the complete answer (``LLoCO.choose``, the prompt `lloco eval niah` builds), so a miss can be
told apart from a near miss, and two adapters can be compared on how far each is from the whole answer.
"""

from __future__ import annotations

import argparse

from lloco_index import LLoCO
from lloco_index.eval.niah import DEFAULT_NEEDLE, DEFAULT_QUESTION, Haystack, load_haystack

FORMS = ("eat a sandwich", "eat a sandwich and sit in Dolores Park",
         "eat a sandwich and sit in Dolores Park on a sunny day")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--haystack", required=True, nargs="+")
    ap.add_argument("--lengths", type=int, nargs="+", default=[128000])
    ap.add_argument("--depths", type=float, nargs="+", default=[25, 50, 75])
    ap.add_argument("--expand", type=int, default=1)
    ap.add_argument("--adapter", default=None, help="decoder adapter folder (default: the bundled one)")
    ap.add_argument("--store", default=None, help="store folder, to reuse chunks compressed by `lloco eval niah`")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    lloco = LLoCO.from_pretrained("smollm2-135m", adapter=args.adapter, store=args.store, device=args.device)
    hay = Haystack(load_haystack(args.haystack), lloco.backbone.tokenizer)
    print("length depth positions " + " | ".join(FORMS))
    for length in args.lengths:
        for depth in args.depths:
            context = hay.build(length, depth, DEFAULT_NEEDLE)
            a = lloco.choose(DEFAULT_QUESTION, FORMS, contexts=[context], expand=args.expand)
            print(length, depth, a.prompt_tokens, " ".join(f"{s:.2f}" for s in a.choice_scores), flush=True)


if __name__ == "__main__":
    main()
