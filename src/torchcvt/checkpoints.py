"""Checkpoint interoperability: official .pth, transformers and torchcvt's own format, detected by content.

Every reader returns weights in torchcvt's key layout, which is the official one
(stage0.patch_embed.proj.weight, ..., norm.weight, head.weight). Nothing is unpickled beyond tensors:
safetensors, or torch.load(weights_only=True).
"""

from __future__ import annotations

import codecs
import json
import pickle
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .checks import check_output_folder
from .config import (
    ARCHITECTURE_FIELDS,
    VARIANTS,
    CvtConfig,
    architecture_differences,
    get_variant,
    variant_config,
)
from .model import CvT, CvtFeatures

FORMATS = ("official", "hf", "torchcvt")
WEIGHTS_NAME = "model.safetensors"
HF_BIN_NAME = "pytorch_model.bin"
CONFIG_NAME = "config.json"
TORCHCVT_FORMAT_VERSION = 1

# Fields transformers' CvtConfig shares with ours that fix the architecture (the drop rates do not).
HF_ARCH_FIELDS = (
    "num_channels", "patch_sizes", "patch_stride", "patch_padding", "embed_dim", "num_heads", "depth",
    "mlp_ratio", "qkv_bias", "cls_token", "qkv_projection_method", "kernel_qkv", "padding_kv", "stride_kv",
    "padding_q", "stride_q",
)
HF_CONFIG_FIELDS = HF_ARCH_FIELDS + ("attention_drop_rate", "drop_rate", "drop_path_rate",
                                     "initializer_range")
# A torchcvt checkpoint records them all; a different activation only warns (the weights still fit).
TORCHCVT_ARCH_FIELDS = tuple(field for field in ARCHITECTURE_FIELDS if field != "activation")
# transformers builds every LayerNorm with PyTorch's default eps and ignores its config's layer_norm_eps.
HF_LAYER_NORM_EPS = 1e-5

_S = "cvt.encoder.stages.{s}."
_L = _S + "layers.{b}."
_A = _L + "attention.attention."
# (torchcvt / official key, transformers key): {s} is a stage, {b} a block, {p} a parameter or buffer name.
HF_KEY_MAP = (
    ("stage{s}.patch_embed.proj.{p}", _S + "embedding.convolution_embeddings.projection.{p}"),
    ("stage{s}.patch_embed.norm.{p}", _S + "embedding.convolution_embeddings.normalization.{p}"),
    ("stage{s}.cls_token", _S + "cls_token"),
    ("stage{s}.blocks.{b}.norm1.{p}", _L + "layernorm_before.{p}"),
    ("stage{s}.blocks.{b}.attn.conv_proj_q.conv.{p}",
     _A + "convolution_projection_query.convolution_projection.convolution.{p}"),
    ("stage{s}.blocks.{b}.attn.conv_proj_q.bn.{p}",
     _A + "convolution_projection_query.convolution_projection.normalization.{p}"),
    ("stage{s}.blocks.{b}.attn.conv_proj_k.conv.{p}",
     _A + "convolution_projection_key.convolution_projection.convolution.{p}"),
    ("stage{s}.blocks.{b}.attn.conv_proj_k.bn.{p}",
     _A + "convolution_projection_key.convolution_projection.normalization.{p}"),
    ("stage{s}.blocks.{b}.attn.conv_proj_v.conv.{p}",
     _A + "convolution_projection_value.convolution_projection.convolution.{p}"),
    ("stage{s}.blocks.{b}.attn.conv_proj_v.bn.{p}",
     _A + "convolution_projection_value.convolution_projection.normalization.{p}"),
    ("stage{s}.blocks.{b}.attn.proj_q.{p}", _A + "projection_query.{p}"),
    ("stage{s}.blocks.{b}.attn.proj_k.{p}", _A + "projection_key.{p}"),
    ("stage{s}.blocks.{b}.attn.proj_v.{p}", _A + "projection_value.{p}"),
    ("stage{s}.blocks.{b}.attn.proj.{p}", _L + "attention.output.dense.{p}"),
    ("stage{s}.blocks.{b}.norm2.{p}", _L + "layernorm_after.{p}"),
    ("stage{s}.blocks.{b}.mlp.fc1.{p}", _L + "intermediate.dense.{p}"),
    ("stage{s}.blocks.{b}.mlp.fc2.{p}", _L + "output.dense.{p}"),
    ("norm.{p}", "layernorm.{p}"),
    ("head.{p}", "classifier.{p}"),
)
_PLACEHOLDER = {"s": r"\d+", "b": r"\d+", "p": r"\w+"}
# Wrappers whose prefix a saved state dict may carry: DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Where training checkpoints keep the model's state dict.
_NESTED_KEYS = ("state_dict", "model")


def _template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{([sbp])\}", template)
    return re.compile("".join(
        re.escape(part) if i % 2 == 0 else f"(?P<{part}>{_PLACEHOLDER[part]})" for i, part in enumerate(parts)
    ))


_TO_TORCHCVT = [(_template_regex(hf), ours) for ours, hf in HF_KEY_MAP]
_TO_HF = [(_template_regex(ours), hf) for ours, hf in HF_KEY_MAP]


StateDict = dict[str, torch.Tensor]


def _rename(state_dict: StateDict, rules: list[tuple[re.Pattern[str], str]]) -> StateDict:
    renamed = {}
    for key, value in state_dict.items():
        for pattern, target in rules:
            match = pattern.fullmatch(key)
            if match:
                key = target.format(**match.groupdict())
                break
        renamed[key] = value
    return renamed


def hf_to_torchcvt(state_dict: StateDict) -> StateDict:
    """Rename transformers' CvtForImageClassification keys to torchcvt's; unknown keys stay as they are."""
    return _rename(state_dict, _TO_TORCHCVT)


def torchcvt_to_hf(state_dict: StateDict) -> StateDict:
    """Rename torchcvt (official) keys to transformers' CvtForImageClassification keys."""
    return _rename(state_dict, _TO_HF)


@dataclass
class Checkpoint:
    """Weights in torchcvt's key layout and what the checkpoint says about itself."""

    path: Path
    format: str
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any] | None = None
    architecture: str | None = None
    class_names: tuple[str, ...] | None = None

    @property
    def num_classes(self) -> int:
        head = self.state_dict.get("head.weight")
        return 0 if head is None else head.shape[0]


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read any supported checkpoint file or directory; ValueError saying what it is not if it is none."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        return _read_weights_file(path)
    weights = next((path / name for name in (WEIGHTS_NAME, HF_BIN_NAME) if (path / name).is_file()), None)
    if weights is None:
        raise ValueError(f"{path} is a directory without {WEIGHTS_NAME} or {HF_BIN_NAME}, not a checkpoint")
    checkpoint = _read_weights_file(weights)
    config_path = path / CONFIG_NAME
    if config_path.is_file():
        _apply_config_json(checkpoint, config_path)
    return checkpoint


def _read_weights_file(path: Path) -> Checkpoint:
    obj, metadata = _read_tensor_file(path)
    state_dict = _unwrap(obj, path)
    if any(key.startswith("encoder.stages.") for key in state_dict):  # transformers' CvtModel, no head
        state_dict = {f"cvt.{key}": value for key, value in state_dict.items()}
    if any(key.startswith("cvt.encoder.") for key in state_dict):
        checkpoint = Checkpoint(path, "hf", hf_to_torchcvt(state_dict))
    elif any(key.startswith("stage0.") for key in state_dict):
        checkpoint = Checkpoint(path, "official", state_dict)
    else:
        raise ValueError(
            f"{path} holds {len(state_dict)} tensors but none of a CvT (such as "
            f"stage0.patch_embed.proj.weight or cvt.encoder.stages.0.*): {_preview(list(state_dict))}"
        )
    if "torchcvt" in metadata:
        _apply_torchcvt_meta(checkpoint, _parse_json(metadata["torchcvt"], f"{path} (safetensors metadata)"))
    elif isinstance(obj.get("config"), dict) and "model_name" in obj:  # `torchcvt train`'s best/last.pth
        _apply_torchcvt_meta(checkpoint, {**obj, "architecture": obj["model_name"]})
    return checkpoint


def _read_tensor_file(path: Path) -> tuple[Any, dict[str, str]]:
    """The object a safetensors or torch.save file holds, and the safetensors metadata."""
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path} is empty, not a checkpoint")
    with open(path, "rb") as file:
        head = file.read(512)
    if len(head) >= 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len <= size - 8:
            return _read_safetensors(path)
        raise ValueError(f"{path} is a truncated safetensors file ({size} bytes, its header alone needs "
                         f"{header_len + 8})")
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):  # torch.save's zip format or legacy pickle
        return _torch_load(path), {}
    try:  # incremental, so that a character cut at byte 512 does not count as binary
        codecs.getincrementaldecoder("utf-8")().decode(head)
        found = "a text file" if b"\0" not in head else "unrecognised binary data"
    except UnicodeDecodeError:
        found = "unrecognised binary data"
    raise ValueError(f"{path} is not a checkpoint: it is {found}, neither safetensors nor a torch.save file")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(path, framework="pt") as file:
            return {key: file.get_tensor(key) for key in file.keys()}, file.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(
            f"{path} is a damaged or truncated safetensors file ({_first_line(error)})"
        ) from None


def _torch_load(path: Path) -> Any:
    try:
        with warnings.catch_warnings():
            # A pickle protocol other than torch.save's is what an unsafe file often has: it is refused
            # below in one line, without torch's notice about the protocol before it.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        what = f" ({found.group(1)})" if found else ""
        raise ValueError(
            f"{path} holds pickled Python objects besides tensors{what}; torchcvt loads weights only "
            "(torch.load weights_only=True): save the model's state_dict alone"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:  # how torch reports a damaged archive
        raise ValueError(
            f"{path} is not a readable PyTorch checkpoint, truncated or damaged ({_first_line(error)})"
        ) from None


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The model's state dict inside a plain or training checkpoint, without wrapper prefixes."""
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    nested = next((obj[key] for key in _NESTED_KEYS if isinstance(obj.get(key), dict)), None)
    if nested is not None and not any(isinstance(value, torch.Tensor) for value in obj.values()):
        obj = nested
    others = [key for key, value in obj.items() if not isinstance(value, torch.Tensor)]
    if others or not obj:
        found = f"non-tensor entries {_preview(others)}" if obj else "it is empty"
        raise ValueError(f"{path} is not a state dict of tensors: {found}")
    for prefix in _WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in obj):
            obj = {key[len(prefix):]: value for key, value in obj.items()}
    return obj


def _apply_config_json(checkpoint: Checkpoint, config_path: Path) -> None:
    meta = _parse_json(config_path.read_text(encoding="utf-8", errors="replace"), str(config_path))
    if meta.get("format") == "torchcvt":
        _apply_torchcvt_meta(checkpoint, meta)
    elif meta.get("model_type") == "cvt":
        checkpoint.format = "hf"
        checkpoint.config = _config_from_hf(meta, config_path)
        names = [name for _, name in sorted(meta.get("id2label", {}).items(), key=lambda item: int(item[0]))]
        if names and names != [f"LABEL_{i}" for i in range(len(names))]:
            checkpoint.class_names = tuple(names)
    else:
        raise ValueError(
            f"{config_path} is neither a transformers CvT config (model_type 'cvt') nor a torchcvt config "
            f"(model_type {meta.get('model_type')!r})"
        )


def _parse_json(text: str, where: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where} holds JSON {type(data).__name__}, not an object")
    return data


def _config_from_hf(meta: dict[str, Any], where: Path) -> dict[str, Any]:
    """The torchcvt config fields a transformers config.json records, normalised and validated."""
    fields = {name: meta[name] for name in HF_CONFIG_FIELDS if name in meta}
    if "id2label" in meta or "num_labels" in meta:
        fields["num_classes"] = len(meta["id2label"]) if "id2label" in meta else meta["num_labels"]
    try:
        full = CvtConfig().replace(**fields).to_dict()
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    return {name: full[name] for name in fields}


def _apply_torchcvt_meta(checkpoint: Checkpoint, meta: dict[str, Any]) -> None:
    try:
        config = CvtConfig.from_dict(meta["config"]).to_dict()
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{checkpoint.path}: torchcvt metadata has no valid config ({error})") from None
    checkpoint.format = "torchcvt"
    checkpoint.config = config
    checkpoint.architecture = meta.get("architecture")
    names = meta.get("class_names")
    checkpoint.class_names = tuple(names) if names else None


def load_checkpoint(model: CvT, path: str | Path | Checkpoint) -> Checkpoint:
    """Load an official, transformers or torchcvt checkpoint (or one already read) into model.

    A head of another size is re-initialised with a warning; any other difference is a ValueError.
    """
    checkpoint = path if isinstance(path, Checkpoint) else read_checkpoint(path)
    _check_config(model, checkpoint)
    _load_state_dict(model, checkpoint)
    names = checkpoint.class_names
    if names and len(names) == model.num_classes:
        model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), "label_names": names}
    return checkpoint


def _check_config(model: CvT, checkpoint: Checkpoint) -> None:
    if not checkpoint.config:
        return
    ours = model.config.to_dict()
    theirs = checkpoint.config
    fields = HF_ARCH_FIELDS if checkpoint.format == "hf" else TORCHCVT_ARCH_FIELDS
    differences = [f"{name} is {theirs[name]} there but {ours[name]} here"
                   for name in fields if name in theirs and theirs[name] != ours[name]]
    if differences:
        names = _variants_like(theirs.get("depth"), theirs.get("embed_dim"))
        like = f" (it looks like {' or '.join(names)})" if names else ""
        raise ValueError(
            f"{checkpoint.path} was saved from another architecture{like}: {'; '.join(differences)}; "
            "create the model with matching overrides"
        )
    if checkpoint.format == "torchcvt" and theirs["activation"] != ours["activation"]:
        warnings.warn(
            f"{checkpoint.path} was saved with activation={theirs['activation']!r} but the model uses "
            f"{ours['activation']!r}: its outputs will differ from the saved model's", stacklevel=3,
        )


def _load_state_dict(model: CvT, checkpoint: Checkpoint) -> None:
    state_dict = dict(checkpoint.state_dict)
    if checkpoint.num_classes != model.num_classes:
        state_dict = {key: value for key, value in state_dict.items() if not key.startswith("head.")}
        model.reset_classifier(model.num_classes)
        if model.num_classes:  # a headless backbone (num_classes=0, features_only) drops the head by design
            warnings.warn(
                f"{checkpoint.path} has a head of {checkpoint.num_classes} classes but the model "
                f"{model.num_classes}: the model's head of {model.num_classes} classes is re-initialised "
                "(train it before use)", stacklevel=3,
            )
    own = model.state_dict()
    if checkpoint.num_classes != model.num_classes:
        state_dict.update({key: value for key, value in own.items() if key.startswith("head.")})
    for key, value in own.items():  # BatchNorm's batch counters do not change outputs; some exports drop them
        if key.endswith("num_batches_tracked"):
            state_dict.setdefault(key, value)
    missing = [key for key in own if key not in state_dict]
    unexpected = [key for key in state_dict if key not in own]
    misshaped = [f"{key} {tuple(state_dict[key].shape)} vs {tuple(own[key].shape)} in the model"
                 for key in own if key in state_dict and state_dict[key].shape != own[key].shape]
    if missing or unexpected or misshaped:
        problems = [f"{len(keys)} {label} ({_preview(keys)})" for label, keys in
                    (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys]
        hint = _layout_hint(checkpoint.state_dict, model.config)
        raise ValueError(f"{checkpoint.path} does not fit the model{hint}: {'; '.join(problems)}")
    model.load_state_dict(state_dict)


def _layout(state_dict: StateDict) -> tuple[list[int], list[int]]:
    """Depth and width of each stage as the keys and shapes of a state dict show them."""
    depth, width = [], []
    while f"stage{len(width)}.patch_embed.proj.weight" in state_dict:
        stage = len(width)
        width.append(state_dict[f"stage{stage}.patch_embed.proj.weight"].shape[0])
        block = re.compile(rf"stage{stage}\.blocks\.(\d+)\.")
        depth.append(len({match.group(1) for key in state_dict if (match := block.match(key))}))
    return depth, width


def _layout_hint(state_dict: StateDict, config: CvtConfig) -> str:
    depth, width = _layout(state_dict)
    if (depth, width) == (list(config.depth), list(config.embed_dim)):
        return ""
    names = _variants_like(depth, width)
    return (f": it looks like another variant (depth {depth}, embed_dim {width}; the model has depth "
            f"{list(config.depth)}, embed_dim {list(config.embed_dim)})"
            + (f" such as {' or '.join(names)}" if names else ""))


def _variants_like(depth: list[int] | None, width: list[int] | None) -> list[str]:
    """Registered variants with these per-stage depths and widths."""
    configs = {name: variant_config(name) for name in VARIANTS}
    return [name for name, c in configs.items() if (list(c.depth), list(c.embed_dim)) == (depth, width)]


def _preview(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _contiguous(state_dict: StateDict) -> StateDict:
    return {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}


ClassNames = list[str] | tuple[str, ...] | None


def _class_names(model: CvT, class_names: ClassNames) -> list[str] | None:
    if class_names is None:
        class_names = getattr(model, "pretrained_cfg", {}).get("label_names")
    names = class_names
    if names is None:
        return None
    if len(names) != model.num_classes:
        raise ValueError(f"{len(names)} class names given for a model of {model.num_classes} classes")
    return [str(name) for name in names]


def save_official(model: CvT, path: str | Path) -> Path:
    """Write the plain state dict with the official keys, as microsoft/CvT's .pth files hold it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(_contiguous(model.state_dict()), path)
    return path


def save_checkpoint(model: CvT, path: str | Path, class_names: ClassNames = None) -> Path:
    """Write torchcvt's format: a directory with model.safetensors and config.json, or one .safetensors file.

    Both carry the config, architecture name and class names, so either alone rebuilds the model.
    """
    path = Path(path)
    meta = {
        "format": "torchcvt",
        "format_version": TORCHCVT_FORMAT_VERSION,
        "architecture": getattr(model, "pretrained_cfg", {}).get("architecture"),
        "class_names": _class_names(model, class_names),
        "config": model.config.to_dict(),
    }
    if path.suffix == ".safetensors":
        path.parent.mkdir(parents=True, exist_ok=True)
        weights = path
    else:
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        weights = path / WEIGHTS_NAME
    metadata = {"format": "pt", "torchcvt": json.dumps(meta)}
    save_file(_contiguous(model.state_dict()), weights, metadata=metadata)
    return path


def hf_config(model: CvT, class_names: ClassNames = None) -> dict[str, Any]:
    """transformers' CvtConfig for this model as config.json holds it; ValueError if it has no equivalent."""
    config = model.config
    last = config.num_stages - 1
    problems = [f"stage {i}'s qkv_projection_method {method!r} (transformers only has 'dw_bn')"
                for i, method in enumerate(config.qkv_projection_method) if method != "dw_bn"]
    problems += [f"stage {i}'s position embedding" for i, on in enumerate(config.position_embedding) if on]
    problems += [f"stage {i}'s {kind!r} token embedding (transformers only has 'conv')"
                 for i, kind in enumerate(config.token_embedding) if kind != "conv"]
    problems += [f"stage {i}'s class token of width {width} (transformers sizes every class token by the "
                 f"last stage, {config.embed_dim[last]})"
                 for i, (on, width) in enumerate(zip(config.cls_token, config.embed_dim, strict=True))
                 if on and width != config.embed_dim[last]]
    if problems:
        raise ValueError(f"transformers' CvT cannot represent {', '.join(problems)}")
    if config.activation != "gelu":
        warnings.warn(
            f"the model uses activation={config.activation!r}, which transformers' CvT config cannot express "
            "(it always uses exact GELU): the converted model's outputs will differ", stacklevel=3,
        )
    if config.layer_norm_eps != HF_LAYER_NORM_EPS:
        warnings.warn(
            f"the model uses layer_norm_eps={config.layer_norm_eps} but transformers' CvT always uses "
            f"{HF_LAYER_NORM_EPS}: the converted model's outputs will differ", stacklevel=3,
        )
    short = [i for i, depth in enumerate(config.depth) if depth <= i]
    if short:
        warnings.warn(
            f"transformers' CvtStage fails to build when depth[i] <= i (stage {short[0]} has depth "
            f"{config.depth[short[0]]}): the files are correct but transformers cannot load them",
            stacklevel=3,
        )
    if not config.cls_token[last]:
        warnings.warn(
            "transformers' CvtForImageClassification.forward fails without a class token in the last stage: "
            "the files are correct but transformers cannot run them", stacklevel=3,
        )
    names = _class_names(model, class_names) or [f"LABEL_{i}" for i in range(model.num_classes)]
    values = config.to_dict()
    return {
        "architectures": ["CvtForImageClassification"],
        "model_type": "cvt",
        **{name: values[name] for name in HF_CONFIG_FIELDS},
        "num_labels": model.num_classes,
        "id2label": {str(i): name for i, name in enumerate(names)},
        "label2id": {name: i for i, name in enumerate(names)},
    }


def save_hf(model: CvT, path: str | Path, class_names: ClassNames = None) -> Path:
    """Write a directory that transformers' CvtForImageClassification.from_pretrained loads."""
    path = Path(path)
    config = hf_config(model, class_names)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file(torchcvt_to_hf(_contiguous(model.state_dict())), path / WEIGHTS_NAME, metadata={"format": "pt"})
    return path


def export_checkpoint(model: CvT, path: str | Path, to: str, class_names: ClassNames = None) -> Path:
    """Write model in one of FORMATS: 'official' (.pth file), 'hf' (directory) or 'torchcvt'."""
    if to == "official":
        return save_official(model, path)
    if to == "hf":
        return save_hf(model, path, class_names)
    if to == "torchcvt":
        return save_checkpoint(model, path, class_names)
    raise ValueError(f"unknown checkpoint format {to!r}; choose one of {', '.join(FORMATS)}")


def check_destination(src: str | Path, dst: str | Path, to: str, overwrite: bool = False) -> None:
    """Refuse a destination that is (or holds) the source, an existing one unless overwrite is set, and one
    that cannot be written as format `to` needs (a file for official and .safetensors, else a folder)."""
    src, dst = Path(src), Path(dst)
    # samefile compares inodes, so a hard link or a symlink to the source is caught too.
    if dst.exists() and src.exists() and (dst.samefile(src) or (dst.is_dir() and _inside(src, dst))):
        raise ValueError(f"destination {dst} is the source checkpoint {src} or holds it: "
                         "choose another destination")
    as_file = to == "official" or (to == "torchcvt" and dst.suffix == ".safetensors")
    if as_file and dst.is_dir():
        raise ValueError(f"destination {dst} is a folder: {to} writes a file, give a file name")
    check_output_folder(dst.parent if as_file else dst, "destination")
    if dst.exists() and not overwrite and (not dst.is_dir() or any(dst.iterdir())):
        raise ValueError(f"destination {dst} already exists: pass --overwrite (overwrite=True) to replace it")


def _inside(path: Path, folder: Path) -> bool:
    return any(parent.samefile(folder) for parent in path.resolve().parents)


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    to: str,
    model_name: str | None = None,
    activation: str | None = None,
    overwrite: bool = False,
    config_overrides: dict[str, Any] | None = None,
) -> CvT:
    """Read src in any supported format and write it to dst in format `to`; returns the model in between.

    The architecture comes from the checkpoint's config when it has one, else from the variant model_name.
    Without `activation`, a transformers source keeps its exact GELU and others their own activation.
    dst must not be the source; an existing dst is replaced only with overwrite=True. config_overrides
    set config fields (e.g. depth) of a source that does not record them, such as an official .pth.
    """
    if to not in FORMATS:
        raise ValueError(f"unknown checkpoint format {to!r}; choose one of {', '.join(FORMATS)}")
    check_destination(src, dst, to, overwrite)
    checkpoint = read_checkpoint(src)
    name = model_name or checkpoint.architecture
    if name is None:
        why = ("official checkpoints carry no config" if checkpoint.format == "official"
               else "transformers configs name no torchcvt variant")
        raise ValueError(
            f"{src} does not say which variant it holds ({why}): name it with --model "
            f"(one of {', '.join(sorted(VARIANTS))})"
        )
    overrides = {**(checkpoint.config or {}), **(config_overrides or {})}
    overrides["num_classes"] = checkpoint.num_classes
    if activation is not None:
        overrides["activation"] = activation
    elif checkpoint.format == "hf":
        overrides["activation"] = "gelu"
    model = CvT(variant_config(name, **overrides))
    model.pretrained_cfg = {**get_variant(name).data_config(), "architecture": name}
    _check_config(model, checkpoint)
    _load_state_dict(model, checkpoint)
    export_checkpoint(model.eval(), dst, to, checkpoint.class_names)
    return model


def model_from_checkpoint(
    name: str | None,
    checkpoint: str | Path | Checkpoint,
    *,
    num_classes: int | None = None,
    features_only: bool = False,
    **overrides: Any,
) -> CvT | CvtFeatures:
    """The model a checkpoint of any format holds, with its weights.

    Variant `name` (default: the one the checkpoint records) with every architecture field the
    checkpoint's config sets (a run's `model.overrides` included), then `overrides`; the head size is
    the checkpoint's unless num_classes is given (then a head of another size is re-initialised).
    """
    stored = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint)
    name = name or stored.architecture
    if name is None:
        raise ValueError(
            f"{stored.path} does not say which variant it holds: name it "
            f"(one of {', '.join(sorted(VARIANTS))})"
        )
    saved = {key: value for key, value in (stored.config or {}).items() if key in ARCHITECTURE_FIELDS}
    if stored.architecture and stored.architecture != name:
        for field, theirs, ours in architecture_differences(saved, variant_config(name).to_dict()):
            if field not in overrides:
                raise ValueError(
                    f"checkpoint {stored.path} holds a {stored.architecture} whose {field} is "
                    f"{theirs} but {name} has {field} {ours}"
                )
    from .factory import create_model

    head = (stored.num_classes or 1000) if num_classes is None else num_classes
    return create_model(
        name, num_classes=head, checkpoint=stored, features_only=features_only, **{**saved, **overrides}
    )
