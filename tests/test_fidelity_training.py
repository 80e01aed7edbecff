"""The control gap during real training, SD and SD3: it rises when the conditioning carries
information, and stays near zero when the conditioning images are shuffled against their targets."""

from __future__ import annotations

import json
import subprocess
import sys

import datasets
import pytest
from conftest import RESOLUTION, ROOT, script_env, train_argv

from controlnet_trainer import fidelity, fixtures
from controlnet_trainer.cli import run

# The tiny ControlNet spends its first ~100 steps correcting the random UNet; at STEPS the honest
# gap is about twice HONEST_GAP, while a shuffled run's stays within a seventh of SHUFFLED_GAP.
STEPS = 250
HONEST_GAP = 0.0015  # the honest run's gap at STEPS exceeds this
SHUFFLED_GAP = 0.0005  # the shuffled run's gap stays within this of zero
SD3_STEPS = 100  # by then the honest SD3 gap is about 1.5 times the bound asserted, 7 times the shuffled one
# The T5 prompt length of the SD3 pair: the captions take fewer tokens, and each block's attention
# over image and text tokens costs as the square of their number.
SD3_T5_TOKENS = 8


@pytest.fixture(scope="module")
def fill_data(tmp_path_factory, assets):
    root = tmp_path_factory.mktemp("fidelity-data")
    honest = fixtures.build_fill_dataset(root / "fill", num_rows=400, size=RESOLUTION)
    rows = datasets.load_dataset(str(honest))["train"]
    # The same rows with the conditioning images permuted: outlines no longer match the circles.
    shuffled_conditioning = rows.select_columns(["conditioning_image"]).shuffle(seed=1)
    broken = datasets.concatenate_datasets([rows.remove_columns(["conditioning_image"]), shuffled_conditioning], axis=1)
    broken.to_parquet(root / "shuffled" / "data" / "train-00000-of-00001.parquet")
    return {"honest": honest, "shuffled": root / "shuffled"}


def gaps(output_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["fidelity/control_gap"] for r in records if "fidelity/control_gap" in r}


def train_side_by_side(root, fill_data, script: str, argv_for) -> dict[str, object]:
    """The honest and the shuffled run, trained side by side: two processes of one thread each
    take little longer than one process of two threads takes for one run."""
    launched = {}
    for name, dataset in fill_data.items():
        log = (root / f"{name}.log").open("w")
        command = [sys.executable, str(ROOT / script), *argv_for(root / name, dataset)]
        launched[name] = (subprocess.Popen(command, env=script_env(OMP_NUM_THREADS="1"), stdout=log, stderr=log), log)
    for name, (process, log) in launched.items():
        process.wait(timeout=1800)
        log.close()
        assert process.returncode == 0, (root / f"{name}.log").read_text()[-3000:]
    return {name: root / name for name in fill_data}


@pytest.fixture(scope="module")
def trained(assets, fill_data, tmp_path_factory) -> dict[str, object]:
    flags = {"max_train_steps": STEPS, "validation_steps": STEPS // 2, "fidelity_samples": 16}
    return train_side_by_side(
        tmp_path_factory.mktemp("fidelity-runs"),
        fill_data,
        "train_controlnet.py",
        lambda output_dir, dataset: train_argv(assets, output_dir, dataset_name=dataset, **flags),
    )


@pytest.fixture(scope="module")
def trained_sd3(assets, tiny_sd3, fill_data, tmp_path_factory) -> dict[str, object]:
    """The same pair on the tiny SD3: flow matching, the conditioning through the VAE. It learns
    faster than the tiny SD (no random UNet to correct first); 32 held-out samples steady the
    measure."""
    flags = {
        "max_train_steps": SD3_STEPS,
        "validation_steps": SD3_STEPS // 2,
        "fidelity_samples": 32,
        "max_sequence_length": SD3_T5_TOKENS,
    }
    return train_side_by_side(
        tmp_path_factory.mktemp("fidelity-runs-sd3"),
        fill_data,
        "train_controlnet_sd3.py",
        lambda output_dir, dataset: train_argv(
            assets, output_dir, dataset_name=dataset, pretrained_model_name_or_path=tiny_sd3["sd3"], **flags
        ),
    )


def test_control_gap_rises_with_training(trained):
    measured = gaps(trained["honest"])
    assert sorted(measured) == [0, STEPS // 2, STEPS]
    assert measured[0] == 0.0  # a fresh ControlNet's zero convolutions add nothing
    assert measured[STEPS] > HONEST_GAP, measured
    final = json.loads((trained["honest"] / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["fidelity/matched"] < final["fidelity/mismatched"]


def test_control_gap_stays_flat_when_conditioning_is_shuffled(trained):
    measured = gaps(trained["shuffled"])
    assert measured[0] == 0.0
    assert abs(measured[STEPS]) < SHUFFLED_GAP, measured


def test_sd3_control_gap_rises_with_training_and_stays_flat_when_shuffled(trained_sd3):
    honest, shuffled = gaps(trained_sd3["honest"]), gaps(trained_sd3["shuffled"])
    assert sorted(honest) == [0, SD3_STEPS // 2, SD3_STEPS]
    assert honest[0] == 0.0 and shuffled[0] == 0.0  # zero-initialised output blocks add nothing
    assert 0 < honest[SD3_STEPS // 2] < honest[SD3_STEPS], honest
    assert honest[SD3_STEPS] > 0.015, honest
    assert abs(shuffled[SD3_STEPS]) < 0.008 and honest[SD3_STEPS] > 4 * abs(shuffled[SD3_STEPS]), (honest, shuffled)


def test_fidelity_dataset_is_measured_apart_and_every_training_row_trains(assets, tmp_path, capsys):
    held = fixtures.build_fill_dataset(tmp_path / "held", num_rows=6, size=RESOLUTION, seed=5)
    flags = {"fidelity_dataset": held, "fidelity_samples": 4, "fidelity_timesteps": 1, "fidelity_steps": 2}
    run(train_argv(assets, tmp_path / "run", max_train_steps=2, **flags))
    plan = json.loads((tmp_path / "run" / "training_options.json").read_text())["plan"]
    assert plan["num_samples"] == 24  # nothing held out of the training rows
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    measured = {r["step"]: r for r in records if "fidelity/unet_only" in r}
    assert sorted(measured) == [0, 2]
    # Step 0 scores the fresh ControlNet: the standalone measure of the first 4 rows of the
    # fidelity dataset, with one timestep each, must give the same numbers.
    capsys.readouterr()
    standalone = [f"--pretrained_model_name_or_path={assets['sd']}", f"--dataset_name={held}"]
    fidelity.main([*standalone, f"--resolution={RESOLUTION}", "--num_samples=4", "--timesteps_per_sample=1"])
    printed = json.loads(capsys.readouterr().out)
    for condition in ("matched", "unet_only"):
        assert measured[0][f"fidelity/{condition}"] == pytest.approx(printed[condition], rel=1e-5)
