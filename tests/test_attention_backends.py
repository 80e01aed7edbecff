"""benchmarks/attention_backends.py: the step's attention calls, and their timing per SDPA backend."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import ROOT
from diffusers.models.attention_processor import Attention

from controlnet_trainer import fixtures, reference_models

sys.path.insert(0, str(ROOT / "benchmarks"))

from attention_backends import attention_calls, call_flops, measure, step_flops_by_operator


def test_every_attention_of_the_step_is_recorded_with_its_gradient_path(assets):
    parts = reference_models.meta_components(assets["sd"])
    calls = dict(attention_calls(parts, resolution=64, batch=3))
    unet_attention = {f"unet.{name}" for name, m in parts["unet"].named_modules() if isinstance(m, Attention)}
    assert unet_attention and unet_attention <= calls.keys()
    assert any(name.startswith("controlnet.") for name in calls)
    for name, call in calls.items():
        assert call.batch == 3
        cross = name.endswith("attn2")
        assert (call.key_tokens == fixtures.MODEL_MAX_LENGTH) == cross
        if name.startswith(("unet.down_blocks", "unet.mid_block")):
            # Before the residuals join, the frozen UNet has nothing to pass a gradient to.
            assert not call.backward, name
        elif name.startswith("unet.up_blocks"):
            # Frozen projections on hidden states that carry the residuals' gradient.
            assert call.query_grad and call.key_value_grad == (not cross), name
        else:  # the ControlNet trains its projections
            assert call.query_grad and call.key_value_grad, name
    top = max(calls.values(), key=lambda call: call.query_tokens)
    assert top.query_tokens == (64 // 8) ** 2  # the latents' tokens at the first block


def test_recorded_calls_carry_all_of_the_steps_attention_flops(assets):
    # On meta tensors attention is counted as batched matrix products, and nothing else in the
    # tiny UNet or ControlNet is one: the calls' FLOPs must add up to those of the whole step.
    parts = reference_models.meta_components(assets["sd"])
    calls = attention_calls(parts, resolution=64, batch=2)
    by_operator = step_flops_by_operator(parts, resolution=64, batch=2)
    assert sum(call_flops(call) for _, call in calls) / 1e12 == pytest.approx(by_operator["bmm"], rel=1e-9)
    # The same step as the MFU figures count, at twice the samples.
    assert sum(by_operator.values()) * 1e12 == pytest.approx(2 * reference_models.step_flops(parts, 64)["cached"])


def test_per_step_totals_weigh_each_shape_by_its_calls_and_leave_out_backends_that_decline():
    result = measure("tiny", batch=2, device=torch.device("cpu"), dtype=torch.float32, repeats=1)
    rows, totals = result["calls"], result["per_step"]["backends"]
    assert sum(row["calls_per_step"] for row in rows) > len(rows)  # shapes repeat, so weights matter
    math_ms = sum(row["backends"]["math"]["ms"] * row["calls_per_step"] for row in rows)
    assert totals["math"]["ms"] == pytest.approx(math_ms)
    assert totals["math"]["tflop_per_s"] == pytest.approx(result["per_step"]["tflop"] / (math_ms / 1e3))
    # The CPU has no cuDNN kernel: every shape says so, and the backend gets no step total.
    assert all(row["backends"]["cudnn_attention"]["unavailable"] for row in rows)
    assert totals["cudnn_attention"]["ms"] is None
    assert totals["best of each"]["ms"] <= min(total["ms"] for total in totals.values() if total["ms"] is not None)
