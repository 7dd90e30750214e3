"""Assembling a run from its config: data folders, datasets and loaders, model, optimiser, schedule, loss."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..checks import check_output_folder
from ..config import variant_config
from ..data import (
    SeededSampler,
    ShardSampler,
    cache_folder,
    data_name,
    eval_transform,
    is_folder_tree,
    loader_options,
    open_images,
    source_classes,
    train_transform,
    write_digits,
)
from ..errors import TorchcvtError
from ..factory import create_model
from ..model import CvT
from ..runrecord import LAST_NAME
from ..typed import describe_changes
from ..weights import Checkpoint
from .optim import build_loss, build_optimizer, build_scheduler, freeze_stages, learning_rate
from .runtime import Runtime, seed_everything
from .starting import read_weights, released_weights
from .state import (
    check_resumable,
    check_training_state,
    read_training_state,
    remove_leftover_temporaries,
    set_aside_previous_run,
)
from .train_config import TrainConfig, as_train_config, per_process_batch

logger = logging.getLogger(__name__)

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Components:
    """Everything a training loop runs on, built and checked before the first step."""

    output: Path
    train_dir: Path
    val_dir: Path
    class_names: list[str]
    model: CvT
    ddp: nn.Module  # the model as the forward pass calls it (DistributedDataParallel when distributed)
    train_set: Dataset  # data.ImageFolder or hfdata.HFImages
    val_set: Dataset
    sampler: SeededSampler
    train_loader: DataLoader
    val_loader: DataLoader
    batch_size: int
    global_batch: int
    steps_per_epoch: int
    epochs: int
    max_steps: int | None  # a run counted in steps (train.steps) stops after this many
    lr: float
    optimizer: torch.optim.Optimizer
    scheduler: Any
    mixup: Any
    criterion: nn.Module
    ema: Any
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    val_amp_dtype: torch.dtype | None  # validation's autocast dtype (None: fp32)
    resume_path: Path | None
    resume_state: dict[str, Any] | None


def data_folders(cfg: TrainConfig, runtime: Runtime) -> tuple[Path, Path]:
    """The train and val ImageFolder trees; the embedded digits (written once) when none is given."""
    d = cfg.data
    if d.train is None:
        root = Path(d.digits_root) if d.digits_root else cache_folder("digits")
        if runtime.is_main:
            write_digits(root)
        if runtime.distributed:
            dist.barrier()
        return write_digits(root)
    train = Path(d.train)
    if d.val is None:
        raise TorchcvtError(
            f"data.val is not set (data.train is {train}); give the validation ImageFolder tree")
    return train, Path(d.val)


def checked_classes(train_dir: Path, val_dir: Path) -> list[str]:
    """The class list of the training data; a one-line error when the validation data's differs."""
    class_names = source_classes(train_dir)
    if len(class_names) < 2:
        raise TorchcvtError(
            f"data folder {train_dir} holds 1 class ({class_names[0]}): a classifier needs at least 2 "
            "class folders"
        )
    val_classes = source_classes(val_dir)
    if val_classes != class_names:
        missing = sorted(set(class_names) - set(val_classes))
        extra = sorted(set(val_classes) - set(class_names))
        raise TorchcvtError(
            f"val classes differ from train's ({len(val_classes)} in {val_dir}, {len(class_names)} "
            f"in {train_dir}): missing from val {missing[:5]}, not in train {extra[:5]}"
        )
    return class_names


RUNS_ROOT = Path("runs")


def with_run_folder(cfg: TrainConfig, runtime: Runtime) -> TrainConfig:
    """cfg with train.output set: as given, else a fresh folder named from the data and the model, as timm
    and transformers name theirs (runs/DATA-MODEL-YYYYmmdd-HHMMSS, -2, -3... if taken), rank 0's name on
    every rank."""
    if cfg.train.output is not None:
        return cfg
    folder = None
    if runtime.is_main:
        stem = RUNS_ROOT / f"{data_name(cfg.data.train)}-{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        folder, n = stem, 1
        while folder.exists():
            n += 1
            folder = stem.with_name(f"{stem.name}-{n}")
    if runtime.distributed:
        chosen = [folder]
        dist.broadcast_object_list(chosen, src=0, group=runtime.control)
        folder = chosen[0]
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, output=str(folder)))


def make_run_folder(output: Path) -> list[Path]:
    """Create the run folder; a one-line error when it is a file or cannot be written. Returns the folders
    it created, innermost first, for a start that fails to take away again (remove_created)."""
    if output.exists() and not output.is_dir():
        raise TorchcvtError(f"train.output {output} is a file, not a folder")
    check_output_folder(output, "train.output")
    created = [folder for folder in (output, *output.parents) if not folder.exists()]
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise TorchcvtError(f"train.output {output} cannot be created: {error.strerror}") from None
    return created


def remove_created(paths: Sequence[Path]) -> None:
    """Take away what a failed start created (its lock file, then its folders, innermost first), so no
    folder is left holding nothing but a lock; a folder something else was written into stays."""
    for path in paths:
        try:
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink(missing_ok=True)
        except OSError:
            return  # not empty: something besides this start lives there


def resume_path(cfg: TrainConfig, output: Path) -> Path | None:
    """train.resume, else OUTPUT/last.pth when present and auto_resume is on."""
    t = cfg.train
    if t.resume:
        path = Path(t.resume)
        # A run folder stands for its last checkpoint.
        return path / LAST_NAME if path.is_dir() and (path / LAST_NAME).is_file() else path
    last = output / LAST_NAME
    return last if t.auto_resume and last.is_file() else None


def starting_weights(cfg: TrainConfig) -> Checkpoint | None:
    """The weights a run starts from, read: model.pretrained's (Hub cache) or model.checkpoint's."""
    m = cfg.model
    if m.pretrained is not None:
        return released_weights(m.pretrained)
    return read_weights(m.checkpoint) if m.checkpoint is not None else None


def build_model(
    cfg: TrainConfig, class_names: list[str], checkpoint: Checkpoint | None, runtime: Runtime
) -> CvT:
    """The configured variant with its overrides; with starting weights (not when resuming), those weights
    with a head for the data's classes (see model.head)."""
    m = cfg.model
    fresh = True
    if checkpoint is None:
        model = create_model(m.name, num_classes=len(class_names), **m.overrides)
    else:
        # Loaded as saved (its own head), so that the head is replaced by the rule below and nowhere else.
        source = m.pretrained or checkpoint.path
        model = create_model(m.name, checkpoint=checkpoint, **m.overrides)
        fresh = _needs_new_head(m.head, checkpoint.num_classes, checkpoint.class_names, class_names, source)
        if fresh:
            model.reset_classifier(len(class_names))
        model.pretrained_cfg = {
            **model.pretrained_cfg, "num_classes": len(class_names), "label_names": tuple(class_names),
        }
        if runtime.is_main:
            head = "a new head" if fresh else "its own head"
            logger.info(
                f"fine-tuning {source} with {head} for the data's {len(class_names)} classes"
            )
    if fresh and m.head_init == "zero":
        nn.init.zeros_(model.head.weight)
        nn.init.zeros_(model.head.bias)
    freeze_stages(model, m.freeze_stages)
    model.to(runtime.device)
    if m.sync_bn and runtime.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def _needs_new_head(
    head: str, count: int, names: Sequence[str] | None, class_names: list[str], source: str | Path
) -> bool:
    """model.head's rule: auto keeps the starting head only when it is the data's (same number of classes,
    and the same names where the checkpoint records them)."""
    if head == "keep":
        if count != len(class_names):
            raise TorchcvtError(
                f"model.head=keep, but {source} has a {count}-class head and the data {len(class_names)} "
                "classes: use model.head=auto for a new head"
            )
        return False
    return head == "new" or count != len(class_names) or (names is not None and list(names) != class_names)


def build_components(cfg: TrainConfig | Mapping[str, Any], runtime: Runtime) -> Components:
    """Build every component of a run from its config; every input is checked here, before training."""
    cfg = as_train_config(cfg)
    d, a, t = cfg.data, cfg.aug, cfg.train
    output = Path(t.output)
    if runtime.is_main:
        make_run_folder(output)
    amp_dtype = AMP_DTYPES[t.amp]
    val_amp_dtype = amp_dtype if t.val_amp is None else AMP_DTYPES[t.val_amp]
    seed = t.seed
    # Per-rank streams (as timm's random_seed(seed, rank)): DropPath masks and mixup differ across ranks.
    # Rank 0 draws what a single process draws; DDP gives every rank rank 0's initial weights.
    seed_everything(seed + runtime.rank)
    train_dir, val_dir = data_folders(cfg, runtime)
    class_names = checked_classes(train_dir, val_dir)
    resume_from = resume_path(cfg, output)
    # Read before a previous run is set aside: the starting weights may be that run's best.pth.
    starting = None if resume_from else starting_weights(cfg)
    if runtime.is_main:
        remove_leftover_temporaries(output)
        if resume_from is None:
            set_aside_previous_run(output)
    resume = read_training_state(resume_from) if resume_from else None
    if resume is not None:
        check_training_state(resume, resume_from)
        m = cfg.model
        config = variant_config(m.name, num_classes=len(class_names), **m.overrides)
        changes = check_resumable(resume, cfg, config, class_names, resume_from)
        if changes and runtime.is_main:
            logger.info("resuming with a changed config (the schedule and optimiser follow it): "
                        + describe_changes(changes))
    model = build_model(cfg, class_names, starting, runtime)
    data_config = model.pretrained_cfg
    train_set = open_images(train_dir, train_transform(a, data_config), class_names)
    val_set = open_images(val_dir, eval_transform(data_config), class_names)
    empty = train_set.empty_classes()
    if empty:
        where = f"class folder {train_dir / empty[0]}" if is_folder_tree(train_dir) else (
            f"class {empty[0]!r} of {train_dir}")
        raise TorchcvtError(
            f"{where} holds no images: a class with nothing to learn"
            + (f" ({len(empty)} such classes)" if len(empty) > 1 else "")
            + "; add images or remove the class from train and val"
        )
    if runtime.is_main:
        val_set.warn_empty_classes()
    batch_size = per_process_batch(t, runtime.world_size)
    per_rank = math.ceil(len(train_set) / runtime.world_size)
    # The key the user set: train.global_batch (divided among the processes) or train.batch_size.
    given = (f"train.global_batch={t.global_batch} ({batch_size} per process)" if t.global_batch is not None
             else f"train.batch_size={batch_size}")
    if batch_size > per_rank:
        raise TorchcvtError(
            f"{given} is larger than the {per_rank} training images each of "
            f"{runtime.world_size} process(es) gets from {train_dir} ({len(train_set)} in all)"
        )
    global_batch = batch_size * runtime.world_size

    if a.repeated_aug:
        from timm.data.distributed_sampler import RepeatAugSampler

        base = RepeatAugSampler(
            train_set, num_replicas=runtime.world_size, rank=runtime.rank, num_repeats=a.repeated_aug
        )
    else:
        base = DistributedSampler(
            train_set, num_replicas=runtime.world_size, rank=runtime.rank, shuffle=True, seed=seed,
            drop_last=False,
        )
    sampler = SeededSampler(base, seed, runtime.rank, runtime.world_size)
    options = loader_options(d.workers, d.pin_memory, d.persistent_workers, runtime.device)
    # A private generator: creating loader iterators must not consume the global RNG.
    train_loader = DataLoader(
        train_set, batch_size=batch_size, sampler=sampler, drop_last=True,
        generator=torch.Generator().manual_seed(seed), **options,
    )
    val_loader = DataLoader(
        val_set,
        batch_size=d.eval_batch_size or batch_size,
        sampler=ShardSampler(len(val_set), runtime.rank, runtime.world_size),
        **options,
    )
    steps_per_epoch = len(base) // batch_size

    lr = learning_rate(cfg.optim, global_batch)
    optimizer = build_optimizer(model, cfg.optim, lr)
    epochs = math.ceil(t.steps / steps_per_epoch) if t.steps else t.epochs
    scheduler = build_scheduler(optimizer, cfg.sched, epochs, steps_per_epoch, t.steps)
    mixup, criterion = build_loss(a, len(class_names))
    # fp16 needs loss scaling on every device (torch's GradScaler runs on CPU too); bf16 does not.
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=amp_dtype is torch.float16)
    ddp: nn.Module = model
    if runtime.distributed:
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    ema = None
    if t.ema:
        from timm.utils import ModelEmaV3

        # After DDP's broadcast of rank 0's weights: every rank's average starts from the same model.
        ema = ModelEmaV3(model, decay=t.ema_decay)
    return Components(
        output=output, train_dir=train_dir, val_dir=val_dir, class_names=class_names, model=model, ddp=ddp,
        train_set=train_set, val_set=val_set, sampler=sampler, train_loader=train_loader,
        val_loader=val_loader, batch_size=batch_size, global_batch=global_batch,
        steps_per_epoch=steps_per_epoch, epochs=epochs, max_steps=t.steps, lr=lr, optimizer=optimizer,
        scheduler=scheduler,
        mixup=mixup, criterion=criterion, ema=ema, scaler=scaler, amp_dtype=amp_dtype,
        val_amp_dtype=val_amp_dtype, resume_path=resume_from, resume_state=resume,
    )
