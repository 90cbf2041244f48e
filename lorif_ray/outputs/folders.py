"""Which folders this tool may write into: an ``output_dir`` it made (or an empty one), and an index folder
that holds nothing but an index.

A marker file records that an output folder is this tool's, so a typo in ``output_dir`` that points at a
user's own folder is refused before anything in it is overwritten (``overwrite=true`` takes it anyway).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from lorif_ray.config import Config
from lorif_ray.errors import ConfigError
from lorif_ray.store import IndexFolder

log = logging.getLogger(__name__)

MARKER = ".lorif-ray-output"
# what an unmarked output folder may hold and still be taken: what older versions wrote before the check (Hydra's
# record of the run and the job's log; the jobs now write both only after claiming the folder, lorif_ray.cli)
HYDRA_ENTRIES = (".hydra",)
JOB_LOGS = tuple(f"{job}.log" for job in ("attribute", "index", "curvature", "query", "serve"))


def _foreign(directory: Path) -> list[str]:
    names = sorted(p.name for p in directory.iterdir())
    return [n for n in names if n not in HYDRA_ENTRIES and n != MARKER and n not in JOB_LOGS]


def claim_output_dir(cfg: Config) -> None:
    """Refuse an output or index folder that holds something this tool did not write; mark a new one.

    Raises:
        ConfigError: ``output_dir`` is not empty and has no marker (unless ``overwrite``), or the index
            folder holds files but no index.
    """
    out = Path(cfg.output_dir)
    if out.is_dir() and not (out / MARKER).exists() and not cfg.overwrite:
        foreign = _foreign(out)
        if foreign:
            raise ConfigError(f"output_dir={out} already holds files this tool did not write ({', '.join(foreign[:5])}"
                              f"{' …' if len(foreign) > 5 else ''}): choose an empty or new folder, or set "
                              "overwrite=true to write into it anyway")
    index = IndexFolder(cfg.index_path)
    stray = index.strays()
    if stray:
        raise ConfigError(f"the index folder {index.path} holds files but no index ({', '.join(stray[:5])}): an index "
                          "folder holds nothing but the index; choose another output_dir or index_dir")
    if not (out / MARKER).exists():
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / MARKER).write_text(json.dumps({"tool": "lorif-ray", "created": time.time()}) + "\n")
        except OSError as error:  # a read-only output folder fails later, where something must be written
            log.warning("cannot mark %s as this tool's output folder: %s", out, error)
