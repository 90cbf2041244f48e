"""Errors before work, in one line (issue 20, rows 3 and 10; issue 21, rows 6 and 8), as a user meets them.

Each job runs as a subprocess with the arguments a user types. A config or input error must end the job with
exit status 2 and one line on stderr naming the key and value (or the file), with no traceback (``debug=true``
shows it), before Ray starts: the jobs run with ``RAY_TMPDIR`` in the test's folder, where a started Ray
instance leaves its session folder (``ray._common.utils.get_default_system_temp_dir``).
"""

from __future__ import annotations

import shutil

from lorif_ray.cli import schema_keys
from lorif_ray.config import Config
from lorif_ray.eval.config import SweepConfig
from lorif_ray.plan import PlanJob
from tests.user.conftest import finish, job_env, ray_started, run, start

JOBS = {"attribute": Config, "index": Config, "curvature": Config, "query": Config, "serve": Config,
        "plan": PlanJob, "evaluate": SweepConfig, "sweep": SweepConfig, "report": SweepConfig}


def _error_line(result) -> str:
    """The one line a failed job wrote (asserting it is one line, exit status 2, no traceback)."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stdout + result.stderr, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_a_wrong_model_folder_or_hub_id_fails_in_one_line_before_ray_starts(tmp_path):
    """Row 3: a wrong folder and a Hub id not in the cache, on the default cluster (a local Ray instance the
    job would start): one line naming model.path and its value; Ray never starts and nothing is written."""
    env = job_env(tmp_path)
    wrong = start("attribute", "model.path=/wrong", f"output_dir={tmp_path / 'out1'}", env=env)
    hub = start("attribute", "model.path=gpt2", f"output_dir={tmp_path / 'out2'}", "debug=true", env=env)
    line = _error_line(finish(wrong))
    assert line == "error: model.path=/wrong: no such folder"
    debugged = finish(hub)
    assert debugged.returncode == 2 and "Traceback (most recent call last)" in debugged.stderr
    last = debugged.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model.path=gpt2: no such folder, and the Hugging Face cache at "
                           f"{tmp_path / 'empty-hf-cache'} does not hold it") and "`hf download gpt2`" in last
    assert not ray_started(tmp_path)
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


def test_a_typo_names_the_closest_key_in_every_kind_of_job(tmp_path):
    """A typo'd key (Hydra said "Could not override 'datta.train'") names the closest key, for the three
    config schemas (the stages', the planner's, the evaluation's)."""
    env = job_env(tmp_path)
    cases = {("attribute", "datta.train=x.jsonl"): "did you mean data.train?",
             ("query", "top_k=3"): "did you mean query.top_k?",
             ("plan", "num_gpu=4"): "did you mean num_gpus?",
             ("sweep", "eval.num_subset=4"): "did you mean eval.num_subsets?"}
    running = {case: start(case[0], case[1], f"output_dir={tmp_path / 'out'}", env=env) for case in cases}
    for (job, arg), suggestion in cases.items():
        line = _error_line(finish(running[(job, arg)]))
        assert line == f"error: {arg}: no such key; {suggestion}", (job, line)
    assert not (tmp_path / "out").exists()


def test_help_lists_every_key_with_its_meaning_in_every_job(tmp_path):
    """Row 10: `--help` listed the config groups and explained no key; now every job's lists every key of its
    config dataclass with that field's one-line meaning and the value this command line gives it."""
    env = job_env(tmp_path)
    running = {job: start(job, "--help", env=env) for job in JOBS}
    for job, schema in JOBS.items():
        result = finish(running[job])
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        for key in (k for k in schema_keys(schema) if not k.node):
            assert key.help, f"{schema.__name__}.{key.name} has no help text"
            line = next((l for l in lines if l.split() and l.split()[0] == key.name), None)
            assert line is not None and key.help in line, (job, key.name)
        assert "debug=true" in result.stdout
    attribute = finish(start("attribute", "--help", "model=llama_70b", "f=16", env=env)).stdout
    assert any(l.split()[:1] == ["f"] and l.endswith("[16]") for l in attribute.splitlines())
    assert "model      llama_70b" in attribute


def test_a_folder_of_the_users_is_refused_before_anything_is_written_into_it(tiny_assets, tmp_path, env):
    """Issue 21 row 6: `output_dir` = a folder holding the user's thesis.txt was refused, but Hydra's `.hydra/`
    and `attribute.log` had been written into it first; now it holds thesis.txt alone, and Ray never started."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.txt").write_text("three years of work\n")
    result = run("attribute", f"model.path={tiny_assets['model']}", f"data.train={tiny_assets['train']}",
                 f"data.queries={tiny_assets['queries']}", "data.max_length=32", f"output_dir={folder}", env=env)
    line = _error_line(result)
    assert line.startswith(f"error: output_dir={folder} already holds files this tool did not write (thesis.txt)")
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.txt"]
    assert not ray_started(tmp_path)


def test_damaged_model_files_are_named(tiny_assets, tmp_path, env):
    """Issue 21 row 8: a model.safetensors cut short, one with a huge header length and a config.json cut short
    gave a bare SafetensorError / JSONDecodeError; each is now one line naming the file."""
    models = {}
    for case in ("short", "header", "config"):
        models[case] = tmp_path / case
        shutil.copytree(tiny_assets["model"], models[case])
    weights = models["short"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    header = models["header"] / "model.safetensors"
    header.write_bytes((2**60).to_bytes(8, "little") + header.read_bytes()[8:])
    config = models["config"] / "config.json"
    config.write_text(config.read_text()[:40])
    running = {case: start("index", f"model.path={path}", f"data.train={tiny_assets['train']}", "cluster=none",
                           "data.max_length=32", f"output_dir={tmp_path / ('out-' + case)}", env=env)
               for case, path in models.items()}
    expected = {"short": f"error: {weights}: its tensors end at byte ",
                "header": f"error: {header}: its header length says {2**60} bytes, the file holds ",
                "config": f"error: {config}: not valid JSON ("}
    for case, prefix in expected.items():
        line = _error_line(finish(running[case]))
        assert line.startswith(prefix), (case, line)
        assert not (tmp_path / f"out-{case}").exists()


def test_every_field_has_a_one_line_help_text():
    """What `--help` shows comes from the dataclasses: no field without its meaning, none over one line."""
    for schema in (Config, SweepConfig, PlanJob):
        for key in schema_keys(schema):
            assert key.help and "\n" not in key.help, f"{schema.__name__}.{key.name}"


def test_a_layout_the_local_instance_cannot_hold_fails_before_ray_starts(tiny_assets, tmp_path, env):
    """The stage-1 layout is checked against the local instance the job would start (its size is known before
    it starts): one line, asked vs available, instead of starting Ray (this check used to need a running one)."""
    result = run("index", f"model.path={tiny_assets['model']}", f"data.train={tiny_assets['train']}",
                 "data.max_length=32", "cluster.num_cpus=2", "cluster.gradient_actors=8",
                 f"output_dir={tmp_path / 'out'}", env=env)
    line = _error_line(result)
    assert line.startswith("error: the stage-1 layout does not fit this Ray cluster: it asks 8 replica(s)")
    assert "the cluster has 2 CPUs" in line
    assert not ray_started(tmp_path) and not (tmp_path / "out").exists()
