"""Frozen work done once: VAE latent distributions and text embeddings, reused across runs.

The cache stores each image's posterior mean and standard deviation, so every step still draws a
fresh latent sample as the uncached path does. It stores the embedding of each distinct caption
plus the empty prompt, so prompt dropout still happens per sample per step. A cache lives in a
folder named by a hash of everything that changes its contents: models and revisions,
resolution and transform, the rows and columns. Any change gives a new folder, and a later run
with the same inputs reuses the old one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
from collections.abc import Callable, Sequence
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from huggingface_hub import constants as hub_constants

from . import data
from .buckets import Bucket
from .errors import InputError
from .families import ModelFamily, Models, TextConditioning, to_latents
from .settings import Settings

logger = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when the stored layout or the encoding changes
COMPLETE = "complete.json"
_TEXT_BATCH = 32  # prompts are short: this batch's memory is small at any resolution


def cache_root(settings: Settings) -> Path:
    if settings.memory.embeddings_cache_dir:
        return Path(settings.memory.embeddings_cache_dir)
    # Beside the hub's and datasets' caches: $HF_HOME, ~/.cache/huggingface unless set.
    base = Path(settings.model.cache_dir) if settings.model.cache_dir else Path(hub_constants.HF_HOME)
    return base / "controlnet_trainer"


def _weights_signature(path: str) -> str | list:
    """A local model folder is identified by its files' sizes and times; a hub id by name."""
    root = Path(path)
    if not root.exists():
        return path
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".json"))
    return [(str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def cache_key(
    settings: Settings,
    family: ModelFamily,
    models: Models,
    rows: datasets.Dataset,
    transform: data.PairedTransform,
) -> str:
    """A hash of everything the cached tensors depend on."""
    vae = settings.model.pretrained_vae_model_name_or_path
    inputs = {
        "version": CACHE_VERSION,
        "family": family.name,
        "model": [settings.model.pretrained_model_name_or_path, settings.model.revision, settings.model.variant],
        "model_files": _weights_signature(settings.model.pretrained_model_name_or_path),
        "vae": [vae, _weights_signature(vae)] if vae else None,
        "tokenizer": settings.model.tokenizer_name,
        "resolution": transform.resolution,
        "interpolation": transform.interpolation.value,
        "rows": [rows._fingerprint, len(rows)],
        "columns": dataclasses.astuple(data.columns_of(settings.data)),
        "latents": bool(settings.memory.cache_latents),
        # Rows are assigned to buckets from their sizes and the resolution, both keyed above.
        "aspect_ratio_buckets": settings.data.aspect_ratio_buckets,
        "text": bool(settings.memory.cache_text_embeddings),
        # The encoders run in the mixed-precision dtype: a bf16 run's cache is not an fp32 run's.
        "dtypes": [str(models.vae.dtype), *(str(encoder.dtype) for encoder in models.text_encoders)],
    }
    if models.text_options:  # SD3's T5 length and use
        inputs["text_options"] = models.text_options
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclasses.dataclass(frozen=True)
class EmbeddingCache:
    """Memory-mapped cached tensors; rows are indexed by dataset position."""

    directory: Path
    # One array per piece (rows of one latent shape that one process encoded; None for an empty
    # piece), and each row's (piece, position in it).
    latent_means: tuple[np.ndarray, ...] | None
    latent_stds: tuple[np.ndarray, ...] | None
    latent_slots: np.ndarray | None
    text_hidden: np.ndarray | None
    text_pooled: np.ndarray | None
    caption_ids: list[list[int]] | None  # per row, per caption: a row of text_hidden (0 is "")

    def latents(self, index: int, generator: torch.Generator, vae) -> torch.Tensor:
        """A fresh sample of row ``index``'s posterior (batch of 1), as ``latent_dist.sample()`` draws
        it, in ``vae``'s latent space (shifted and scaled)."""
        group, position = self.latent_slots[index].tolist()
        device = generator.device
        rows = [position]  # a list index copies out of the read-only memory map
        mean = _tensor(self.latent_means[group][rows]).to(device, non_blocking=True).float()
        std = _tensor(self.latent_stds[group][rows]).to(device, non_blocking=True).float()
        noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
        return to_latents(vae, mean + std * noise)

    def text(self, indices: list[int], picks: list[int], device: torch.device) -> TextConditioning:
        """Embeddings of the chosen captions; -1 (dropped) takes the empty prompt's."""
        ids = [0 if pick < 0 else self.caption_ids[row][pick] for row, pick in zip(indices, picks)]
        hidden = _tensor(self.text_hidden[ids]).to(device, non_blocking=True).float()
        pooled = None
        if self.text_pooled is not None:
            pooled = _tensor(self.text_pooled[ids]).to(device, non_blocking=True).float()
        return TextConditioning(hidden, pooled)


def _array(tensor: torch.Tensor) -> np.ndarray:
    """A tensor as stored: in the dtype the encoder computed it in, so a bf16 or fp16 run's cache
    takes half the disk at no loss. numpy has no bfloat16, so bf16 is stored as its 16 bits."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy()
    return tensor.numpy()


def _tensor(array: np.ndarray) -> torch.Tensor:
    """The stored array as a tensor: int16 arrays hold bf16 bits (nothing else is int16)."""
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if tensor.dtype == torch.int16 else tensor


def _captions(rows: datasets.Dataset, column: str) -> list[list[str]]:
    return [data.caption_options(cell) for cell in data.column_values(rows, column)]


def _write(directory: Path, name: str, array: np.ndarray) -> None:
    np.save(directory / f"{name}.npy", array)


@torch.no_grad()
def _encode_latents(
    models: Models, dataset: torch.utils.data.Dataset, batch_size: int, num_workers: int
) -> tuple[np.ndarray, ...]:
    # The training batch: the encoder then needs no more memory than an uncached step gives it
    # (a batch of 32 at 1024 px in fp32 took ~80 GiB for SDXL's VAE on an H200).
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=data.collate, num_workers=num_workers
    )
    means, stds = [], []
    for batch in loader:
        pixels = batch["pixel_values"].to(models.vae.device, models.vae.dtype)
        posterior = models.vae.encode(pixels).latent_dist
        means.append(_array(posterior.mean))
        stds.append(_array(posterior.std))
    return np.concatenate(means), np.concatenate(stds)


@torch.no_grad()
def _encode_texts(models: Models, family: ModelFamily, prompts: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    hidden, pooled = [], []
    for start in range(0, len(prompts), _TEXT_BATCH):
        text = family.encode_prompts(models, prompts[start : start + _TEXT_BATCH])
        hidden.append(_array(text.encoder_hidden_states))
        if text.pooled is not None:
            pooled.append(_array(text.pooled))
    return np.concatenate(hidden), (np.concatenate(pooled) if pooled else None)


class CacheError(InputError):
    """The cache cannot be built where it should live."""


def cache_bytes(
    settings: Settings,
    family: ModelFamily,
    models: Models,
    rows: datasets.Dataset,
    transform: data.PairedTransform,
    buckets: Sequence[Bucket] | None,
) -> tuple[int, int]:
    """(latent bytes, text bytes) the cache will take on disk, from the shapes the models give."""
    latent = 0
    if settings.memory.cache_latents:
        factor = 2 ** (len(models.vae.config.block_out_channels) - 1)
        channels = models.vae.config.latent_channels
        shapes = buckets or [(transform.resolution, transform.resolution)] * len(rows)
        # Mean and standard deviation, stored in the VAE's dtype.
        itemsize = models.vae.dtype.itemsize
        latent = sum(2 * channels * (height // factor) * (width // factor) * itemsize for height, width in shapes)
    text = 0
    if settings.memory.cache_text_embeddings:
        captions = {c for options in _captions(rows, data.columns_of(settings.data).caption) for c in options}
        with torch.no_grad():
            empty = family.encode_prompts(models, [""])
        per_caption = empty.encoder_hidden_states[0].numel() + (0 if empty.pooled is None else empty.pooled[0].numel())
        text = (len(captions - {""}) + 1) * per_caption * empty.encoder_hidden_states.element_size()
    return latent, text


def check_room(folder: Path, latent: int, text: int) -> str | None:
    """Why the cache cannot be written under ``folder``, or None if the disk has room for it."""
    parent = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(parent).free
    if latent + text <= free:
        return None
    larger = "--cache_text_embeddings" if text > latent else "--cache_latents"
    return (
        f"The embeddings cache needs about {_gib(latent + text)} in {folder} ({_gib(latent)} of image "
        f"latents, {_gib(text)} of caption embeddings), but that disk has only {_gib(free)} free. "
        f"Free some space, point --embeddings_cache_dir at a disk with room, or drop {larger}, "
        "the larger part, to compute that part at every step instead."
    )


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


@dataclasses.dataclass(frozen=True)
class Team:
    """The processes of one machine, which build that machine's copy of the cache together."""

    member: int  # this process's place in the team; 0 leads: it checks, encodes texts, publishes
    size: int
    build: bool  # the lead found no complete cache
    folder: Path  # where the team builds: named after the lead, so every member writes there


def machine_team(accelerator: Accelerator, directory: Path, sizes: Callable[[], tuple[int, int]]) -> Team:
    """This process's team. Launchers number ranks machine by machine, so a machine's lead is the
    rank its local rank 0 has. Only leads look at the disk; the gather gives every member its
    lead's answer (members that looked for themselves could disagree while another run publishes).
    If a lead finds no room for the build (``sizes``: its bytes), every process raises its error."""
    lead = accelerator.process_index - accelerator.local_process_index
    build, problem = None, None
    if accelerator.is_local_main_process:
        build = not is_complete(directory)
        problem = check_room(directory.parent, *sizes()) if build else None
    mine = (lead, os.getpid(), build, problem)
    table = gather_object([mine])  # [mine] in one process
    problem = next((row[3] for row in table if row[3] is not None), None)
    if problem is not None:
        raise CacheError(problem)
    _, lead_pid, build, _ = table[lead]
    size = sum(1 for row in table if row[0] == lead)
    return Team(accelerator.local_process_index, size, build, _partial_name(directory, lead_pid))


def _latent_pieces(buckets: Sequence[Bucket] | None, num_rows: int, team_size: int) -> list[list[int]]:
    """Row indices stored together: one latent shape (all rows, or an aspect-ratio bucket's), and
    of those every ``team_size``-th, so that each member of the team encodes its own pieces.
    Piece p belongs to member p % team_size."""
    if buckets is None:
        shapes = [list(range(num_rows))]
    else:
        by_bucket: dict[Bucket, list[int]] = {}
        for index, bucket in enumerate(buckets):
            by_bucket.setdefault(bucket, []).append(index)
        shapes = list(by_bucket.values())
    return [rows[member::team_size] for rows in shapes for member in range(team_size)]


def _write_latents(folder: Path, team: Team, settings, models: Models, dataset, pieces: list[list[int]]) -> None:
    for piece, indices in enumerate(pieces):
        if piece % team.size == team.member and indices:
            subset = torch.utils.data.Subset(dataset, indices)
            mean, std = _encode_latents(models, subset, settings.data.train_batch_size, settings.data.dataloader_num_workers)
            _write(folder, f"latent_mean_{piece}", mean)
            _write(folder, f"latent_std_{piece}", std)


def _slots(pieces: list[list[int]], num_rows: int) -> np.ndarray:
    """Each row's (piece, position in it)."""
    slots = np.zeros((num_rows, 2), dtype=np.int64)
    for piece, indices in enumerate(pieces):
        slots[indices] = [(piece, position) for position in range(len(indices))]
    return slots


def _write_texts(folder: Path, family: ModelFamily, models: Models, captions: list[list[str]]) -> None:
    # Index 0 is the empty prompt that dropout swaps in; each distinct caption is encoded once.
    table = [""] + sorted({c for options in captions for c in options} - {""})
    position = {caption: i for i, caption in enumerate(table)}
    hidden, pooled = _encode_texts(models, family, table)
    _write(folder, "text_hidden", hidden)
    if pooled is not None:
        _write(folder, "text_pooled", pooled)
    ids = [[position[c] for c in options] for options in captions]
    (folder / "caption_ids.json").write_text(json.dumps(ids))


def build(
    accelerator: Accelerator,
    team: Team,
    directory: Path,
    settings: Settings,
    family: ModelFamily,
    models: Models,
    rows: datasets.Dataset,
    transform: data.PairedTransform,
    buckets: Sequence[Bucket] | None = None,
) -> None:
    """Encode everything into the team's folder, then the lead renames it to ``directory``.

    Every process calls this, building or not, because of the barriers in it. Each member
    encodes its share of the latents; the lead encodes the texts, which cost little.
    """
    if team.build and team.member == 0:
        logger.info("Caching embeddings of %d rows in %s (%d processes)", len(rows), directory, team.size)
        _remove_abandoned_builds(directory)
        team.folder.mkdir(parents=True)
    accelerator.wait_for_everyone()  # the folder exists before the members write into it
    columns = data.columns_of(settings.data)
    pieces = _latent_pieces(buckets, len(rows), team.size)
    if team.build and settings.memory.cache_latents:
        dataset = data.ControlNetDataset(rows, columns, transform, buckets=buckets)
        _write_latents(team.folder, team, settings, models, dataset, pieces)
    accelerator.wait_for_everyone()
    if not (team.build and team.member == 0):
        return
    if settings.memory.cache_latents:
        _write(team.folder, "latent_slots", _slots(pieces, len(rows)))
    if settings.memory.cache_text_embeddings:
        _write_texts(team.folder, family, models, _captions(rows, columns.caption))
    files = sorted(path.name for path in team.folder.iterdir())
    (team.folder / COMPLETE).write_text(json.dumps({"rows": len(rows), "version": CACHE_VERSION, "files": files}))
    _publish(team.folder, directory)


def _partial_name(directory: Path, lead_pid: int) -> Path:
    """Where a team builds the cache: two runs that build the same cache at once (or two
    machines on one shared disk) each write their own folder, so neither deletes the other's work."""
    return directory.with_name(f"{directory.name}.partial-{socket.gethostname()}-{lead_pid}")


def _remove_abandoned_builds(directory: Path) -> None:
    """Partial builds of this cache left on this host by processes that no longer run (killed)."""
    prefix = f"{directory.name}.partial-{socket.gethostname()}-"
    if not directory.parent.is_dir():
        return
    for path in directory.parent.iterdir():
        pid = path.name.removeprefix(prefix)
        if path.name.startswith(prefix) and pid.isdigit() and not _process_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


def _publish(partial: Path, directory: Path) -> None:
    """Rename the finished build into place; if another process published it first, keep theirs.

    A rename onto a folder that has files fails, so exactly one of several builders wins.
    """
    try:
        os.rename(partial, directory)
        return
    except OSError:
        if is_complete(directory):
            logger.info("Another process finished %s first; using its copy", directory)
            shutil.rmtree(partial, ignore_errors=True)
            return
    logger.warning("Replacing the incomplete embeddings cache in %s", directory)
    shutil.rmtree(directory, ignore_errors=True)
    os.rename(partial, directory)


def is_complete(directory: Path) -> bool:
    """Whether ``directory`` holds a finished build with every file it lists (damage or an
    interrupted copy would otherwise surface later as a missing array)."""
    marker = directory / COMPLETE
    if not marker.exists():
        return False
    listed = json.loads(marker.read_text()).get("files", [])
    return all((directory / name).exists() for name in listed)


def load(directory: Path) -> EmbeddingCache:
    def array(name: str) -> np.ndarray | None:
        path = directory / f"{name}.npy"
        return np.load(path, mmap_mode="r") if path.exists() else None

    ids_path = directory / "caption_ids.json"
    slots = array("latent_slots")
    groups = range(0 if slots is None else int(slots[:, 0].max()) + 1)
    return EmbeddingCache(
        directory=directory,
        latent_means=tuple(array(f"latent_mean_{group}") for group in groups) or None,
        latent_stds=tuple(array(f"latent_std_{group}") for group in groups) or None,
        latent_slots=slots,
        text_hidden=array("text_hidden"),
        text_pooled=array("text_pooled"),
        caption_ids=json.loads(ids_path.read_text()) if ids_path.exists() else None,
    )


def prepare_cache(
    accelerator: Accelerator,
    settings: Settings,
    family: ModelFamily,
    models: Models,
    rows: datasets.Dataset,
    transform: data.PairedTransform,
    buckets: Sequence[Bucket] | None = None,
) -> EmbeddingCache | None:
    """The cache for this run: built by each machine's processes together unless complete,
    then memory-mapped by every process. As all of them work on the build, none waits at a
    barrier for the length of a build (NCCL gives up on a barrier after 10 minutes).

    ``buckets`` are the rows' aspect-ratio buckets, if any: latents are then stored per bucket.
    """
    if not (settings.memory.cache_latents or settings.memory.cache_text_embeddings):
        return None
    directory = cache_root(settings) / cache_key(settings, family, models, rows, transform)
    # Each machine's processes share the work of its copy: on a disk of its own (the default
    # ~/.cache), every machine needs one; on a shared disk, the first copy finished is kept.
    team = machine_team(accelerator, directory, lambda: cache_bytes(settings, family, models, rows, transform, buckets))
    if not team.build and team.member == 0:
        logger.info("Reusing the embeddings cached in %s", directory)
    build(accelerator, team, directory, settings, family, models, rows, transform, buckets)
    accelerator.wait_for_everyone()  # every machine's copy is in place
    return load(directory)
