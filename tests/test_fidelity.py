"""Tests of the conditioning-fidelity probe and its command, on the tiny offline fixtures."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from accelerate.utils import DistributedType
from diffusers import ControlNetModel

from controlnet_trainer import data, fidelity, fixtures
from controlnet_trainer.errors import InputError
from controlnet_trainer.families.sd import FAMILY as SD
from controlnet_trainer.families.sdxl import FAMILY as SDXL
from controlnet_trainer.models import load_models
from controlnet_trainer.settings import ModelSettings

RESOLUTION = 64
NUM_HELDOUT = 8
COLUMNS = data.Columns("image", "conditioning_image", "text")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine the threads'
    barriers make each forward pass ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fill(tmp_path_factory) -> Path:
    return fixtures.build_fill_dataset(tmp_path_factory.mktemp("fill") / "fill", num_rows=40, size=RESOLUTION)


@pytest.fixture(scope="module")
def rows(fill, tmp_path_factory) -> datasets.Dataset:
    return datasets.load_dataset(str(fill), cache_dir=str(tmp_path_factory.mktemp("cache")))["train"]


@pytest.fixture(scope="module")
def samples(rows) -> list[dict]:
    _, heldout = fidelity.split_heldout(rows, NUM_HELDOUT, seed=0)
    return fidelity.load_samples(heldout, COLUMNS, data.PairedTransform(RESOLUTION))


def _load(base: Path, family, weight_dtype: torch.dtype = torch.float32):
    """Frozen base models in ``weight_dtype`` and a fresh fp32 ControlNet made from the UNet."""
    args = ModelSettings(pretrained_model_name_or_path=str(base))
    # from_unet draws the conditioning embedding from the global generator: seeded here, so the
    # probe's numbers do not depend on which tests ran before (after test_sdxl, matched and
    # blank differed by 5e-6 instead of more than 1e-5).
    torch.manual_seed(0)
    models = load_models(args, family)
    for module in models.frozen():
        module.requires_grad_(False).eval().to(dtype=weight_dtype)
    return models


@pytest.fixture(scope="module")
def sd_models(assets):
    return _load(assets["sd"], SD)


@pytest.fixture(scope="module")
def probe(sd_models, samples) -> fidelity.FidelityProbe:
    return fidelity.FidelityProbe.build(sd_models, SD, samples, resolution=RESOLUTION, timesteps_per_sample=2)


def perturbed(controlnet: ControlNetModel, seed: int = 0, scale: float = 0.05) -> ControlNetModel:
    """A copy whose zero convolutions hold random weights, as after some training.

    The conditioning embedding's biases are zeroed so a blank image embeds to zero and the
    outlines alone move the residuals; with its random biases they would drown the thin lines.
    """
    copied = copy.deepcopy(controlnet)
    generator = torch.Generator().manual_seed(seed)
    embedding = copied.controlnet_cond_embedding
    with torch.no_grad():
        for conv in (embedding.conv_in, *embedding.blocks):
            conv.bias.zero_()
        embedding.conv_out.weight.copy_(torch.randn(embedding.conv_out.weight.shape, generator=generator) * 2.0)
        for conv in (*copied.controlnet_down_blocks, copied.controlnet_mid_block):
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * scale)
    return copied


def _losses(result: fidelity.FidelityResult) -> list[float]:
    return [result.matched, result.mismatched, result.blank, result.unet_only]


def test_fresh_controlnet_has_no_gap_and_scores_repeat_exactly(sd_models, probe):
    controlnet = sd_models.controlnet.train()
    first = probe.evaluate(controlnet)
    second = probe.evaluate(controlnet, batch_size=3)  # batching must not change the numbers much
    again = probe.evaluate(controlnet)

    assert first == again  # fixed noise and timesteps
    assert second.to_json() == pytest.approx(first.to_json(), rel=1e-6)
    assert max(_losses(first)) - min(_losses(first)) <= 1e-6
    assert first.control_gap == 0.0
    assert first.num_samples == NUM_HELDOUT
    assert 0.0 < first.unet_only < 10.0
    assert controlnet.training, "evaluate must restore training mode"


def test_perturbed_controlnet_exercises_the_conditioning_path(sd_models, probe):
    fresh = probe.evaluate(sd_models.controlnet)
    result = probe.evaluate(perturbed(sd_models.controlnet))

    assert result.unet_only == pytest.approx(fresh.unet_only, abs=1e-7)  # the UNet alone is unchanged
    # Rounding alone moves these losses by ~1e-7; the conditioning moves them far more.
    assert abs(result.matched - result.mismatched) > 1e-5
    assert abs(result.matched - result.blank) > 1e-5
    assert abs(result.blank - result.unet_only) > 1e-3  # the ControlNet's own trunk still adds residuals
    assert result.control_gap == pytest.approx((result.mismatched - result.matched) / result.mismatched)
    assert result.to_metrics() == {
        "fidelity/matched": result.matched,
        "fidelity/mismatched": result.mismatched,
        "fidelity/blank": result.blank,
        "fidelity/unet_only": result.unet_only,
        "fidelity/control_gap": result.control_gap,
    }


def test_probe_inputs_are_fixed_by_the_seed(sd_models, samples, probe):
    batch = data.collate(samples)  # a collated batch works as well as a list of samples
    same = fidelity.FidelityProbe.build(sd_models, SD, batch, resolution=RESOLUTION, timesteps_per_sample=2)
    other = fidelity.FidelityProbe.build(sd_models, SD, batch, resolution=RESOLUTION, timesteps_per_sample=2, seed=1)

    for name in ("latents", "encoder_hidden_states", "conditioning", "timesteps", "noise"):
        assert torch.equal(getattr(same, name), getattr(probe, name)), name
    assert not torch.equal(other.noise, probe.noise)
    assert not torch.equal(other.timesteps, probe.timesteps)
    assert torch.equal(probe.mismatched_index, torch.tensor([1, 2, 3, 4, 5, 6, 7, 0]))


def test_timesteps_cover_the_schedule_in_strata():
    timesteps = fidelity.fixed_timesteps(50, 4, 1000, torch.Generator().manual_seed(0))
    assert timesteps.shape == (50, 4)
    for stratum in range(4):
        column = timesteps[:, stratum]
        assert column.min() >= stratum * 250 and column.max() < (stratum + 1) * 250
    assert len(set(timesteps[:, 0].tolist())) > 40  # per-sample offsets differ


class ShardOf:
    """What ``evaluate`` uses of an Accelerator, for one rank; ``others`` stands for the rest."""

    def __init__(self, rank: int, world: int, others: torch.Tensor | None = None):
        self.process_index, self.num_processes = rank, world
        self.distributed_type = DistributedType.MULTI_CPU  # data-parallel: every rank holds all weights
        self.device = torch.device("cpu")
        self.others = others
        self.sent = None

    def unwrap_model(self, model):
        return model

    def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        assert reduction == "sum"
        self.sent = tensor.clone()
        return tensor if self.others is None else tensor + self.others


def test_ranks_evaluate_their_share_and_agree(sd_models, probe):
    controlnet = perturbed(sd_models.controlnet)
    whole = probe.evaluate(controlnet)
    rank_1 = ShardOf(1, 2)
    probe.evaluate(controlnet, accelerator=rank_1)
    combined = probe.evaluate(controlnet, accelerator=ShardOf(0, 2, others=rank_1.sent))

    assert rank_1.sent[-2:].tolist() == [NUM_HELDOUT, NUM_HELDOUT // 2]  # 4 samples x 2 timesteps
    assert combined.num_samples == NUM_HELDOUT
    assert combined.to_json() == pytest.approx(whole.to_json(), rel=1e-6)


def test_mixed_precision_frozen_models(assets, samples):
    models = _load(assets["sd"], SD, torch.bfloat16)
    probe = fidelity.FidelityProbe.build(
        models, SD, samples[:2], resolution=RESOLUTION, timesteps_per_sample=1, weight_dtype=torch.bfloat16
    )
    fresh = probe.evaluate(models.controlnet)
    result = probe.evaluate(perturbed(models.controlnet))

    assert models.controlnet.dtype == torch.float32
    assert fresh.control_gap == 0.0
    assert all(0.0 < loss < 10.0 for loss in _losses(result))
    assert result.matched != result.unet_only


def test_sdxl_probe_evaluates_with_time_ids(sdxl_assets, samples):
    models = _load(sdxl_assets["sdxl"], SDXL)
    probe = fidelity.FidelityProbe.build(
        models, SDXL, samples[:4], resolution=RESOLUTION, timesteps_per_sample=1, crop_override=(3, 5)
    )
    assert probe.added_conditioning["time_ids"][0].tolist() == [64, 64, 3, 5, 64, 64]
    assert probe.added_conditioning["text_embeds"].shape == (4, fixtures.TEXT_HIDDEN_SIZE)

    fresh = probe.evaluate(models.controlnet)
    result = probe.evaluate(perturbed(models.controlnet))
    assert fresh.control_gap == 0.0
    assert abs(result.matched - result.mismatched) > 1e-6
    assert result.num_samples == 4


def test_split_heldout_is_deterministic_and_disjoint(rows):
    rows = rows.add_column("row", list(range(len(rows))))

    def split(seed: int) -> tuple[list[int], list[int]]:
        train, heldout = fidelity.split_heldout(rows, 8, seed=seed)
        return list(train["row"]), list(heldout["row"])

    train, heldout = split(3)
    assert split(3) == (train, heldout)
    assert split(4)[1] != heldout
    assert len(heldout) == 8 and len(train) == len(rows) - 8
    assert set(train).isdisjoint(heldout)
    assert sorted(train + heldout) == list(range(len(rows)))
    assert heldout == sorted(heldout) and train == sorted(train)  # dataset order is kept


@pytest.mark.parametrize("num_samples, message", [(40, "too few"), (100, "too few"), (1, "at least 2")])
def test_split_heldout_refuses_impossible_sizes(rows, num_samples, message):
    with pytest.raises(InputError, match=message):
        fidelity.split_heldout(rows, num_samples, seed=0)


def test_command_prints_json_for_a_saved_controlnet(assets, sd_models, fill, tmp_path):
    saved = tmp_path / "controlnet"
    perturbed(sd_models.controlnet).save_pretrained(str(saved))
    command = [
        sys.executable,
        "-m",
        "controlnet_trainer.fidelity",
        f"--pretrained_model_name_or_path={assets['sd']}",
        f"--controlnet_model_name_or_path={saved}",
        f"--dataset_name={fill}",
        f"--cache_dir={tmp_path / 'cache'}",
        f"--resolution={RESOLUTION}",
        "--num_samples=4",
        "--timesteps_per_sample=2",
    ]
    environment = os.environ | {"OMP_NUM_THREADS": "1"}  # see one_thread
    result = subprocess.run(
        command, check=False, capture_output=True, text=True, cwd=Path(__file__).parents[1], env=environment
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)

    assert set(printed) == {"matched", "mismatched", "blank", "unet_only", "control_gap", "num_samples"}
    assert printed["num_samples"] == 4
    assert printed["matched"] != printed["mismatched"]


def test_command_reports_bad_input_without_traceback(assets, capsys):
    with pytest.raises(SystemExit) as exit_info:
        fidelity.main(
            [
                f"--pretrained_model_name_or_path={assets['sd']}",
                f"--controlnet_model_name_or_path={assets['controlnet']}",
            ]
        )
    assert exit_info.value.code == 2
    assert "--dataset_name" in capsys.readouterr().err
