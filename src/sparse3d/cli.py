"""What every Hydra entry point shares (layer 3): the config folder, one-line user errors.

Bad input from the user raises ``UserError``; ``run_hydra`` reports it as one ``error:`` line on
stderr with exit code 2 instead of a traceback. Unknown choices of a config group
(``experiment=nonsense``) are caught before Hydra runs, naming the available ones.
"""

from __future__ import annotations

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


def run_hydra(config_name: str, task: Callable[[Any], None]) -> None:
    """Run ``task(cfg)`` under Hydra with ``conf/<config_name>.yaml``; user errors as one line."""
    import hydra

    try:
        precheck_groups(sys.argv[1:])
    except UserError as e:
        fail(str(e))

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)
    def _run(cfg) -> None:
        try:
            task(cfg)
        except UserError as e:
            fail(str(e))

    _run()
