"""The command line of every job: the one bootstrap that the thin Hydra entry points in ``jobs/`` call.

    python jobs/attribute.py --help                 # every key with its one-line meaning and current value
    python jobs/attribute.py model.path=/x ...      # error: model.path=/x: no such folder   (exit status 2)
    python jobs/attribute.py debug=true ...         # the same error with its traceback (or LORIF_RAY_DEBUG=1)

What it adds to ``hydra.main``:

- The keys of the command line are checked against the config dataclasses before Hydra composes them; a
  typo'd key names the closest one (``datta.train=x: no such key; did you mean data.train?``).
- Every error raised on purpose (``lorif_ray.errors``, Hydra's for a bad value or option, ``OSError``) ends the
  job with one line on stderr naming the key and value or the file, exit status 2, no traceback; ``debug=true``
  on the command line (it is no config key) or ``LORIF_RAY_DEBUG=1`` shows the traceback. Other exceptions
  (bugs) keep theirs.
- A job over an output folder (``stages``) checks its inputs (``check_before_work``: model folder or Hub id,
  data files, index and curvature) and a local Ray layout before Ray starts or a model loads, then claims the
  folder (``claim_output_dir``). Only then does anything go into ``output_dir``: Hydra's record of the run
  (``.hydra/``) and the run's own log file ``logs/<job>-<YYYYmmdd-HHMMSS-mmm>.log``, with ``<job>.log`` a link
  to the newest one. Hydra itself writes nothing there (``hydra.output_subdir: null``, console-only job logging).

This module is the terminal front end of the package: it writes the error line and ``--help`` itself.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import sys
import time
import traceback
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
DEBUG_ENV = "LORIF_RAY_DEBUG"
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's default job log format
EXIT_ERROR = 2  # a named error: the command line or the inputs are at fault
_TRUE = ("true", "1", "yes", "on")
_BOOLEAN = _TRUE + ("false", "0", "no", "off")

log = logging.getLogger(__name__)
_run_log: logging.FileHandler | None = None  # the log file of the job running in this process


class _JobFailed(BaseException):
    """Carries a job's exception out of Hydra's ``run_job`` (which catches ``Exception`` and prints its own
    lines), so it is reported here once."""

    def __init__(self, error: BaseException):
        super().__init__(error)
        self.error = error


def run_job(task: Callable[[Any], Any], *, config_name: str = "config", schema: type | None = None,
            stages: Sequence[str] = (), doc: str | None = None, argv: Sequence[str] | None = None) -> None:
    """Run ``task(config object)`` as a Hydra job of ``conf/<config_name>.yaml``; exits the process on an error.

    Args:
        task: the job's body; it gets the validated config object (``OmegaConf.to_object``).
        schema: the config dataclass (default: the one ``conf/<config_name>.yaml`` names: ``Config``,
            ``SweepConfig`` or ``PlanJob``): ``--help`` lists its keys, the command line's are checked
            against it.
        stages: what the job runs over ``output_dir`` (some of ``lorif_ray.stages.preflight.PREFLIGHT_STAGES``):
            checked, claimed and logged before ``task`` starts; empty for jobs with their own folders.
        doc: the job's usage text (its module docstring), shown first by ``--help``.
        argv: the command line (default ``sys.argv[1:]``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, debug = _take_debug(argv)
    debug = debug or os.environ.get(DEBUG_ENV, "").lower() in _TRUE
    schema = schema or _register(config_name)
    job = Path(sys.argv[0]).stem or "job"
    if "--help" in argv or "-h" in argv:
        sys.stdout.write(help_text(schema, config_name, [a for a in argv if a not in ("--help", "-h")], doc) + "\n")
        return
    try:
        check_keys(_overrides(argv), schema)
        _run_hydra(task, config_name, stages, job, argv)
    except _JobFailed as failed:
        _exit(failed.error, debug)
    except (Exception, KeyboardInterrupt) as error:  # before the job: the command line did not compose
        _exit(error, debug, command_line=True)


def _take_debug(argv: list[str]) -> tuple[list[str], bool]:
    """The command line without ``debug=<bool>`` (a flag of this bootstrap, no config key), and its value."""
    rest, debug = [], False
    for arg in argv:
        key, _, value = arg.lstrip("+").partition("=")
        if key == "debug" and value.lower() in _BOOLEAN:
            debug = value.lower() in _TRUE
        else:
            rest.append(arg)
    return rest, debug


def _run_hydra(task, config_name: str, stages: Sequence[str], job: str, argv: list[str]) -> None:
    import hydra

    def body(dict_config) -> Any:
        try:
            from lorif_ray.config import from_hydra

            cfg = from_hydra(dict_config)
            if stages:
                cfg = prepare_output(cfg, stages, job, dict_config)
            return task(cfg)
        except (Exception, KeyboardInterrupt) as error:
            raise _JobFailed(error) from error

    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its composition errors; this module reports them
    if not any(a.startswith("hydra.job.name=") for a in argv):
        argv = [*argv, f"hydra.job.name={job}"]  # Hydra would name the job after this module
    saved = sys.argv
    sys.argv = [saved[0], *argv]
    try:
        hydra.main(version_base=None, config_path=str(CONF_DIR), config_name=config_name)(body)()
    finally:
        sys.argv = saved


def prepare_output(cfg, stages: Sequence[str], job: str, dict_config=None):
    """Check ``stages``' inputs and local Ray layout, claim ``output_dir``, then write the run's record and start
    its log file there; returns ``cfg`` with the model resolved (``check_before_work``)."""
    from lorif_ray.distributed.backends import check_ray_layout
    from lorif_ray.outputs.folders import claim_output_dir
    from lorif_ray.stages.preflight import check_before_work

    cfg = check_before_work(cfg, stages)
    check_ray_layout(cfg, stages)
    claim_output_dir(cfg)
    if dict_config is not None:
        record_run(Path(cfg.output_dir), dict_config)
    start_run_log(Path(cfg.output_dir), job)
    return cfg


def record_run(output_dir: Path, dict_config) -> None:
    """Hydra's record of the run in ``<output_dir>/.hydra/``: config.yaml, hydra.yaml, overrides.yaml (the
    latest run's, as Hydra writes them)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    folder = output_dir / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(dict_config, folder / "config.yaml")
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        OmegaConf.save(OmegaConf.create({"hydra": OmegaConf.to_container(hydra_cfg, resolve=False)}),
                       folder / "hydra.yaml")
        OmegaConf.save(hydra_cfg.overrides.task, folder / "overrides.yaml")


def start_run_log(output_dir: Path, job: str) -> Path:
    """Log this run to its own file ``<output_dir>/logs/<job>-<YYYYmmdd-HHMMSS-mmm>.log`` (root logger, INFO,
    Hydra's format) and point ``<output_dir>/<job>.log`` at it, so the newest run's log is always at the same path
    (``ls <output_dir>/logs`` lists every run's, oldest first). A ``<job>.log`` of an older version (one file
    appended by every run) moves into ``logs/`` first."""
    logs = output_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    now = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + f"-{int(now * 1000) % 1000:03d}"
    path, n = logs / f"{job}-{stamp}.log", 1
    while path.exists():  # names sort by time; two runs in one millisecond get a count
        n += 1
        path = logs / f"{job}-{stamp}{n}.log"
    global _run_log
    root = logging.getLogger()
    if _run_log is not None:  # the previous job of a multirun: its file ends here
        root.removeHandler(_run_log)
        _run_log.close()
    handler = _run_log = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    latest = output_dir / f"{job}.log"
    try:
        if latest.is_file() and not latest.is_symlink():
            latest.replace(logs / f"{job}-before-{stamp}.log")
        link = output_dir / f".{job}.log.{os.getpid()}"
        link.unlink(missing_ok=True)
        link.symlink_to(Path("logs") / path.name)
        link.replace(latest)
    except OSError as error:  # a file system without links: the newest file in logs/ is the run's
        log.debug("no %s link (%s); the run logs to %s", latest, error, path)
    return path


# ---------------------------------------------------------------- errors


def _exit(error: BaseException, debug: bool, command_line: bool = False) -> typing.NoReturn:
    """Report ``error`` and end the process: one line for a named error (``command_line``: any error of
    composing the command line), its traceback too with ``debug``."""
    if isinstance(error, KeyboardInterrupt):
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    message = one_line(error)
    if message is None and command_line:
        message = f"the command line does not compose ({type(error).__name__}: {_flatten(str(error))})"
    if message is None or debug:
        traceback.print_exception(type(error), error, error.__traceback__)
    if message is None:
        sys.exit(1)
    if _run_log is not None:  # the run's log file (if started) records the error too
        _run_log.emit(logging.LogRecord("lorif_ray.cli", logging.ERROR, __file__, 0, message, None, None))
    sys.stderr.write(f"error: {message}\n")
    sys.exit(EXIT_ERROR)


def one_line(error: BaseException) -> str | None:
    """The one-line report of an error raised on purpose; None for anything else (a bug: keep its traceback)."""
    from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    from lorif_ray.errors import LorifError

    cause = getattr(error, "cause", None)  # a Ray task's error (RayTaskError): its cause is what was raised
    if isinstance(cause, BaseException) and type(error).__module__.startswith("ray."):
        error = cause
    if isinstance(error, MissingConfigException) and error.options and error.missing_cfg_file:
        group, _, choice = error.missing_cfg_file.rpartition("/")
        close = difflib.get_close_matches(choice, error.options, n=1)
        suggestion = f"; did you mean {group}={close[0]}?" if close else ""
        return f"{group}={choice}: no such option; choose one of {', '.join(error.options)}{suggestion}"
    if isinstance(error, ConfigCompositionException) and isinstance(error.__cause__, OmegaConfBaseException):
        detail = error.__cause__
        override = re.search(r"override (\S+)", str(error))  # "Error merging override f=abc"
        where = override.group(1) if override else getattr(detail, "full_key", None) or _first_line(str(error))
        return f"{where}: {_first_line(getattr(detail, 'msg', None) or str(detail))}"
    if isinstance(error, (LorifError, HydraException, OmegaConfBaseException, OSError)):
        return _flatten(str(error)) or type(error).__name__
    return None


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _flatten(text: str) -> str:
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


# ---------------------------------------------------------------- keys


@dataclasses.dataclass(frozen=True)
class Key:
    """One key of a config schema: its dotted name, one-line meaning, and whether keys below it are free (a
    dict or list value, e.g. ``model.arch.hidden_size``)."""

    name: str
    help: str
    open: bool = False
    node: bool = False


def schema_keys(schema: type, prefix: str = "") -> list[Key]:
    """Every key of a config dataclass, depth first in field order (nested dataclasses are nodes)."""
    from lorif_ray.config import help_of

    hints = typing.get_type_hints(schema)
    keys = []
    for f in dataclasses.fields(schema):
        name, kind = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(kind):
            keys.append(Key(name, help_of(f), node=True))
            keys += schema_keys(kind, name + ".")
        else:
            open_ = any(typing.get_origin(t) in (dict, list) for t in (kind, *typing.get_args(kind)))
            keys.append(Key(name, help_of(f), open=open_))
    return keys


def config_groups(config_name: str) -> list[str]:
    """The config groups of ``conf/`` (folders of presets: model, data, method, cluster, eval)."""
    return sorted(d.name for d in CONF_DIR.iterdir() if d.is_dir() and d.name != "hydra")


def _overrides(argv: Iterable[str]) -> list:
    """The key=value arguments of a command line, parsed as Hydra parses them (flags dropped)."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args, _ = get_args_parser().parse_known_args(list(argv))
    return OverridesParser.create().parse_overrides(args.overrides)


def check_keys(overrides: Sequence, schema: type) -> None:
    """Refuse a key the schema does not have, naming the closest key (Hydra's own keys are not checked).

    Raises:
        ConfigError: ``<override>: no such key; did you mean <key>?``.
    """
    from lorif_ray.errors import ConfigError

    keys = schema_keys(schema)
    names = {k.name for k in keys}
    open_prefixes = tuple(k.name + "." for k in keys if k.open)
    groups = set(config_groups(""))
    for override in overrides:
        key = override.key_or_group
        if override.is_delete() or override.package is not None or key.startswith(("hydra.", "hydra/")):
            continue
        if key == "hydra" or key in names or key in groups or key.startswith(open_prefixes):
            continue
        raise ConfigError(f"{override.input_line}: no such key{_suggest(key, names | groups)}")


def _suggest(key: str, names: set[str]) -> str:
    """"; did you mean <closest>?" (a key of the same last part first), or a pointer to ``--help``."""
    last = key.rpartition(".")[2]
    same_leaf = sorted(n for n in names if n.rpartition(".")[2] == last)
    close = same_leaf[:1] or difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.6)
    if not close:  # a typo in the first part: compare the leaf with each key's leaf
        leaves = {n.rpartition(".")[2]: n for n in sorted(names)}
        close = [leaves[m] for m in difflib.get_close_matches(last, list(leaves), n=1, cutoff=0.75)]
    return f"; did you mean {close[0]}?" if close else "; --help lists every key"


# ---------------------------------------------------------------- --help


def help_text(schema: type, config_name: str, overrides: Sequence[str] = (), doc: str | None = None) -> str:
    """``--help``: the job's usage, its config groups, then every key with its one-line meaning and its value in
    the composed config (of ``overrides``, e.g. ``--help model=llama_70b``)."""
    values, choices = _composed(config_name, overrides)
    lines = [doc.strip(), ""] if doc else []
    lines.append("Config groups (group=option picks a preset from conf/<group>/):")
    for group in config_groups(config_name):
        if group in choices:
            options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
            lines.append(f"  {group:<10} {choices[group]}   (options: {', '.join(options)})")
    lines += ["", "Keys (key=value on the command line; the value shown is this command line's):"]
    keys = [k for k in schema_keys(schema) if not k.node]
    width = min(32, max(len(k.name) for k in keys) + 2)
    for key in keys:
        value = _format_value(_lookup(values, key.name))
        lines.append(f"  {key.name:<{width}}{key.help}  [{value}]")
    lines += ["", "Flags:",
              f"  debug=true  (or {DEBUG_ENV}=1) an error shows its traceback; without it an error is one line "
              "naming the key and value, exit status 2",
              "  -m / --multirun  sweep comma-separated values (a Hydra multirun), e.g. -m method=lorif,logra",
              "  --cfg job  print the composed config;  --hydra-help  Hydra's own options"]
    return "\n".join(lines)


def _composed(config_name: str, overrides: Sequence[str]) -> tuple[dict, dict]:
    """(the composed config as a plain dict, unresolved; {group: choice}); empty when it does not compose."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    _register(config_name)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(config_name, overrides=[o for o in overrides if not o.startswith("-")],
                          return_hydra_config=True)
    except Exception:  # noqa: BLE001 - help still lists the keys, with the dataclass defaults
        return {}, {}
    choices = {k: v for k, v in OmegaConf.to_container(cfg.hydra.runtime.choices).items() if "/" not in k}
    values = OmegaConf.to_container(cfg, resolve=False)
    values.pop("hydra", None)
    return values, choices


def _register(config_name: str) -> type:
    """Register with Hydra the schema that ``conf/<config_name>.yaml`` names, and return it."""
    if config_name == "sweep":
        from lorif_ray.eval.config import SweepConfig, register_sweep_configs

        register_sweep_configs()
        return SweepConfig
    if config_name == "plan":
        from lorif_ray.plan import PlanJob, register_plan_config

        register_plan_config()
        return PlanJob
    from lorif_ray.config import Config, register_configs

    register_configs()
    return Config


def _lookup(values: dict, dotted: str) -> Any:
    node: Any = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return "?"
        node = node[part]
    return node


def _format_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
