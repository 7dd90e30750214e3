"""Classify images and extract embeddings: files, folders, PIL images or tensors in, top-k or features out."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader

from .checks import resolve_device
from .config import model_data_config
from .data import eval_transform
from .decoding import to_rgb
from .errors import TorchcvtError
from .factory import create_model
from .inference import optimize_for_inference
from .inputs import ImageFiles, ImageProgress, input_files, read_image, transformed
from .model import CvT
from .reports import FileResult, Prediction
from .weights import Checkpoint
from .weights.catalogue import IMAGENET_1K, class_names
from .workers import sized_workers

ImageInput = Image.Image | str | Path | torch.Tensor


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (the first WordNet lemma of each synset)."""
    return list(class_names(IMAGENET_1K))


def default_class_names(num_classes: int) -> list[str]:
    """ImageNet-1k names for 1000 outputs, else the indices as strings."""
    return imagenet_class_names() if num_classes == 1000 else [str(i) for i in range(num_classes)]


class Predictor:
    """A model in eval mode with its preprocessing and class names: classifies and embeds images.

    Inputs are PIL images, file paths, uint8 image tensors (C, H, W) that get the same preprocessing,
    or float tensors (C, H, W) / (B, C, H, W) taken as already preprocessed model input. It runs
    optimize_for_inference's snapshot of the model (in dtype, default the model's own): later edits to
    the model do not reach it.
    """

    def __init__(
        self,
        model: CvT,
        class_names: Sequence[str] | None = None,
        data_config: dict[str, Any] | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        dtype: torch.dtype | None = None,
    ):
        if batch_size < 1:
            raise TorchcvtError(f"batch_size must be at least 1, got {batch_size}")
        self.device = resolve_device(device)
        # model.eval() as before this snapshot existed: callers compare against the model in eval mode.
        self.model = optimize_for_inference(model.eval(), dtype).to(self.device)
        self.batch_size = batch_size
        expected = model_data_config(model.config.img_size, getattr(model, "pretrained_cfg", None))
        self.data_config = {**expected, **(data_config or {})}
        self.transform = eval_transform(self.data_config)
        num_classes = model.num_classes
        if class_names is None:
            stored = getattr(model, "pretrained_cfg", {}).get("label_names")
            class_names = stored or default_class_names(num_classes)
        self.class_names = list(class_names)
        if num_classes and len(self.class_names) != num_classes:
            raise TorchcvtError(f"{len(self.class_names)} class names for a model with {num_classes} outputs")

    @classmethod
    def create(
        cls,
        name: str | None,
        checkpoint: str | Path | Checkpoint | None = None,
        *,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        dtype: torch.dtype | None = None,
        **overrides: Any,
    ) -> Predictor:
        """create_model(name, checkpoint=...) with its preprocessing: the weights' head and class names are
        kept unless num_classes or class_names ask for others."""
        if num_classes is None and class_names is not None and checkpoint is None:
            num_classes = len(class_names)
        model = create_model(name, checkpoint=checkpoint, num_classes=num_classes, **overrides)
        return cls(model, class_names, device=device, batch_size=batch_size, dtype=dtype)

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """One input as a model-ready (C, H, W) float tensor."""
        if isinstance(image, torch.Tensor):
            if image.dim() != 3:
                raise TorchcvtError(f"expected one image tensor (C, H, W), got shape {tuple(image.shape)}")
            if image.is_floating_point():
                return image
            if image.dtype != torch.uint8:
                raise TorchcvtError(f"integer image tensors must be uint8, got {image.dtype}")
            image = Image.fromarray(image.permute(1, 2, 0).squeeze(-1).cpu().numpy())
        if isinstance(image, (str, Path)):
            image = read_image(image)
        elif isinstance(image, Image.Image):
            image = to_rgb(image)
        else:
            raise TypeError(f"cannot read a {type(image).__name__}; give a PIL image, a path or a tensor")
        return transformed(image, self.transform)

    def _check_head(self) -> None:
        if not self.model.num_classes:
            raise TorchcvtError(
                "the model has no classifier head (num_classes=0): it can embed, not classify")

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
            raise TorchcvtError(f"top_k must be at least 1, got {k}")
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
            raise TorchcvtError(f"workers must be 0 or more, got {workers}")
        loader = DataLoader(ImageFiles(paths, self.transform), batch_size=self.batch_size,
                            num_workers=sized_workers(workers, "workers"),
                            collate_fn=list, pin_memory=self.device.type == "cuda")
        with ImageProgress(len(paths), progress) as bar:
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
        files = input_files(paths)
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
        files = input_files(paths)
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


def predictor(name: str | None, checkpoint: str | Path | Checkpoint | None = None, **kwargs: Any
              ) -> Predictor:
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
