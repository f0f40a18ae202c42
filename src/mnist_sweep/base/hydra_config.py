"""Hydra glue shared by the entry points: where the config tree is, composing a trial's config
(cached), checking overrides, the Hydra app wrapper, one-paragraph errors and a quick exit."""

from __future__ import annotations

import copy
import functools
import os
import re
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mnist_sweep.base.errors import ConfigError, report, user_errors_exit
from mnist_sweep.base.interrupts import INTERRUPTS


def shipped_folder(package: str) -> Path:
    """A folder shipped in the package (conf/ and sweeps/ of the repository, installed as
    mnist_sweep.conf and mnist_sweep.sweeps): found wherever the package is installed. An
    editable install (`make install`) puts src/ on the path instead: the repository's folder."""
    import importlib.resources

    try:
        return Path(str(importlib.resources.files(package)))
    except ModuleNotFoundError:
        repository = Path(__file__).resolve().parents[3]  # above src/mnist_sweep/base/
        return repository / package.rsplit(".", 1)[-1]


# Config keys that say where and how a trial runs, not what it is: not a run's params (tags, or
# nothing), not part of a study's definition (they may differ between machines and restarts).
LOCAL_KEYS = (
    "tracking",
    "train.device",
    "train.threads",
    "train.progress",
    "train.cuda_graphs",
    "data.root",
    "data.download",
    "debug",
    "hydra",
)

# The config tree; MNIST_SWEEP_CONF may point at another.
CONF_DIR = Path(os.environ.get("MNIST_SWEEP_CONF") or shipped_folder("mnist_sweep.conf"))


def resolved(cfg: DictConfig) -> dict[str, Any]:
    """A mapping node as plain Python (a dict), its interpolations resolved."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict), f"a mapping node, not {type(plain).__name__}"
    return {str(key): value for key, value in plain.items()}


def exit_now(code: int = 0) -> None:
    """End the command once everything is written, without the interpreter's teardown of torch,
    MLflow and the rest (~1.3 s here, after the user has the result): output flushed, atexit
    handlers run (MLflow's and multiprocessing's among them), then the process ends."""
    import atexit

    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(code)


def config_groups(conf_dir: Path = CONF_DIR) -> dict[str, list[str]]:
    """{group: [options]} of the config tree, e.g. {"schedule": ["cosine", ..., "step"]}."""
    return {group: list(options) for group, options in _config_groups(conf_dir)}


@functools.lru_cache(maxsize=8)
def _config_groups(conf_dir: Path) -> tuple:
    return tuple(
        (d.name, tuple(sorted(p.stem for p in d.glob("*.yaml"))))
        for d in sorted(conf_dir.iterdir())
        if d.is_dir() and d.name[0] not in "_."
    )


_initialized_dir: str | None = None


def _hydra_for(conf_dir: Path) -> None:
    """Initialize Hydra's compose API for `conf_dir` once per process (it costs ~60 ms)."""
    global _initialized_dir
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if _initialized_dir != str(conf_dir) or not GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
        initialize_config_dir(str(conf_dir), version_base="1.3")
        _initialized_dir = str(conf_dir)


def release_hydra() -> None:
    global _initialized_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    _initialized_dir = None


def compose(
    overrides: list[str], conf_dir: Path = CONF_DIR, config_name: str = "config", check: bool = True
) -> DictConfig:
    """The composed config for `overrides`, or a ConfigError naming the bad override.
    `check=False` skips the friendly override check (for overrides already checked)."""
    if check:
        check_overrides(overrides, conf_dir, config_name)
    with _COMPOSING:
        return copy.deepcopy(_composed(tuple(overrides), conf_dir, config_name))


# Hydra's compose API is one global per process; threads that compose (the scale-out
# benchmark's simulated workers) take turns.
_COMPOSING = threading.RLock()


@functools.lru_cache(maxsize=256)
def _composed(overrides: tuple[str, ...], conf_dir: Path, config_name: str) -> DictConfig:
    """Hydra's compose, once per distinct override list (~60 ms each; a sweep asks for the same
    ones many times: its checks, each worker, each trial's choice of group options)."""
    from hydra import compose as hydra_compose

    _hydra_for(conf_dir)
    try:
        return hydra_compose(config_name, overrides=list(overrides))
    except Exception as error:  # anything check_overrides did not foresee
        raise ConfigError(
            f"The overrides {' '.join(overrides)} cannot be applied: {' '.join(str(error).split())}"
        ) from None


def compose_trial(overrides: list[str], values: dict, conf_dir: Path = CONF_DIR) -> DictConfig:
    """compose(overrides + to_overrides(values)) for a trial's sampled values, but composed once
    per choice of config-group options (cached) with the other values set on a copy: ~1 ms
    instead of ~60 ms a trial. Values win over overrides, as they come after them. (A worker's
    placement, train.device and train.threads, comes as values too: its trials' configs are
    then the ones the sweep's checks composed.)"""
    groups = config_groups(conf_dir)
    chosen = {k: v for k, v in values.items() if k in groups}
    cfg = compose([*overrides, *to_overrides(chosen)], conf_dir, check=False)
    for key, value in values.items():
        if key not in groups:
            try:
                OmegaConf.update(cfg, key, value, merge=False)
            except OmegaConfBaseException as error:  # a key the fixed overrides deleted, say
                raise ConfigError(
                    f"{key}={value!r} cannot be set on the config of the overrides "
                    f"{' '.join(overrides) or '(none)'}: {' '.join(str(error).split())}"
                ) from None
    return cfg


def check_overrides(
    overrides: list[str],
    conf_dir: Path = CONF_DIR,
    config_name: str = "config",
    reference: list[str] | None = None,
) -> None:
    """Raise a ConfigError naming the first override that names an unknown group option or key.
    Keys are looked up in the config composed with `reference` (default: the overrides' group
    choices): overrides with the same group choices whose config is composed anyway (cached)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as error:
        raise ConfigError(
            f"Cannot parse the override(s) {' '.join(overrides)}: {' '.join(str(error).split())}"
        ) from None
    groups = config_groups(conf_dir)
    plain = [o for o in parsed if not o.key_or_group.startswith("hydra")]
    for o in plain:  # group options first: they decide which keys exist
        if o.key_or_group in groups and not o.is_delete() and not o.is_sweep_override():
            option = o.value()
            if not isinstance(option, str) or option not in groups[o.key_or_group]:
                raise ConfigError(
                    f"{o.input_line} names no option of the config group "
                    f"{o.key_or_group!r}: allowed are "
                    f"{', '.join(groups[o.key_or_group])}."
                )
    group_choices = tuple(str(o.input_line) for o in plain if o.key_or_group in groups)
    deletes = [o for o in plain if o.is_delete() and o.key_or_group not in groups]
    # A deleted key is looked up where it still exists (the group choices' config), so that its
    # delete is checked before any config that applies it is composed; every other key in the
    # config the trials compose (`reference`), where added (+key) and deleted (~key) keys are
    # already applied.
    if deletes or reference is None:
        choices_config = _composed(group_choices, conf_dir, config_name)
        for o in deletes:
            _check_key_exists(o, choices_config)
    base = (
        choices_config if reference is None else _composed(tuple(reference), conf_dir, config_name)
    )
    for o in plain:
        if o.key_or_group in groups or o.is_add() or o.is_force_add() or o.is_delete():
            continue
        _check_key_exists(o, base)


def _check_key_exists(override: Any, config: DictConfig) -> None:
    """A ConfigError unless the key `override` sets or deletes is in `config`."""
    parent_key, _, leaf = override.key_or_group.rpartition(".")
    parent = OmegaConf.select(config, parent_key) if parent_key else config
    if isinstance(parent, DictConfig) and leaf in parent:
        return
    where = f"the {parent_key!r} config" if parent_key else "the top-level config"
    keys = (
        ", ".join(str(k) for k in parent.keys() if k != "hydra")
        if isinstance(parent, DictConfig)
        else "none"
    )
    hint = "" if override.is_delete() else f" To add a new key use +{override.input_line}."
    raise ConfigError(
        f"{override.input_line} {'deletes' if override.is_delete() else 'overrides'} a key that "
        f"does not exist: {override.key_or_group!r} is not in {where}, whose keys are: "
        f"{keys}.{hint}"
    )


def _command_line_overrides(argv: list[str]) -> tuple[list[str], bool]:
    """(overrides, whether Hydra runs a job with them) as Hydra's own argument parser sees them."""
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(argv)
    informational = args.help or args.hydra_help or args.info or args.shell_completion
    return args.overrides, not (informational or args.multirun)


def run_hydra_app(task: Callable[[DictConfig], object], config_name: str = "config") -> None:
    """Run `task` as a Hydra app over conf/, turning UserErrors into one-paragraph exits."""
    INTERRUPTS.install()  # Ctrl-C and SIGTERM end the run KILLED (see interrupts.py)
    overrides, runs_job = _command_line_overrides(sys.argv[1:])
    if runs_job:
        try:
            check_overrides(overrides, CONF_DIR, config_name)
        except ConfigError as error:
            report(error)
            raise SystemExit(error.exit_code) from None
        release_hydra()  # hydra.main initializes its own

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)
    def app(cfg: DictConfig) -> None:
        with user_errors_exit(debug=bool(cfg.get("debug", False))):
            task(cfg)

    try:
        app()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None
    exit_now(0)


# ----------------------------------------------------------------------------- overrides

_PLAIN = re.compile(r"^[A-Za-z0-9_.:/\-+]+$")


def override_value(value: Any) -> str:
    """A sampled value written back in Hydra's override syntax, so that Hydra reads back the
    same value of the same type: the string "1", "true" or "null" is quoted (unquoted, Hydra
    would make it an int, a bool or None)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if _PLAIN.match(text) and _reads_back_as(text) == text:
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _reads_back_as(text: str) -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(f"k={text}").value()
    except Exception:
        return None


def to_overrides(values: Mapping[str, Any]) -> list[str]:
    return [f"{key}={override_value(value)}" for key, value in values.items()]
