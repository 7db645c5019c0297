"""How many aten ops one training pass dispatches: the host-side cost that bounds MFU on a small model.

    python3 scripts/count_train_ops.py [--tokens 64] [any `lloco train` option, e.g. --lean false]

Builds the models as `lloco train compressor` does (default model, CPU), runs one forward and one backward through
`Backbone.hidden_states` per adapter, and counts the ops that reach the dispatcher: views (metadata only) apart
from the rest (each one a kernel launch on a GPU). Counts do not depend on the device, so a change to the training
stack can be checked here before it costs GPU time (docs/training.md, "Throughput and what limits it").
"""

from __future__ import annotations

import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lloco_index.cli import split_options
from lloco_index.compressor import ENCODER_ADAPTER
from lloco_index.train import DECODER_ADAPTER, TrainConfig, setup_models

_METADATA = ("detach", "t", "_unsafe_view", "lift_fresh")  # no kernel, though not marked as views


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.is_view or func.__name__.split(".")[0] in _METADATA:
            self.views += 1
        else:
            self.ops += 1
        return func(*args, **(kwargs or {}))


def main(argv: list[str]) -> None:
    options = split_options(argv)[0]
    tokens = int(options.pop("tokens", "64"))
    torch.manual_seed(0)
    bb, _ = setup_models(TrainConfig.from_args(options), torch.device("cpu"))
    x = torch.randn(1, tokens, bb.hidden_size)
    print(f"stack: {type(bb.train_stack).__name__ if bb.train_stack else 'transformers + PEFT'}, {tokens} tokens")
    for adapter in (ENCODER_ADAPTER, DECODER_ADAPTER):
        with bb.use(adapter):
            bb.hidden_states(x).sum().backward()  # warm-up: lazy initialisation is not a pass's cost
            with OpCounter() as fwd:
                h = bb.hidden_states(x)
            with OpCounter() as bwd:
                h.sum().backward()
        print(f"{adapter}: forward {fwd.ops} ops + {fwd.views} views, backward {bwd.ops} ops + {bwd.views} views")


if __name__ == "__main__":
    main(sys.argv[1:])
