"""The version of a campaign's plan, and the refusal of a plan changed under a running campaign.

The plan (which site runs which unit, and how each site's units are cut into
chunks) decides every marker's meaning: ``stage/ral/step3/t0p1.json`` says that
unit's step3 ran at ral. The plan marker records what the plan was made from (the
units table, in order, and the config fields that shape chunks and placement) and
its version, a digest of them. A campaign whose units table or chunking changed
after its plan was made is refused before anything runs, naming what changed:
running it would redo delivered work, and mark done at one site what another site ran.
"""

from __future__ import annotations

__all__ = ("check_plan_unchanged", "plan_record", "plan_version", "recorded_plan", "recorded_units")

import dataclasses
import hashlib
import json
from typing import Any

from .config import Campaign, Unit
from .errors import CampaignConfigError, PlanChangedError
from .markers import read_marker_if_written


def _shape(campaign: Campaign) -> dict[str, Any]:
    """Return what the plan is made of, as JSON-ready values."""
    return {
        "instrument": campaign.instrument,
        "skymap": campaign.skymap,
        "raw_collection": campaign.raw_collection,
        "central": campaign.central.name,
        "max_quanta": campaign.max_quanta,
        "stages": [
            [stage.name, stage.location, stage.units_per_chunk, stage.quanta_per_unit]
            for stage in campaign.stages
        ],
        # A unit's move only when it moved: plans made before moves existed keep their version.
        "units": [
            [unit.name, [list(cell) for cell in unit.cells], unit.site, *([unit.move] if unit.move else [])]
            for unit in campaign.units
        ],
    }


def plan_version(campaign: Campaign) -> str:
    """Return the version of the campaign's plan: a digest of its units table and chunking fields."""
    text = json.dumps(_shape(campaign), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def plan_record(campaign: Campaign) -> dict[str, Any]:
    """Return the plan marker's record of the plan: its version and what it was made from."""
    return {"plan_version": plan_version(campaign), "plan": _shape(campaign)}


def recorded_units(shape: dict[str, Any]) -> tuple[Unit, ...]:
    """Return the units of a plan's shape (`_shape`), as the plan marker records them."""
    return tuple(
        Unit(name, tuple((tract, patch) for tract, patch in cells), site, sum(move))
        for name, cells, site, *move in shape["units"]
    )


def _differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Return, unit by unit and field by field, how the current plan differs from the recorded one."""
    old = {unit.name: unit for unit in recorded_units(recorded)}
    new = {unit.name: unit for unit in recorded_units(current)}
    changes = []
    for name in old.keys() & new.keys():
        before, after = old[name], new[name]
        if before.site != after.site:
            changes.append(f"unit {name} moved from {before.site} to {after.site}")
        if before.cells != after.cells:
            changes.append(f"unit {name} covers other tracts or patches")
        if before.move != after.move:
            changes.append(f"unit {name}'s move changed from {before.move} to {after.move}")
    changes += [f"unit {name} removed (was at {old[name].site})" for name in old.keys() - new.keys()]
    changes += [f"unit {name} added (at {new[name].site})" for name in new.keys() - old.keys()]
    if not changes and [u[0] for u in recorded["units"]] != [u[0] for u in current["units"]]:
        changes.append("the units are in another order (which cuts each site's units into other chunks)")
    changes += [
        f"{field} changed from {recorded.get(field)!r} to {value!r}"
        for field, value in current.items()
        if field != "units" and recorded.get(field) != value
    ]
    return sorted(changes)


def check_plan_unchanged(campaign: Campaign, source: str = "config") -> None:
    """Refuse a campaign whose plan changed since its work directory's plan was made.

    Nothing is checked before the plan exists (a new campaign), nor for a plan marker
    written before plans were versioned.

    Raises
    ------
    PlanChangedError
        Raised naming each unit moved, added or removed and each changed field, and
        how to go on.
    CampaignConfigError
        Raised while a ``multisite move`` cut short has not been run again.
    """
    moving = campaign.layout.move_in_progress
    if moving.is_file():
        record = json.loads(moving.read_text())
        if "adopting" in record:
            return  # a site's instance adopting a published plan: done again when it starts
        units = record["units"]
        commands = sorted({f"--unit {name} --to {to}" for name, (_, to) in units.items()})
        raise CampaignConfigError(
            source,
            [
                f"a `multisite move` was cut short before it wrote the plan ({moving}: "
                + ", ".join(f"{name} {old} -> {to}" for name, (old, to) in units.items())
                + "): nothing runs on a half-written plan. Run the move again, e.g. "
                + "; ".join(f"`multisite move <config> {command}`" for command in commands)
            ],
        )
    marker = campaign.layout.placement_marker
    recorded = read_marker_if_written(marker).get("plan")
    if recorded is None:
        return
    current = _shape(campaign)
    if recorded == current:
        return
    raise PlanChangedError(source, str(marker), _differences(recorded, current))


def recorded_plan(campaign: Campaign) -> Campaign | None:
    """Return the campaign with the units its plan marker records, if only their sites or order differ.

    What ``multisite move`` starts from: the plan the campaign runs, whatever the units
    table says (a move interrupted after rewriting the table, or a table edited by hand
    to move units). `None` when there is no recorded plan, or when the table has other
    units or cells, or another field differs: that is no move.
    """
    recorded = read_marker_if_written(campaign.layout.placement_marker).get("plan")
    if recorded is None:
        return None
    units = recorded_units(recorded)
    same_cells = {u.name: u.cells for u in units} == {u.name: u.cells for u in campaign.units}
    others = {key: value for key, value in _shape(campaign).items() if key != "units"}
    if not same_cells or any(recorded.get(key) != value for key, value in others.items()):
        return None
    return dataclasses.replace(campaign, units=units)
