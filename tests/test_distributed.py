"""Two real processes on CPU (gloo DDP): sharding, gradient averaging, checkpoints, resume, validation.

`accelerate launch --cpu --num_processes 2` starts a single process; two gloo ranks on CPU need
`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2`. Three launches in all
(about 25 s each on two cores, mostly imports) plus one in-process single-process reference run.

What each rank trained on is observed through a small wrapper script that records the dataset
indices of every micro-batch per rank (``batch["index"]``) and then runs the trainer unchanged.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from conftest import RESOLUTION, ROOT, free_port, script_env, settings_of, step_records, train_argv
from safetensors.torch import load_file

from controlnet_trainer import fixtures, loop
from controlnet_trainer.cli import run

WEIGHTS = "diffusion_pytorch_model.safetensors"
LAUNCH_TIMEOUT = 600  # generous: a rank stuck in a collective shows up as a timeout, with its output

# 24 rows; 2 ranks x 2 = a global batch of 4, so 6 steps per epoch: 8 steps cross into epoch 1.
STEPS = 8
FLAGS = {
    "max_train_steps": STEPS,
    "lr_scheduler": "linear",
    "lr_warmup_steps": 2,
    "checkpointing_steps": 4,
    "validation_steps": 2,
    "validation_prompt": "red circle with blue background",
    "num_validation_images": 1,
}

# Records each micro-batch's dataset indices per rank, then runs the real entry point.
PROBE = """\
import json, os, sys
from accelerate.state import PartialState
from controlnet_trainer import cli, loop

_loss = loop.micro_batch_loss

def _recorded(batch, *args, **kwargs):
    rank = PartialState().process_index
    with open(os.path.join(os.environ["PROBE_DIR"], f"rank{rank}.jsonl"), "a") as handle:
        handle.write(json.dumps(batch["index"]) + "\\n")
    return _loss(batch, *args, **kwargs)

loop.micro_batch_loss = _recorded
sys.argv[0] = "train_controlnet.py"
cli.main()
"""


def start_two(script: Path, argv: list[str], machine: list[str] | None = None, **env) -> subprocess.Popen:
    """Two ranks on one machine; or, with ``machine`` flags for two, this machine's one rank."""
    machine = machine or ["--num_machines=1", f"--main_process_port={free_port()}"]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
        *machine, "--mixed_precision=no", "--dynamo_backend=no", str(script), *argv,
    ]  # fmt: skip
    # Own session for the launcher; torch's elastic agent gives each rank a session of its own.
    return subprocess.Popen(
        command, env=script_env(ACCELERATE_USE_CPU="true", **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def wait_two(process: subprocess.Popen, check: bool = True) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = process.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        _, stderr = kill_two(process)
        pytest.fail(f"two-process run hung for {LAUNCH_TIMEOUT}s; stderr tail:\n{stderr[-5000:]}")
    done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert not check or done.returncode == 0, f"two-process run failed ({done.returncode}):\n{done.stderr[-5000:]}"
    return done


def kill_two(process: subprocess.Popen) -> tuple[str, str]:
    """Kill a launch and its ranks, which hold the output pipes open; returns their output."""
    for pid in [*child_pids(process.pid), process.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return process.communicate()


def launch_two(script: Path, argv: list[str], **env) -> subprocess.CompletedProcess:
    return wait_two(start_two(script, argv, **env))


def flags(assets: dict, **extra) -> dict:
    # A fixed starting ControlNet, so that "how far the weights moved" has a reference.
    start = {"validation_image": assets["validation"], "controlnet_model_name_or_path": assets["controlnet"]}
    return FLAGS | start | extra


def read_probe(directory: Path, rank: int) -> list[list[int]]:
    return [json.loads(line) for line in (directory / f"rank{rank}.jsonl").read_text().splitlines()]


def metrics(output_dir: Path) -> list[dict]:
    return step_records(output_dir)


def one_process(assets: dict, output_dir: Path, **extra) -> list[list[int]]:
    """Train in this process with one thread (as accelerate launch gives each rank, so that a
    launch beside it keeps a core); returns each micro-batch's dataset indices."""
    seen: list[list[int]] = []
    loss = loop.micro_batch_loss

    def recorded(batch, *args, **kwargs):
        seen.append(list(batch["index"]))
        return loss(batch, *args, **kwargs)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(loop, "micro_batch_loss", recorded)
            run(train_argv(assets, output_dir, train_batch_size=4, **flags(assets, **extra)))
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return seen


def beside(process: subprocess.Popen, work):
    """``work()`` in this process while ``process`` runs; a failure of it ends ``process`` too."""
    try:
        return work()
    except BaseException:
        kill_two(process)
        raise


@pytest.fixture(scope="module")
def reference_runs(assets, tmp_path_factory) -> dict:
    """The uninterrupted two-process run, 2 samples per rank, with validation every 2 steps, and
    the same run in one process with the same global batch (4), trained here meanwhile."""
    root = tmp_path_factory.mktemp("two-process")
    probe_script, probe_dir = root / "probe.py", root / "probe"
    probe_script.write_text(PROBE)
    probe_dir.mkdir()
    output_dir, one_dir = root / "out", root / "one-process"
    launched = start_two(
        probe_script, train_argv(assets, output_dir, train_batch_size=2, **flags(assets)), PROBE_DIR=str(probe_dir)
    )
    batches = beside(launched, lambda: one_process(assets, one_dir))
    done = wait_two(launched)
    return {
        "two": {"output_dir": output_dir, "stderr": done.stderr, "ranks": [read_probe(probe_dir, r) for r in (0, 1)]},
        "one": {"output_dir": one_dir, "batches": batches},
    }


@pytest.fixture(scope="module")
def two_process_run(reference_runs) -> dict:
    return reference_runs["two"]


@pytest.fixture(scope="module")
def one_process_run(reference_runs) -> dict:
    return reference_runs["one"]


def test_each_rank_trains_on_its_own_half_of_every_global_batch(two_process_run, one_process_run):
    rank0, rank1 = two_process_run["ranks"]
    assert len(rank0) == len(rank1) == STEPS
    assert all(len(batch) == 2 for batch in rank0 + rank1)
    for step, (a, b, whole) in enumerate(zip(rank0, rank1, one_process_run["batches"], strict=True)):
        assert not set(a) & set(b), f"step {step + 1}: both ranks trained on {set(a) & set(b)}"
        assert sorted(a + b) == sorted(whole), f"step {step + 1}: ranks {a} + {b}, one process {whole}"
    first_epoch = [index for batch in rank0[:6] + rank1[:6] for index in batch]
    assert sorted(first_epoch) == list(range(24)), "epoch 0 must visit every row exactly once"


def test_metrics_are_logged_once_by_the_main_process(two_process_run):
    logged = metrics(two_process_run["output_dir"])
    assert [r["step"] for r in logged] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) for r in logged)


def test_two_processes_match_one_process_with_the_same_global_batch(assets, two_process_run, one_process_run):
    """Averaged gradients over 2 x 2 samples must equal the gradient over the same 4 samples."""
    two, one = metrics(two_process_run["output_dir"]), metrics(one_process_run["output_dir"])
    assert [r["lr"] for r in two] == pytest.approx([r["lr"] for r in one], rel=1e-12)
    start = load_file(Path(assets["controlnet"]) / WEIGHTS)
    a = load_file(two_process_run["output_dir"] / WEIGHTS)
    b = load_file(one_process_run["output_dir"] / WEIGHTS)
    assert a.keys() == b.keys() == start.keys()
    moved = math.sqrt(sum(((b[k].double() - start[k].double()) ** 2).sum().item() for k in b))
    apart = math.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum().item() for k in b))
    losses = [(r2["loss"], r1["loss"]) for r2, r1 in zip(two, one)]
    assert moved > 1e-2, "training did not move the weights"
    # Same samples, same per-sample noise and timesteps: only float summation order differs. Noise
    # keyed on (rank, micro-batch) instead of on the sample puts this ratio above 1.
    same_losses = [l2 for l2, _ in losses] == pytest.approx([l1 for _, l1 in losses], rel=1e-4)
    assert apart / moved < 1e-3 and same_losses, (
        f"two processes moved {apart / moved:.2e} of the update away from one process; "
        f"losses (2 procs, 1 proc): {losses}"
    )


def test_checkpoints_are_written_once_and_completely(two_process_run):
    output_dir = two_process_run["output_dir"]
    assert sorted(p.name for p in output_dir.iterdir() if "checkpoint" in p.name) == ["checkpoint-4", "checkpoint-8"]
    expected = {
        "controlnet", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "random_states_1.pkl",
        "training_state.json",
    }  # fmt: skip
    for step in (4, 8):
        checkpoint = output_dir / f"checkpoint-{step}"
        assert {p.name for p in checkpoint.iterdir()} == expected, f"{checkpoint}: {sorted(os.listdir(checkpoint))}"
        assert json.loads((checkpoint / "training_state.json").read_text())["global_step"] == step
        assert (checkpoint / "controlnet" / WEIGHTS).is_file() and (checkpoint / "controlnet" / "config.json").is_file()
        assert torch.load(checkpoint / "optimizer.bin", weights_only=False)["state"], "empty optimizer state"
        for rank in (0, 1):
            assert (checkpoint / f"random_states_{rank}.pkl").stat().st_size > 0
        assert two_process_run["stderr"].count(f"Saved state to {checkpoint}\n") == 1
    final, last = load_file(output_dir / WEIGHTS), load_file(output_dir / "checkpoint-8" / "controlnet" / WEIGHTS)
    assert all(torch.equal(final[k], last[k]) for k in final)


def test_validation_on_the_main_process_does_not_stall_the_other_rank(two_process_run):
    images = sorted(p.name for p in (two_process_run["output_dir"] / "validation").iterdir())
    assert images == [f"step-{s:06d}.png" for s in (2, 4, 6, 8)]
    assert two_process_run["stderr"].count("Running validation at step 2\n") == 1


# Records how many rows each rank's VAE encodes, then runs the real entry point.
ENCODE_PROBE = """\
import os, sys
from accelerate.state import PartialState
from diffusers import AutoencoderKL
from controlnet_trainer import cli

_encode = AutoencoderKL.encode

def _recorded(self, pixels, *args, **kwargs):
    with open(os.path.join(os.environ["PROBE_DIR"], f"encoded{PartialState().process_index}"), "a") as handle:
        handle.write(f"{pixels.shape[0]}\\n")
    return _encode(self, pixels, *args, **kwargs)

AutoencoderKL.encode = _recorded
sys.argv[0] = "train_controlnet.py"
cli.main()
"""


def test_two_processes_share_the_cache_build_and_train_as_without_it(assets, tmp_path, two_process_run):
    probe_script, probe_dir, cache_root = tmp_path / "probe.py", tmp_path / "probe", tmp_path / "cache"
    probe_script.write_text(ENCODE_PROBE)
    probe_dir.mkdir()
    cached = {"cache_latents": True, "cache_text_embeddings": True, "embeddings_cache_dir": cache_root}
    argv = train_argv(assets, tmp_path / "out", train_batch_size=2, **flags(assets), **cached)
    launch_two(probe_script, argv, PROBE_DIR=str(probe_dir))
    encoded = [sum(map(int, (probe_dir / f"encoded{rank}").read_text().split())) for rank in (0, 1)]
    assert encoded == [12, 12], f"rows encoded by each rank: {encoded}"
    (folder,) = [p for p in cache_root.iterdir() if (p / "complete.json").exists()]
    assert [np.load(folder / f"latent_mean_{piece}.npy").shape[0] for piece in (0, 1)] == [12, 12]
    # The rows' latents come back from the right pieces: the same losses as the uncached run.
    with_cache = [r["loss"] for r in metrics(tmp_path / "out")]
    assert with_cache == pytest.approx([r["loss"] for r in metrics(two_process_run["output_dir"])], rel=1e-5)


# Rank 0 takes 5 s to load the dataset (as a first download would), then the real entry point runs.
SLOW_LOAD = """\
import sys, time
from accelerate.state import PartialState
from controlnet_trainer import cli, datasources

_load = datasources.load_train_dataset

def _slow(args):
    if PartialState().process_index == 0:
        time.sleep(5)
    return _load(args)

datasources.load_train_dataset = _slow
sys.argv[0] = "train_controlnet.py"
cli.main()
"""


@pytest.fixture(scope="module")
def dry_runs(assets, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Two dry runs of two processes side by side, on the fill rows with two unreadable images
    and --skip_bad_images, where rank 0 loads the dataset 5 s late: the patient one with
    --ddp_timeout=60, the impatient one with --ddp_timeout=2."""
    import datasets

    root = tmp_path_factory.mktemp("dry-runs")
    rows = datasets.load_dataset(str(assets["fill"]))["train"].cast_column("image", datasets.Image(decode=False))
    garbage = {"bytes": b"garbage", "path": None}
    broken = rows.map(lambda row, i: {"image": garbage if i in (3, 6) else row["image"]}, with_indices=True)
    broken.to_parquet(root / "data" / "data" / "train-00000-of-00001.parquet")
    script = root / "slow.py"
    script.write_text(SLOW_LOAD)
    argv = train_argv(assets, root / "out", dataset_name=root / "data", skip_bad_images=True, dry_run=True)
    # Both launches at once: their 5 s waits overlap.
    patient = start_two(script, [*argv, "--ddp_timeout=60"])
    impatient = start_two(script, [*argv, "--ddp_timeout=2"])
    return {"patient": wait_two(patient), "impatient": wait_two(impatient, check=False)}


def test_two_processes_share_the_image_scan_and_skip_the_same_rows(dry_runs):
    """Each rank opens half the images; both learn of every bad row, whichever rank found it."""
    done = dry_runs["patient"]
    assert done.stderr.count("Checking that the images of 12 rows open") == 2
    # Row 3 is rank 1's to open and row 6 rank 0's; each rank reports both.
    assert done.stderr.count("skipping 2 row(s) with unreadable images (first: row 3") == 2
    planned = re.findall(r'"num_samples": (\d+)', done.stdout)
    assert planned and set(planned) == {"22"}, done.stdout


def test_ddp_timeout_is_how_long_ranks_wait_for_each_other(dry_runs):
    assert '"num_processes": 2' in dry_runs["patient"].stdout
    short = dry_runs["impatient"]
    assert short.returncode != 0 and "timed out" in short.stderr.lower(), short.stderr[-3000:]


def test_two_processes_share_the_bucket_scan_and_draw_batches_of_one_bucket(assets, tmp_path):
    """Each rank reads half the image headers; every rank's batches still hold rows of one true
    bucket (the buckets one process assigns), so the shares were put back in row order."""
    import datasets

    from controlnet_trainer import data

    shapes = fixtures.build_fill_dataset(tmp_path / "fill", num_rows=16, size=128, aspect_ratios=(2.0, 0.5))
    probe_script, probe_dir = tmp_path / "probe.py", tmp_path / "probe"
    probe_script.write_text(PROBE)
    probe_dir.mkdir()
    flags = {"dataset_name": shapes, "resolution": 128, "aspect_ratio_buckets": True, "train_batch_size": 2}
    argv = train_argv(assets, tmp_path / "out", max_train_steps=3, **flags)
    launch_two(probe_script, argv, PROBE_DIR=str(probe_dir))
    rows = datasets.load_dataset(str(shapes))["train"]
    truth = data.assign_buckets(rows, settings_of(train_argv(assets, tmp_path / "x", **flags)).data)
    assert len(set(truth)) == 2
    batches = read_probe(probe_dir, 0) + read_probe(probe_dir, 1)
    assert len(batches) == 6
    assert all(len({truth[index] for index in batch}) == 1 for batch in batches), batches


# Two gloo ranks and their host group with a 3 s timeout; rank 0 reaches the agreement 10 s late.
LATE_RANK = """\
import datetime, os, sys, time
import torch
from controlnet_trainer import ranks

rank = int(sys.argv[1])
torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[2]}", rank=rank, world_size=2)
group = ranks.host_group(2, datetime.timedelta(seconds=3))
if rank == 0:
    time.sleep(10)
try:
    ranks.any_rank(False, group)
    print("agreed")
except RuntimeError as error:
    print("gave up:", error)
"""


def test_the_host_group_waits_no_longer_than_its_timeout(tmp_path):
    """The per-step agreements wait as long as --ddp_timeout says, not gloo's own 30 minutes."""
    script = tmp_path / "late.py"
    script.write_text(LATE_RANK)
    port = str(free_port())
    ranks_ = [
        subprocess.Popen([sys.executable, str(script), str(rank), port], env=script_env(), stdout=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]  # fmt: skip
    on_time = ranks_[1].communicate(timeout=120)[0]
    ranks_[0].kill()  # still asleep; what it prints later tells nothing about rank 1's wait
    ranks_[0].communicate(timeout=120)
    # Without the timeout, rank 1 would wait the 10 s and agree.
    assert "gave up" in on_time and "Timed out waiting 3000ms" in on_time, on_time


def test_stop_and_resume_in_two_processes_matches_the_uninterrupted_run(assets, tmp_path, two_process_run):
    output_dir = tmp_path / "out"
    argv = train_argv(assets, output_dir, train_batch_size=2, **flags(assets))
    stopped = launch_two(ROOT / "train_controlnet.py", [*argv, "--stop_at_step=3"])
    assert "--resume_from_checkpoint=latest" in stopped.stderr
    assert sorted(p.name for p in output_dir.iterdir() if "checkpoint" in p.name) == ["checkpoint-3"]
    assert not (output_dir / WEIGHTS).exists()
    assert {p.name for p in (output_dir / "checkpoint-3").iterdir()} >= {"random_states_0.pkl", "random_states_1.pkl"}

    resumed = launch_two(ROOT / "train_controlnet.py", [*argv, "--resume_from_checkpoint=latest"])
    assert "Resumed from" in resumed.stderr and "at step 3" in resumed.stderr
    straight_dir = two_process_run["output_dir"]
    resumed_log = [(r["step"], r["loss"], r["lr"]) for r in metrics(output_dir)]
    assert resumed_log == [(r["step"], r["loss"], r["lr"]) for r in metrics(straight_dir)]  # bit for bit
    a, b = load_file(output_dir / WEIGHTS), load_file(straight_dir / WEIGHTS)
    different = [k for k in b if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"


def two_machines(argv: list[str], homes: tuple[Path, Path]) -> list[subprocess.Popen]:
    """One rank on each of two "machines" (two launchers on this host, ranks 0 and 1), each with
    its own HF_HOME; returns the two launchers."""
    port = free_port()
    return [
        start_two(
            ROOT / "train_controlnet.py",
            argv,
            [
                "--num_machines=2",
                f"--machine_rank={rank}",
                "--main_process_ip=127.0.0.1",
                f"--main_process_port={port}",
            ],
            HF_HOME=str(home),
        )
        for rank, home in enumerate(homes)
    ]


def machine_logs(launchers: list[subprocess.Popen]) -> list[str]:
    """Each machine's log, once both have finished."""
    done = [wait_two(launcher, check=False) for launcher in launchers]
    # Every machine's log: the one that failed first shows the cause, the other only a lost peer.
    for rank, machine in enumerate(done):
        assert machine.returncode == 0, f"machine {rank} failed:\n" + "\n".join(d.stderr[-3000:] for d in done)
    return [machine.stderr for machine in done]


def test_each_machine_builds_its_copy_of_the_embeddings_cache(assets, tmp_path):
    """The cache's default folder is under HF_HOME, on each machine's own disk: each machine's
    processes build its copy, or the second machine's ranks would find no cache and fail.
    On a shared disk both machines build at once, the first copy finished is kept, and the
    other machine's build folder is removed. Both runs train the same weights."""
    common = {"train_batch_size": 2, "max_train_steps": 3, "cache_latents": True, "cache_text_embeddings": True}
    own_homes = (tmp_path / "home0", tmp_path / "home1")
    own = machine_logs(two_machines(train_argv(assets, tmp_path / "own", **common), own_homes))
    for log, home in zip(own, own_homes, strict=True):
        assert f"Caching embeddings of 24 rows in {home}" in log
        assert len(list((home / "controlnet_trainer").glob("*/complete.json"))) == 1
    shared = tmp_path / "shared"
    logs = machine_logs(two_machines(train_argv(assets, tmp_path / "shared-run", **common), (shared, shared)))
    assert sum("first; using its copy" in log for log in logs) == 1
    assert len(list((shared / "controlnet_trainer").iterdir())) == 1  # one copy, no build folder left
    a, b = load_file(tmp_path / "own" / WEIGHTS), load_file(tmp_path / "shared-run" / WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a)


def parent_pid(pid: int) -> int:
    # /proc/<pid>/stat: "pid (name) state ppid ..."; the name may hold spaces, so split after it.
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid``, from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and parent_pid(int(entry.name)) == pid:
                children.append(int(entry.name))
        except OSError:  # gone meanwhile
            continue
    return children


def rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of training rank ``rank``, a child of the launcher, from its environment."""
    for pid in child_pids(launcher.pid):
        try:
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
        except OSError:
            continue
    return None


def test_sigterm_to_one_rank_stops_both_at_the_same_step(assets, tmp_path):
    """The ranks agree on stopping over the host (gloo) every step: a signal to rank 1 alone
    makes both save one complete checkpoint after the same step and exit cleanly."""
    output_dir = tmp_path / "out"
    argv = train_argv(assets, output_dir, train_batch_size=2, max_train_steps=400, checkpointing_steps=1000)
    process = start_two(ROOT / "train_controlnet.py", argv)
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while len(step_records(output_dir)) < 2:
        assert process.poll() is None and time.monotonic() < deadline, "training ended before a signal could be sent"
        time.sleep(0.05)
    pid = rank_pid(process, 1)
    assert pid is not None, "rank 1 not found"
    os.kill(pid, signal.SIGTERM)
    done = wait_two(process)
    assert done.stderr.count("Received SIGTERM") == 1  # rank 1 alone was signalled
    saved = sorted(output_dir.glob("checkpoint-*"))
    assert len(saved) == 1 and "Stopped by" in done.stderr
    step = json.loads((saved[0] / "training_state.json").read_text())["global_step"]
    assert 2 <= step < 400 and not (output_dir / WEIGHTS).exists()
    assert {p.name for p in saved[0].iterdir()} >= {"random_states_0.pkl", "random_states_1.pkl"}


def test_streaming_ranks_share_the_stream_and_match_one_process(assets, tmp_path):
    """--streaming over two ranks: disjoint rows every step, together the one-process batch."""
    probe_script, probe_dir = tmp_path / "probe.py", tmp_path / "probe"
    probe_script.write_text(PROBE)
    probe_dir.mkdir()
    common = {"streaming": True, "max_train_steps": 4, "shuffle_buffer_size": 8}
    launched = start_two(
        probe_script,
        train_argv(assets, tmp_path / "two", train_batch_size=2, **flags(assets, **common)),
        PROBE_DIR=str(probe_dir),
    )
    one_dir = tmp_path / "one"
    seen = beside(launched, lambda: one_process(assets, one_dir, **common))
    wait_two(launched)
    rank0, rank1 = (read_probe(probe_dir, rank) for rank in (0, 1))
    for a, b, whole in zip(rank0, rank1, seen, strict=True):
        assert not set(a) & set(b) and sorted(a + b) == sorted(whole)
    start = load_file(Path(assets["controlnet"]) / WEIGHTS)
    two, one = load_file(tmp_path / "two" / WEIGHTS), load_file(one_dir / WEIGHTS)
    moved = math.sqrt(sum(((one[k].double() - start[k].double()) ** 2).sum().item() for k in one))
    apart = math.sqrt(sum(((two[k].double() - one[k].double()) ** 2).sum().item() for k in one))
    assert moved > 1e-2 and apart / moved < 1e-3, (moved, apart)


def epoch_lengths(positions: list[list[int]]) -> list[int]:
    """Micro-batches per epoch of one rank: stream positions start again with every epoch."""
    lengths = [1]
    for previous, batch in itertools.pairwise(positions):
        if min(batch) < min(previous):
            lengths.append(0)
        lengths[-1] += 1
    return lengths


def test_streaming_ranks_read_their_own_shards_end_epochs_together_and_resume(assets, tmp_path):
    """Four tar shards of 7, 7, 7 and 3 rows, two each: one rank has 14 rows and the other 10, so
    epoch 0 ends for both after 5 steps of 2 samples. Stopped in epoch 1 and resumed, the run
    ends bit-identical to the straight one."""
    shards = fixtures.write_fill_webdataset(tmp_path / "shards", num_rows=24, size=RESOLUTION, rows_per_shard=7)
    probe_script, probe_dir = tmp_path / "probe.py", tmp_path / "probe"
    probe_script.write_text(PROBE)
    probe_dir.mkdir()
    common = {"dataset_name": shards, "streaming": True, "max_train_steps": 8, "shuffle_buffer_size": 8}

    def argv(output_dir: Path, **extra) -> list[str]:
        return train_argv(assets, output_dir, train_batch_size=2, **flags(assets, **common, **extra))

    resumed = tmp_path / "resumed"
    # The straight run and the one stopped at step 6 train side by side.
    straight_launch = start_two(probe_script, argv(tmp_path / "straight"), PROBE_DIR=str(probe_dir))
    stopped_launch = start_two(ROOT / "train_controlnet.py", argv(resumed, stop_at_step=6))
    straight, _ = wait_two(straight_launch), wait_two(stopped_launch)
    assert "Each of the 2 ranks reads its own 2 of the stream's 4 shards" in straight.stderr
    lengths = [epoch_lengths(read_probe(probe_dir, rank)) for rank in (0, 1)]
    assert lengths[0] == lengths[1] == [5, 3], lengths

    state = json.loads((resumed / "checkpoint-6" / "training_state.json").read_text())
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 1)
    launch_two(ROOT / "train_controlnet.py", argv(resumed, resume_from_checkpoint="latest"))
    a, b = load_file(resumed / WEIGHTS), load_file(tmp_path / "straight" / WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in b)
