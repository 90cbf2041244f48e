"""README.md as tests (issue 20, item 2): every code block runs exactly as it stands, in a fresh copy of the
repository, the way a new user meets it.

Each fenced block carries a kind in the comment on the line before it (``<!-- readme-test: KIND -->``):

- ``run``: a shell block, run as one bash script in the copy (``make test``, the suite itself, is checked in
  ``.ci/run`` instead: CI runs exactly that);
- ``fails``: each line must fail with exit status 2 and print the one line its comment shows;
- ``python``: a Python block, run as a script;
- ``template``: needs what this machine lacks (a GPU cluster, a registry, or hours); its jobs' keys are
  composed into their configs, so a stale key fails here;
- ``layout``: the tree of the repository: every path it names exists.

A block without a kind fails ``test_every_block_has_a_kind``. The copy holds the files git tracks (and the
untracked ones it does not ignore), with their modification times, and this checkout's ``.venv``.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
KINDS = ("run", "fails", "python", "template", "layout")
FENCE = re.compile(r"^```", re.M)
BLOCK = re.compile(r"^<!-- readme-test: (\w+) -->\n```(\w*)\n(.*?)^```", re.M | re.S)
CI_COMMAND = "make test"  # the suite: .ci/run runs exactly this, so a test does not run it inside itself
CONFIG_OF_JOB = {"plan": "plan", "evaluate": "sweep", "sweep": "sweep", "report": "sweep", "peer_kronfluence": "sweep"}


@dataclass(frozen=True)
class Block:
    kind: str
    language: str
    text: str
    line: int  # where the fence opens in README.md


def readme_blocks(kind: str | None = None) -> list[Block]:
    text = README.read_text()
    blocks = [Block(m.group(1), m.group(2), m.group(3), text.count("\n", 0, m.start()) + 2) for m in BLOCK.finditer(text)]
    return [b for b in blocks if kind is None or b.kind == kind]


def commands(block: Block) -> list[str]:
    """The block's command lines (continuations joined), with their comments."""
    return [line for line in block.text.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A fresh copy of the repository (mtimes kept, so `make` finds its .venv up to date)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    copy = tmp_path_factory.mktemp("clone") / "lorif-ray"
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file() and not source.is_symlink():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    (copy / ".venv").symlink_to(Path(sys.prefix))
    return copy


def user_env(clone: Path) -> dict:
    """A user's shell: the copy's package first; the default Hugging Face cache (the README's messages name it)."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("HF_HUB_CACHE", "HF_HOME", "LORIF_RAY_DEBUG", "HYDRA_FULL_ERROR", "RAY_ADDRESS")}
    return {**env, "PYTHONPATH": str(clone)}


def run_script(clone: Path, script: str, timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=clone, env=user_env(clone),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{script}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-6000:]}"
    return result


def run_block(clone: Path, block: Block) -> subprocess.CompletedProcess:
    """A ``run`` block as one bash script, its ``make test`` line checked against ``.ci/run`` instead."""
    lines = block.text.splitlines()
    kept = [line for line in lines if line.split("#")[0].strip() != CI_COMMAND]
    if len(kept) < len(lines):
        assert CI_COMMAND in (ROOT / ".ci" / "run").read_text().splitlines()
    return run_script(clone, "\n".join(kept))


def block_with(kind: str, needle: str) -> Block:
    found = [b for b in readme_blocks(kind) if needle in b.text]
    assert len(found) == 1, (kind, needle, found)
    return found[0]


def test_every_block_has_a_kind():
    text = README.read_text()
    assert len(FENCE.findall(text)) == 2 * len(readme_blocks()), "a fenced block of README.md has no readme-test kind"
    assert {b.kind for b in readme_blocks()} <= set(KINDS)


@pytest.fixture(scope="module")
def demo(clone) -> subprocess.CompletedProcess:
    """The quick start: `make demo` in the copy (on Ray, as it stands)."""
    return run_block(clone, block_with("run", "make demo"))


def test_quick_start_runs_the_demo_with_the_figures_the_readme_gives(demo, clone):
    log = demo.stdout + demo.stderr
    assert "known source in the top-1: 39/48" in log and "known source in the top-5: 47/48" in log, log[-3000:]
    out = clone / "outputs" / "lorif_f4_c1_r64"
    assert (out / "report.html").is_file() and "report.html" in log
    top = pq.read_table(out / "topk.parquet")
    assert {"query_text", "train_text"} <= set(top.column_names) and (out / "opponents.parquet").is_file()


def test_your_model_and_data_block(clone):
    run_block(clone, block_with("run", "lorif_ray.embedded export"))
    assert (clone / "my-model" / "model" / "config.json").is_file()
    top = pq.read_table(clone / "out" / "topk.parquet")
    assert top.num_rows == 48 * 20 and top.column("rank").to_pylist()[:20] == list(range(1, 21))
    meta = json.loads((clone / "out" / "index" / "_manifest.json").read_text())
    assert meta["dtype"] == "float16" and meta["num_rows"] == 736
    import numpy as np

    assert np.load(clone / "out" / "scores.npy", mmap_mode="r").shape == (48, 736)


def test_the_scoring_without_an_index_block(clone):
    """jobs/score.py as the README shows it (after the model-and-data block's export): a query run with texts and
    its page, and no index anywhere; K-FAC takes its two passes."""
    run_script(clone, f"{shlex.quote(str(clone / '.venv/bin/python'))} -m lorif_ray.embedded export my-model")
    run_block(clone, block_with("run", "jobs/score.py"))
    for out in ("out-live", "out-live-kfac"):
        topk = pq.read_table(clone / out / "topk.parquet")
        assert topk.num_rows > 0 and all(topk.column("train_text").to_pylist())
        assert (clone / out / "report.html").is_file() and not (clone / out / "index").exists()
    assert "2 passes, no index" in (clone / "out-live-kfac" / "score.log").read_text()


def test_the_errors_block_prints_each_line_it_shows(clone):
    for line in commands(readme_blocks("fails")[0]):
        command, _, shown = line.partition("# ")
        result = subprocess.run(["bash", "-c", command], cwd=clone, env=user_env(clone), capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 2, (command, result.stderr[-2000:])
        assert result.stderr.strip() == shown.strip().replace("~", str(Path.home())), (command, result.stderr)


def test_the_python_api_block_prints_proponents_that_make_sense(clone):
    script = clone / "readme_example.py"
    script.write_text(readme_blocks("python")[0].text)
    printed = run_script(clone, f"{shlex.quote(str(clone / '.venv/bin/python'))} readme_example.py").stdout
    train = {json.loads(line)["text"] for line in _embedded_train(clone).read_text().splitlines()}
    queries = re.split(r"^query ", printed, flags=re.M)[1:]
    assert [q.split("\n", 1)[0] for q in queries] == ["0", "1"], printed
    sources = ["noudridor is crossed by the river keraisa .", "the national animal of pailaria is the fox ."]
    for query, source in zip(queries, sources):
        texts = [line.split(None, 2)[2] for line in query.splitlines()[1:] if line.startswith("  ")]
        assert len(texts) == 3 and set(texts) <= train, printed
        assert source in texts, printed  # the sentence that states the fact is among its top three


def _embedded_train(clone: Path) -> Path:
    code = "from lorif_ray.embedded import embedded_assets; print(embedded_assets(progress=False).train_path)"
    out = subprocess.run([str(clone / ".venv/bin/python"), "-c", code], cwd=clone, env=user_env(clone),
                         capture_output=True, text=True, check=True).stdout
    return Path(out.strip().splitlines()[-1])


def test_the_query_service_block_answers_over_http(demo, clone):
    result = run_block(clone, block_with("run", "jobs/serve.py"))
    health, answer = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert health["status"] == "ready" and health["train"] == 736
    (only,) = answer["results"]
    assert only["query_text"] == "the capital of drugitul is sousal"
    assert [p["rank"] for p in only["proponents"]] == [1, 2, 3] and len(only["opponents"]) == 3
    assert "drugitul has its capital in sousal ." in [p["train_text"] for p in only["proponents"]]
    expected = pq.read_table(clone / "outputs" / "lorif_f4_c1_r64" / "topk.parquet").to_pylist()
    ranked = [r["train_id"] for r in expected if r["query_text"] == only["query_text"]][:3]
    assert [p["train_id"] for p in only["proponents"]] == ranked  # the demo's own top-k for that query


def test_the_plan_and_evaluation_blocks(clone):
    plan = run_block(clone, block_with("run", "jobs/plan.py"))
    models = [line.split(",")[0] for line in plan.stdout.splitlines() if line.startswith("model: ")]
    assert models == ["model: olmo3", "model: llama", "model: apertus"], plan.stdout[-2000:]
    run_block(clone, block_with("run", "eval=tiny"))
    results = clone / ".cache" / "eval" / "results" / "tiny"
    assert (results / "quality.md").is_file() and (results / "lds_pareto.png").is_file()
    assert pq.read_table(results / "results.parquet").num_rows == 2
    assert not subprocess.run(["git", "status", "--porcelain", "bench/results"], cwd=ROOT, capture_output=True,
                              text=True).stdout  # the committed results stay as they are


def template_jobs() -> list[tuple[str, list[str]]]:
    """(job, its key=value overrides) of every jobs/*.py command in the template blocks (sweeps expanded)."""
    found = []
    for block in readme_blocks("template"):
        for line in commands(block):
            words = shlex.split(line.split("  #")[0])
            at = next((i for i, w in enumerate(words) if re.fullmatch(r"jobs/\w+\.py", w)), None)
            if at is None:
                continue
            job = Path(words[at]).stem
            args = [w for w in words[at + 1:] if not w.startswith("-")]
            choices = [[f"{k}={v}" for v in vs.split(",")] for k, vs in (a.split("=", 1) for a in args)]
            found += [(job, list(combo)) for combo in itertools.product(*choices)]
    return found


def test_the_templates_compose_with_the_current_keys():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lorif_ray.cli import CONF_DIR, _overrides, _register, check_keys

    jobs = template_jobs()
    assert {job for job, _ in jobs} >= {"attribute", "evaluate", "sweep", "report"}, jobs
    for job, overrides in jobs:
        config_name = CONFIG_OF_JOB.get(job, "config")
        check_keys(_overrides(overrides), _register(config_name))
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            OmegaConf.to_object(compose(config_name, overrides=overrides))  # the dataclass checks every value


def test_the_layout_names_what_is_there():
    (block,) = readme_blocks("layout")
    paths = [line.split()[0] for line in block.text.splitlines() if line and not line.startswith(" ")]
    assert len(paths) > 15
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, missing
    packages = {p.name for p in (ROOT / "lorif_ray").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= {Path(p).name for p in paths}, "a package of lorif_ray/ is not in the README's layout"
