"""Classify images and extract embeddings: files, folders, PIL images or tensors in, top-k or features out."""

from __future__ import annotations

import csv
import io
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .checkpoints import Checkpoint, model_from_checkpoint, read_checkpoint
from .checks import resolve_device
from .config import IMAGENET_MEAN, IMAGENET_STD
from .data import eval_transform, load_image, to_rgb, unreadable_reason, walk_images
from .factory import create_model
from .files import write_bytes
from .model import CvT

# PIL warns above ~89 MP and refuses above ~179 MP; photos of tens of megapixels are ordinary, so
# allow up to 2**28 pixels (16k x 16k) and refuse only beyond that.
MAX_IMAGE_PIXELS = 2**28

ImageInput = Image.Image | str | Path | torch.Tensor
logger = logging.getLogger(__name__)


class UnreadableImageError(ValueError):
    """An input file that is missing, empty, truncated or not an image; the message is the reason."""


class Prediction(NamedTuple):
    index: int
    label: str
    prob: float


@dataclass
class FileResult:
    """What happened to one input file: its predictions (or embedding row) or why it was not read."""

    path: str
    predictions: list[Prediction] | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "predictions": [p._asdict() for p in self.predictions or []]}


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (the first WordNet lemma of each synset)."""
    return resources.files("torchcvt").joinpath("imagenet_classes.txt").read_text().splitlines()


def checkpoint_class_names(checkpoint: Checkpoint | str | Path) -> list[str] | None:
    """The class list a checkpoint stores (training, torchcvt and transformers checkpoints), or None."""
    stored = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint)
    return list(stored.class_names) if stored.class_names else None


def default_class_names(num_classes: int) -> list[str]:
    """ImageNet-1k names for 1000 outputs, else the indices as strings."""
    return imagenet_class_names() if num_classes == 1000 else [str(i) for i in range(num_classes)]


@contextmanager
def _large_images_allowed() -> Iterator[None]:
    previous = Image.MAX_IMAGE_PIXELS
    # PIL warns above MAX_IMAGE_PIXELS and raises above twice that.
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS // 2
    try:
        with warnings.catch_warnings():
            # Large images and odd metadata (corrupt EXIF, unknown TIFF tags) are fine to classify.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def read_image(path: str | Path) -> Image.Image:
    """Load an image file as upright 8-bit RGB, or raise UnreadableImageError with a one-line reason."""
    try:
        with _large_images_allowed():
            return load_image(path)
    except Exception as error:  # PIL's decoders raise many exception types on corrupt data
        raise UnreadableImageError(unreadable_reason(path, error)) from None


def find_images(paths: Sequence[str | Path]) -> list[Path]:
    """Files named directly (whatever their extension) plus image files found under folders, recursively.

    Symlinked folders are followed, each folder once. Missing paths, broken symlinks and folders that
    cannot be listed are kept, so that they are reported rather than silently dropped; hidden files and
    folders inside a walked folder are skipped.
    """
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for path in map(Path, paths):
        found += walk_images(path, seen) if path.is_dir() else [path]
    return found


def model_data_config(model: CvT) -> dict[str, Any]:
    """The preprocessing a model expects: its pretrained_cfg, or ImageNet defaults at its img_size."""
    size = model.config.img_size
    config = {"input_size": (3, size, size), "crop_pct": 0.875 if size <= 224 else 1.0,
              "interpolation": "bicubic", "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    pretrained = getattr(model, "pretrained_cfg", None) or {}
    return {**config, **{k: pretrained[k] for k in config if k in pretrained}}


class Predictor:
    """A model in eval mode with its preprocessing and class names: classifies and embeds images.

    Inputs are PIL images, file paths, uint8 image tensors (C, H, W) that get the same preprocessing,
    or float tensors (C, H, W) / (B, C, H, W) taken as already preprocessed model input.
    """

    def __init__(
        self,
        model: CvT,
        class_names: Sequence[str] | None = None,
        data_config: dict[str, Any] | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.device = resolve_device(device)
        self.model = model.eval().to(self.device)
        self.batch_size = batch_size
        self.data_config = {**model_data_config(model), **(data_config or {})}
        self.transform = eval_transform(self.data_config)
        num_classes = model.num_classes
        if class_names is None:
            stored = getattr(model, "pretrained_cfg", {}).get("label_names")
            class_names = stored or default_class_names(num_classes)
        self.class_names = list(class_names)
        if num_classes and len(self.class_names) != num_classes:
            raise ValueError(f"{len(self.class_names)} class names for a model with {num_classes} outputs")

    @classmethod
    def create(
        cls,
        name: str,
        checkpoint: str | Path | None = None,
        *,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        **overrides: Any,
    ) -> Predictor:
        """Build variant `name` and load `checkpoint`; its head size and class list are used unless given."""
        # Read once: the head size and class list come from the same object the weights load from.
        stored = None if checkpoint is None else read_checkpoint(checkpoint)
        if stored is not None:
            class_names = checkpoint_class_names(stored) if class_names is None else class_names
            num_classes = stored.num_classes if num_classes is None else num_classes
        if num_classes is None:
            num_classes = len(class_names) if class_names else 1000
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names but num_classes is {num_classes}")
        model = (
            create_model(name, num_classes=num_classes, **overrides)
            if stored is None
            else model_from_checkpoint(name, stored, num_classes=num_classes, **overrides)
        )
        return cls(model, class_names, device=device, batch_size=batch_size)

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """One input as a model-ready (C, H, W) float tensor."""
        if isinstance(image, torch.Tensor):
            if image.dim() != 3:
                raise ValueError(f"expected one image tensor (C, H, W), got shape {tuple(image.shape)}")
            if image.is_floating_point():
                return image
            if image.dtype != torch.uint8:
                raise ValueError(f"integer image tensors must be uint8, got {image.dtype}")
            image = Image.fromarray(image.permute(1, 2, 0).squeeze(-1).cpu().numpy())
        if isinstance(image, (str, Path)):
            image = read_image(image)
        elif isinstance(image, Image.Image):
            image = to_rgb(image)
        else:
            raise ValueError(f"cannot read a {type(image).__name__}; give a PIL image, a path or a tensor")
        return _transformed(image, self.transform)

    def _check_head(self) -> None:
        if not self.model.num_classes:
            raise ValueError("the model has no classifier head (num_classes=0): it can embed, not classify")

    def _batches(self, inputs: ImageInput | Sequence[ImageInput]) -> Iterator[torch.Tensor]:
        if isinstance(inputs, torch.Tensor) and inputs.dim() == 4 and inputs.is_floating_point():
            yield from inputs.split(self.batch_size)
            return
        items = _as_list(inputs)
        for start in range(0, len(items), self.batch_size):
            yield torch.stack([self.preprocess(item) for item in items[start : start + self.batch_size]])

    @torch.inference_mode()
    def _run(self, batch: torch.Tensor, embed: bool) -> torch.Tensor:
        features = self.model.forward_features(batch.to(self.device))
        return self.model.forward_head(features, pre_logits=embed).float().cpu()

    def _outputs(self, inputs: ImageInput | Sequence[ImageInput], embed: bool) -> torch.Tensor:
        rows = [self._run(batch, embed) for batch in self._batches(inputs) if len(batch)]
        width = self.model.num_features if embed else self.model.num_classes
        return torch.cat(rows) if rows else torch.empty(0, width)

    def logits(self, inputs: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """Logits (N, num_classes) for one input or many; (0, num_classes) for an empty batch."""
        self._check_head()
        return self._outputs(inputs, embed=False)

    def embed(self, inputs: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """Pre-logits features (N, num_features): the normalised class token, or the mean token."""
        return self._outputs(inputs, embed=True)

    def top_k(self, logits: torch.Tensor, k: int = 5) -> list[list[Prediction]]:
        """The k most probable classes of each row of logits."""
        if k < 1:
            raise ValueError(f"top_k must be at least 1, got {k}")
        probs, indices = logits.softmax(dim=-1).topk(min(k, logits.shape[-1]), dim=-1)
        return [
            [Prediction(i, self.class_names[i], p) for i, p in zip(row_i, row_p, strict=True)]
            for row_i, row_p in zip(indices.tolist(), probs.tolist(), strict=True)
        ]

    def __call__(
        self, inputs: ImageInput | Sequence[ImageInput], top_k: int = 5
    ) -> list[Prediction] | list[list[Prediction]]:
        """Top-k predictions: a list for a single input, a list of lists for a sequence or a batch."""
        results = self.top_k(self.logits(inputs), top_k)
        return results[0] if _is_single(inputs) else results

    def _over_files(
        self, paths: Sequence[str | Path], embed: bool, progress: bool | None, workers: int = 0
    ) -> Iterator[tuple[list[FileResult], torch.Tensor | None]]:
        """Decode files in a DataLoader (workers > 0: in that many processes) and yield each batch's results
        (errors filled in) with the outputs of its readable files."""
        if workers < 0:
            raise ValueError(f"workers must be 0 or more, got {workers}")
        loader = DataLoader(_Files(paths, self.transform), batch_size=self.batch_size, num_workers=workers,
                            collate_fn=list, pin_memory=self.device.type == "cuda")
        with _Progress(len(paths), progress) as bar:
            for batch in loader:
                results = [FileResult(path, error=error) for path, _, error in batch]
                tensors = [tensor for _, tensor, _ in batch if tensor is not None]
                yield results, self._finite_outputs(results, tensors, embed)
                bar.update(len(results))

    def _finite_outputs(self, results: list[FileResult], tensors: list[torch.Tensor], embed: bool
                        ) -> torch.Tensor | None:
        """The model's outputs for the readable files; a file whose output holds NaN or inf gets an error."""
        if not tensors:
            return None
        outputs = self._run(torch.stack(tensors), embed)
        finite = outputs.isfinite().all(dim=1)
        readable = [result for result in results if result.error is None]
        for result, ok in zip(readable, finite.tolist(), strict=True):
            if not ok:
                name = getattr(self.model, "pretrained_cfg", {}).get("architecture", "CvT")
                result.error = (f"the output of model {name} "
                                "is NaN or infinite for this image: check its weights and config")
        return outputs[finite] if finite.any() else None

    def predict_files(
        self,
        paths: Sequence[str | Path],
        top_k: int = 5,
        progress: bool | None = None,
        on_error: Callable[[FileResult], None] | None = None,
        workers: int = 0,
    ) -> list[FileResult]:
        """Classify files and folders (walked recursively); unreadable files get their reason, the rest go on.

        progress=None shows a bar on a terminal and a log line every 30 s otherwise; on_error is called
        for each unreadable file; workers > 0 decodes images in that many processes.
        """
        self._check_head()
        files = _input_files(paths)
        results = []
        for batch, logits in self._over_files(files, embed=False, progress=progress, workers=workers):
            readable = [r for r in batch if r.error is None]
            if readable:
                for result, predictions in zip(readable, self.top_k(logits, top_k), strict=True):
                    result.predictions = predictions
            for result in batch:
                if result.error is not None and on_error is not None:
                    on_error(result)
            results.extend(batch)
        return results

    def embed_files(
        self,
        paths: Sequence[str | Path],
        progress: bool | None = None,
        on_error: Callable[[FileResult], None] | None = None,
        workers: int = 0,
    ) -> tuple[torch.Tensor, list[FileResult]]:
        """Pre-logits features of every readable file (one row each, in order) and a result per file."""
        files = _input_files(paths)
        results, rows = [], []
        for batch, features in self._over_files(files, embed=True, progress=progress, workers=workers):
            if features is not None:
                rows.append(features)
            for result in batch:
                if result.error is not None and on_error is not None:
                    on_error(result)
            results.extend(batch)
        features = torch.cat(rows) if rows else torch.empty(0, self.model.num_features)
        return features, results


def _transformed(image: Image.Image, transform: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    if not image.width or not image.height:
        raise UnreadableImageError(f"image has no pixels ({image.width}x{image.height})")
    return transform(image)


class _Files(Dataset):
    """Files as (path, model input or None, reason it is unreadable or None); module-level so it pickles."""

    def __init__(self, paths: Sequence[str | Path], transform: Callable[[Image.Image], torch.Tensor]):
        self.paths, self.transform = [str(path) for path in paths], transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor | None, str | None]:
        path = self.paths[index]
        try:
            return path, _transformed(read_image(path), self.transform), None
        except UnreadableImageError as error:
            return path, None, str(error)


class _Progress:
    """A tqdm bar on a terminal; where stderr is a log, an INFO line every `interval` seconds instead."""

    def __init__(self, total: int, progress: bool | None, interval: float = 30.0):
        self.total, self.done, self.interval = total, 0, interval
        self.bar = tqdm(total=total, unit="img", disable=None if progress is None else not progress)
        self.log = progress is None and self.bar.disable
        self.start = self.last = time.monotonic()

    def update(self, count: int) -> None:
        self.bar.update(count)
        self.done += count
        now = time.monotonic()
        if self.log and (now - self.last >= self.interval or self.done == self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            logger.info("%d/%d images (%.1f img/s)", self.done, self.total, rate)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def predictor(name: str, checkpoint: str | Path | None = None, **kwargs: Any) -> Predictor:
    """A Predictor for variant `name` with weights from `checkpoint`; see Predictor.create."""
    return Predictor.create(name, checkpoint, **kwargs)


def _is_single(inputs: Any) -> bool:
    if isinstance(inputs, torch.Tensor):
        return inputs.dim() == 3
    return isinstance(inputs, (Image.Image, str, Path))


def _as_list(inputs: Any) -> list[Any]:
    if _is_single(inputs):
        return [inputs]
    if isinstance(inputs, torch.Tensor):
        return list(inputs)
    return list(inputs)


def _input_files(paths: Sequence[str | Path]) -> list[Path]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files = find_images(paths)
    if not files:
        raise ValueError(f"no image files found in {', '.join(map(str, paths)) or 'the given paths'}")
    return files


def write_json_report(results: Sequence[FileResult], path: str | Path) -> None:
    """A JSON list, per file {"path", "predictions": [{"index", "label", "prob"}]} or {"path", "error"}."""
    # allow_nan=False: NaN is not JSON, so a report can never hold it.
    text = json.dumps([r.to_dict() for r in results], indent=2, allow_nan=False) + "\n"
    write_bytes(path, text.encode())


def write_csv_report(results: Sequence[FileResult], path: str | Path) -> None:
    """One CSV row per prediction (path, rank, index, label, prob, error), or one with the error."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["path", "rank", "index", "label", "prob", "error"])
    for result in results:
        if result.error is not None:
            writer.writerow([result.path, "", "", "", "", result.error])
        for rank, p in enumerate(result.predictions or [], 1):
            writer.writerow([result.path, rank, p.index, p.label, f"{p.prob:.6f}", ""])
    write_bytes(path, text.getvalue().encode())


def format_table(results: Sequence[FileResult]) -> str:
    """A plain-text table: path, rank, probability and class for each prediction, or the error."""
    rows = [("path", "#", "prob", "class")]
    for result in results:
        if result.error is not None:
            rows.append((result.path, "-", "-", f"error: {result.error}"))
        for rank, p in enumerate(result.predictions or [], 1):
            shown = result.path if rank == 1 else ""
            rows.append((shown, str(rank), f"{p.prob:.4f}", f"{p.label} ({p.index})"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        "  ".join([*(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)), row[3]])
        for row in rows
    )


def save_embeddings(path: str | Path, features: torch.Tensor, files: Sequence[str]) -> list[Path]:
    """Write features (N, D) and their file list: .safetensors (list in its metadata) or .npy + .files.json.

    Returns the files written.
    """
    path = Path(path)
    if len(files) != features.shape[0]:
        raise ValueError(f"{features.shape[0]} feature rows but {len(files)} file names")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        metadata = {"files": json.dumps(list(files))}
        save_file({"embeddings": features.contiguous()}, str(path), metadata=metadata)
        return [path]
    if path.suffix == ".npy":
        np.save(path, features.numpy())
        listing = path.with_suffix(".files.json")
        listing.write_text(json.dumps(list(files), indent=1) + "\n")
        return [path, listing]
    raise ValueError(f"embeddings go to a .safetensors or .npy file, got {path.name!r}")


def load_embeddings(path: str | Path) -> tuple[torch.Tensor, list[str]]:
    """Read what save_embeddings wrote: the features (N, D) and the N file names."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor("embeddings"), json.loads((f.metadata() or {})["files"])
    return torch.from_numpy(np.load(path)), json.loads(path.with_suffix(".files.json").read_text())
