"""``model.path`` as a local folder or a Hugging Face Hub id, resolved through the local Hub cache only.

A Hub id (``gpt2``, ``org/name``) is looked up in the cache that ``huggingface_hub`` uses (``HF_HUB_CACHE``,
else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``; layout ``models--org--name/refs/main`` holding a
commit, ``snapshots/<commit>/`` the files): the snapshot of ``refs/main`` is the model folder. Nothing is
downloaded; the driver resolves the id once and every stage and Ray actor gets the folder.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from lorif_ray.errors import ConfigError

log = logging.getLogger(__name__)

# a Hub repository id: "name" or "namespace/name" (letters, digits, "-", "_", "."; no "--" or ".." runs)
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


def hub_cache_dir() -> Path:
    """The Hugging Face Hub cache, by huggingface_hub's documented precedence, read now (not at import):
    ``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``, ``$HF_HOME/hub``, ``$XDG_CACHE_HOME/huggingface/hub``,
    ``~/.cache/huggingface/hub``."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "huggingface" / "hub"


def is_hub_id(text: str) -> bool:
    """Whether ``text`` has the form of a Hub repository id (``gpt2``, ``org/name``)."""
    return bool(_HUB_ID.match(text)) and "--" not in text and ".." not in text


def resolve_model_path(path: str | Path, key: str = "model.path", cache_dir: str | Path | None = None) -> Path:
    """The local folder of ``path``: the folder itself, or the cached snapshot of a Hub id.

    Args:
        cache_dir: the Hub cache to look in; None = ``hub_cache_dir()``.

    Raises:
        ConfigError: neither a folder nor a Hub id in the cache (one line: where it looked and how to fetch it).
    """
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    text = str(path)
    if local.exists():
        raise ConfigError(f"{key}={text}: a file, not a model folder; give the folder that holds config.json")
    if not is_hub_id(text):
        raise ConfigError(f"{key}={text}: no such folder")
    from huggingface_hub import try_to_load_from_cache

    cache = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    found = try_to_load_from_cache(text, "config.json", cache_dir=str(cache))
    if isinstance(found, str):
        snapshot = Path(found).parent
        log.info("%s=%s: the Hub id resolved in the Hugging Face cache to %s", key, text, snapshot)
        return snapshot
    held = cache / f"models--{text.replace('/', '--')}"
    what = ("holds it without a config.json in its main snapshot" if held.is_dir() else "does not hold it")
    raise ConfigError(f"{key}={text}: no such folder, and the Hugging Face cache at {cache} {what} (nothing is "
                      f"downloaded here): fetch it where there is network with `hf download {text}` and copy the "
                      "cache here (or point HF_HUB_CACHE / HF_HOME at it), or give a local model folder")
