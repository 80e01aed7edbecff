"""Where the training rows come from: every form users keep ControlNet data in.

1. A hub id or a local dataset directory that ``datasets.load_dataset`` reads (parquet, arrow,
   csv, json files; imagefolder).
2. A directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``.
3. A folder of images with a ``metadata.jsonl`` or ``metadata.csv`` naming, per row, the image
   file, the conditioning image file and the caption. ``load_dataset("imagefolder")`` would only
   turn the first into an image and leave the conditioning column as path strings relative to a
   folder nobody knows later, which is where diffusers' script crashes; here both become images
   read from paths resolved against the folder, and every file is checked before training.

4. WebDataset tar shards (``<key>.<field>.<ext>`` files, read by datasets' webdataset loader):
   a column named ``image.png`` answers to ``--image_column=image``, so the default column
   names work for shards written as ``<key>.image.png``, ``<key>.conditioning_image.png`` and
   ``<key>.text.txt``.

``load_stream`` reads the same sources as a stream (--streaming). Only the train split is
returned, its columns checked (``load_train_dataset``).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path

import datasets
import pyarrow as pa

from . import data
from .settings import DataSettings

logger = logging.getLogger(__name__)

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
# imagefolder's name for the image path, and the names people use beside it for the conditioning image.
IMAGE_ALIASES = ("file_name",)
CONDITIONING_ALIASES = ("conditioning_image_file_name", "conditioning_file_name")
# An indexed dataset streamed with --streaming is cut into this many shards, so that shuffling
# the shard order every epoch mixes it beyond the reach of the shuffle buffer.
STREAM_SHARDS = 64
# Flux's flag for a JSON-lines file of rows whose relative paths are read from the working directory.
JSONL_FLAG = "--jsonl_for_train"



@dataclasses.dataclass(frozen=True)
class Source:
    """Where the training rows are: what load_dataset is given, and the flag that named it."""

    path: str
    flag: str
    data_dir: str | None = None  # --train_data_dir beside --dataset_name: load_dataset's data_dir

    def describe(self) -> str:
        return self.path if self.data_dir is None else f"{self.path} (data_dir {self.data_dir})"


def source_of(settings: DataSettings) -> Source:
    """diffusers' reading of the flags: --dataset_name, with --train_data_dir as its data_dir
    when both are given; --train_data_dir alone is the dataset itself; Flux's --jsonl_for_train
    stands alone."""
    if settings.jsonl_for_train is not None:
        return Source(settings.jsonl_for_train, JSONL_FLAG)
    if settings.dataset_name is not None:
        return Source(settings.dataset_name, "--dataset_name", settings.train_data_dir)
    return Source(settings.train_data_dir, "--train_data_dir")


def load_train_dataset(settings: DataSettings) -> datasets.Dataset:
    """The ``train`` split named by --dataset_name and/or --train_data_dir, columns checked."""
    source = source_of(settings)
    columns = data.columns_of(settings)
    train = load_rows(
        source.path,
        config_name=settings.dataset_config_name,
        cache_dir=settings.cache_dir,
        columns=columns,
        flag=source.flag,
        skip_missing=settings.skip_bad_images,
        data_dir=source.data_dir,
    )
    data.check_columns(train, columns)
    if len(train) == 0:
        raise data.DataError(f"Dataset {source.describe()!r} has no rows in its train split; add training data.")
    data.check_captions(train, settings.caption_column)
    return train

def load_rows(
    source: str,
    *,
    config_name: str | None,
    cache_dir: str | None,
    columns: data.Columns,
    flag: str = "--dataset_name",
    skip_missing: bool = False,
    data_dir: str | None = None,
) -> datasets.Dataset:
    """The train split of ``source`` (--dataset_name or --train_data_dir, named by ``flag``).

    ``data_dir`` (--train_data_dir beside --dataset_name) is load_dataset's: the folder of the
    dataset to read, as diffusers passes it. ``skip_missing`` (--skip_bad_images) leaves out
    metadata rows whose image files are missing instead of stopping.
    """
    return webdataset_columns(_load_rows(source, config_name, cache_dir, columns, flag, skip_missing, data_dir))


def load_stream(
    source: str,
    *,
    config_name: str | None,
    cache_dir: str | None,
    columns: data.Columns,
    flag: str,
    data_dir: str | None = None,
) -> datasets.IterableDataset:
    """The train split of ``source`` as a stream: rows are read as training reaches them.

    Hub ids and dataset folders stream from their files without being converted to a local arrow
    cache first; a save_to_disk folder or a metadata folder is small enough to index and is
    streamed from its arrow files.
    """
    local = None if flag == JSONL_FLAG else _local_path(source, flag)
    if local is not None:
        _refuse_file(local, source, flag)
    folder = Path(source) if flag == JSONL_FLAG else _data_folder(source, local, data_dir)
    if folder is not None and (_is_saved_dataset(folder) or _find_metadata(folder) is not None):
        rows = _load_rows(source, config_name, cache_dir, columns, flag, False, data_dir)
        return webdataset_columns(rows.to_iterable_dataset(num_shards=min(len(rows), STREAM_SHARDS)))
    where, data_dir = (source, data_dir) if local is None else (str(local), _inside(local, folder))
    stream = _load_dataset(where, config_name, cache_dir, data_dir=data_dir, streaming=True)
    return webdataset_columns(_train_split(stream, source))


def webdataset_columns(rows: datasets.Dataset | datasets.IterableDataset):
    """Rows of WebDataset shards with ``image.png``-style columns renamed to ``image``.

    The webdataset loader names a column by everything after the key, extension included; users
    (and the column flags' defaults) name the field. A name is only shortened when no other
    column would take the same name.
    """
    names = rows.column_names or []
    if "__key__" not in names:
        return rows
    stems = [name.split(".", 1)[0] for name in names]
    renames = {
        name: stem
        for name, stem in zip(names, stems, strict=True)
        if stem != name and stems.count(stem) == 1 and stem not in names
    }
    return rows.rename_columns(renames) if renames else rows


def _load_rows(
    source: str,
    config_name: str | None,
    cache_dir: str | None,
    columns: data.Columns,
    flag: str,
    skip_missing: bool,
    data_dir: str | None = None,
) -> datasets.Dataset:
    if flag == JSONL_FLAG:
        return _load_jsonl(source, columns, skip_missing)
    local = _local_path(source, flag)
    if local is not None:
        _refuse_file(local, source, flag)
    folder = _data_folder(source, local, data_dir)
    if folder is not None and _is_saved_dataset(folder):
        _refuse_config_name(config_name, "a dataset written by save_to_disk")
        return _load_saved(folder, source)
    metadata = None if folder is None else _find_metadata(folder)
    if metadata is not None:
        _refuse_config_name(config_name, f"a folder described by {metadata.name}")
        return load_metadata_folder(metadata, columns, skip_missing=skip_missing)
    if local is None:
        return _train_split(_load_dataset(source, config_name, cache_dir, data_dir=data_dir), source)
    return _load_local_dataset(local, source, config_name, cache_dir, _inside(local, folder))


def _load_jsonl(source: str, columns: data.Columns, skip_missing: bool) -> datasets.Dataset:
    path = Path(source).expanduser()
    if not path.is_file():
        raise data.DataError(f"`{JSONL_FLAG}` points to {source!r}, which is not a file. Check the path.")
    return load_metadata_folder(path, columns, skip_missing=skip_missing, relative_to=Path.cwd())


def _data_folder(source: str, local: Path | None, data_dir: str | None) -> Path | None:
    """The local folder (or metadata file) that holds the rows, None where load_dataset finds them.

    ``data_dir`` is read inside a local ``source`` (an absolute one stands alone), as load_dataset
    reads it. With a packaged loader's name (--dataset_name=imagefolder) it is the folder itself:
    one described by a metadata file is read here, conditioning images included.
    """
    if data_dir is None:
        return local
    if local is None:
        folder = Path(data_dir).expanduser()
        is_described = folder.is_dir() and _find_metadata(folder) is not None
        return folder if source == "imagefolder" and is_described else None
    folder = local / Path(data_dir).expanduser()
    if not folder.is_dir() or not folder.resolve().is_relative_to(local.resolve()):
        raise data.DataError(
            f"`--train_data_dir={data_dir}` names the folder of `--dataset_name={source}` to load (its "
            f"data_dir, as in diffusers), but {folder} is not a folder inside it. Name a subfolder of "
            f"{local}, or drop one of the two flags."
        )
    return folder


def _inside(local: Path, folder: Path) -> str | None:
    """``folder`` as load_dataset's data_dir for the local dataset ``local`` (relative, as it
    requires), or None for the whole dataset."""
    relative = os.path.relpath(folder.resolve(), local.resolve())
    return None if relative == "." else relative


def _refuse_file(local: Path, source: str, flag: str) -> None:
    if local.is_file() and local.name not in METADATA_FILES:
        raise data.DataError(
            f"`{flag}` points to the file {source!r}; point it at the folder holding the data: a "
            "dataset folder (parquet, arrow, csv, json or WebDataset tar files), a folder written by "
            f"save_to_disk, or a folder of images with one of {list(METADATA_FILES)}."
        )


def _local_path(source: str, flag: str) -> Path | None:
    """The local path ``source`` names, or None for a hub id; a missing local path is an error."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if flag == "--train_data_dir" or source.startswith((".", "/", "~")):
        raise data.DataError(f"`{flag}` points to {source!r}, which does not exist. Check the path.")
    return None


def _refuse_config_name(config_name: str | None, what: str) -> None:
    if config_name is not None:
        raise data.DataError(
            f"`--dataset_config_name={config_name}` has no meaning for {what}, which has a single "
            "configuration. Drop the flag."
        )


def _train_split(loaded, source: str):
    """The train split of a DatasetDict or IterableDatasetDict (a bare split passes through)."""
    if isinstance(loaded, (datasets.Dataset, datasets.IterableDataset)):
        return loaded
    if "train" not in loaded:
        raise data.DataError(
            f"Dataset {source!r} has no 'train' split (it has {sorted(loaded)}); put the training "
            "rows in a split named train."
        )
    return loaded["train"]


def _load_dataset(path: str, config_name: str | None, cache_dir: str | None, **options):
    try:
        # Datasets 4+ never runs a dataset's own loading script, so no remote code is executed.
        return datasets.load_dataset(path, config_name, cache_dir=cache_dir, **options)
    except datasets.data_files.EmptyDatasetError as error:
        raise data.DataError(
            f"Dataset {path!r} has no data files ({error}). Point the flag at the folder that holds the "
            "data: parquet, arrow, csv, json or WebDataset tar files, a folder written by save_to_disk, "
            f"or a folder of images with one of {list(METADATA_FILES)}."
        ) from error
    except (ConnectionError, datasets.exceptions.DatasetNotFoundError) as error:
        raise data.DataError(
            f"Dataset {path!r} is not a local folder, and it could not be loaded from the Hub ({error}). "
            "A hub id needs the network or an earlier download in the cache (--cache_dir); a local "
            "folder needs a path that exists (start it with ./ to say it is one)."
        ) from error
    except ValueError as error:
        if "corresponds to no data" in str(error):
            raise data.DataError(f"Dataset {path!r} has no rows in its train split; add training data.") from error
        if str(error).startswith("BuilderConfig"):  # "BuilderConfig 'x' not found. Available: [...]"
            raise data.DataError(
                f"`--dataset_config_name={config_name}` is not a configuration of {path!r} ({error}). "
                "Pass one of those, or drop the flag."
            ) from error
        raise


def _load_local_dataset(
    path: Path, source: str, config_name: str | None, cache_dir: str | None, data_dir: str | None = None
) -> datasets.Dataset:
    """load_dataset on a local directory, rebuilt when its cache is older than the files."""
    loaded = _load_dataset(str(path), config_name, cache_dir, data_dir=data_dir)
    # With a README (or .huggingface.yaml) declaring `configs:`, datasets keys the cache by the
    # folder and config names alone, so a folder rebuilt in place would silently load old rows.
    if not _has_dataset_card(path):
        return _train_split(loaded, source)
    if _newest_mtime(_walk(path)) > _oldest_cache_mtime(loaded):
        loaded = _load_dataset(
            str(path), config_name, cache_dir, data_dir=data_dir, download_mode=datasets.DownloadMode.FORCE_REDOWNLOAD
        )
    train = _train_split(loaded, source)
    # The rebuilt cache keeps its path and so its fingerprint; tie the fingerprint to when the
    # cache was written, so caches keyed by it (datasets' own, --cache_latents) see the new rows.
    files = [entry["filename"] for entry in train.cache_files]
    if not files:
        return train  # held in memory: nothing on disk was reused
    return _with_fingerprint(train, _digest([(name, _signature(name)) for name in files]))


def _has_dataset_card(path: Path) -> bool:
    return (path / "README.md").is_file() or (path / ".huggingface.yaml").is_file()


def _walk(root: Path) -> Iterable[Path]:
    """Every file and folder under ``root``, skipping hidden ones (caches, .git)."""
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        yield Path(folder)
        yield from (Path(folder, name) for name in files if not name.startswith("."))


def _newest_mtime(paths: Iterable[Path]) -> float:
    # Folders count too: deleting or renaming a file only changes its folder's mtime.
    return max((path.stat().st_mtime for path in paths), default=0.0)


def _oldest_cache_mtime(loaded: datasets.DatasetDict) -> float:
    files = [Path(entry["filename"]) for split in loaded.cache_files.values() for entry in split]
    return min((path.stat().st_mtime for path in files if path.exists()), default=float("inf"))


def _signature(path: object) -> tuple[int, int] | None:
    """(size, mtime in ns) of a regular file, None where there is none."""
    if not isinstance(path, (str, Path)):
        return None  # os.stat would take an integer for a file descriptor
    try:
        status = os.stat(path)
    except (OSError, ValueError):  # ValueError: a NUL in the path
        return None
    return (status.st_size, status.st_mtime_ns) if stat.S_ISREG(status.st_mode) else None


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _with_fingerprint(dataset: datasets.Dataset, fingerprint: str) -> datasets.Dataset:
    # Selecting the full contiguous range slices the table without copying it.
    return dataset.select(range(len(dataset)), new_fingerprint=fingerprint)


def _is_saved_dataset(path: Path) -> bool:
    if (path / datasets.config.DATASETDICT_JSON_FILENAME).is_file():
        return True
    return (path / datasets.config.DATASET_STATE_JSON_FILENAME).is_file() and (
        path / datasets.config.DATASET_INFO_FILENAME
    ).is_file()


def _load_saved(path: Path, source: str) -> datasets.Dataset:
    """The train split of a save_to_disk folder, read alone: load_from_disk fails with an
    IndexError on a split saved without rows, whichever split it is."""
    split = path
    if (path / datasets.config.DATASETDICT_JSON_FILENAME).is_file():
        splits = json.loads((path / datasets.config.DATASETDICT_JSON_FILENAME).read_text())["splits"]
        _train_split(dict.fromkeys(splits), source)  # names the splits there are if train is not one
        split = path / "train"
    state = json.loads((split / datasets.config.DATASET_STATE_JSON_FILENAME).read_text())
    if not state.get("_data_files"):
        raise data.DataError(f"Dataset {source!r} has no rows in its train split; add training data.")
    # Memory-mapped from the saved arrow files, which are the data itself: no cache to go stale.
    return datasets.load_from_disk(str(split))


def _find_metadata(path: Path) -> Path | None:
    """The metadata file itself, or one at a folder's root or in its train/ split folder as imagefolder allows."""
    if path.is_file():
        return path
    for base in (path, path / "train"):
        for name in METADATA_FILES:
            if (base / name).is_file():
                return base / name
    return None


def load_metadata_folder(
    metadata: Path, columns: data.Columns, *, skip_missing: bool = False, relative_to: Path | None = None
) -> datasets.Dataset:
    """Rows of a metadata file; image paths resolved against its folder (or ``relative_to``),
    checked and read as images.

    The Dataset is built here rather than by load_dataset("imagefolder"), so there is no cache
    that could serve rows of an earlier version of the folder, and its fingerprint covers each
    file's size and write time: an image replaced in place gives a new fingerprint, so caches
    keyed by it (--cache_latents) are not reused. Rows naming a missing file are an error, or
    with ``skip_missing`` (--skip_bad_images) left out with a warning.
    """
    lines, rows = _read_metadata(metadata)
    if not rows:
        raise data.DataError(f"{metadata} lists no rows; add one row per training example.")
    table = _columns_of(rows, columns)
    image_columns = [name for name in (columns.image, columns.conditioning_image) if name in table]
    folder = (relative_to or metadata.parent).resolve()
    written = {name: table[name] for name in image_columns}
    resolved = {name: [_resolve(folder, value) for value in values] for name, values in written.items()}
    signatures = {name: [_signature(path) for path in paths] for name, paths in resolved.items()}
    table |= resolved
    missing = sorted(
        (row, name) for name, column in signatures.items() for row, sig in enumerate(column) if sig is None
    )
    if missing:
        message = _missing_files_message(metadata, folder, lines, written, resolved, missing)
        keep = _keep_rows(message, missing, len(lines), skip_missing)
        lines = [lines[row] for row in keep]
        table = {name: [values[row] for row in keep] for name, values in table.items()}
        signatures = {name: [values[row] for row in keep] for name, values in signatures.items()}
    _check_captions(table, columns.caption, lines, metadata)
    return _with_fingerprint(_dataset_of(table, image_columns, metadata), _digest([table, signatures]))


def _missing_files_message(
    metadata: Path,
    folder: Path,
    lines: list[int],
    written: dict[str, list],
    resolved: dict[str, list],
    missing: list[tuple[int, str]],
) -> str:
    """The first missing file, as written and where it was looked for, and how many are missing."""
    row, name = missing[0]
    value, path = written[name][row], resolved[name][row]
    if isinstance(path, str):
        problem = f"names {value!r} in `{name}`, which does not exist (looked for {path!r})"
    else:
        problem = f"has no file path in `{name}` (got {value!r})"
    total = len(written) * len(lines)
    return (
        f"{metadata.name} row {row} (line {lines[row]}) {problem}; {len(missing)} of {total} image files "
        f"listed in {metadata} are missing (relative paths are read from {folder})."
    )


def _keep_rows(message: str, missing: list[tuple[int, str]], num_rows: int, skip_missing: bool) -> list[int]:
    if not skip_missing:
        raise data.DataError(
            f"{message} Fix the paths or add the files, or pass --skip_bad_images to train without those rows."
        )
    keep = sorted(set(range(num_rows)) - {row for row, _ in missing})
    if not keep:
        raise data.DataError(f"{message} No row has all its image files; there is nothing to train on.")
    logger.warning("--skip_bad_images: %s Training on the other %d rows.", message, len(keep))
    return keep


def _dataset_of(table: dict[str, list], image_columns: list[str], metadata: Path) -> datasets.Dataset:
    try:
        dataset = datasets.Dataset.from_dict(table)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise data.DataError(
            f"{metadata} mixes value types within one field ({error}); give every row the same "
            "kind of value per field, e.g. a string caption or a list of strings in all rows."
        ) from error
    # Image features decode (and apply EXIF orientation) exactly as for a parquet dataset.
    for name in image_columns:
        dataset = dataset.cast_column(name, datasets.Image())
    return dataset


def _read_metadata(metadata: Path) -> tuple[list[int], list[dict]]:
    """(line number of each row, rows); line numbers point users at the row to fix."""
    if metadata.suffix == ".csv":
        return _read_csv(metadata)
    return _read_jsonl(metadata)


def _read_jsonl(metadata: Path) -> tuple[list[int], list[dict]]:
    lines, rows = [], []
    with open(metadata, encoding="utf-8") as file:
        for number, text in enumerate(file, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                raise data.DataError(
                    f"{metadata} line {number} is not valid JSON ({error.msg}); write one JSON object per line."
                ) from error
            if not isinstance(row, dict):
                raise data.DataError(
                    f"{metadata} line {number} is a {type(row).__name__}, not a JSON object; write one "
                    'object per line, e.g. {"image": "images/0.png", "conditioning_image": '
                    '"conditioning/0.png", "text": "a caption"}.'
                )
            lines.append(number)
            rows.append(row)
    return lines, rows


def _read_csv(metadata: Path) -> tuple[list[int], list[dict]]:
    # CSV has no types, so every value stays a string: a caption like "1984" is not turned into a
    # number. utf-8-sig drops the byte-order mark spreadsheet programs write.
    lines, rows = [], []
    with open(metadata, newline="", encoding="utf-8-sig") as file:
        reader = csv.DictReader(file)
        for row in reader:
            if None in row:
                raise data.DataError(
                    f"{metadata} line {reader.line_num} has more fields than the header "
                    f"{reader.fieldnames}; quote values that contain commas."
                )
            lines.append(reader.line_num)
            rows.append(row)
    return lines, rows


def _columns_of(rows: list[dict], columns: data.Columns) -> dict[str, list]:
    """Column-wise values over the union of the rows' fields, imagefolder names mapped to ours."""
    names = list(dict.fromkeys(name for row in rows for name in row))
    renames = _alias_renames(names, columns)
    return {renames.get(name, name): [row.get(name) for row in rows] for name in names}


def _alias_renames(names: list[str], columns: data.Columns) -> dict[str, str]:
    renames = {}
    for target, aliases in ((columns.image, IMAGE_ALIASES), (columns.conditioning_image, CONDITIONING_ALIASES)):
        if target in names:
            continue
        alias = next((name for name in aliases if name in names), None)
        if alias is not None:
            renames[alias] = target
    return renames


def _resolve(folder: Path, value: object) -> object:
    """An absolute path string; a missing or non-text value is kept for the check to report."""
    if not isinstance(value, str) or not value:
        return value
    return os.path.normpath(folder / Path(value).expanduser())


def _check_captions(table: dict[str, list], caption: str, lines: list[int], metadata: Path) -> None:
    """A row without a caption would only fail at tokenisation, mid-training."""
    values = table.get(caption)
    if values is None:
        return  # data.check_columns names the missing column and the flag
    row = next((row for row, value in enumerate(values) if value is None), None)
    if row is not None:
        raise data.DataError(
            f"{metadata.name} row {row} (line {lines[row]}) has no caption in `{caption}`; give every "
            'row a caption (use "" for none).'
        )
