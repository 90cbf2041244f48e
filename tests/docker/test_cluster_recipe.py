"""Static checks that the cluster recipe is one consistent thing (issue 12, case 8b): docker/cluster.yaml,
docker/Dockerfile and README.md name the same image, mount the same shared storage, and size the jobs
for the GPUs the example cluster has. No Docker daemon, no cluster."""

import re
import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def cluster() -> dict:
    return yaml.safe_load((ROOT / "docker/cluster.yaml").read_text())


def readme_commands() -> list[list[str]]:
    """Every command in README.md's bash blocks (continuations joined, `&&` split, comments dropped), as words."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split("  #")[0].strip()
            if command and not command.startswith("#"):
                commands += [shlex.split(part) for part in command.split("&&")]
    return commands


def option(words: list[str], flag: str) -> str:
    return words[words.index(flag) + 1]


def overrides(words: list[str]) -> dict[str, str]:
    return dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-"))


def cluster_gpus() -> int:
    nodes = cluster()["available_node_types"]
    return sum(node.get("min_workers", 0) * node.get("resources", {}).get("GPU", 0) for node in nodes.values())


def test_head_and_workers_run_the_one_image_the_readme_builds_and_pushes():
    docker = cluster()["docker"]
    assert "head_image" not in docker and "worker_image" not in docker, docker
    image = docker["image"]
    builds = [w for w in readme_commands() if w[:2] == ["docker", "build"]]
    assert [option(w, "-t") for w in builds] == ["lorif-ray:gpu"], builds
    assert option(builds[0], "-f") == "docker/Dockerfile" and "FLAVOR=gpu" in builds[0]
    assert image.split("/")[-1] == "lorif-ray:gpu", image
    pushes = [w for w in readme_commands() if w[:2] == ["docker", "push"]]
    assert [w[2] for w in pushes] == [image], (pushes, image)  # README pushes what the nodes pull
    if docker.get("pull_before_run"):
        assert "/" in image, "pull_before_run needs an image in a registry"
    dockerfile = (ROOT / "docker/Dockerfile").read_text()
    built = r"#\s+docker build -f docker/Dockerfile -t lorif-ray:gpu \\\n#\s+--build-arg FLAVOR=gpu"
    assert re.search(built, dockerfile)


def test_shared_storage_is_mounted_on_hosts_and_in_containers_where_the_readme_puts_everything():
    config = cluster()
    mounts = [o.split()[1] for o in config["docker"]["run_options"] if o.startswith(("--volume ", "-v "))]
    assert len(mounts) == 1, config["docker"]["run_options"]
    host, container = mounts[0].split(":")[:2]
    assert host == container, mounts  # the same paths on the host and in the container
    assert any("mount " in c and c.rstrip().endswith(f" {host}") for c in config["initialization_commands"]), \
        config["initialization_commands"]
    assert any(f"mountpoint -q {container}" in c for c in config["setup_commands"]), config["setup_commands"]
    submits = [w for w in readme_commands() if w[:3] == ["ray", "job", "submit"]]
    assert submits
    for words in submits:
        keys = ("model.path", "data.train", "data.queries", "output_dir")
        paths = {k: v for k, v in overrides(words).items() if k in keys}
        assert len(paths) == 4 and all(v.startswith(container + "/") for v in paths.values()), paths


def test_the_readme_jobs_and_plans_are_sized_for_the_example_cluster():
    config = cluster()
    gpus = cluster_gpus()
    workers = [n for name, n in config["available_node_types"].items() if name != config["head_node_type"]]
    assert all(n["min_workers"] == n["max_workers"] for n in workers), workers  # started with the cluster
    assert config["max_workers"] == sum(n["max_workers"] for n in workers)
    layout = yaml.safe_load((ROOT / "conf/cluster/gpu_nodes.yaml").read_text())
    for words in [w for w in readme_commands() if w[:3] == ["ray", "job", "submit"]]:
        keys = overrides(words)
        assert keys["cluster"] == "gpu_nodes", keys
        tp = int(keys.get("cluster.tp_size", layout["tp_size"]))
        replicas = int(keys.get("cluster.gradient_actors", layout["gradient_actors"]))
        assert tp * replicas == gpus, (keys, gpus)  # stage 1 uses every GPU, and no more
        assert tp <= 8  # a replica's ranks share one node (STRICT_PACK)
    plans = [overrides(w) for w in readme_commands() if len(w) > 1 and w[1] == "jobs/plan.py"]
    assert plans and all(int(p["num_gpus"]) == gpus for p in plans), (plans, gpus)
    table = (ROOT / "README.md").read_text()
    assert re.findall(r"on (\d+) GPUs", table) and set(re.findall(r"on (\d+) GPUs", table)) == {str(gpus)}
