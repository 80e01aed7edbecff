"""Every image is opened once before training, so a bad file fails in seconds, not in hour five.

Unreadable, truncated or corrupt files stop the run with the row and the file. With
--skip_bad_images their rows are left out instead, and the count is reported. Images smaller
than --resolution are counted and reported, because they are upscaled and come out blurry.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import datasets
import torch
from PIL import Image

from .data import Columns, DataError, open_image, undecoded

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Problem:
    row: int
    column: str
    source: str
    error: str


@dataclasses.dataclass(frozen=True)
class ScanReport:
    problems: tuple[Problem, ...]
    small_images: int  # images whose short side is below the resolution


def _describe(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return value.get("path") or "embedded image bytes"
    return type(value).__name__


def _load(value) -> Image.Image:
    image = open_image(value)
    image.load()  # decodes fully: truncated files fail here, not at open
    return image


class _RowCheck(torch.utils.data.Dataset):
    """Per row: the problems found and whether its image is below the resolution."""

    def __init__(self, rows: datasets.Dataset, columns: Columns, resolution: int):
        # Undecoded, so a corrupt file is our error to report, not a crash.
        self.rows = undecoded(rows, [columns.image, columns.conditioning_image])
        self.columns = columns
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[list[Problem], bool]:
        row = self.rows[index]
        problems, small = [], False
        for column in (self.columns.image, self.columns.conditioning_image):
            try:
                image = _load(row[column])
            except Exception as error:  # any failure to decode is what we look for
                problems.append(Problem(index, column, _describe(row[column]), f"{type(error).__name__}: {error}"))
                continue
            if column == self.columns.image:
                small = min(image.size) < self.resolution
        return problems, small


def scan_images(
    rows: datasets.Dataset,
    columns: Columns,
    *,
    resolution: int,
    num_workers: int,
    indices: Sequence[int] | None = None,
) -> ScanReport:
    """Open the images of ``indices`` (every row by default); problems name rows of ``rows``."""
    indices = range(len(rows)) if indices is None else indices
    logger.info("Checking that the images of %d rows open", len(indices))
    # A Subset hands _RowCheck the rows' own indices, so problems name rows of ``rows``.
    check = torch.utils.data.Subset(_RowCheck(rows, columns, resolution), indices)
    loader = torch.utils.data.DataLoader(check, batch_size=None, num_workers=num_workers)
    problems, small = [], 0
    for found, is_small in loader:
        problems.extend(found)
        small += int(is_small)
    return ScanReport(tuple(problems), small)


def merge(reports: Sequence[ScanReport]) -> ScanReport:
    """One report from the reports of the processes that each scanned a share of the rows."""
    problems = sorted((p for report in reports for p in report.problems), key=lambda p: p.row)
    return ScanReport(tuple(problems), sum(report.small_images for report in reports))


def apply_scan(rows: datasets.Dataset, report: ScanReport, *, skip_bad: bool, resolution: int) -> datasets.Dataset:
    """Raise on bad files, or drop their rows with --skip_bad_images; report small images."""
    if report.small_images:
        logger.warning(
            "%d of %d images are smaller than --resolution=%d and will be upscaled (blurry targets); "
            "consider a lower --resolution or filtering them out.",
            report.small_images,
            len(rows),
            resolution,
        )
    if not report.problems:
        return rows
    bad_rows = sorted({p.row for p in report.problems})
    first = report.problems[0]
    if not skip_bad:
        raise DataError(
            f"{len(bad_rows)} row(s) have unreadable images; the first is row {first.row}, column "
            f"`{first.column}`, file {first.source!r} ({first.error}). Fix or remove those files, or "
            "pass --skip_bad_images to train without those rows."
        )
    logger.warning(
        "--skip_bad_images: skipping %d row(s) with unreadable images (first: row %d, %s)",
        len(bad_rows),
        first.row,
        first.source,
    )
    keep = sorted(set(range(len(rows))) - set(bad_rows))
    if not keep:
        raise DataError(
            f"--skip_bad_images left out every row: all {len(rows)} have an unreadable image (the first is "
            f"row {first.row}, column `{first.column}`, file {first.source!r}: {first.error}), so there is "
            "nothing to train on. Fix the files, or check --image_column and --conditioning_image_column."
        )
    return rows.select(keep)
