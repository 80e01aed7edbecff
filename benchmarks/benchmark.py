"""Speed, memory and learning benchmarks on the offline fixtures; prints a table, writes JSON.

    python benchmarks/benchmark.py [--out benchmarks/results.json] [--quick] [--rounds 5] [--steps 20]
        [--diffusers_script path/to/diffusers/examples/controlnet/train_controlnet.py]

Sections:
- ``train``: the CPU cost of an optimizer step for SD and SDXL tiny fixtures at 64 and 128 px,
  batch 4. It compares the way diffusers' script trains (VAE and text encoders every step) with
  the cached path (``--cache_latents --cache_text_embeddings``). Every run is one real training
  process. The two paths of a case run in turn, ``--rounds`` times each; a round's step time is
  the median after warm-up, a path's is the median of its rounds, and the speed-up is the median
  of the rounds' ratios, printed with their range. It also reports samples per second, the peak
  resident memory of the process, and the whole-process time of a 6-step run. The cached path is
  measured with its cache already built; the build time is reported apart.
  One more SD case uses a VAE whose encoder has SD 1.5's share of a step's FLOPs
  (``fixtures.SD15_PROPORTIONED_VAE_CHANNELS``); the default tiny VAE has a tenth of it. The
  tiny models' steps are bound by per-operator overhead, not arithmetic, so the last case is
  SD 1.5 itself at a quarter of its width (``reference_models.narrowed_sd15``), at 64 px. For
  each case the table also gives the speed-up the FLOPs allow: a step's FLOPs uncached over
  cached, counted by ``reference_models.step_flops``.
- ``against_diffusers`` (with ``--diffusers_script``): diffusers' own script, unchanged, against
  our uncached and cached paths on the tiny SD fixture and the one with SD 1.5's VAE share, at
  64 px, batch 4, with the same flags. diffusers' script logs no step times, so all three run
  under ``step_clock.py`` and are timed by the gaps between their optimizer steps. The three runs
  of a round take turns as the two paths of ``train`` do.
- ``data``: decode and transform throughput of one data-loader worker at 512 px on a
  JPEG-encoded fill dataset.
- ``fidelity``: the control gap after a fixed number of steps with the default settings of the
  demo (64 px, batch 4, learning rate 1e-3).

The GPU section (real SD 1.5 / SDXL architectures, MFU, GPU memory) is ``gpu_benchmark.py``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from step_clock import step_seconds


def run_training(flags: list[str], env: dict, *, sdxl: bool = False, profile_out: Path | None = None) -> dict:
    """One training process; returns its wall time, its start and end on the wall clock (to set
    against its log's timestamps), peak RSS (MiB; None where it cannot be told from this
    process's own) and metrics records.
    With ``profile_out``, the process runs under ``profile_step.py``, which writes its summary there."""
    script = "train_controlnet_sdxl.py" if sdxl else "train_controlnet.py"
    command = [sys.executable, str(ROOT / script), *flags]
    if profile_out is not None:
        profiler = [str(ROOT / "benchmarks" / "profile_step.py"), *(["--sdxl"] if sdxl else []), f"--out={profile_out}"]
        command = [sys.executable, *profiler, "--", *flags]
    output_dir = output_dir_of(flags)
    result = run_process(command, output_dir, env)
    metrics = (output_dir / "metrics.jsonl").read_text().splitlines()
    return result | {"records": [json.loads(line) for line in metrics]}


def run_clocked(script: Path, flags: list[str], env: dict) -> dict:
    """Any training script (ours or diffusers') under ``step_clock.py``: run_process's figures and
    the clock reading after each optimizer step, the same clock for every script."""
    output_dir = output_dir_of(flags)
    readings = output_dir.with_name(output_dir.name + ".steps.json")
    clock = [str(ROOT / "benchmarks" / "step_clock.py"), f"--out={readings}", "--"]
    result = run_process([sys.executable, *clock, str(script), *flags], output_dir, env)
    return result | json.loads(readings.read_text())


def output_dir_of(flags: list[str]) -> Path:
    return Path(next(f.split("=", 1)[1] for f in flags if f.startswith("--output_dir=")))


def run_process(command: list[str], output_dir: Path, env: dict) -> dict:
    """Run one training command to its end; its stderr goes to ``<output_dir>.log``."""
    log = output_dir.with_name(output_dir.name + ".log")
    started, started_at = time.perf_counter(), time.time()
    # stderr goes to a file: a pipe read only at the end would fill up and stall the run.
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)
    wall, ended_at = time.perf_counter() - started, time.time()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"training failed: {' '.join(command)}\n{log.read_text()[-3000:]}")
    peak = usage.ru_maxrss / 1024
    # Linux carries the parent's peak into a child's at exec, so a child's figure is only its own
    # while this process stays smaller (main() builds big models in subprocesses for that).
    # None then: a figure that is the caller's, not the child's (the GPU benchmark, which builds
    # models in its own process and reports GPU memory, does not use it).
    if peak <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:
        peak = None
    return {"wall_seconds": wall, "started_at": started_at, "ended_at": ended_at, "peak_rss_mib": peak, "log": log}


def median_step(records: list[dict], warmup: int) -> float:
    times = [r["step_seconds"] for r in records if "step_seconds" in r][warmup:]
    return statistics.median(times)


def train_section(
    assets: Path, work: Path, env: dict, *, steps: int, warmup: int, rounds: int, quick: bool
) -> list[dict]:
    rows = []
    families = [("sd", "tiny-sd")] if quick else [("sd", "tiny-sd"), ("sdxl", "tiny-sdxl")]
    cases = [
        (family, model, resolution) for family, model in families for resolution in ((64,) if quick else (64, 128))
    ]
    # The VAE encoder's share of a step as in SD 1.5 at 512 px: the case the 1.4x target is about.
    cases.append(("sd", "tiny-sd-sd15-vae", 64))
    # SD 1.5's structure with weights enough that a CPU step is arithmetic, not overhead.
    cases.append(("sd", "sd15-quarter-width", 64))
    for family, model, resolution in cases:
        rows.extend(train_pair(assets, work, env, family, model, resolution, steps=steps, warmup=warmup, rounds=rounds))
    # Counting FLOPs imports torch here, which would raise this process's peak RSS, and with it
    # every later child's (see run_training): so only once the timed runs are over.
    for row, (family, model, resolution) in zip(rows[1::2], cases, strict=True):
        row["flop_bound_speedup"] = flop_bound(assets / model, resolution)
    return rows


def round_order(round_index: int, paths: tuple = (False, True)) -> tuple:
    """Which path runs when in a round: the paths turn by one place each round (uncached first,
    then cached first, and so on), so that a CPU slowing down or speeding up over the rounds
    favours none of them."""
    shift = round_index % len(paths)
    return (*paths[shift:], *paths[:shift])


def paired_speedup(slower: list[float], faster: list[float]) -> dict:
    """A speed-up from seconds per step measured round by round (the cache's: uncached, then
    cached): the median of the rounds' ratios, and the ratios, whose range shows how far one
    round can be trusted."""
    ratios = [s / f for s, f in zip(slower, faster, strict=True)]
    return {"speedup": statistics.median(ratios), "speedup_by_round": ratios}


def train_pair(assets, work, env, family, model, resolution, *, steps, warmup, rounds) -> list[dict]:
    """The uncached and the cached row of one case. Their timed runs alternate, round by round:
    on a shared machine the same run's step time moves by 20% from one minute to the next, so two
    runs minutes apart give a ratio that is mostly the machine's drift."""
    sdxl = family == "sdxl"
    names = {
        cached: f"{model.removeprefix('tiny-')}-{resolution}px-{'cached' if cached else 'uncached'}"
        for cached in (False, True)
    }

    def run(cached: bool, label: str, max_steps: int) -> dict:
        output = work / f"{names[cached]}-{label}"
        result = run_training(case_flags(assets, work, model, resolution, cached, output, max_steps), env, sdxl=sdxl)
        shutil.rmtree(output)  # the saved ControlNets would add up to gigabytes over the rounds
        return result

    built = run(True, "build", 1)  # so that the timed cached runs find the cache built
    timed = {False: [], True: []}
    for round_index in range(rounds):
        for cached in round_order(round_index):
            timed[cached].append(run(cached, f"round{round_index}", steps))
    rows = []
    for cached in (False, True):
        peak = highest_peak([result["peak_rss_mib"] for result in timed[cached]], names[cached])
        by_round = [median_step(result["records"], warmup) for result in timed[cached]]
        step = statistics.median(by_round)
        rows.append(
            {
                "case": names[cached],
                "seconds_per_step": step,
                "seconds_per_step_by_round": by_round,
                "samples_per_second": 4 / step,
                "peak_rss_mib": peak,
                "six_step_process_seconds": run(cached, "6", 6)["wall_seconds"],
                "cache_build_process_seconds": built["wall_seconds"] if cached else None,
                "flop_bound_speedup": None,  # the cached rows' is filled in by train_section
            }
        )
    rows[1].update(paired_speedup(rows[0]["seconds_per_step_by_round"], rows[1]["seconds_per_step_by_round"]))
    return rows


def highest_peak(peaks: list[float | None], name: str) -> float:
    """The highest peak RSS of a path's runs; run_process gives None where it cannot tell."""
    if None in peaks:
        raise RuntimeError(f"peak RSS of {name} is hidden under the benchmark process's own")
    return max(peaks)


def case_flags(
    assets: Path,
    work: Path,
    model: str,
    resolution: int,
    cached: bool,
    output: Path,
    max_steps: int,
    *,
    report_to: str = "none",
) -> list[str]:
    cache_flags = ["--cache_latents", "--cache_text_embeddings", f"--embeddings_cache_dir={work / 'cache'}"]
    return [
        f"--pretrained_model_name_or_path={assets / model}",
        f"--dataset_name={assets / 'fill'}",
        f"--output_dir={output}",
        f"--resolution={resolution}",
        "--train_batch_size=4",
        "--learning_rate=1e-4",
        "--lr_warmup_steps=0",
        f"--max_train_steps={max_steps}",
        "--checkpointing_steps=100000",
        f"--report_to={report_to}",
        "--seed=0",
        *(cache_flags if cached else []),
    ]


def flop_bound(model_dir: Path, resolution: int) -> float:
    """The cache's speed-up if a step's time were its arithmetic: FLOPs uncached over cached."""
    from controlnet_trainer import reference_models

    flops = reference_models.step_flops(reference_models.meta_components(model_dir), resolution)
    return flops["uncached"] / flops["cached"]


DIFFUSERS_PATHS = ("diffusers", "uncached", "cached")


def diffusers_section(assets: Path, work: Path, env: dict, script: Path, *, steps: int, warmup: int, rounds: int):
    """diffusers' own train_controlnet.py against our uncached and cached paths: the same fixture,
    flags and clock (``step_clock.py``: the gap between optimizer steps), the three runs of a round
    in turn, each round starting one place further on."""
    rows = []
    for model in ("tiny-sd", "tiny-sd-sd15-vae"):
        clocked = functools.partial(run_against_diffusers, assets, work, env, script, model)
        clocked("cached", "build", 1)  # so that the timed cached runs find the cache built
        by_round = {path: [] for path in DIFFUSERS_PATHS}
        peaks = {path: [] for path in DIFFUSERS_PATHS}
        for round_index in range(rounds):
            for path in round_order(round_index, DIFFUSERS_PATHS):
                result = clocked(path, f"round{round_index}", steps)
                by_round[path].append(step_seconds(result["optimizer_step_ends"], warmup))
                peaks[path].append(result["peak_rss_mib"])
        rows.extend(against_diffusers_row(model, path, by_round, peaks[path]) for path in DIFFUSERS_PATHS)
    return {"script": str(script), "script_sha256": hashlib.sha256(script.read_bytes()).hexdigest(), "rows": rows}


def run_against_diffusers(assets, work, env, script, model, path, label, max_steps) -> dict:
    """One clocked run of ``path``: diffusers' script, or ours uncached or cached."""
    output = work / f"vs-diffusers-{model}-{path}-{label}"
    # diffusers' script knows no "none"; tensorboard is both scripts' default.
    flags = case_flags(assets, work, model, 64, path == "cached", output, max_steps, report_to="tensorboard")
    runner = script if path == "diffusers" else ROOT / "train_controlnet.py"
    result = run_clocked(runner, flags, env)
    shutil.rmtree(output)
    return result


def against_diffusers_row(model: str, path: str, by_round: dict, peaks: list) -> dict:
    step = statistics.median(by_round[path])
    row = {
        "case": f"{model.removeprefix('tiny-')}-64px-{path}",
        "seconds_per_step": step,
        "seconds_per_step_by_round": by_round[path],
        "samples_per_second": 4 / step,
        "peak_rss_mib": highest_peak(peaks, f"{model} {path}"),
    }
    if path != "diffusers":
        row["over_diffusers"] = paired_speedup(by_round["diffusers"], by_round[path])
    return row


def data_section(work: Path, *, samples: int) -> dict:
    """Decode + paired transform at 512 px, one worker, JPEG-encoded images."""
    import datasets
    import numpy as np

    from controlnet_trainer import data, fixtures

    rng = np.random.default_rng(0)
    rows = {"image": [], "conditioning_image": [], "text": []}
    for _ in range(samples):
        sample = fixtures.fill_sample(rng, 768)
        for column, image in (("image", sample.image), ("conditioning_image", sample.conditioning_image)):
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            rows[column].append({"bytes": buffer.getvalue(), "path": None})
        rows["text"].append(sample.text)
    table = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    table = table.cast_column("conditioning_image", datasets.Image())
    columns = data.Columns("image", "conditioning_image", "text")
    dataset = data.ControlNetDataset(table, columns, data.PairedTransform(512))
    dataset[0]  # warm-up
    started = time.perf_counter()
    for index in range(len(dataset)):
        dataset[index]
    elapsed = time.perf_counter() - started
    return {"case": "decode+transform 512px (768px JPEG source)", "samples_per_second_per_worker": samples / elapsed}


def fidelity_section(assets: Path, work: Path, env: dict, *, steps: int) -> dict:
    flags = [
        f"--pretrained_model_name_or_path={assets / 'tiny-sd'}",
        f"--dataset_name={assets / 'fill'}",
        f"--output_dir={work / 'fidelity'}",
        "--resolution=64",
        "--train_batch_size=4",
        "--learning_rate=1e-3",
        "--lr_warmup_steps=0",
        f"--max_train_steps={steps}",
        f"--validation_steps={steps // 4}",
        "--checkpointing_steps=100000",
        "--fidelity_samples=32",
        "--report_to=none",
        "--seed=0",
    ]
    records = run_training(flags, env)["records"]
    gaps = {r["step"]: r["fidelity/control_gap"] for r in records if "fidelity/control_gap" in r}
    return {"case": f"control gap, tiny SD 64px batch 4 lr 1e-3, {steps} steps", "gap_by_step": gaps}


def print_table(results: dict) -> None:
    print(f"\n{results['machine']}\n")
    print(f"{'case':<34}{'s/step':>9}{'samples/s':>11}{'peak RSS MiB':>14}{'6-step run s':>14}{'cache build s':>15}")
    for row in results["train"]:
        build = row["cache_build_process_seconds"]
        print(
            f"{row['case']:<34}{row['seconds_per_step']:>9.3f}{row['samples_per_second']:>11.1f}"
            f"{row['peak_rss_mib']:>14.0f}{row['six_step_process_seconds']:>14.1f}"
            f"{'' if build is None else f'{build:.1f}':>15}"
        )
    by_case = {row["case"]: row for row in results["train"]}
    for row in results["train"]:
        if row["case"].endswith("-cached"):
            base = by_case[row["case"].replace("-cached", "-uncached")]
            memory = row["peak_rss_mib"] / base["peak_rss_mib"]
            ratios = row["speedup_by_round"]
            print(
                f"  {row['case']}: {row['speedup']:.2f}x faster per step (median of {len(ratios)} rounds, "
                f"{min(ratios):.2f}x to {max(ratios):.2f}x; FLOPs allow {row['flop_bound_speedup']:.2f}x), "
                f"peak memory x{memory:.2f}"
            )
    if "against_diffusers" in results:
        print_against_diffusers(results["against_diffusers"])
    if "data" in results:
        print(
            f"\n{results['data']['case']}: {results['data']['samples_per_second_per_worker']:.1f} samples/s per worker"
        )
    if "fidelity" in results:
        gaps = ", ".join(f"step {s}: {g * 100:.2f}%" for s, g in results["fidelity"]["gap_by_step"].items())
        print(f"\n{results['fidelity']['case']}: {gaps}")


def print_against_diffusers(section: dict) -> None:
    print(f"\nagainst {section['script']} (sha256 {section['script_sha256'][:12]}), same clock for all\n")
    print(f"{'case':<34}{'s/step':>9}{'samples/s':>11}{'peak RSS MiB':>14}   speed-up over diffusers' script")
    for row in section["rows"]:
        gain_text = ""
        if "over_diffusers" in row:
            gain, ratios = row["over_diffusers"]["speedup"], row["over_diffusers"]["speedup_by_round"]
            gain_text = f"{gain:.2f}x ({min(ratios):.2f}x to {max(ratios):.2f}x)"
        print(
            f"{row['case']:<34}{row['seconds_per_step']:>9.3f}{row['samples_per_second']:>11.1f}"
            f"{row['peak_rss_mib']:>14.0f}   {gain_text}"
        )


def build_assets(assets: Path, *, quick: bool) -> None:
    from controlnet_trainer import fixtures, reference_models

    fixtures.build_fill_dataset(assets / "fill", num_rows=400, size=128)
    fixtures.build_tiny_sd(assets / "tiny-sd")
    fixtures.build_tiny_sd(assets / "tiny-sd-sd15-vae", vae_channels=fixtures.SD15_PROPORTIONED_VAE_CHANNELS)
    reference_models.build_reference("sd15", assets / "sd15-quarter-width", width_divisor=4)
    if not quick:
        fixtures.build_tiny_sdxl(assets / "tiny-sdxl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results.json"))
    parser.add_argument(
        "--quick", action="store_true", help="no SDXL, no 128 px, 3 rounds of 12 steps, no fidelity run"
    )
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps of each timed run")
    parser.add_argument(
        "--rounds", type=int, default=5, help="timed runs of each path per case, uncached and cached in turn"
    )
    parser.add_argument("--fidelity_steps", type=int, default=400)
    parser.add_argument(
        "--diffusers_script",
        type=Path,
        default=None,
        help="a copy of diffusers' examples/controlnet/train_controlnet.py (not shipped here): times it "
        "against our uncached and cached paths on the tiny SD fixtures at 64 px",
    )
    parser.add_argument("--build_assets", default=None, help=argparse.SUPPRESS)  # the child that builds them
    args = parser.parse_args()
    if args.build_assets:
        build_assets(Path(args.build_assets), quick=args.quick)
        return

    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        assets = work / "assets"
        # In a process of its own, as everything that imports torch before the timed runs: this
        # process's peak RSS would otherwise become every child's (see run_training).
        build = [__file__, f"--build_assets={assets}", *(["--quick"] if args.quick else [])]
        subprocess.run([sys.executable, *build], env=env, check=True, stdout=subprocess.DEVNULL)
        steps, rounds = (12, 3) if args.quick else (args.steps, args.rounds)
        results = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}",
            "command": " ".join(sys.argv),
            "train": train_section(assets, work, env, steps=steps, warmup=3, rounds=rounds, quick=args.quick),
            "data": data_section(work, samples=16 if args.quick else 64),
        }
        if args.diffusers_script is not None:
            results["against_diffusers"] = diffusers_section(
                assets, work, env, args.diffusers_script.resolve(), steps=steps, warmup=3, rounds=rounds
            )
        if not args.quick:
            results["fidelity"] = fidelity_section(assets, work, env, steps=args.fidelity_steps)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print_table(results)


if __name__ == "__main__":
    main()
