"""benchmarks/profile_step.py: the real trainer under torch.profiler, its time split by kind."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import RESOLUTION, ROOT, script_env, train_argv

sys.path.insert(0, str(ROOT / "benchmarks"))

from profile_step import kind_of, summarize


@pytest.mark.parametrize(
    ("operator", "kind"),
    [
        ("aten::convolution_backward", "convolution"),
        ("aten::cudnn_convolution", "convolution"),
        ("aten::_scaled_dot_product_flash_attention_backward", "attention"),
        ("aten::mm", "matrix products"),
        ("aten::addmm", "matrix products"),
        ("aten::native_group_norm", "normalisation"),
        ("aten::_fused_adamw_", "optimizer"),
        ("aten::copy_", "copies and casts"),
        ("aten::silu", "other"),
        ("ProfilerStep*", "host: Python between operators"),
    ],
)
def test_operators_are_sorted_into_kinds_of_work(operator, kind):
    assert kind_of(operator) == kind


def test_profiles_the_recorded_steps_of_a_real_run(assets, tmp_path):
    out = tmp_path / "profile.json"
    flags = train_argv(assets, tmp_path / "run", max_train_steps=6)
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "profile_step.py"),
        "--wait=2",
        "--active=2",
        "--top=300",
        f"--out={out}",
    ]
    done = subprocess.run(
        [*command, "--", *flags], env=script_env(), capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(out.read_text())
    kinds = summary["kinds_ms_per_step"]
    assert summary["clock"] == "cpu" and summary["ms_per_step"] > 0
    assert kinds["convolution"] > 0 and kinds["matrix products"] > 0 and kinds["attention"] > 0
    assert sum(kinds.values()) == pytest.approx(summary["ms_per_step"])
    assert (tmp_path / "run" / "diffusion_pytorch_model.safetensors").exists()  # the run itself completed
    # The shapes name the layer: the ControlNet's first conv reads the batch of 4 RGB conditioning images.
    first_conv = f"[4, 3, {RESOLUTION}, {RESOLUTION}]"
    shaped = summary["top_operator_shapes_ms_per_step"]
    assert any(kind_of(row) == "convolution" and first_conv in row for row in shaped), list(shaped)[:20]


def test_device_split_counts_each_kernel_once():
    """kineto lists a kernel as its own row and inside its operator's device time; an annotation
    row on the device spans a whole range. Each kernel must be counted once."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def row(key, device_type, us, annotation=False):
        return SimpleNamespace(
            key=key,
            device_type=device_type,
            self_device_time_total=us,
            self_cpu_time_total=0,
            is_user_annotation=annotation,
        )

    events = [
        row("aten::cudnn_convolution", DeviceType.CPU, 6000),
        row("aten::mm", DeviceType.CPU, 2000),
        row("sm90_xmma_fprop_implicit_gemm", DeviceType.CUDA, 6000),
        row("cutlass_gemm", DeviceType.CUDA, 2000),
        row("ProfilerStep#7", DeviceType.CUDA, 20000, annotation=True),
    ]
    summary = summarize(events, on_device=True, steps=2, top=10)
    assert summary["ms_per_step"] == pytest.approx(4.0)
    assert summary["kinds_ms_per_step"] == pytest.approx({"convolution": 3.0, "matrix products": 1.0})
    assert summary["kernel_ms_per_step"] == pytest.approx(4.0)
    assert list(summary["top_kernels_ms_per_step"]) == ["sm90_xmma_fprop_implicit_gemm", "cutlass_gemm"]
