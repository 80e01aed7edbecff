"""Time the optimizer steps of any training script from outside it, so that scripts which log no
step times (diffusers' examples) and ours are timed by the same clock.

    python benchmarks/step_clock.py --out steps.json -- path/to/train_script.py <its flags>

It runs the script unchanged in this process, after registering PyTorch's global optimizer-step
hook, and writes the clock reading (``time.perf_counter``) after every optimizer step. The gaps
between readings are whole steps: data loading, forward, backward, the update and any per-step
logging. ``step_seconds`` turns them into a step time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import runpy
import statistics
import sys
import time
from pathlib import Path


def step_seconds(readings: list[float], warmup: int) -> float:
    """The median time of a step, leaving out the first ``warmup`` steps (at least 1: the clock
    has no reading before step 1). Step ``n`` takes the gap from reading ``n-1`` to ``n``."""
    gaps = [later - earlier for earlier, later in itertools.pairwise(readings)][max(warmup, 1) - 1 :]
    if not gaps:
        raise ValueError(f"{len(readings)} optimizer steps leave no step time after {warmup} of warm-up")
    return statistics.median(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file for the clock readings")
    parser.add_argument("script", help="the training script, then its flags")
    parser.add_argument("flags", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    # Not at the top: benchmark.py imports step_seconds, and a process that has loaded torch
    # passes its peak RSS on to every training process it starts.
    from torch.optim.optimizer import register_optimizer_step_post_hook

    readings: list[float] = []
    register_optimizer_step_post_hook(lambda *_: readings.append(time.perf_counter()))
    sys.argv = [args.script, *args.flags]
    # As if the script were run itself: Python puts a script's folder first on the import path.
    sys.path[0] = str(Path(args.script).resolve().parent)
    try:
        runpy.run_path(args.script, run_name="__main__")
    finally:
        Path(args.out).write_text(json.dumps({"optimizer_step_ends": readings}))


if __name__ == "__main__":
    main()
