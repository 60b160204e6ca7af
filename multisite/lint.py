"""Snakemake's lints of the workflow, less the one that does not fit how it is deployed.

``snakemake --lint`` asks every rule for a conda environment or a container. This
workflow runs inside the LSST software stack (cvmfs, or conda's stackvana): every
rule uses the stack the instance was started in, which is what each facility
provides, so per-rule conda environments are not how it is deployed. `check_workflow`
drops exactly that finding and fails on any other::

    python -m multisite.lint            # what ``make lint`` runs
"""

from __future__ import annotations

__all__ = ("IGNORED_LINTS", "check_workflow", "lint_report", "main", "unexpected_lints")

import argparse
import contextlib
import io
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

IGNORED_LINTS = frozenset({"Specify a conda environment or container for each rule."})
"""Titles of the Snakemake lints that do not apply: rules run in the LSST stack, not in conda envs."""


def lint_report(snakefile: str | Path = "Snakefile", workdir: str | Path | None = None) -> dict[str, Any]:
    """Lint a workflow with Snakemake and return its JSON report.

    Parameters
    ----------
    snakefile : `str` or `pathlib.Path`
        The workflow's Snakefile.
    workdir : `str` or `pathlib.Path`, optional
        Directory to lint from (relative paths of the workflow are relative to it);
        the current directory if not given.

    Returns
    -------
    report : `dict`
        ``{"snakefiles": [...], "rules": [...]}``: one item per snakefile or rule
        with findings, ``{"for": {...}, "lints": [{"title", "body", "links"}, ...]}``.

    Notes
    -----
    Snakemake 9's command line accepts ``--lint json`` but prints text (it does not
    pass the format on), so the JSON report is asked of its API, which prints it.
    """
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ResourceSettings

    printed = io.StringIO()
    with SnakemakeApi() as api:
        workflow = api.workflow(
            resource_settings=ResourceSettings(),
            snakefile=Path(snakefile).resolve(),
            workdir=Path(workdir).resolve() if workdir is not None else None,
        )
        with contextlib.redirect_stdout(printed):
            workflow.lint(json=True)
    return json.loads(printed.getvalue())


def _where(item: Mapping[str, Any]) -> str:
    target = item["for"]
    if "rule" in target:
        return f"rule {target['rule']} (line {target.get('line')}, {target.get('snakefile')})"
    return f"snakefile {target.get('snakefile')}"


def unexpected_lints(report: Mapping[str, Any]) -> list[str]:
    """Return the findings of a lint report that are not in `IGNORED_LINTS`.

    Parameters
    ----------
    report : `~collections.abc.Mapping`
        A report from `lint_report`.

    Returns
    -------
    findings : `list` [`str`]
        One line per finding: where, the lint's title and its explanation.
    """
    findings = []
    for section in ("snakefiles", "rules"):
        for item in report.get(section, []):
            for lint in item["lints"]:
                if lint["title"] not in IGNORED_LINTS:
                    findings.append(f"{_where(item)}: {lint['title']} {lint['body']}".strip())
    return findings


def check_workflow(snakefile: str | Path = "Snakefile", workdir: str | Path | None = None) -> list[str]:
    """Lint a workflow and return the findings that matter (empty if none).

    Parameters
    ----------
    snakefile : `str` or `pathlib.Path`
        The workflow's Snakefile.
    workdir : `str` or `pathlib.Path`, optional
        Directory to lint from; the current directory if not given.

    Returns
    -------
    findings : `list` [`str`]
        Every finding but those in `IGNORED_LINTS`.
    """
    return unexpected_lints(lint_report(snakefile, workdir))


def main(argv: Sequence[str] | None = None) -> int:
    """Lint the workflow; print each finding that matters and return 1 if there is any.

    Parameters
    ----------
    argv : `~collections.abc.Sequence` [`str`], optional
        Command-line arguments; those of the process if not given.

    Returns
    -------
    status : `int`
        0 if the workflow has no finding but the ignored ones, else 1.
    """
    parser = argparse.ArgumentParser(prog="python -m multisite.lint", description=__doc__.splitlines()[0])
    parser.add_argument("--snakefile", default="Snakefile", help="the workflow (default: %(default)s)")
    parser.add_argument("--directory", default=None, help="directory to lint from (default: the current one)")
    args = parser.parse_args(argv)
    findings = check_workflow(args.snakefile, args.directory)
    for finding in findings:
        print(finding, file=sys.stderr)
    if findings:
        print(f"{len(findings)} workflow lint finding(s).", file=sys.stderr)
        return 1
    ignored = ", ".join(repr(title) for title in sorted(IGNORED_LINTS))
    print(f"Workflow lint: no findings (ignored, by design: {ignored}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
