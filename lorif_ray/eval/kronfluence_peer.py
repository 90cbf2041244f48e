"""Kronfluence (EK-FAC influence functions, Grosse et al. 2023) as an optional external peer.

Same attributed model, same data, same LDS ground truth and tail-patch as the sweep's points; only the
scores come from the ``kronfluence`` package (the ``kronfluence`` extra of pyproject.toml, installed with
``--no-deps`` as its comment says, so that torch is not replaced; imported here only, so the rest of the
harness never needs it).

- Model: the setup's attributed GPT-2, its ``Conv1D`` layers turned into the equal ``nn.Linear``
  (kronfluence tracks ``nn.Linear``/``nn.Conv2d`` only). Tracked modules: the same block linears that
  the sweep attributes (``lorif_ray.model.layers.select_layers``: every block linear, not the head).
- Loss (training examples) and measurement (queries): each example's next-token cross-entropy summed
  over its loss tokens (``lorif_ray.eval.recipe.summed_losses``), summed over the batch as kronfluence
  expects. Factors are fitted with labels sampled from the model (the true Fisher, kronfluence's
  default) unless ``eval.kronfluence.fisher=empirical``; padding is masked out of the covariances.
- Sign: kronfluence's pairwise score is ⟨(G+λ)⁻¹∇f(q), ∇L(t)⟩ with f = the query loss, i.e. > 0 when
  a gradient step on t lowers the query loss = removing t raises it: our convention (> 0 = proponent),
  so the scores are stored unchanged. ``lds.json`` also records the LDS of the negated scores as the
  check (it is the mirror image, so a wrong sign would show as a negative LDS).
- Storage: EK-FAC keeps no per-training-example data (training gradients are recomputed at scoring
  time), so the row's ``bytes_per_example`` is empty and ``factor_bytes`` gives the size of the
  factors used for preconditioning (eigenbases + eigenvalue-corrected Λ for EK-FAC).

Layout: ``<cache_root>/runs/kronfluence-<strategy>-<hash>/`` with ``scores.npy`` (queries × train,
input order), ``scores.json`` (ids), ``peer.json`` (times, sizes, settings), ``lds.json``, the
tail-patch json; kronfluence's own factor and score files under ``<cache_root>/kronfluence/<strategy>-<fisher>-<hash>/``
(shared by the damping variants, which differ only at scoring time).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from collections import Counter
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lorif_ray.data import IGNORE_INDEX, collate
from lorif_ray.eval.config import SweepConfig
from lorif_ray.eval.groundtruth import Setup, ensure_setup, ground_truth, tokenized
from lorif_ray.eval.recipe import summed_losses
from lorif_ray.eval.stats import MeanSE, lds_per_query
from lorif_ray.eval.sweep import append_row, cached_tail_patch, load_scores, write_ground_truth_summary
from lorif_ray.model.layers import conv1d_to_linear
from lorif_ray.store import write_json

RUNS: Counter = Counter()  # what this process actually computed: "kronfluence_factors", "kronfluence_scores"

# Factors that the preconditioning step loads, per strategy (kronfluence's storage names).
_PRECONDITION_FACTORS = {
    "ekfac": ("activation_eigenvectors", "gradient_eigenvectors", "lambda_matrix"),
    "kfac": ("activation_eigenvectors", "gradient_eigenvectors", "activation_eigenvalues", "gradient_eigenvalues"),
    "diagonal": ("lambda_matrix",),
    "identity": (),
}


class _Examples(torch.utils.data.Dataset):
    def __init__(self, examples):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


def make_task(tracked: list[str]):
    """A kronfluence ``Task``: summed token loss per example (optionally on sampled labels)."""
    from kronfluence.task import Task

    class SummedTokenLoss(Task):
        def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
            if not sample:
                return summed_losses(model, batch).sum()
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
            labels = batch["labels"][:, 1:]
            with torch.no_grad():  # true Fisher: targets drawn from the model at the loss positions
                probs = torch.softmax(logits.detach(), dim=-1)
                drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).reshape(labels.shape)
                labels = torch.where(labels != IGNORE_INDEX, drawn, labels)
            return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="sum")

        def compute_measurement(self, batch, model) -> torch.Tensor:
            return summed_losses(model, batch).sum()

        def get_influence_tracked_modules(self):
            return list(tracked)

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return SummedTokenLoss()


def _key(cfg: SweepConfig, setup: Setup, *, with_damping: bool) -> str:
    import kronfluence

    kc = cfg.eval.kronfluence
    key = {"setup": setup.digest, "strategy": kc.strategy, "fisher": kc.fisher, "seed": cfg.seed,
           "layers": cfg.model.layers, "kronfluence": getattr(kronfluence, "__version__", "?")}
    if with_damping:
        key["damping"] = kc.damping
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def run_dir(cfg: SweepConfig, setup: Setup) -> Path:
    """Scores, LDS and tail-patch of one (setup, strategy, Fisher, seed, damping)."""
    return Path(cfg.eval.cache_root) / "runs" / f"kronfluence-{cfg.eval.kronfluence.strategy}-{_key(cfg, setup, with_damping=True)}"


def factors_dir(cfg: SweepConfig, setup: Setup) -> Path:
    """kronfluence's own files; the factors do not depend on the damping, so damping variants share them."""
    kc = cfg.eval.kronfluence
    return Path(cfg.eval.cache_root) / "kronfluence" / f"{kc.strategy}-{kc.fisher}-{_key(cfg, setup, with_damping=False)}"


def compute_scores(cfg: SweepConfig, setup: Setup, out: Path) -> dict:
    """Fit the factors (unless cached) and score every (query, training example) pair.

    Writes ``scores.npy`` (float32, queries × train in input order), ``scores.json`` and ``peer.json``
    into ``out``; the factors' fit time and size go to ``factors.json`` beside kronfluence's files.
    """
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    from lorif_ray.model.layers import select_layers
    from lorif_ray.model.loading import load_model

    ev, kc = cfg.eval, cfg.eval.kronfluence
    model, tokenizer = load_model(setup.model_dir, device="cpu")
    model = conv1d_to_linear(model.float()).eval()
    tracked = list(select_layers(model, cfg.model.layers))
    train_set, queries = tokenized(setup, tokenizer, ev.max_length)
    task = make_task(tracked)
    model = prepare_model(model, task)
    kdir = factors_dir(cfg, setup)
    # kronfluence 1.0.1 builds torch.cuda.amp.GradScaler (disabled on CPU), which torch deprecates
    warnings.filterwarnings("ignore", message=".*GradScaler.*", category=FutureWarning)
    analyzer = Analyzer(analysis_name=ev.setup, model=model, task=task, cpu=True, log_level=logging.WARNING,
                        disable_tqdm=not cfg.progress, output_dir=str(kdir))
    loader = DataLoaderKwargs(collate_fn=partial(collate, pad_token_id=tokenizer.pad_token_id))
    factors_name = "factors"
    used = _PRECONDITION_FACTORS[kc.strategy]

    if not (kdir / "factors.json").exists():
        factor_args = FactorArguments(strategy=kc.strategy, use_empirical_fisher=kc.fisher == "empirical",
                                      covariance_max_examples=None, lambda_max_examples=None)
        torch.manual_seed(cfg.seed)  # the sampled labels of the true Fisher
        start = time.perf_counter()
        analyzer.fit_all_factors(factors_name=factors_name, dataset=_Examples(train_set), factor_args=factor_args,
                                 per_device_batch_size=kc.batch_size, dataloader_kwargs=loader,
                                 overwrite_output_dir=True)
        fit_seconds = time.perf_counter() - start
        factors = analyzer.load_all_factors(factors_name)
        factor_bytes = sum(t.numel() * t.element_size() for name in used for t in factors.get(name, {}).values())
        disk = sum(p.stat().st_size for p in Path(analyzer.factors_output_dir(factors_name)).rglob("*.safetensors"))
        write_json(kdir / "factors.json", {"fit_seconds": fit_seconds, "factor_bytes": factor_bytes,
                                           "factor_disk_bytes": disk, "factors_used": list(used),
                                           "tracked_modules": tracked, "threads": ev.threads})
        RUNS["kronfluence_factors"] += 1
    fitted = json.loads((kdir / "factors.json").read_text())

    damping = "heuristic" if kc.damping is None else f"{kc.damping:g}"
    start = time.perf_counter()
    analyzer.compute_pairwise_scores(scores_name=f"pairwise-damping-{damping}", factors_name=factors_name,
                                     query_dataset=_Examples(queries), train_dataset=_Examples(train_set),
                                     per_device_query_batch_size=len(queries),
                                     per_device_train_batch_size=kc.batch_size, dataloader_kwargs=loader,
                                     score_args=ScoreArguments(damping_factor=kc.damping), overwrite_output_dir=True)
    score_seconds = time.perf_counter() - start
    scores = analyzer.load_pairwise_scores(f"pairwise-damping-{damping}")["all_modules"].double().numpy()
    if scores.shape != (len(queries), len(train_set)):
        raise RuntimeError(f"kronfluence scores have shape {scores.shape}, expected {(len(queries), len(train_set))}")

    np.save(out / "scores.npy", scores.astype(np.float32))
    write_json(out / "scores.json", {"query_ids": [q.id for q in queries], "train_ids": [t.id for t in train_set],
                                     "sign": "kronfluence's own (> 0 = proponent), not flipped"})
    info = {**fitted, "score_seconds": score_seconds, "settings": asdict(kc), "seed": cfg.seed,
            "factors_dir": str(kdir)}
    write_json(out / "peer.json", info)
    RUNS["kronfluence_scores"] += 1
    return info


def run_kronfluence(cfg: SweepConfig) -> dict:
    """Kronfluence's scores on the setup of ``cfg.eval``, their LDS and tail-patch; returns (and appends) a row."""
    ev, kc = cfg.eval, cfg.eval.kronfluence
    torch.set_num_threads(ev.threads)
    setup = ensure_setup(ev)
    gt = ground_truth(ev, setup, progress=cfg.progress)
    write_ground_truth_summary(ev, setup, gt)
    out = run_dir(cfg, setup)
    out.mkdir(parents=True, exist_ok=True)
    if not ((out / "scores.npy").exists() and (out / "peer.json").exists()):
        compute_scores(cfg, setup, out)
    info = json.loads((out / "peer.json").read_text())
    scores = load_scores(out, gt)
    lds_values = lds_per_query(scores, gt.subsets, gt.mean_losses)
    lds = MeanSE.of(lds_values)
    negated = MeanSE.of(lds_per_query(-scores, gt.subsets, gt.mean_losses))
    write_json(out / "lds.json", {"query_ids": gt.query_ids, "per_query": [float(v) for v in lds_values],
                                  "num_subsets": int(gt.subsets.shape[0]), "seeds": gt.seeds,
                                  "negated_scores": {"mean": negated.mean, "se": negated.se}})
    tp_path = cached_tail_patch(ev, setup, scores, out)
    tp = json.loads(tp_path.read_text())
    mib = info["factor_bytes"] / 2**20
    row = {
        "setup": f"{ev.setup}:{setup.digest[:12]}",
        "method": f"kronfluence-{kc.strategy}" + ("" if kc.fisher == "true" else f"-{kc.fisher}"),  # -empirical
        "f": None, "c": None, "r": None,
        "damping": kc.damping,  # None: 0.1 × mean of each module's Λ (kronfluence's heuristic)
        "dtype": "float32",
        "seed": cfg.seed,
        "lds": lds.mean, "lds_se": lds.se, "lds_queries": lds.n,
        "tail_patch": tp["mean"], "tail_patch_se": tp["se"],
        "bytes_per_example": None,  # nothing stored per training example
        "disk_bytes_per_example": None,
        "factor_bytes": info["factor_bytes"],
        "index_source": None, "index_made_by": None, "index_seconds": None,
        "curvature_seconds": info["fit_seconds"],  # factor fitting (covariances, eigendecomposition, Λ)
        "query_seconds": info["score_seconds"],  # query gradients + all N training gradients, every query
        "num_train": len(gt.train_ids), "num_queries": len(gt.query_ids),
        "num_subsets": int(gt.subsets.shape[0]), "num_seeds": len(gt.seeds),
        "index_dir": None, "run_dir": str(out), "tail_patch_path": str(tp_path),
        "note": (f"{kc.strategy} factors {mib:.2f} MiB in all ({', '.join(info['factors_used'])}); "
                 f"{kc.fisher} Fisher; no per-example storage (training gradients recomputed when scoring)"),
    }
    append_row(Path(ev.results_dir), row)
    return row
