"""Tests for the end-of-training plot drawn with PIL."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from controlnet_trainer import plots
from controlnet_trainer.errors import InputError

WIDTH, HEIGHT = plots.PANEL_SIZE


def _records(steps: int = 200, *, fidelity: bool = False) -> list[dict]:
    records = []
    for step in range(1, steps + 1):
        record = {"step": step, "loss": 0.05 + 0.2 * math.exp(-step / 50) + 0.02 * math.sin(step), "lr": 1e-5}
        if fidelity and step % 50 == 0:
            record |= {"fidelity/control_gap": 0.001 * step, "fidelity/matched": 0.1, "fidelity/blank": 0.2}
        records.append(record)
    return records


def _colours(path) -> set[tuple[int, int, int]]:
    with Image.open(path) as image:
        return {colour for _, colour in image.convert("RGB").getcolors(maxcolors=WIDTH * HEIGHT * 2)}


def _column_has(path, colour, x_range: range) -> bool:
    with Image.open(path) as image:
        rgb = image.convert("RGB")
        return any(rgb.getpixel((x, y)) == colour for x in x_range for y in range(HEIGHT))


def test_loss_only_is_one_panel_with_both_curves(tmp_path):
    path = plots.plot_training_curves(_records(), tmp_path / "sub" / "curves.png")
    assert path == tmp_path / "sub" / "curves.png"
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (WIDTH, HEIGHT)
    colours = _colours(path)
    assert plots.SMOOTH_LOSS in colours and plots.RAW_LOSS in colours
    assert plots.GAP not in colours


def test_fidelity_adds_a_gap_panel_to_the_right(tmp_path):
    path = plots.plot_training_curves(_records(fidelity=True), tmp_path / "curves.png")
    with Image.open(path) as image:
        assert image.size == (2 * WIDTH, HEIGHT)
    assert _column_has(path, plots.GAP, range(WIDTH, 2 * WIDTH))
    assert not _column_has(path, plots.GAP, range(WIDTH))


def test_records_read_back_from_jsonl_with_non_finite_strings(tmp_path):
    """metrics.jsonl stores nan/inf as strings; they are skipped, and the title says how many."""
    records = _records(50)
    records[10]["loss"], records[20]["loss"], records[30]["loss"] = "nan", "inf", "-inf"
    lines = "".join(json.dumps(r) + "\n" for r in records)
    parsed = [json.loads(line) for line in lines.splitlines()]
    path = plots.plot_training_curves(parsed, tmp_path / "curves.png")
    assert plots.SMOOTH_LOSS in _colours(path)
    assert plots._title("loss", "0.1", 3) == "loss: last 0.1 (3 non-finite skipped)"
    assert plots._series(parsed, "loss")[1] == 3


def test_single_record_is_drawn_as_a_dot(tmp_path):
    path = plots.plot_training_curves([{"step": 7, "loss": 0.3}], tmp_path / "one.png")
    with Image.open(path) as image:
        assert image.size == (WIDTH, HEIGHT)
    assert plots.SMOOTH_LOSS in _colours(path)


def test_records_without_loss_still_plot(tmp_path):
    """Validation-only or fidelity-only records leave the loss panel empty but labelled."""
    records = [{"step": 100, "fidelity/control_gap": 0.05}, {"step": 200, "fidelity/control_gap": "nan"}]
    path = plots.plot_training_curves(records, tmp_path / "gap.png")
    with Image.open(path) as image:
        assert image.size == (2 * WIDTH, HEIGHT)
    colours = _colours(path)
    assert plots.GAP in colours and plots.SMOOTH_LOSS not in colours

    path = plots.plot_training_curves([{"step": 1, "lr": 1e-5}], tmp_path / "lr.png")
    with Image.open(path) as image:
        assert image.size == (WIDTH, HEIGHT)


def test_no_records_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no metrics records"):
        plots.plot_training_curves([], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_series_sorts_by_step_and_scales():
    records = [{"step": 2, "g": 0.5}, {"step": 1, "g": "0.25"}, {"step": 3}, {"step": 4, "g": "oops"}]
    assert plots._series(records, "g", scale=100.0) == ([(1.0, 25.0), (2.0, 50.0)], 1)


@pytest.mark.parametrize(
    ("low", "high", "integer"),
    [(0.0, 1.0, False), (0.0312, 0.2071, False), (-3.0, 2.0, False), (1.0, 9999.0, True), (-1.0, 1.0, True)],
)
def test_ticks_are_round_and_inside_the_range(low, high, integer):
    ticks = plots._nice_ticks(low, high, integer=integer)
    assert 2 <= len(ticks) <= 2 * plots.TICKS + 1
    assert all(low - 1e-9 <= t <= high + 1e-9 for t in ticks)
    if integer:
        assert all(float(t).is_integer() for t in ticks)
