"""Attribution quality: LDS ground truth by retraining, tail-patch, sweeps and the report.

Layout (data flow): ``setups`` (corpora the project owns) → ``recipe`` (deterministic full-batch
training) → ``groundtruth`` (subsets, retrained query losses, cached) → ``stats`` (Spearman, LDS) ;
``cache`` (content-addressed indexes, factors from a dense index) → ``sweep`` (one results row per
point, with ``tailpatch``) → ``report`` (Markdown, Pareto plot).
"""
