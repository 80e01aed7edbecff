"""Attention in a cached ControlNet training step, timed under each of PyTorch's SDPA backends.

    python benchmarks/attention_backends.py [--family sd15] [--batch 16] [--out FILE]
    python benchmarks/attention_backends.py --family sdxl --batch 2
    python benchmarks/attention_backends.py --tiny      # the tiny SD fixture, any device

The GPU profile of an SD 1.5 step put its attention kernels at about a fifth of the GPU's peak,
against three fifths for its convolutions and matrix products. This script tells whether another
backend does better on the step's own shapes. It records every ``scaled_dot_product_attention``
call of one training step (the ControlNet and the frozen UNet, as the trainer's cached step runs
them) on meta tensors, with whether its backward runs: the UNet's down and middle blocks get no
gradient. Then it times each distinct call, forward and (where the step has it) backward, in
bf16 on random tensors laid out as diffusers lays them out, under the default choice and under
each backend alone. It prints milliseconds per step by backend, with the FLOP rate from
``torch.utils.flop_counter``, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from diffusers.models.attention_processor import Attention
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_benchmark import resolution_of

from controlnet_trainer import fixtures, reference_models

# None: PyTorch picks, as the trainer leaves it; then each backend forced alone.
BACKENDS = (
    None,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
)


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """The shape of one scaled_dot_product_attention call, and which of its inputs need a gradient."""

    batch: int
    heads: int
    query_tokens: int
    key_tokens: int
    head_dim: int
    query_grad: bool
    key_value_grad: bool

    @property
    def backward(self) -> bool:
        return self.query_grad or self.key_value_grad

    def label(self) -> str:
        grads = "q" * self.query_grad + "kv" * self.key_value_grad
        return (
            f"{self.batch}x{self.heads}x{self.query_tokens}x{self.head_dim} attends {self.key_tokens}"
            f" ({'grad ' + grads if grads else 'forward only'})"
        )


def _record(calls: list[tuple[str, AttentionCall]], name: str):
    def hook(module: Attention, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        context = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        source = hidden if context is None else context
        query_tokens = hidden.shape[1] if hidden.ndim == 3 else hidden.shape[2] * hidden.shape[3]
        # q, k and v need a gradient when their input does or their projection is trained.
        call = AttentionCall(
            batch=hidden.shape[0],
            heads=module.heads,
            query_tokens=query_tokens,
            key_tokens=query_tokens if context is None else context.shape[1],
            head_dim=module.inner_dim // module.heads,
            query_grad=hidden.requires_grad or module.to_q.weight.requires_grad,
            key_value_grad=source.requires_grad or module.to_k.weight.requires_grad,
        )
        calls.append((name, call))

    return hook


def attention_calls(parts: dict[str, torch.nn.Module], resolution: int, batch: int) -> list[tuple[str, AttentionCall]]:
    """Every attention call of one cached training step, in order, as (module name, call)."""
    controlnet, step = reference_models.meta_training_step(parts, resolution, batch)
    calls: list[tuple[str, AttentionCall]] = []
    handles = [
        module.register_forward_pre_hook(_record(calls, f"{owner}.{name}"), with_kwargs=True)
        for owner, model in (("controlnet", controlnet), ("unet", parts["unet"]))
        for name, module in model.named_modules()
        if isinstance(module, Attention)
    ]
    try:
        step()
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _inputs(call: AttentionCall, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """q, k, v as diffusers passes them: (batch, heads, tokens, head_dim) views of (batch, tokens, heads, head_dim)."""
    shapes = (
        (call.query_tokens, call.query_grad),
        (call.key_tokens, call.key_value_grad),
        (call.key_tokens, call.key_value_grad),
    )
    return [
        torch.randn(call.batch, tokens, call.heads, call.head_dim, device=device, dtype=dtype, requires_grad=grad)
        for tokens, grad in shapes
    ]


def _run(call: AttentionCall, leaves: list[torch.Tensor]) -> None:
    query, key, value = (leaf.transpose(1, 2) for leaf in leaves)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value)
    if call.backward:
        out.backward(torch.ones_like(out))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_flops(call: AttentionCall) -> float:
    """FLOPs of the call's forward and backward as the MFU figures count them: on meta tensors.

    There attention runs as matrix products, with no recomputation in the backward; the counter
    knows no formula for the CPU's fused kernel, which it would count as nothing.
    """
    with FlopCounterMode(display=False) as counter:
        _run(call, _inputs(call, torch.device("meta"), torch.float32))
    return counter.get_total_flops()


def time_call(
    call: AttentionCall, backend: SDPBackend | None, device: torch.device, dtype: torch.dtype, repeats: int
) -> tuple[float | None, str]:
    """Median seconds of one call under ``backend`` (None: PyTorch's own pick), or None and why not."""
    leaves = _inputs(call, device, dtype)
    times = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
                for _ in range(repeats + 2):  # two warm-up calls
                    _synchronize(device)
                    started = time.perf_counter()
                    _run(call, leaves)
                    _synchronize(device)
                    times.append(time.perf_counter() - started)
                    for leaf in leaves:
                        leaf.grad = None
        except RuntimeError as error:
            # PyTorch says why a backend declined in its warnings; the error itself is generic.
            reasons = [str(warning.message).splitlines()[0] for warning in caught] or [str(error).splitlines()[0]]
            return None, "; ".join(dict.fromkeys(reasons))
    return statistics.median(times[2:]), ""


def _parts(family: str, work: Path) -> dict[str, torch.nn.Module]:
    if family == "tiny":
        return reference_models.meta_components(fixtures.build_tiny_sd(work / "tiny-sd"))
    tokenizers = reference_models.write_tokenizers(family, work)
    with torch.device("meta"):
        return reference_models.components(family, tokenizers)


def step_flops_by_operator(parts: dict[str, torch.nn.Module], resolution: int, batch: int) -> dict[str, float]:
    """TFLOP of one cached training step per operator, counted as for MFU (attention is ``bmm`` there)."""
    _, step = reference_models.meta_training_step(parts, resolution, batch)
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_flop_counts()["Global"]
    return {str(op).removeprefix("aten."): count / 1e12 for op, count in sorted(flops.items(), key=lambda kv: -kv[1])}


def measure(family: str, batch: int, device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    """The step's attention calls grouped by shape, each timed under every backend, with per-step totals.

    ``repeats=0`` counts shapes and FLOPs only.
    """
    resolution = resolution_of(family, tiny=family == "tiny")
    with tempfile.TemporaryDirectory() as work:
        parts = _parts(family, Path(work))
        calls = attention_calls(parts, resolution, batch)
        by_operator = step_flops_by_operator(parts, resolution, batch)
    rows = []
    for call, count in collections.Counter(call for _, call in calls).items():
        timings = {}
        for backend in BACKENDS if repeats else ():
            seconds, why = time_call(call, backend, device, dtype, repeats)
            timings[_name(backend)] = {"ms": None if seconds is None else seconds * 1e3, "unavailable": why or None}
        rows.append(
            {
                **dataclasses.asdict(call),
                "label": call.label(),
                "calls_per_step": count,
                "tflop": call_flops(call) / 1e12,
                "backends": timings,
            }
        )
    return {
        "family": family,
        "batch": batch,
        "device": _device_name(device),
        "dtype": str(dtype),
        "torch": torch.__version__,
        "step_tflop_by_operator": by_operator,
        "calls": rows,
        "per_step": per_step(rows, timed=bool(repeats)),
    }


def per_step(rows: list[dict], timed: bool = True) -> dict[str, dict]:
    """Milliseconds and TFLOP/s of all the step's attention under each backend, and the best per shape.

    A backend that cannot run some shape gets no total: the step would fall back for that shape.
    """
    tflop = sum(row["tflop"] * row["calls_per_step"] for row in rows)
    columns = {}
    if timed:
        columns = {_name(backend): [row["backends"][_name(backend)]["ms"] for row in rows] for backend in BACKENDS}
        columns["best of each"] = [min(ms for ms in shape if ms is not None) for shape in zip(*columns.values())]
    totals = {}
    for name, times in columns.items():
        ms = None if None in times else sum(t * row["calls_per_step"] for t, row in zip(times, rows))
        totals[name] = {"ms": ms, "tflop_per_s": None if ms is None else tflop / (ms / 1e3)}
    return {"tflop": tflop, "backends": totals}


def _name(backend: SDPBackend | None) -> str:
    return "default" if backend is None else backend.name.lower()


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def print_report(result: dict) -> None:
    backends = [name for name in result["per_step"]["backends"] if name != "best of each"]
    print(
        f"{result['family']}, batch {result['batch']}, {result['dtype']} on {result['device']}, torch {result['torch']}"
    )
    print("| call | per step | TFLOP per step |" + "".join(f" {name} ms |" for name in backends))
    print("| --- | ---: | ---: |" + " ---: |" * len(backends))
    for row in result["calls"]:
        cells = "".join(f" {_ms(row['backends'][name]['ms'])} |" for name in backends)
        print(f"| {row['label']} | {row['calls_per_step']} | {row['tflop'] * row['calls_per_step']:.3g} |{cells}")
    step = result["step_tflop_by_operator"]
    print(
        f"\nthe step: {sum(step.values()):.3g} TFLOP: " + ", ".join(f"{op} {tflop:.3g}" for op, tflop in step.items())
    )
    print(f"its attention: {result['per_step']['tflop']:.3g} TFLOP")
    for name, total in result["per_step"]["backends"].items():
        rate = "" if total["ms"] is None else f" ({total['tflop_per_s']:.3g} TFLOP/s)"
        print(f"  {name}: {_ms(total['ms'])} ms per step{rate}")
    declined = collections.Counter(
        (name, timing["unavailable"])
        for row in result["calls"]
        for name, timing in row["backends"].items()
        if timing["unavailable"]
    )
    for (name, why), shapes in declined.items():
        print(f"  {name} declined {shapes} of {len(result['calls'])} shapes: {why}")


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("sd15", "sdxl"), default="sd15")
    parser.add_argument(
        "--batch", type=int, default=16, help="samples per step (gpu_benchmark.py: 16 for SD 1.5, 2 for SDXL)"
    )
    parser.add_argument("--tiny", action="store_true", help="the tiny SD fixture at 64 px instead")
    parser.add_argument(
        "--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="the trainer's weight dtype"
    )
    parser.add_argument(
        "--repeats", type=int, default=10, help="timed calls of each shape and backend; 0: count shapes and FLOPs only"
    )
    parser.add_argument("--out", default=None, help="JSON file for the figures")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = _parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = measure("tiny" if args.tiny else args.family, args.batch, device, getattr(torch, args.dtype), args.repeats)
    print_report(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
