"""The package's exceptions, and the kind of campaign event each one records.

Each exception keeps the built-in base it always had (`ValueError` for bad
input, `RuntimeError` for a step that did not deliver), so ``except`` clauses
written against those bases behave the same. `event_kind` is the one place that
decides which event a failed step records.
"""

from __future__ import annotations

__all__ = (
    "CampaignConfigError",
    "DamagedFilesError",
    "HandoffError",
    "InventoryError",
    "PlacementError",
    "PlanChangedError",
    "PlanInputError",
    "QAFailed",
    "RucioHandoffError",
    "RucioTransferStuck",
    "StageFailed",
    "event_kind",
)

from .states import EventKind


class CampaignConfigError(ValueError):
    """The campaign configuration is invalid; the message lists every problem and its fix.

    Parameters
    ----------
    source : `str`
        Where the configuration came from (a file, or ``config`` for a mapping).
    problems : `list` [`str`]
        One sentence per problem, naming the field and how to fix it.
    """

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        super().__init__(
            f"{source}: invalid campaign configuration:\n" + "\n".join(f"  - {p}" for p in problems)
        )


class PlanChangedError(CampaignConfigError):
    """The units table or the chunking changed after the campaign's plan was made.

    Parameters
    ----------
    source : `str`
        Where the configuration came from.
    marker : `str`
        The plan marker that records the plan the campaign runs.
    changes : `list` [`str`]
        Each unit moved, added or removed, and each changed field.
    """

    def __init__(self, source: str, marker: str, changes: list[str]):
        self.changes = changes
        listing = "\n".join(f"    {change}" for change in changes[:50])
        more = f"\n    ... and {len(changes) - 50} more" if len(changes) > 50 else ""
        super().__init__(
            source,
            [
                f"units / stages: the plan differs from the one this campaign runs ({marker}):\n"
                f"{listing}{more}\n"
                "  Nothing was run: markers already written belong to the recorded plan, and running a "
                "changed one would redo delivered work or mark a unit done where it did not run. Put the "
                "units table and stages back as the plan marker records them (its 'plan' field), then move "
                "units with `multisite move <config> --unit U... --to SITE` (or drain a site with `--from "
                "SITE --to SITE,...`), which checks that nothing begun changes; or start the changed plan "
                "in a new work directory."
            ],
        )


class InventoryError(ValueError):
    """An inventory or visits table cannot be used; the message names the problem and its fix."""


class PlacementError(ValueError):
    """The planner's inputs are inconsistent; the message lists each problem and its fix.

    Parameters
    ----------
    problems : `list` [`str`]
        One sentence per problem, each naming the input (``shares``, ``pins``,
        ``assignment``, ``inventory``, ...) and how to fix it.
    """

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("cannot plan the placement:\n" + "\n".join(f"  - {p}" for p in problems))


class PlanInputError(ValueError):
    """An option of ``multisite plan`` cannot be used; the message names it and the fix."""


class HandoffError(RuntimeError):
    """A hand-off did not deliver everything it should have."""


class DamagedFilesError(HandoffError):
    """Files at a site are missing or differ from what their source recorded.

    The message names each file (Butler-relative path, dataset type and data ID)
    and how to repair it (`multisite.integrity.damaged_files` writes it).

    Parameters
    ----------
    message : `str`
        The message.
    site : `str`
        The site holding the files.
    damage : `list`
        The files (`multisite.integrity.Damage`).
    """

    def __init__(self, message: str, site: str, damage: list):
        super().__init__(message)
        self.site = site
        self.damage = damage


class RucioHandoffError(HandoffError):
    """A Rucio hand-off failed; the message names the files, the rule and Rucio's reasons."""


class RucioTransferStuck(RucioHandoffError):
    """A Rucio rule is STUCK, SUSPENDED or did not finish in time: operators are notified as stuck."""


class StageFailed(RuntimeError):
    """Quanta of a stage failed; the message names them and their logs."""


class QAFailed(RuntimeError):
    """A QA check failed; the message summarises which product and why."""


def event_kind(error: BaseException) -> EventKind:
    """Return the kind of the campaign event a step that raised ``error`` records.

    Parameters
    ----------
    error : `BaseException`
        What the step raised.

    Returns
    -------
    kind : `EventKind`
        `EventKind.STUCK` for a transfer that stopped moving (`RucioTransferStuck`),
        so that operators are told it is stuck; `EventKind.FAILED` for anything else.
    """
    return EventKind.STUCK if isinstance(error, RucioTransferStuck) else EventKind.FAILED
