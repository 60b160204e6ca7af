"""The demo campaign config relocated into a directory, for tests and benchmarks that run it there."""

from __future__ import annotations

__all__ = ("relocate_config",)

from pathlib import Path
from typing import Any

import yaml


def relocate_config(
    config_path: str | Path, directory: str | Path, base: str | Path = ".", **overrides: Any
) -> Path:
    """Copy a campaign config into ``directory`` with its work area and repositories there.

    Parameters
    ----------
    config_path : `str` or `pathlib.Path`
        The campaign config to copy (its units table is copied too).
    directory : `str` or `pathlib.Path`
        Where the copy, its units table and its ``work`` area go.
    base : `str` or `pathlib.Path`
        Directory the original config's relative paths are relative to.
    **overrides
        Top-level keys to replace.

    Returns
    -------
    path : `pathlib.Path`
        The new config file.
    """
    config_path, directory = Path(config_path), Path(directory)
    config = yaml.safe_load(config_path.read_text())
    units = Path(config["units"])
    units = units if units.is_absolute() else Path(base) / units
    config["workdir"] = str(directory / "work")
    config["units"] = str(directory / "units.tsv")
    for name, site in config["sites"].items():
        site["repo"] = str(directory / "work" / "sites" / name / "repo")
    config.update(overrides)
    (directory / "units.tsv").write_text(units.read_text())
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
