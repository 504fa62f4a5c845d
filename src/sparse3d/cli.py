"""What every Hydra entry point shares (layer 3): the config folder, one-line user errors.

Bad input from the user raises ``UserError``; ``run_hydra`` reports it as one ``error:`` line on
stderr with exit code 2 instead of a traceback. Before Hydra runs (and creates the run folder),
unknown choices of a config group (``experiment=nonsense``) are reported naming the available
ones, and the config is composed once from the command line's overrides so that a wrong type, an
unknown key of a typed block or a value out of its range (the ``__post_init__`` of a structured
config) is one line naming the override.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: File suffixes read as sparse3d HDF5 volumes; anything else goes through the importer.
H5_SUFFIXES = (".h5", ".hdf5")


def _conf_dir() -> Path:
    """The config tree: ``sparse3d/conf`` inside a wheel install, else the repository's ``conf/``."""
    packaged = Path(__file__).resolve().parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "conf"


CONF_DIR = _conf_dir()


class UserError(Exception):
    """Bad input from the user: reported as one line, no traceback."""


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def precheck_groups(argv: list[str]) -> None:
    """Unknown config choices (experiment=..., model=...) as one line, before Hydra runs."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        if not sep or "/" in key or key.startswith("hydra"):
            continue
        group = CONF_DIR / key
        if group.is_dir():
            options = sorted(p.stem for p in group.glob("*.yaml"))
            for v in value.split(","):
                if v and v not in options:
                    raise UserError(f"unknown {key} {v!r}: choose one of {', '.join(options)}")


class _NoAdverts(logging.Filter):
    """Drops Lightning's tips that advertise cloud services."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip:")


def quiet_lightning() -> None:
    """Lightning's messages once, through the handlers Hydra set up (console and the run's log
    file), without its cloud-service tips. Call after importing Lightning (its import adds
    console handlers of its own)."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        for handler in list(lg.handlers):
            lg.removeHandler(handler)
        lg.propagate = True
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdverts())
    # Lightning's own use of a torch API it deprecated; nothing a user can act on
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def _is_hydra_key(arg: str) -> bool:
    return arg.lstrip("+~").partition("=")[0].startswith("hydra")


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


def _override_of(key: str, overrides: list[str]) -> str:
    """The command-line override that sets ``key`` (the last one), else ``key`` itself."""
    for arg in reversed(overrides):
        if arg.lstrip("+~").partition("=")[0] == key:
            return arg
    return key


def _composition_error(err: Exception, overrides: list[str]) -> str:
    """One line for a failed composition: the override and the reason."""
    cause = err.__cause__ or err.__context__
    if cause is not None and getattr(cause, "full_key", None):
        reason = _first_line(cause)
        typed = dataclasses.is_dataclass(getattr(cause, "object_type", None))
        _, hint, append = str(err).partition("To append to your config use ")
        if hint and not typed:  # a new key of an untyped block: Hydra's hint, on the same line
            reason += f" (to add it, use {append.split()[0]})"
        return f"{_override_of(str(cause.full_key), overrides)}: {reason}"
    if getattr(err, "full_key", None):  # an OmegaConf error raised directly (~key)
        return f"{_override_of(str(err.full_key), overrides)}: {_first_line(err)}"
    return "; ".join(ln.strip() for ln in str(err).splitlines()[:2] if ln.strip())


def _check_typed(node: Any, path: str, overrides: list[str]) -> None:
    """Every block of ``node`` typed by a dataclass: no key it lacks, ranges of its
    ``__post_init__`` (raises UserError)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, ListConfig):
        for i in range(len(node)):
            _check_typed(node._get_node(i), f"{path}[{i}]", overrides)
        return
    if not isinstance(node, DictConfig) or node._is_none() or node._is_missing():
        return
    kind = OmegaConf.get_type(node)
    if kind is not None and dataclasses.is_dataclass(kind):
        fields = {f.name for f in dataclasses.fields(kind)}
        for key in node.keys():
            if key not in fields:
                full = f"{path}.{key}" if path else str(key)
                raise UserError(
                    f"{_override_of(full, overrides)}: Key {key!r} not in {kind.__name__!r}"
                )
        try:
            OmegaConf.to_object(node)
        except ValueError as err:  # the ranges of __post_init__, and OmegaConf's validation
            raise UserError(_first_line(err)) from None
        except Exception:  # noqa: BLE001 - e.g. an interpolation only Hydra's run resolves
            pass
        return
    for key in node.keys():
        _check_typed(node._get_node(key), f"{path}.{key}" if path else str(key), overrides)


def precompose(config_name: str, argv: list[str]) -> Any:
    """``conf/<config_name>.yaml`` composed with the overrides in ``argv``, checked; None where
    Hydra's own options are given (``-m``, ``--cfg``, ``--help``, ...) or nothing but ``hydra.*``
    overrides, which only Hydra handles.

    Raises:
        UserError: an override that does not parse, a value of the wrong type, a key that is not
            in the config or its typed block, a value out of the range of a typed block.
    """
    if any(arg.startswith("-") for arg in argv):
        return None
    overrides = [arg for arg in argv if not _is_hydra_key(arg)]
    if not overrides:
        return None
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            cfg = compose(config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(_composition_error(err, overrides)) from None
    except Exception:  # noqa: BLE001 - anything else: Hydra's own run reports it
        return None
    _check_typed(cfg, "", overrides)
    return cfg


def run_hydra(
    config_name: str, task: Callable[[Any], None], check: Callable[[Any], Any] | None = None
) -> None:
    """Run ``task(cfg)`` under Hydra with ``conf/<config_name>.yaml``; user errors as one line.

    The command line is checked before Hydra runs (:func:`precheck_groups`, :func:`precompose`);
    ``check(cfg)``, given, runs on that composed config too, so the command's own checks that
    raise UserError also come before the run folder exists.
    """
    import hydra

    try:
        precheck_groups(sys.argv[1:])
        cfg = precompose(config_name, sys.argv[1:])
        if cfg is not None and check is not None:
            check(cfg)
    except UserError as e:
        fail(str(e))

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)
    def _run(cfg) -> None:
        try:
            task(cfg)
        except UserError as e:
            fail(str(e))

    _run()
