"""A checkpoint written by commit 310fcad resumes with this code to exactly the weights that
310fcad's uninterrupted run ended with.

tests/data/checkpoint_310fcad/ holds, from that commit: a tiny SD 1.x pipeline and the ControlNet
the run starts from (base/), the run's checkpoint-2 as written, its final weights and its
metrics.jsonl. README.md there says how they were made.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import torch
from conftest import step_records
from safetensors.torch import load_file

from controlnet_trainer.cli import run

DATA = Path(__file__).with_name("data") / "checkpoint_310fcad"
# The session fixture's fill dataset, as its 24 decoded rows (pixels and captions), at 310fcad.
FILL_ROWS_SHA256 = "17662c4f1c30821bd09cd5c9094f2981dc2ef86c75d74cea2b2f4fb946fef4fd"
# torch's intra-op threads in the run that wrote the stored files: they decide how float sums split.
RECORDED_THREADS = 2


def command(dataset: Path, output_dir: Path) -> list[str]:
    """The command line of the run that wrote the stored checkpoint.

    24 rows in batches of 4, accumulated over 2, make 3 optimizer steps an epoch: the checkpoint
    at step 2 stops mid-epoch, and steps 3 and 4 cross into the next one. Noise, timesteps and
    empty prompts are drawn per sample from (seed, epoch, row), so they follow from the saved
    progress; the cosine schedule goes on from the saved scheduler, Adam from its saved moments
    and the EMA from its saved average.
    """
    return [
        f"--pretrained_model_name_or_path={DATA / 'base'}",
        f"--controlnet_model_name_or_path={DATA / 'base' / 'controlnet'}",
        f"--dataset_name={dataset}",
        f"--output_dir={output_dir}",
        "--resolution=32",
        "--train_batch_size=4",
        "--gradient_accumulation_steps=2",
        "--max_train_steps=4",
        "--checkpointing_steps=2",
        "--learning_rate=1e-3",
        "--lr_scheduler=cosine",
        "--lr_warmup_steps=0",
        "--proportion_empty_prompts=0.5",
        "--use_ema",
        "--ema_decay=0.5",
        "--seed=0",
        "--validation_steps=100",
        "--report_to=none",
    ]


def fill_rows_sha256(dataset: Path) -> str:
    digest = hashlib.sha256()
    for row in datasets.load_dataset(str(dataset))["train"]:
        digest.update(np.asarray(row["image"]).tobytes())
        digest.update(np.asarray(row["conditioning_image"]).tobytes())
        digest.update(row["text"].encode())
    return digest.hexdigest()


def test_a_checkpoint_of_310fcad_resumes_to_its_uninterrupted_end(assets, tmp_path):
    # Otherwise the run below trains on other data and the comparison says nothing of checkpoints.
    assert fill_rows_sha256(assets["fill"]) == FILL_ROWS_SHA256, "the fill fixture's rows differ from 310fcad's"
    output_dir = tmp_path / "out"
    shutil.copytree(DATA / "checkpoint-2", output_dir / "checkpoint-2")

    threads = torch.get_num_threads()
    torch.set_num_threads(RECORDED_THREADS)
    try:
        run([*command(assets["fill"], output_dir), "--resume_from_checkpoint=latest"])
    finally:
        torch.set_num_threads(threads)

    # Steps 1 and 2 came from the checkpoint: this run trained, and logged, steps 3 and 4 only,
    # with the losses of the uninterrupted run (same batches, noise, timesteps and empty prompts).
    records = step_records(output_dir)
    assert [r["step"] for r in records] == [3, 4]
    stored = map(json.loads, (DATA / "metrics.jsonl").read_text().splitlines())
    straight_losses = {r["step"]: r["loss"] for r in stored if "loss" in r}
    assert [r["loss"] for r in records] == [straight_losses[3], straight_losses[4]]
    # The CPU run is bit-reproducible (tests/test_training.py's resume tests compare with
    # torch.equal too), so nothing short of equality is accepted.
    expected = load_file(DATA / "diffusion_pytorch_model.safetensors")
    resumed = load_file(output_dir / "diffusion_pytorch_model.safetensors")
    assert resumed.keys() == expected.keys()
    mismatched = [name for name in expected if not torch.equal(expected[name], resumed[name])]
    assert not mismatched, f"{len(mismatched)} of {len(expected)} tensors differ, e.g. {mismatched[:3]}"
    # Step 4 is the first step of epoch 1 (3 steps an epoch), 2 micro-batches into it.
    progress = json.loads((output_dir / "checkpoint-4" / "training_state.json").read_text())
    assert progress == {"global_step": 4, "epoch": 1, "batch_in_epoch": 2, "seed": 0, "batch_layout": [4, 1]}
