"""GPU benchmark: the published SD 1.5 (512 px) and SDXL (1024 px) architectures, bf16.

    python benchmarks/gpu_benchmark.py [--out benchmarks/gpu_results.json] [--families sd15 sdxl]
    python benchmarks/gpu_benchmark.py --tiny     # the same cases on the tiny fixtures, any device

Models come from ``controlnet_trainer.reference_models`` (published configs, random weights, no
download). Every case is one real training process of ``train_controlnet.py`` or
``train_controlnet_sdxl.py`` on a fill dataset at the case's resolution with
``--mixed_precision=bf16 --allow_tf32``. Per case it reports samples per second (from the median
optimizer-step time after warm-up), model FLOP utilisation, and the peak GPU memory that the
trainer logs (``peak_memory_reserved_gib``: what PyTorch took from the card).

Steps are timed as the trainer logs them: the mean over each --logging_steps window (5 steps, so
the loss is read back, which waits for the GPU, once per window as in a real run). A case that
logs more often has its windows regrouped into the same 5-step blocks, so every case reports the
median of 5-step means; the first block is warm-up.

MFU = model FLOPs per sample x samples/s / 989 TFLOP/s (dense bf16 of an H100 or H200 SXM).
Model FLOPs are counted once per family with ``torch.utils.flop_counter`` on meta tensors: the
ControlNet forward and backward, the frozen UNet forward and its backward into the residuals,
and for the uncached path also the VAE encoder and the text encoders. Gradient checkpointing's
recomputation is not useful work, so it lowers MFU, as the usual definition has it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from benchmark import run_training

from controlnet_trainer import fixtures, reference_models

PEAK_BF16_FLOPS = 989e12
LOG_EVERY = 5  # steps per timed window; the first window (warm-up, compilation) is left out
MEMORY = ("--gradient_checkpointing", "--use_8bit_adam")
LOG_STAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")  # how a trainer log line begins
SAVE_LINE = re.compile(r"Saved the ControlNet to .* \((\d+(?:\.\d+)?) s\)")  # the trainer's final save
SHORT_NAMES = {
    "--gradient_checkpointing": "ckpt",
    "--use_8bit_adam": "adam8bit",
    "--set_grads_to_none": "grads-none",
    "--torch_compile": "compiled",
    "--logging_steps=1": "log-every-step",
    "--use_ema": "ema",
}


@dataclasses.dataclass(frozen=True)
class Case:
    family: str  # a reference_models family, or "tiny-sd"/"tiny-sdxl"
    batch: int
    cached: bool
    options: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        options = "+".join(SHORT_NAMES[o] for o in self.options) or "default"
        return f"{self.family} b{self.batch} {'cached' if self.cached else 'uncached'} {options}"

    @property
    def slug(self) -> str:
        """The name as a file name: the case's output folder, log and profile."""
        return self.name.replace(" ", "_").replace("+", "_")


def cases(family: str, tiny: bool) -> list[Case]:
    """Throughput at a full batch, then memory at batch 1 with the memory options."""
    name = f"tiny-{'sd' if family == 'sd15' else 'sdxl'}" if tiny else family
    lean = (*MEMORY, "--set_grads_to_none")
    if family == "sdxl":
        big = 2
        # The last two are the recipe diffusers gives for SDXL on a 24 GB card, as diffusers runs it
        # (uncached) and with the VAE and text encoders off the GPU (cached).
        return [Case(name, big, True), Case(name, big, False), Case(name, 1, False, lean), Case(name, 1, True, lean)]
    big = 2 if tiny else 16
    return [
        Case(name, big, True),
        # A larger batch shows whether the step is bound by the GPU (time grows with the batch)
        # or by issuing kernels from Python; compilation fuses the work between matrix products.
        Case(name, 3 * big, True),
        # (inductor takes minutes to compile on a CPU: --tiny leaves this one out)
        *([] if tiny else [Case(name, big, True, ("--torch_compile",))]),
        Case(name, big, False),
        # What reading the loss back after every step (diffusers' way) costs.
        Case(name, big, True, ("--logging_steps=1",)),
        # What keeping an exponential moving average of the weights costs per step.
        Case(name, big, True, ("--use_ema",)),
        Case(name, big, True, MEMORY),
        Case(name, big, True, lean),
        # diffusers documents 16 GB for SD 1.5 at batch 1 with the last of these.
        Case(name, 1, False),
        Case(name, 1, False, MEMORY),
        Case(name, 1, False, lean),
    ]


def resolution_of(family: str, tiny: bool) -> int:
    return 64 if tiny else {"sd15": 512, "sdxl": 1024}[family]


def case_flags(case: Case, model_dir: Path, data_dir: Path, work: Path, resolution: int, steps: int) -> list[str]:
    cache = ["--cache_latents", "--cache_text_embeddings", f"--embeddings_cache_dir={work / 'cache'}"]
    on_gpu = torch.cuda.is_available()
    return [
        f"--pretrained_model_name_or_path={model_dir}",
        f"--dataset_name={data_dir}",
        f"--output_dir={work / case.slug}",
        f"--resolution={resolution}",
        f"--train_batch_size={case.batch}",
        "--learning_rate=1e-5",
        "--lr_warmup_steps=0",
        f"--max_train_steps={steps}",
        "--checkpointing_steps=100000",
        f"--logging_steps={LOG_EVERY}",
        "--report_to=none",
        "--mixed_precision=bf16",
        "--seed=0",
        f"--dataloader_num_workers={8 if on_gpu else 0}",
        *(["--allow_tf32"] if on_gpu else []),
        *(cache if case.cached else []),
        *case.options,
    ]


def run_case(case: Case, flops: dict, flags: list[str], env: dict, profile_out: Path | None = None) -> dict:
    run = run_training(flags, env, sdxl="sdxl" in case.family, profile_out=profile_out)
    records = run["records"]
    windows = [r for r in records if "step_seconds" in r]
    blocks = block_means(windows)
    step = statistics.median(blocks[1:])
    samples_per_second = case.batch / step
    model_flops = flops["cached" if case.cached else "uncached"]
    log = run["log"].read_text()
    row = {
        "case": case.name,
        "batch": case.batch,
        "seconds_per_step": step,
        "samples_per_second": samples_per_second,
        "tflop_per_sample": model_flops / 1e12,
        "mfu": model_flops * samples_per_second / PEAK_BF16_FLOPS,
        "peak_memory_reserved_gib": peak(records, "peak_memory_reserved_gib"),
        "peak_memory_allocated_gib": peak(records, "peak_memory_allocated_gib"),
        "first_window_seconds_per_step": blocks[0],
        # Start-up, loading, cache build and the final save: where a short run's time goes.
        "process_seconds_outside_steps": run["wall_seconds"] - sum(per_step_seconds(windows)),
        **startup_parts(records),
        **log_edges(log, run["started_at"], run["ended_at"]),
        "log": str(run["log"]),
        **({"profile": json.loads(profile_out.read_text())} if profile_out else {}),
    }
    return row | off_the_step_clock(row, log)


def startup_parts(records: list[dict]) -> dict:
    """The trainer's start-up record: its total and each part, from the start of training to the
    first step. The rest of the time outside steps is Python's imports, the final save and exit."""
    startup = next((r for r in records if "startup_seconds" in r), None)
    if startup is None:
        return {}
    parts = {k.removeprefix("startup/").removesuffix("_seconds"): v for k, v in startup.items() if "/" in k}
    return {"startup_seconds": startup["startup_seconds"], "startup_parts_seconds": parts}


def log_edges(log: str, started_at: float, ended_at: float) -> dict:
    """What the process did before its first log line (Python's imports, mostly) and after its
    last (the last is the final save's: after it, the exit, and with --profile the profiler's
    summary), in seconds. A slow exit once hid 40 s of waiting for the data loader's workers."""
    stamps = [
        datetime.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()  # logging's local time
        for match in map(LOG_STAMP.match, log.splitlines())
        if match
    ]
    if not stamps:
        return {}
    return {"before_first_log_seconds": stamps[0] - started_at, "after_last_log_seconds": ended_at - stamps[-1]}


def off_the_step_clock(row: dict, log: str) -> dict:
    """The final save's seconds, and what is left of the time outside steps once start-up, the
    time before the first log line and after the last, and the final save are taken out: time
    the training loop spent off its step clock. The trainer's clock leaves out checkpoints and
    evaluations (these cases have none), so anything a step does next to them is missed by
    ``step_seconds`` and shows here instead: before f9d9fee, --use_ema's weight swap ran there
    and cost SD 1.5 on an H100 31.6 s in 25 steps, while its step time looked like the default
    case's. Start-up and the time before the first log line overlap by a part of a second, so a
    case with nothing off the clock shows about zero."""
    save = SAVE_LINE.search(log)
    parts = ("startup_seconds", "before_first_log_seconds", "after_last_log_seconds")
    if save is None or not all(part in row for part in parts):
        return {}
    rest = row["process_seconds_outside_steps"] - sum(row[part] for part in parts) - float(save[1])
    return {"final_save_seconds": float(save[1]), "off_step_clock_seconds": rest}


def per_step_seconds(windows: list[dict]) -> list[float]:
    """Each step's time: the mean of the logging window that holds it."""
    seconds, previous = [], 0
    for record in windows:
        seconds += [record["step_seconds"]] * (record["step"] - previous)
        previous = record["step"]
    return seconds


def block_means(windows: list[dict], block: int = LOG_EVERY) -> list[float]:
    """Mean step time per whole block of `block` steps, whatever the logging interval.

    A median of single steps drops the slow ones that a median of 5-step means keeps, so cases
    that log at different intervals are compared on the same blocks.
    """
    seconds = per_step_seconds(windows)
    return [statistics.fmean(seconds[i : i + block]) for i in range(0, len(seconds) - block + 1, block)]


def peak(records: list[dict], key: str) -> float | None:
    """The largest logged value; None where nothing was logged (training on the CPU)."""
    return max((r[key] for r in records if key in r), default=None)


def build_assets(family: str, tiny: bool, work: Path) -> tuple[Path, Path]:
    """The family's model and fill data under ``work``, built unless a finished build is there."""
    name = f"{family}{'-tiny' if tiny else ''}"
    model_dir, data_dir, built = work / f"model-{name}", work / f"fill-{name}", work / f"{name}.built"
    if built.exists():
        return model_dir, data_dir
    for folder in (model_dir, data_dir):  # a build cut short
        shutil.rmtree(folder, ignore_errors=True)
    if tiny:
        (fixtures.build_tiny_sdxl if family == "sdxl" else fixtures.build_tiny_sd)(model_dir)
    else:
        reference_models.build_reference(family, model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    rows = 144 if family == "sd15" else 64  # whole batches of 16 and 48: every step is full
    fixtures.build_fill_dataset(data_dir, num_rows=rows, size=resolution_of(family, tiny))
    built.touch()
    return model_dir, data_dir


def keep_log(row: dict, folder: str | None) -> None:
    if folder and "log" in row:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(row["log"], Path(folder) / Path(row["log"]).name)


def print_row(row: dict) -> None:
    if "error" in row:
        print(f"{row['case']:<45} FAILED: {row['error'].splitlines()[-1] if row['error'] else ''}", flush=True)
        return
    memory = row["peak_memory_reserved_gib"]
    print(
        f"{row['case']:<45}{row['seconds_per_step']:>8.3f}{row['samples_per_second']:>10.1f}"
        f"{row['mfu'] * 100:>7.1f}%{'-' if memory is None else f'{memory:.1f}':>9}",
        flush=True,
    )
    if "startup_seconds" in row:
        parts = ", ".join(f"{part} {seconds:.1f}" for part, seconds in row["startup_parts_seconds"].items())
        rest = row["process_seconds_outside_steps"] - row["startup_seconds"]
        print(
            f"    start-up {row['startup_seconds']:.1f} s ({parts}); imports, final save, exit {rest:.1f} s", flush=True
        )
    if "after_last_log_seconds" in row:
        print(
            f"    before the first log line (imports) {row['before_first_log_seconds']:.1f} s, "
            f"after the last (exit) {row['after_last_log_seconds']:.1f} s",
            flush=True,
        )
    if "off_step_clock_seconds" in row:
        print(
            f"    final save {row['final_save_seconds']:.1f} s; in the training loop but off its step clock "
            f"{row['off_step_clock_seconds']:.1f} s",
            flush=True,
        )
    if "profile" in row:  # where the step's time went, per kind of work
        profile = row["profile"]
        print(
            "    " + ", ".join(f"{kind} {ms:.1f} ms" for kind, ms in profile["kinds_ms_per_step"].items()), flush=True
        )
        if "kernel_ms_per_step" in profile:  # busy time against the step's wall time: the rest is idle
            print(f"    GPU busy {profile['kernel_ms_per_step']:.1f} ms per step; top kernels:", flush=True)
            for kernel, ms in list(profile["top_kernels_ms_per_step"].items())[:12]:
                print(f"      {ms:7.2f} ms  {kernel[:110]}", flush=True)
        print("    top operators by input shapes:", flush=True)
        for operator, ms in list(profile["top_operator_shapes_ms_per_step"].items())[:12]:
            print(f"      {ms:7.2f} ms  {operator[:150]}", flush=True)


def machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{gpu}; torch {torch.__version__}; {os.cpu_count()} CPU cores; Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "gpu_results.json"))
    parser.add_argument("--families", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl"])
    parser.add_argument("--steps", type=int, default=25, help=f"optimizer steps per case (windows of {LOG_EVERY})")
    parser.add_argument("--logs", default=None, help="copy each case's training log into this folder")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run each case under profile_step.py and add where its step time goes (its s/step then "
        "includes the profiler's overhead)",
    )
    parser.add_argument("--only", nargs="+", default=[""], help="run only the cases whose name contains one of these")
    parser.add_argument("--tiny", action="store_true", help="tiny fixtures at 64 px: checks the script anywhere")
    parser.add_argument(
        "--work_dir",
        default=None,
        help="keep the models, data and embeddings cache here and reuse them in later runs (a GPU's "
        "device time goes further: building SD 1.5 and its data takes about a minute, SDXL more); "
        "default: a temporary folder",
    )
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    command = " ".join([str(Path(__file__).relative_to(ROOT)), *argv])

    path_entries = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(path_entries), "HF_HUB_OFFLINE": "1"}
    results = {"machine": machine(), "command": command, "peak_flops": PEAK_BF16_FLOPS, "cases": []}
    print(f"{results['machine']}\n{'case':<45}{'s/step':>8}{'samples/s':>10}{'MFU':>8}{'GiB':>9}", flush=True)
    with contextlib.ExitStack() as stack:
        work = Path(args.work_dir or stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        for family in args.families:
            model_dir, data_dir = build_assets(family, args.tiny, work)
            resolution = resolution_of(family, args.tiny)
            flops = reference_models.step_flops(reference_models.meta_components(model_dir), resolution)
            results[f"tflop_per_sample_{family}"] = {k: v / 1e12 for k, v in flops.items()}
            for case in [c for c in cases(family, args.tiny) if any(part in c.name for part in args.only)]:
                flags = case_flags(case, model_dir, data_dir, work, resolution, args.steps)
                shutil.rmtree(work / case.slug, ignore_errors=True)  # a kept --work_dir's earlier run
                profile_out = work / f"{case.slug}.profile.json" if args.profile else None
                try:
                    row = run_case(case, flops, flags, env, profile_out)
                except Exception as error:  # noqa: BLE001 - one case failing (out of memory, say) must not lose the rest
                    row = {"case": case.name, "error": "".join(traceback.format_exception(error))[-3000:]}
                keep_log(row, args.logs)
                results["cases"].append(row)
                print_row(row)
                # Written after every case, so a run cut short still leaves its figures.
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
