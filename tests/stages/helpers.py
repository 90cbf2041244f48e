from lorif_ray.config import Config, DataConfig, MethodConfig, ModelConfig, QueryConfig


def make_config(assets, output_dir, method="lorif", **overrides) -> Config:
    query = overrides.pop("query", QueryConfig(full_scores=True, top_k=5))
    return Config(model=ModelConfig(path=str(assets["model"]), device="cpu"),
                  data=DataConfig(train=str(assets["train"]), queries=str(assets["queries"]), max_length=32),
                  method=MethodConfig(name=method), query=query, output_dir=str(output_dir), progress=False,
                  **overrides)
