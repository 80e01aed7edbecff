"""Where a training step's time goes: the real trainer, unchanged, under torch.profiler.

    python benchmarks/profile_step.py [--sdxl] [--out profile.json] -- <train_controlnet.py flags>

A hook after every optimizer step advances the profiler's schedule: it skips the first
``--wait`` steps (loading, warm-up, compilation), then records ``--active`` steps. It prints the
operators that took the most time (device time on a GPU, CPU time otherwise; each operator's own
time, so nothing is counted twice) and that time split into kinds of work: matrix products,
convolutions, attention, normalisation, copies and casts, the optimizer, data loading, Python
between operators (on the CPU clock), and the rest, which is mostly elementwise work. It also
lists the top operators by input shapes, which names the layer behind an operator such as
``aten::add_``. ``--max_train_steps`` must cover ``--wait`` + 1 + ``--active`` steps.
``gpu_benchmark.py --profile`` runs its cases through this script.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.profiler import ProfilerActivity, profile, schedule

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controlnet_trainer import cli

# The first matching kind names an operator; the order matters ("convolution" before "copy").
KINDS = (
    ("host: Python between operators", ("profilerstep",)),  # a step's own CPU time (CPU clock only)
    ("data loading", ("dataloader",)),
    ("attention", ("attention", "scaled_dot_product")),
    ("convolution", ("conv",)),
    ("matrix products", ("::mm", "addmm", "bmm", "matmul", "linear")),
    ("normalisation", ("group_norm", "layer_norm", "batch_norm")),
    ("optimizer", ("adam", "_foreach_", "optimizer")),
    ("copies and casts", ("copy_", "_to_copy", "clone", "contiguous", "::cat")),
)


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, marks in KINDS if any(mark in lowered for mark in marks)), "other")


def summarize(events, on_device: bool, steps: int, top: int) -> dict:
    """Per-step milliseconds of the operators with the most own time, and of each kind of work.

    On a GPU, kineto lists each kernel twice: as its own row, and inside the device time of the
    operator that launched it. Operators (CPU rows) give the split by kind, each kernel counted
    once under the innermost operator; kernel rows give the GPU's busy time and the top kernels.
    Annotation rows on the device (a profiler step, an optimizer step) span whole ranges and are
    left out of both.
    """
    per_step = 1e3 * steps
    kernels = [
        (e.key, e.self_device_time_total / per_step)
        for e in events
        if on_device and e.device_type != DeviceType.CPU and not e.is_user_annotation
    ]
    operators = by_time(own_time(events, on_device, steps, lambda e: e.key))
    total = sum(ms for _, ms in operators)
    kinds: dict[str, float] = {}
    for name, ms in operators:
        kinds[kind_of(name)] = kinds.get(kind_of(name), 0.0) + ms
    summary = {
        "clock": "device" if on_device else "cpu",
        "ms_per_step": total,
        "kinds_ms_per_step": dict(sorted(kinds.items(), key=lambda item: -item[1])),
        "top_operators_ms_per_step": dict(operators[:top]),
    }
    if on_device:
        kernels = by_time(kernels)
        summary["kernel_ms_per_step"] = sum(ms for _, ms in kernels)
        summary["top_kernels_ms_per_step"] = dict(kernels[:top])
    return summary


def own_time(events, on_device: bool, steps: int, name) -> list[tuple[str, float]]:
    """(name(operator), its own milliseconds per step) for the operator rows: on a GPU, the device
    time of the kernels it launched; otherwise its CPU time."""
    per_step = 1e3 * steps
    return [
        (name(e), (e.self_device_time_total if on_device else e.self_cpu_time_total) / per_step)
        for e in events
        if e.device_type == DeviceType.CPU
    ]


def by_shape(events, on_device: bool, steps: int, top: int) -> dict[str, float]:
    """Per-step milliseconds of the operators with the most own time, one row per operator and
    input shapes: which layer launched them. A conv bias add and a grad accumulation are both
    ``aten::add_``; their shapes ([N, C, H, W] with [1, C, 1, 1], or two equal ones) tell them apart.
    """
    return dict(by_time(own_time(events, on_device, steps, lambda e: f"{e.key} {e.input_shapes}"))[:top])


def by_time(items: list[tuple[str, float]]) -> list[tuple[str, float]]:
    return sorted((item for item in items if item[1] > 0), key=lambda item: -item[1])


def print_summary(summary: dict) -> None:
    total = summary["ms_per_step"]
    print(f"{summary['clock']} time per step: {total:.1f} ms", flush=True)
    tables = [
        ("kind", summary["kinds_ms_per_step"]),
        ("operator", summary["top_operators_ms_per_step"]),
        ("operator and input shapes", summary["top_operator_shapes_ms_per_step"]),
    ]
    if "top_kernels_ms_per_step" in summary:
        tables.append(("kernel", summary["top_kernels_ms_per_step"]))
    for title, table in tables:
        print(f"{title:<100}{'ms/step':>10}{'share':>8}")
        for name, ms in table.items():
            print(f"{name[:99]:<100}{ms:>10.2f}{ms / total:>8.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdxl", action="store_true", help="train_controlnet_sdxl.py's flags")
    parser.add_argument("--wait", type=int, default=5, help="optimizer steps before recording")
    parser.add_argument("--active", type=int, default=3, help="optimizer steps recorded")
    parser.add_argument("--top", type=int, default=25, help="operators listed")
    parser.add_argument("--out", default=None, help="write the summary here as JSON")
    parser.add_argument("flags", nargs=argparse.REMAINDER, help="-- then the training flags")
    args = parser.parse_args()
    flags = args.flags[1:] if args.flags[:1] == ["--"] else args.flags

    on_device = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    plan = schedule(wait=args.wait, warmup=1, active=args.active, repeat=1)
    with profile(activities=activities, schedule=plan, record_shapes=True) as profiler:
        hook = register_optimizer_step_post_hook(lambda *_: profiler.step())
        try:
            cli.run(flags, family="sdxl" if args.sdxl else "sd")
        finally:
            hook.remove()
    summary = summarize(profiler.key_averages(), on_device, args.active, args.top)
    summary["top_operator_shapes_ms_per_step"] = by_shape(
        profiler.key_averages(group_by_input_shape=True), on_device, args.active, args.top
    )
    print_summary(summary)
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
