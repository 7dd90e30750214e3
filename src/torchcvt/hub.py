"""Pretrained weights: the released CvT checkpoints as timm-style tags, fetched through huggingface_hub.

The seven official checkpoints are mirrored on the Hub in transformers' format; huggingface_hub's cache,
HF_HOME, HF_HUB_OFFLINE and revisions apply as usual. Reading goes through torchcvt's checkpoint reader.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .checkpoints import HF_BIN_NAME, WEIGHTS_NAME, Checkpoint, read_checkpoint

logger = logging.getLogger(__name__)

PAPER = "CvT: Introducing Convolutions to Vision Transformers"
PAPER_ID = "arXiv:2103.15808"
ORIGIN_URL = "https://github.com/microsoft/CvT"
LICENSE = "mit"


@dataclass(frozen=True)
class PretrainedTag:
    """One released checkpoint: the variant it fits, its tag, where it lives and what the paper reports."""

    architecture: str
    tag: str
    hf_hub_id: str
    top1: float
    pretraining: str

    @property
    def name(self) -> str:
        return f"{self.architecture}.{self.tag}"


# The first tag of an architecture is its default (the one an untagged name with pretrained=True loads).
# Top-1: ImageNet-1k val, CvT paper Table 2 (the 22k tags are pre-trained on ImageNet-22k, fine-tuned on 1k).
PRETRAINED_TAGS: tuple[PretrainedTag, ...] = (
    PretrainedTag("cvt_13", "ms_in1k", "microsoft/cvt-13", 81.6, "ImageNet-1k"),
    PretrainedTag("cvt_13_384", "ms_in22k_ft_in1k", "microsoft/cvt-13-384-22k", 83.3, "ImageNet-22k"),
    PretrainedTag("cvt_13_384", "ms_in1k", "microsoft/cvt-13-384", 83.0, "ImageNet-1k"),
    PretrainedTag("cvt_21", "ms_in1k", "microsoft/cvt-21", 82.5, "ImageNet-1k"),
    PretrainedTag("cvt_21_384", "ms_in22k_ft_in1k", "microsoft/cvt-21-384-22k", 84.9, "ImageNet-22k"),
    PretrainedTag("cvt_21_384", "ms_in1k", "microsoft/cvt-21-384", 83.3, "ImageNet-1k"),
    PretrainedTag("cvt_w24", "ms_in22k_ft_in1k", "microsoft/cvt-w24-384-22k", 87.7, "ImageNet-22k"),
)


def list_pretrained() -> list[str]:
    """Every tagged name with released weights, e.g. 'cvt_13.ms_in1k'."""
    return [tag.name for tag in PRETRAINED_TAGS]


def _split_revision(hf_hub_id: str) -> tuple[str, str | None]:
    """'owner/name@revision' (timm's way of pinning a revision) as (repo, revision)."""
    repo, _, revision = hf_hub_id.partition("@")
    return repo, revision or None


def download_weights(hf_hub_id: str, cache_dir: str | Path | None = None) -> Path:
    """The local path of a Hub repository's weights (model.safetensors, else pytorch_model.bin).

    Uses huggingface_hub's cache; FileNotFoundError saying what to set or download when neither is there.
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    repo, revision = _split_revision(hf_hub_id)
    failures = []
    for filename in (WEIGHTS_NAME, HF_BIN_NAME):
        try:
            path = hf_hub_download(repo, filename, revision=revision, cache_dir=cache_dir)
        except (EntryNotFoundError, HfHubHTTPError, OSError) as error:
            # A repository may hold only one of the two files; the other is then missing, not an error.
            failures.append(error)
            continue
        logger.info("weights of %s: %s", hf_hub_id, path)
        return Path(path)
    cache = cache_dir or constants.HF_HUB_CACHE
    where = f"https://huggingface.co/{repo}" + (f"/tree/{revision}" if revision else "")
    if constants.is_offline_mode():
        why = (f"they are not in the Hugging Face cache {cache} and HF_HUB_OFFLINE is set: unset it to "
               "download them once, or set HF_HOME to a cache that has them")
    else:
        why = (f"the download failed ({_first_line(failures[-1])}); check the network, or set HF_HOME to a "
               f"cache that has them and HF_HUB_OFFLINE=1")
    raise FileNotFoundError(
        f"cannot get the weights of {hf_hub_id}: {why}; or download {WEIGHTS_NAME} (or {HF_BIN_NAME}) from "
        f"{where} by hand and pass it as checkpoint=PATH (--checkpoint PATH on the command line)"
    )


def read_pretrained(file: str | Path | None = None, hf_hub_id: str | None = None,
                    cache_dir: str | Path | None = None) -> Checkpoint:
    """Read pretrained weights from a local file (timm's pretrained_cfg 'file') or a Hub repository."""
    if file:
        return read_checkpoint(file)
    if not hf_hub_id:
        raise ValueError("no pretrained weights: the pretrained config has neither 'file' nor 'hf_hub_id'")
    return read_checkpoint(download_weights(hf_hub_id, cache_dir))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
