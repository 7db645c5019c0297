"""Where a training step's time goes: a few compressor-pretraining steps under torch.profiler.

    python3 scripts/profile_train.py --corpus corpus.npz --max_steps 12 [--trace false] [any `lloco train` option]

Prints the wall time of each phase of the loop (``train/sample``, ``train/encode``, ``train/decoder_batch``,
``train/decoder_loss``, ``train/backward``, ``train/optimizer``) and the ops that take the most device (CUDA) or
CPU time, then writes a Chrome trace beside the run (``--out_dir``/trace.json; ``--trace false`` skips it: for 40
steps of the long-context QA recipe, writing it outlasted a 5-minute device call). Warm-up steps are included:
profile 10+ steps so they do not dominate. Held-out evaluation is skipped.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from lloco_index.cli import split_options
from lloco_index.train import TrainConfig, _parse_bool, train_compressor


def main(argv: list[str]) -> None:
    options = split_options(argv)[0]
    trace = _parse_bool("trace", options.pop("trace", "true"))
    cfg = TrainConfig.from_args({"out_dir": "runs/profile", "max_steps": "12", "eval_every": "100000",
                                 "save_every": "100000", **options})
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        train_compressor(cfg, held_out_eval=False)
    events = prof.key_averages()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print("phase wall time (CPU side, all steps):")
    for e in sorted((e for e in events if e.key.startswith("train/")), key=lambda e: -e.cpu_time_total):
        print(f"  {e.key:<22} {e.cpu_time_total / 1e3:10.1f} ms  ({e.count} calls)")
    print(events.table(sort_by=f"self_{device}_time_total", row_limit=25))
    if trace:
        out = Path(cfg.out_dir) / "trace.json"
        prof.export_chrome_trace(str(out))
        print(f"trace: {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
