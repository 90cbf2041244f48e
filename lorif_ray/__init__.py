"""lorif-ray: training-data attribution for causal language models with low-rank influence functions.

The Python API (``lorif_ray.api.Attributor``, ``lorif_ray.results.Results``) is re-exported lazily, so
importing a submodule stays light:

    >>> from lorif_ray import Attributor, Results  # doctest: +SKIP
"""

__all__ = ["Attributor", "Results"]


def __getattr__(name: str):
    if name == "Attributor":
        from lorif_ray.api import Attributor

        return Attributor
    if name == "Results":
        from lorif_ray.results import Results

        return Results
    raise AttributeError(f"module 'lorif_ray' has no attribute {name!r}")
