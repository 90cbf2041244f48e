from contextlib import contextmanager

import torch

from lorif_ray.config import Config, DataConfig, MethodConfig, ModelConfig, QueryConfig


def make_config(assets, output_dir, method="lorif", **overrides) -> Config:
    query = overrides.pop("query", QueryConfig(full_scores=True, top_k=5))
    return Config(model=ModelConfig(path=str(assets["model"]), device="cpu"),
                  data=DataConfig(train=str(assets["train"]), queries=str(assets["queries"]), max_length=32),
                  method=MethodConfig(name=method), query=query, output_dir=str(output_dir), progress=False,
                  **overrides)


@contextmanager
def counting_shard_reads():
    """The indices of the shard files opened for reading inside the block, in order (every reader of the store
    goes through ``shard_batches``, which ``lorif_ray.store.index_folder.IndexFolder`` calls)."""
    import lorif_ray.store.index_folder as index_folder

    opened, real = [], index_folder.shard_batches

    def counting(directory, manifest, record, columns, batch_rows):
        opened.append(record.index)
        return real(directory, manifest, record, columns, batch_rows)

    index_folder.shard_batches = counting
    try:
        yield opened
    finally:
        index_folder.shard_batches = real


def index_columns(index_dir) -> dict[str, torch.Tensor]:
    """Every column of an index, all rows in order: {column: (N, width)}."""
    from lorif_ray.store import IndexFolder

    parts: dict[str, list] = {}
    for _, columns in IndexFolder(index_dir).batches(batch_rows=1000):
        for name, value in columns.items():
            parts.setdefault(name, []).append(value)
    return {name: torch.cat(values) for name, values in parts.items()}
