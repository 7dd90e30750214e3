"""The download layer: released weights through huggingface_hub (its cache, HF_HOME, HF_HUB_OFFLINE and
revisions apply as usual)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from ..errors import TorchcvtError
from .checkpoint import HF_BIN_NAME, WEIGHTS_NAME, Checkpoint, read_checkpoint
from .io import first_line

logger = logging.getLogger(__name__)


def split_revision(hf_hub_id: str) -> tuple[str, str | None]:
    """'owner/name@revision' (timm's way of pinning a revision) as (repo, revision)."""
    repo, _, revision = hf_hub_id.partition("@")
    return repo, revision or None


def download_weights(hf_hub_id: str, cache_dir: str | Path | None = None,
                     filenames: Sequence[str] = (WEIGHTS_NAME, HF_BIN_NAME)) -> Path:
    """The local path of a Hub repository's weights: the first of filenames it has.

    Uses huggingface_hub's cache; a one-line TorchcvtError saying what to set or download when none is there.
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    repo, revision = split_revision(hf_hub_id)
    failures = []
    for filename in filenames:
        if not constants.is_offline_mode():
            _announce_download(hf_hub_id, repo, filename, revision, cache_dir)
        try:
            path = hf_hub_download(repo, filename, revision=revision, cache_dir=cache_dir)
        except (EntryNotFoundError, HfHubHTTPError, OSError) as error:
            # A repository may hold only one of the files; the others are then missing, not an error.
            failures.append(error)
            if _unreachable(error):
                break  # the next file would wait through the same retries for the same answer
            continue
        logger.info("weights of %s: %s", hf_hub_id, path)
        return Path(path)
    cache = cache_dir or constants.HF_HUB_CACHE
    where = f"https://huggingface.co/{repo}" + (f"/tree/{revision}" if revision else "")
    if constants.is_offline_mode():
        why = (f"they are not in the Hugging Face cache {cache} and HF_HUB_OFFLINE is set: unset it to "
               "download them once, or set HF_HOME to a cache that has them")
    else:
        why = (f"the download failed ({first_line(failures[-1])}); check the network, or set HF_HOME to a "
               f"cache that has them and HF_HUB_OFFLINE=1")
    raise TorchcvtError(
        f"cannot get the weights of {hf_hub_id}: {why}; or download {' (or '.join(filenames)}"
        f"{')' * (len(filenames) - 1)} from {where} by hand and pass it as checkpoint=PATH "
        "(torchcvt train: model.checkpoint=PATH; predict, eval, export: --checkpoint PATH)"
    )


def _announce_download(hf_hub_id: str, repo: str, filename: str, revision: str | None,
                       cache_dir: str | Path | None) -> None:
    """Say that the Hub is asked, before huggingface_hub's retries, which wait silently without a network."""
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(repo, filename, cache_dir, revision), str)
    what = "checking the Hugging Face Hub for updates to the cached" if cached else "downloading the"
    logger.info("%s weights of %s (%s); without a network this waits for about half a minute of retries: "
                "set HF_HUB_OFFLINE=1 to use the cache alone", what, hf_hub_id, filename)


def _unreachable(error: BaseException) -> bool:
    """Whether a download failed without reaching the Hub (no network): huggingface_hub then looked in the
    cache after its retries and raises LocalEntryNotFoundError; a file the Hub lacks raises another."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    return isinstance(error, LocalEntryNotFoundError) and not constants.is_offline_mode()


def read_pretrained(file: str | Path | None = None, hf_hub_id: str | None = None,
                    cache_dir: str | Path | None = None) -> Checkpoint:
    """Read pretrained weights from a local file (timm's pretrained_cfg 'file') or a Hub repository."""
    if file:
        return read_checkpoint(file)
    if not hf_hub_id:
        raise TorchcvtError("no pretrained weights: the pretrained config has neither 'file' nor 'hf_hub_id'")
    return read_checkpoint(download_weights(hf_hub_id, cache_dir))
