"""Static checks of the cluster image: the Dockerfile parses, its Ray base image and pip installs
match pyproject.toml's pins, and the example cluster config runs that image. No Docker daemon needed."""

import re
import shlex
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
                "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: comments dropped, backslash continuations joined."""
    out, pending = [], ""
    for line in text.splitlines():
        if line.strip().startswith("#") or (not pending and not line.strip()):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, args = pending.strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, f"dangling continuation: {pending!r}"
    return out


def substitute(text: str, args: dict[str, str]) -> str:
    """Expands ${NAME} and $NAME with the ARG defaults; an unknown name fails."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], text)


def dockerfile() -> list[tuple[str, str]]:
    return instructions((ROOT / "docker/Dockerfile").read_text())


def dependencies() -> dict[str, Requirement]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {(r := Requirement(line)).name: r for line in pyproject["project"]["dependencies"]}


def arg_defaults(lines) -> dict[str, str]:
    return dict(args.split("=", 1) for keyword, args in lines if keyword == "ARG" and "=" in args)


def pip_installs(lines) -> list[list[str]]:
    """The arguments of every `pip install` in RUN instructions, ARGs expanded, options dropped."""
    defaults, installs = arg_defaults(lines), []
    for keyword, args in lines:
        if keyword != "RUN":
            continue
        for command in re.split(r"&&|;", args):
            words = shlex.split(substitute(command, defaults))
            if words[:2] == ["pip", "install"] or words[:4] == ["python", "-m", "pip", "install"]:
                words = words[words.index("install") + 1:]
                keep, skip = [], False
                for w in words:
                    if skip:
                        skip = False
                    elif w in ("--index-url", "-i", "--extra-index-url", "-c", "-r"):
                        skip = True
                    elif not w.startswith("-"):
                        keep.append(w)
                installs.append(keep)
    return installs


def test_every_instruction_is_known_and_continuations_join():
    lines = dockerfile()
    assert {k for k, _ in lines} <= INSTRUCTIONS, {k for k, _ in lines} - INSTRUCTIONS
    assert sum(k == "FROM" for k, _ in lines) == 1
    run = [a for k, a in lines if k == "RUN" and "pip install" in a]
    assert len(run) == 1 and run[0].count("pip install") == 2  # three physical lines joined into one RUN


def test_base_image_is_ray_at_the_pinned_version():
    lines = dockerfile()
    ray = dependencies()["ray"]
    assert "default" in ray.extras and str(ray.specifier).startswith("==")
    defaults = arg_defaults(lines)
    image = substitute(next(a for k, a in lines if k == "FROM"), defaults)
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-(cpu|gpu|cu\d+)", image)
    assert match, image
    assert match.group(1) == str(ray.specifier)[2:], (image, str(ray))


def test_pip_installs_exactly_the_pyproject_dependencies():
    """The project itself (`.`, from the copied pyproject.toml) brings every pin; the only other package
    installed is torch, pinned as the Makefile pins it and inside pyproject's range."""
    lines = dockerfile()
    installs = pip_installs(lines)
    assert installs[-1] == ["."], installs
    copied = [a.split() for k, a in lines if k == "COPY"]
    assert any("pyproject.toml" in words[:-1] for words in copied), copied
    deps = dependencies()
    extra = [Requirement(spec) for words in installs[:-1] for spec in words]
    assert [r.name for r in extra] == ["torch"], extra
    torch_pin = extra[0]
    make_pin = re.search(r"^TORCH_SPEC \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert str(torch_pin) == make_pin, (str(torch_pin), make_pin)
    version = str(torch_pin.specifier)[2:]
    assert str(torch_pin.specifier).startswith("==") and deps["torch"].specifier.contains(version), (torch_pin, deps["torch"])


def test_cluster_config_runs_the_image():
    cluster = yaml.safe_load((ROOT / "docker/cluster.yaml").read_text())
    images = [cluster["docker"][k] for k in ("image", "head_image", "worker_image") if k in cluster["docker"]]
    assert images and all(image.split("/")[-1].startswith("lorif-ray:") for image in images), images
    assert "--build-arg FLAVOR=gpu" in (ROOT / "docker/cluster.yaml").read_text()
    nodes = cluster["available_node_types"]
    assert cluster["head_node_type"] in nodes and len(nodes) >= 2
    assert cluster["max_workers"] >= max(n.get("max_workers", 0) for n in nodes.values())
