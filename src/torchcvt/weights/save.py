"""Writing a model in each format; every file torchcvt writes records what rebuilds the model exactly."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

from ..checks import check_output_file, check_output_folder
from ..config import CvtConfig, architecture_differences, model_data_config
from ..errors import TorchcvtError
from ..files import replace_folder, write_json, write_text
from ..model import CvT
from .card import TrainingRun, model_card
from .checkpoint import CONFIG_NAME, FORMATS, TORCHCVT_FORMAT_VERSION, WEIGHTS_NAME
from .formats import hf_config_json, hf_preprocessor_json, torchcvt_to_hf
from .io import preview, save_safetensors, save_torch
from .remote_code import MODELING_NAME, MODELING_SOURCE, remote_code_config

ClassNames = Sequence[str] | None
# What the official code builds, and so what an official .pth implies beyond its keys.
OFFICIAL_DEFAULTS = CvtConfig().to_dict()
PREPROCESSOR_NAME = "preprocessor_config.json"
CARD_NAME = "README.md"
# Every file a checkpoint folder of any format holds: what replacing such a folder may throw away.
FOLDER_FILES = (WEIGHTS_NAME, CONFIG_NAME, PREPROCESSOR_NAME, CARD_NAME)


def model_class_names(model: CvT, class_names: ClassNames = None) -> list[str] | None:
    """The class names given, else those the model carries; ValueError if they do not fit its head."""
    names = class_names
    if names is None:
        names = getattr(model, "pretrained_cfg", {}).get("label_names")
    if names is None:
        return None
    if len(names) != model.num_classes:
        raise TorchcvtError(f"{len(names)} class names given for a model of {model.num_classes} classes")
    return [str(name) for name in names]


def _architecture(model: CvT) -> str | None:
    return getattr(model, "pretrained_cfg", {}).get("architecture")


def save_official(model: CvT, path: str | Path) -> Path:
    """Write the plain state dict with the official keys, as microsoft/CvT's .pth files hold it.

    That layout has no room for a config: fields the official code would not build warn, naming what to
    pass when reloading (torchcvt's format records them).
    """
    unrecorded = [f"{field}={ours}" for field, ours, _ in architecture_differences(
        model.config.to_dict(), OFFICIAL_DEFAULTS, ("activation", "layer_norm_eps", "position_embedding",
                                                   "token_embedding"))]
    if unrecorded:
        warnings.warn(
            f"the official .pth layout records no config: reload {Path(path).name} with "
            f"{', '.join(unrecorded)} (or write torchcvt's format, which records every field)", stacklevel=2,
        )
    return save_torch({key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()},
                      Path(path))


def torchcvt_metadata(model: CvT, class_names: ClassNames = None) -> dict:
    """What torchcvt's format records beside the weights: variant, class names and the full config."""
    return {
        "format": "torchcvt",
        "format_version": TORCHCVT_FORMAT_VERSION,
        "architecture": _architecture(model),
        "class_names": model_class_names(model, class_names),
        "config": model.config.to_dict(),
    }


def save_checkpoint(model: CvT, path: str | Path, class_names: ClassNames = None) -> Path:
    """Write torchcvt's format: a directory with model.safetensors and config.json, or one .safetensors file.

    Both carry the config, architecture name and class names, so either alone rebuilds the model; the
    directory is replaced as one unit (files.replace_folder).
    """
    path = Path(path)
    meta = torchcvt_metadata(model, class_names)
    metadata = {"torchcvt": json.dumps(meta)}
    if path.suffix == ".safetensors":
        return save_safetensors(model.state_dict(), path, metadata)
    with replace_folder(path) as folder:
        save_safetensors(model.state_dict(), folder / WEIGHTS_NAME, metadata)
        write_json(folder / CONFIG_NAME, meta)
    return path


def save_hf(model: CvT, path: str | Path, class_names: ClassNames = None, run: TrainingRun | None = None,
            remote_code: bool = False) -> Path:
    """Write a directory that transformers' pipeline, AutoImageProcessor and CvtForImageClassification load.

    config.json (with id2label from the class names) also records torchcvt's full config (activation,
    layer_norm_eps, variant), so torchcvt rebuilds exactly this model from it; preprocessor_config.json
    does torchcvt's eval preprocessing; README.md is a model card with the Hub's metadata (metrics from run).
    transformers' own CvT runs exact GELU: a QuickGELU model is approximated there unless remote_code adds
    model code (remote_code.py) that transformers runs, exactly, when loaded with trust_remote_code=True.
    The directory is replaced as one unit, so its weights never sit beside another model's config.json.
    """
    path = Path(path)
    config = hf_config_json(model.config, model_class_names(model, class_names), _architecture(model),
                            remote_code)
    if remote_code:
        config = remote_code_config(config)
    data_config = model_data_config(model.config.img_size, getattr(model, "pretrained_cfg", None))
    preprocessor = hf_preprocessor_json(data_config)
    names = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    card = model_card(model.config, _architecture(model), names, preprocessor, run, remote_code)
    with replace_folder(path) as folder:
        save_safetensors(torchcvt_to_hf(model.state_dict()), folder / WEIGHTS_NAME)
        write_json(folder / PREPROCESSOR_NAME, preprocessor)
        write_text(folder / CARD_NAME, card)
        if remote_code:
            write_text(folder / MODELING_NAME, MODELING_SOURCE)
        write_json(folder / CONFIG_NAME, config)
    return path


def export_checkpoint(model: CvT, path: str | Path, to: str, class_names: ClassNames = None,
                      run: TrainingRun | None = None, remote_code: bool = False) -> Path:
    """Write model in one of FORMATS: 'official' (.pth file), 'hf' (directory, its card citing run, with
    exact model code for trust_remote_code=True if remote_code) or 'torchcvt'."""
    if remote_code and to != "hf":
        raise TorchcvtError(f"remote code is for the transformers format (hf), not {to!r}")
    if to == "official":
        return save_official(model, path)
    if to == "hf":
        return save_hf(model, path, class_names, run, remote_code)
    if to == "torchcvt":
        return save_checkpoint(model, path, class_names)
    raise TorchcvtError(f"unknown checkpoint format {to!r}; choose one of {', '.join(FORMATS)}")


def check_destination(src: str | Path, dst: str | Path, to: str, overwrite: bool = False) -> None:
    """Refuse a destination that is (or holds) the source, an existing one unless overwrite is set, one
    that cannot be written as format `to` needs (a file for official and .safetensors, else a folder), and
    a folder holding files no checkpoint format writes (replacing it would throw them away)."""
    src, dst = Path(src), Path(dst)
    as_file = to == "official" or (to == "torchcvt" and dst.suffix == ".safetensors")
    if as_file:
        check_output_file(dst, "destination", reads=[src])
    else:
        check_output_folder(dst, "destination", reads=[src])
    if dst.exists() and not overwrite and (not dst.is_dir() or any(dst.iterdir())):
        raise TorchcvtError(
            f"destination {dst} already exists: pass --overwrite (overwrite=True) to replace it")
    foreign = sorted(p.name for p in dst.iterdir() if p.name not in FOLDER_FILES) if dst.is_dir() else []
    if foreign:
        raise TorchcvtError(f"destination {dst} holds files no checkpoint format writes "
                            f"({preview(foreign, 3)}), which replacing it would delete: give a new or empty "
                            "folder")

