"""lorif-ray: training-data attribution for causal language models with low-rank influence functions.

The Python API (``lorif_ray.api``) is re-exported lazily, so importing a submodule stays light:

    >>> from lorif_ray import Attributor, Results  # doctest: +SKIP
"""

__all__ = ["Attributor", "Results"]


def __getattr__(name: str):
    if name in __all__:
        from lorif_ray import api

        return getattr(api, name)
    raise AttributeError(f"module 'lorif_ray' has no attribute {name!r}")
