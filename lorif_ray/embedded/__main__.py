"""``python -m lorif_ray.embedded export DIR``: the embedded default as files of your own, to try the keys of
"your model and data" on: ``DIR/model`` (a Hugging Face model folder), ``DIR/train.jsonl`` and
``DIR/queries.jsonl``. The model is trained once into the user cache (``lorif_ray.embedded.embedded_assets``)."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from lorif_ray.embedded import embedded_assets

log = logging.getLogger("lorif_ray.embedded")


def export(directory: str | Path) -> Path:
    """Copy the embedded model folder and its training and query files into ``directory`` (created; existing
    files of those names are replaced); returns it."""
    assets, directory = embedded_assets(), Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copytree(assets.model_dir, directory / "model", dirs_exist_ok=True)
    for source, name in ((assets.train_path, "train.jsonl"), (assets.queries_path, "queries.jsonl")):
        shutil.copyfile(source, directory / name)
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorif_ray.embedded", description=__doc__)
    parser.add_argument("command", choices=["export"])
    parser.add_argument("directory", help="where to write model/, train.jsonl and queries.jsonl")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = export(args.directory)
    log.info("the embedded model is in %s/model, its training set in %s/train.jsonl and its queries in "
             "%s/queries.jsonl", out, out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
