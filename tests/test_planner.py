"""Planning at scale: synthetic inventory, visits tables, tract geometry, the planner, chunks, bad input."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from multisite.demo.synthetic import (
    DETECTOR_MARGIN_DEG,
    MAX_SCALE,
    RingTracts,
    focal_plane,
    make_dr1_inventory,
    make_ring_tracts,
    scaled_dr1_inventory,
)
from multisite.errors import InventoryError, PlacementError
from multisite.flow import chunk_units
from multisite.geometry import TractCentres, TractGeometry, tracts_from_raws
from multisite.inventory import MAX_TRACT_ID, Inventory, encode_tract_sets, read_visits_table
from multisite.planner import UnitMap, check_sites, make_plan, make_units, plan_chunks, write_plan

SHARES = {"usdf": 0.35, "in2p3": 0.40, "lancs": 0.10, "ral": 0.15}


@pytest.fixture(scope="module")
def survey() -> tuple[Inventory, RingTracts]:
    # 2,000 visits over 70 tracts: DR1's density of visits per tract, 378,000 raws.
    return make_dr1_inventory(n_visits=2_000, n_tracts=70, seed=7)


@pytest.fixture(scope="module")
def plan(survey):
    inventory, tracts = survey
    return make_plan(inventory, tracts, SHARES)


def _needed_pairs(plan) -> np.ndarray:
    """(raw, site) pairs that must be shipped, worked out raw by raw from the long table.

    Pairs are coded ``raw * n_sites + site index``, sorted and unique.
    """
    long = plan.inventory.frame(tracts=True)
    long["raw"] = np.repeat(
        np.arange(len(plan.inventory)),
        np.maximum((plan.inventory.tract_sets[plan.inventory.tract_set] >= 0).sum(axis=1), 1),
    )
    long = long[long.tract >= 0]
    site_of_tract = plan.assignment.set_index("tract")["site"].map(plan.sites.index)
    site = site_of_tract.reindex(long.tract).to_numpy()
    keep = ~np.isnan(site)  # tracts in no unit: not processed, nothing to ship
    return np.unique(long.raw.to_numpy()[keep] * len(plan.sites) + site[keep].astype(np.int64))


def _shipped_pairs(plan) -> np.ndarray:
    """(raw, site) pairs in the manifests, coded like `_needed_pairs`."""
    n = len(plan.sites)
    return np.sort(
        np.concatenate([plan.manifest(s).astype(np.int64) * n + i for i, s in enumerate(plan.sites)])
    )


def _brute_force_tracts(tracts: RingTracts, ra: float, dec: float, margin: float) -> set[int]:
    """Tracts whose outer (RA, Dec) box meets the box around a point, by checking every tract."""
    found = set()
    for t in range(tracts.n_tracts):
        ring = tracts.ring[t]
        lo, hi = tracts.dec_edges[ring], tracts.dec_edges[ring + 1]
        extra_dec = 0.5 * tracts.overlap * (hi - lo)
        if dec + margin < lo - extra_dec or dec - margin > hi + extra_dec:
            continue
        step = tracts.ra_step[ring]
        half_width = 0.5 * step * (1 + tracts.overlap) + margin / max(np.cos(np.radians(dec)), 1e-3)
        gap = (ra - tracts.ra[t] + 180.0) % 360.0 - 180.0
        if abs(gap) <= half_width + 1e-9:
            found.add(t)
    return found


def test_ring_tracts_have_dr1_sizes():
    tracts = make_ring_tracts(8_000)
    assert tracts.n_tracts == 8_000
    assert tracts.dec_edges[0] == pytest.approx(-70.0) and tracts.dec_edges[-1] == pytest.approx(10.0)
    assert tracts.area / tracts.n_tracts == pytest.approx(2.1, rel=1e-3)
    assert tracts.unique_area.min() > 0.9 * 2.1 and tracts.unique_area.max() < 1.1 * 2.1
    assert tracts.ra_width == pytest.approx(263.4, abs=0.5)
    # Tract ids run ring by ring, south to north.
    assert np.all(np.diff(tracts.ring) >= 0) and np.all(np.diff(tracts.dec) >= 0)


@pytest.mark.parametrize("ra_width", [22.7, 360.0])
def test_tracts_near_agrees_with_checking_every_tract(ra_width):
    if ra_width < 360:
        tracts = make_ring_tracts(70)
    else:
        tracts = RingTracts(np.linspace(-40, -20, 5), np.array([9, 8, 8, 7]), ra_min=0.0, ra_width=360.0)
    rng = np.random.default_rng(3)
    n = 400
    # Points over and around the footprint, including across its RA edges and RA 0.
    ra = (tracts.ra_min + rng.uniform(-5, tracts.ra_width + 5, n)) % 360.0
    dec = rng.uniform(tracts.dec_edges[0] - 1, tracts.dec_edges[-1] + 1, n)
    matrix = tracts.tracts_near(ra, dec, DETECTOR_MARGIN_DEG)
    counts = []
    for i in range(n):
        got = {int(t) for t in matrix[i] if t >= 0}
        assert got == _brute_force_tracts(tracts, ra[i], dec[i], DETECTOR_MARGIN_DEG), (ra[i], dec[i])
        counts.append(len(got))
    assert 0 in counts and 1 in counts and max(counts) >= 2  # the sample meets edges and overlaps


def test_focal_plane_is_lsstcam():
    x, y = focal_plane(189)
    assert len(x) == 189
    assert len({(round(a, 6), round(b, 6)) for a, b in zip(x, y, strict=True)}) == 189
    assert np.hypot(x, y).max() < 1.95  # corner rafts are missing: no detector beyond ~1.9 deg
    assert len(focal_plane(16)[0]) == 16


def test_synthetic_inventory(survey):
    inventory, tracts = survey
    assert len(inventory) == 2_000 * 189 and inventory.n_visits == 2_000
    assert inventory.visit_index.dtype == np.int32 and inventory.ra.dtype == np.float32
    assert np.all(np.bincount(inventory.visit_index) == 189)
    assert np.all(np.bincount(inventory.detector) == 2_000)
    assert np.unique(inventory.visit_ids).size == 2_000 and inventory.visit_ids.min() > 2**31
    # Detectors are within the field of view of their visit.
    vra = np.radians(inventory.visit_ra[inventory.visit_index])
    vdec = np.radians(inventory.visit_dec[inventory.visit_index])
    ra, dec = np.radians(inventory.ra), np.radians(inventory.dec)
    cos_sep = np.sin(vdec) * np.sin(dec) + np.cos(vdec) * np.cos(dec) * np.cos(ra - vra)
    separation = np.degrees(np.arccos(np.clip(cos_sep, -1, 1)))
    assert separation.max() < 1.95 and separation.mean() > 0.8
    assert inventory.bytes.mean() == pytest.approx(32e6, rel=0.01)
    # Visits uniform over the footprint's band.
    assert (
        tracts.dec_edges[0] <= inventory.visit_dec.min() and inventory.visit_dec.max() <= tracts.dec_edges[-1]
    )
    # Stored tract sets are those of the stored positions.
    sample = np.arange(0, len(inventory), 997)
    recomputed = tracts.tracts_near(inventory.ra[sample], inventory.dec[sample])
    for row, raw in zip(recomputed, sample, strict=True):
        assert sorted(int(t) for t in row if t >= 0) == inventory.tracts_of(int(raw))


def test_synthetic_inventory_is_reproducible():
    first, _ = make_dr1_inventory(n_visits=30, n_tracts=20, seed=1)
    again, _ = make_dr1_inventory(n_visits=30, n_tracts=20, seed=1)
    other, _ = make_dr1_inventory(n_visits=30, n_tracts=20, seed=2)
    assert np.array_equal(first.ra, again.ra) and np.array_equal(first.bytes, again.bytes)
    assert not np.array_equal(first.ra, other.ra)


def test_encode_tract_sets_wide_ids():
    # Ids too large to pack four per int64: the row-wise fallback must give the same sets.
    matrix = np.array([[5, 999_999, -1, -1], [999_999, 5, -1, -1], [7, 1, 2, 3], [-1, -1, -1, -1]])
    codes, sets = encode_tract_sets(matrix, 1_000_000)
    assert codes[0] == codes[1] and len(set(codes.tolist())) == 3
    assert [sorted(t for t in sets[c] if t >= 0) for c in codes] == [
        [5, 999_999],
        [5, 999_999],
        [1, 2, 3, 7],
        [],
    ]


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_read_visits_table_round_trip(survey, tmp_path, suffix):
    inventory, tracts = survey
    rows = np.arange(0, len(inventory), 37)
    path = tmp_path / f"visits{suffix}"
    long = inventory.frame(rows, tracts=True)
    # Shuffled, as a database export would be.
    long = long.sample(frac=1.0, random_state=0)
    long.to_parquet(path) if suffix == ".parquet" else long.to_csv(path, index=False)
    read = read_visits_table(path)
    assert len(read) == len(rows) and read.n_tracts <= tracts.n_tracts
    assert np.array_equal(read.visit, inventory.visit[rows])
    assert np.array_equal(read.detector, inventory.detector[rows])
    assert np.array_equal(read.bytes, inventory.bytes[rows])
    for i in range(0, len(rows), 11):
        assert read.tracts_of(i) == inventory.tracts_of(int(rows[i]))


def _table(**columns) -> pd.DataFrame:
    """Return a visits table of three raws of two visits over tracts 5 and 6, ``columns`` replaced."""
    table = {
        "visit": [10, 10, 11, 11],
        "detector": [0, 0, 1, 2],
        "ra": [150.0, 150.0, 151.2, 151.4],
        "dec": [-30.0, -30.0, -30.2, -30.1],
        "bytes": [1000, 1000, 1200, 1100],
        "tract": [5, 6, 6, 6],
    }
    table.update(columns)
    return pd.DataFrame(table)


def test_read_visits_table_boresights_from_the_detectors(tmp_path):
    path = tmp_path / "visits.tsv"
    _table().to_csv(path, sep="\t", index=False)
    read = read_visits_table(path)
    assert len(read) == 3 and read.n_visits == 2 and read.n_tracts == 7
    assert [read.tracts_of(i) for i in range(3)] == [[5, 6], [6], [6]]
    assert read.visit_ra == pytest.approx([150.0, 151.3]) and read.visit_dec == pytest.approx([-30.0, -30.15])


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (_table().drop(columns="bytes"), r"missing column\(s\) \['bytes'\]"),
        (
            _table().drop(columns="tract"),
            r"missing column\(s\) \['tract'\]; the table needs .* one row per raw",
        ),
        (_table().iloc[:0], "no rows"),
        (_table(ra=["150", "x", "151", "151"]), r"column 'ra' is not numeric \(e.g. 'x'\)"),
        (_table(bytes=[True, True, False, True]), "column 'bytes' is not numeric"),
        (_table(dec=[-30.0, np.nan, -30.2, -30.1]), "column 'dec' has empty values"),
        (_table(ra=[150.0, np.inf, 151.2, 151.4]), "column 'ra' has infinite values"),
        (_table(visit=[10.5, 10.5, 11, 11]), r"column 'visit' has fractional values \(e.g. 10.5\)"),
        (_table(dec=[-30.0, -30.0, -95.0, -30.1]), r"column 'dec' has values outside \[-90, 90\]"),
        (_table(bytes=[1000, 1000, -1, 1100]), "column 'bytes' has values outside"),
        (_table(detector=[0, 0, 1, 40_000]), "column 'detector' has values outside"),
        (_table(tract=[5, 6, -2, 6]), "column 'tract' has values outside"),
        (_table(tract=[5, 6, MAX_TRACT_ID + 1, 6]), "column 'tract' has values outside"),
    ],
)
def test_read_visits_table_bad_input(tmp_path, table, message):
    path = tmp_path / "visits.parquet"
    table.to_parquet(path)
    with pytest.raises(InventoryError, match=message) as info:
        read_visits_table(path)
    assert str(path) in str(info.value)


def test_read_visits_table_bad_file(tmp_path):
    with pytest.raises(InventoryError, match="file not found"):
        read_visits_table(tmp_path / "absent.parquet")
    garbage = tmp_path / "visits.parquet"
    garbage.write_text("not parquet")
    with pytest.raises(InventoryError, match="cannot be read"):
        read_visits_table(garbage)
    empty = tmp_path / "visits.csv"
    empty.write_text("")
    with pytest.raises(InventoryError, match="cannot be read"):
        read_visits_table(empty)
    # A raw outside every tract (empty tract) is kept, and overlaps nothing.
    _table(tract=[5, 6, None, 6]).to_csv(empty, index=False)
    assert read_visits_table(empty).tracts_of(1) == []


def test_tracts_from_raws_recover_the_ring_geometry(survey):
    inventory, tracts = survey
    derived = tracts_from_raws(inventory)
    assert isinstance(derived, TractGeometry) and derived.n_tracts == tracts.n_tracts
    # Centres within a detector's size of the true ones, the same rings, the same units and plan.
    assert np.abs(derived.dec - tracts.dec).max() < 0.3
    assert np.abs((derived.ra - tracts.ra + 180.0) % 360.0 - 180.0).max() < 0.3
    assert np.array_equal(derived.ring, tracts.ring)
    for size in (1, 3):
        assert np.array_equal(make_units(derived, size).unit_of_tract, make_units(tracts, size).unit_of_tract)
    plan = make_plan(inventory, derived, SHARES)
    assert plan.max_share_error <= 0.02
    assert plan.duplication_factor == pytest.approx(make_plan(inventory, tracts, SHARES).duplication_factor)


def test_visits_table_with_tract_ids_of_a_large_skymap(survey, tmp_path):
    inventory, tracts = survey
    rows = np.arange(0, len(inventory), 5)
    long = inventory.frame(rows, tracts=True)
    long["tract"] = np.where(long["tract"] >= 0, long["tract"] + 9_800, -1)
    path = tmp_path / "visits.parquet"
    long.to_parquet(path)
    read = read_visits_table(path)
    derived = tracts_from_raws(read)
    assert read.n_tracts == derived.n_tracts == 9_800 + tracts.n_tracts
    units = make_units(derived)
    assert units.names == tuple(f"t{9_800 + t}" for t in range(tracts.n_tracts))
    plan = make_plan(read, derived, SHARES, units=units, pins={"t9813": "lancs"})
    assert sorted(plan.assignment.tract) == list(range(9_800, 9_800 + tracts.n_tracts))
    assert plan.max_share_error <= 0.02 and "t9813" in plan.site_units("lancs")
    assert np.array_equal(_shipped_pairs(plan), _needed_pairs(plan))
    assert list(plan.campaign_units.tract) == [int(u[1:]) for s in plan.sites for u in plan.site_units(s)]


def test_tracts_from_raws_needs_a_tract(tmp_path):
    path = tmp_path / "visits.csv"
    _table(tract=[-1, -1, None, -1]).to_csv(path, index=False)
    with pytest.raises(InventoryError, match="no raw overlaps a tract"):
        tracts_from_raws(read_visits_table(path))


def test_units_of_a_geometry_with_absent_tract_ids():
    nan = np.nan
    tracts = TractCentres(
        ra=np.array([nan, 10.0, 11.0, nan, 12.0, 10.5]),
        dec=np.array([nan, 0.0, 0.0, nan, 0.0, 1.0]),
        ring=np.array([-1, 0, 0, -1, 0, 1]),
    )
    single = make_units(tracts)
    assert single.names == ("t1", "t2", "t4", "t5") and list(single.unit_of_tract) == [-1, 0, 1, -1, 2, 3]
    pairs = make_units(tracts, 2)
    assert pairs.names == ("g0", "g1", "g2")
    assert [list(pairs.tracts_of(name)) for name in pairs.names] == [[1, 2], [4], [5]]


def test_every_unit_placed_exactly_once(plan, survey):
    _, tracts = survey
    assignment = plan.assignment
    assert sorted(assignment.tract) == list(range(tracts.n_tracts))
    assert assignment.groupby("unit").site.nunique().max() == 1
    assert set(assignment.site) <= set(SHARES)
    assert plan.summary.units.sum() == plan.units.n_units == tracts.n_tracts
    assert plan.summary.tracts.sum() == tracts.n_tracts
    assert sum(len(plan.site_units(s)) for s in plan.sites) == plan.units.n_units


def test_manifests_hold_exactly_the_needed_raws(plan):
    assert np.array_equal(_shipped_pairs(plan), _needed_pairs(plan))
    for site, raws, size in zip(plan.sites, plan.site_raws, plan.site_bytes, strict=True):
        manifest = plan.manifest(site)
        assert len(manifest) == raws and np.all(np.diff(manifest) > 0)
        assert plan.inventory.bytes[manifest].sum() == size
        frame = plan.manifest_frame(site)
        assert len(frame) == raws and frame.bytes.sum() == size
    unique = np.unique(np.concatenate([plan.manifest(s) for s in plan.sites]))
    assert plan.unique_raws == len(unique)
    assert plan.unneeded_raws == len(plan.inventory) - len(unique) > 0  # edge raws overlap no tract
    unique_bytes = plan.inventory.bytes[unique].sum()
    assert plan.duplication_factor == pytest.approx(plan.shipped_bytes / unique_bytes)
    assert 1.0 < plan.duplication_factor < 1.3


def test_shares_within_tolerance(plan, survey):
    inventory, tracts = survey
    assert plan.max_share_error <= 0.02
    assert plan.shares.sum() == pytest.approx(1.0)
    core_hours = plan.summary.core_hours.to_numpy()
    assert core_hours == pytest.approx(plan.site_raws * plan.core_hours_per_raw)
    for order in ("rings", "columns"):
        other = make_plan(inventory, tracts, SHARES, order=order)
        assert other.method == f"contiguous:{order}"
        assert other.max_share_error <= 0.02


def test_planner_duplicates_less_than_the_baselines(plan, survey):
    inventory, tracts = survey
    round_robin = make_plan(inventory, tracts, SHARES, method="round_robin")
    id_blocks = make_plan(inventory, tracts, SHARES, method="id_blocks")
    for baseline in (round_robin, id_blocks):
        assert sorted(baseline.assignment.tract) == list(range(tracts.n_tracts))
        assert np.array_equal(_shipped_pairs(baseline), _needed_pairs(baseline))
    assert round_robin.max_share_error <= 0.04
    assert plan.duplication_factor < id_blocks.duplication_factor < round_robin.duplication_factor
    assert round_robin.duplication_factor > 1.3
    # Each contiguous path beats both baselines; ``auto`` takes the better of the two.
    paths = [make_plan(inventory, tracts, SHARES, order=order) for order in ("rings", "columns")]
    assert all(p.duplication_factor < id_blocks.duplication_factor for p in paths)
    assert plan.duplication_factor == pytest.approx(min(p.duplication_factor for p in paths))


def test_pins_respected(survey):
    inventory, tracts = survey
    units = make_units(tracts)
    # Three tracts far apart pinned to one small site, one to another.
    pins = {"t0": "lancs", "t35": "lancs", "t69": "lancs", "t20": "ral"}
    plan = make_plan(inventory, tracts, SHARES, units=units, pins=pins)
    site_of = dict(zip(plan.assignment.unit, plan.assignment.site, strict=True))
    assert all(site_of[unit] == site for unit, site in pins.items())
    assert plan.max_share_error <= 0.02
    table = plan.unit_table.set_index("unit")
    assert table.pinned.sum() == 4 and table.loc["t35", "pinned"]
    # Pinned work counts towards the site's share: lancs gets few other tracts.
    assert (plan.assignment.site == "lancs").sum() < 0.2 * tracts.n_tracts
    # Baselines honour pins too.
    for method in ("round_robin", "id_blocks"):
        other = make_plan(inventory, tracts, SHARES, pins=pins, method=method)
        other_site = dict(zip(other.assignment.unit, other.assignment.site, strict=True))
        assert all(other_site[unit] == site for unit, site in pins.items())


def test_explicit_assignment(survey):
    inventory, tracts = survey
    units = make_units(tracts)
    assignment = {name: list(SHARES)[i % 4] for i, name in enumerate(units.names)}
    plan = make_plan(inventory, tracts, SHARES, assignment=assignment, pins={"t5": assignment["t5"]})
    assert plan.method == "explicit"
    assert dict(zip(plan.assignment.unit, plan.assignment.site, strict=True)) == assignment
    assert np.array_equal(_shipped_pairs(plan), _needed_pairs(plan))


def test_groups_of_tracts_as_units(survey):
    inventory, tracts = survey
    units = make_units(tracts, tracts_per_unit=3)
    assert units.n_units < tracts.n_tracts and np.all(units.unit_of_tract >= 0)
    # A unit's tracts are neighbours in one ring.
    for name in units.names:
        members = units.tracts_of(name)
        assert len(set(tracts.ring[members])) == 1 and np.all(np.diff(members) == 1) and len(members) <= 3
    plan = make_plan(inventory, tracts, SHARES, units=units, share_tolerance=0.03)
    assert plan.assignment.groupby("unit").site.nunique().max() == 1
    assert sorted(plan.assignment.tract) == list(range(tracts.n_tracts))
    assert plan.max_share_error <= 0.03
    assert np.array_equal(_shipped_pairs(plan), _needed_pairs(plan))


def test_units_from_table(survey):
    inventory, tracts = survey
    table = pd.DataFrame({"unit": ["a", "a", "b"], "tract": [10, 11, 40]})
    units = UnitMap.from_table(table, tracts.n_tracts)
    assert units.names == ("a", "b") and list(units.tracts_of("a")) == [10, 11]
    assert (units.unit_of_tract >= 0).sum() == 3
    plan = make_plan(inventory, tracts, {"usdf": 0.5, "ral": 0.5}, units=units)
    # Only raws overlapping the three listed tracts are shipped.
    needed = _needed_pairs(plan)
    assert np.array_equal(_shipped_pairs(plan), needed)
    assert plan.unique_raws == len(np.unique(needed // 2)) < 0.1 * len(inventory)
    assert set(plan.assignment.tract) == {10, 11, 40}
    with pytest.raises(PlacementError, match="tract 10 is in more than one unit"):
        UnitMap.from_table(pd.DataFrame({"unit": ["a", "b"], "tract": [10, 10]}), tracts.n_tracts)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"pins": {"t3": "cern"}}, r"pins: unit 't3' is pinned to unknown site 'cern'"),
        ({"pins": {"tract3": "usdf"}}, r"pins: unknown unit 'tract3'"),
        (
            {"shares": {"usdf": 0.35, "in2p3": 0.40, "lancs": 0.10, "ral": 0.25}},
            r"shares: they sum to 1\.1, not 1",
        ),
        (
            {"shares": {"usdf": 0.35, "in2p3": 0.40, "lancs": 0.10, "ral": 0.1499}},
            r"shares: they sum to 0\.9999",
        ),
        (
            {"shares": {"usdf": 0.6, "in2p3": 0.5, "ral": -0.1}},
            r"shares: site 'ral' has negative share -0\.1",
        ),
        ({"shares": {}}, r"shares: no sites"),
        ({"assignment": {"t0": "usdf"}}, r"assignment: 69 unit\(s\) have no site"),
        ({"method": "random"}, r"method: unknown method 'random'"),
        ({"order": "spiral"}, r"order: unknown order 'spiral'"),
    ],
)
def test_bad_input_is_a_clear_error(survey, kwargs, expected):
    inventory, tracts = survey
    kwargs = {"shares": SHARES, **kwargs}
    with pytest.raises(PlacementError, match=expected) as info:
        make_plan(inventory, tracts, **kwargs)
    assert isinstance(info.value, ValueError) and len(info.value.problems) >= 1


def test_shares_within_rounding_are_accepted(survey):
    inventory, tracts = survey
    shares = {"usdf": 0.35, "in2p3": 0.40, "lancs": 0.10, "ral": 0.15 + 5e-7}
    assert make_plan(inventory, tracts, shares).max_share_error <= 0.02


def test_empty_inventory_is_a_clear_error(survey):
    inventory, tracts = survey
    empty = dataclasses.replace(
        inventory,
        visit_index=inventory.visit_index[:0],
        detector=inventory.detector[:0],
        ra=inventory.ra[:0],
        dec=inventory.dec[:0],
        bytes=inventory.bytes[:0],
        tract_set=inventory.tract_set[:0],
    )
    with pytest.raises(PlacementError, match="inventory: no raws"):
        make_plan(empty, tracts, SHARES)


@pytest.mark.parametrize("site", ["../../etc", "USDF", "1site", "", "a" * 33, "us-df", "us df"])
def test_site_names_are_plain_names(survey, site):
    with pytest.raises(PlacementError, match=f"site name {site!r} is not a plain name"):
        check_sites({site: 0.5, "usdf": 0.5})
    inventory, tracts = survey
    with pytest.raises(PlacementError, match="is not a plain name"):
        make_plan(inventory, tracts, {site: 0.5, "usdf": 0.5})


def test_check_sites():
    check_sites({"usdf": 0.35, "in2p3": 0.4, "lancs": 0.1, "ral_2": 0.15}, pins={"t1": "ral_2"})
    with pytest.raises(PlacementError) as info:
        check_sites({"usdf": float("nan"), "ral": 1.0}, pins={"t1": "../x"})
    assert info.value.problems == [
        "shares: site 'usdf' has share nan; give a number between 0 and 1",
        "pins: unit 't1' is pinned to unknown site '../x'; known sites: ['ral', 'usdf']; add the site to "
        "shares or fix the pin",
    ]


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -5.0, 0.0, MAX_SCALE * 1.01])
def test_scaled_synthetic_inventory_bad_scale(scale):
    with pytest.raises(InventoryError, match="give a number above 0 and at most"):
        scaled_dr1_inventory(scale)


def test_all_problems_reported_together(survey):
    inventory, tracts = survey
    with pytest.raises(PlacementError) as info:
        make_plan(inventory, tracts, {"usdf": 0.7, "ral": -0.2}, pins={"t1": "nowhere"})
    assert len(info.value.problems) == 3


def test_chunk_units():
    units = [f"t{i}" for i in range(7)]
    chunks = chunk_units(units, max_quanta=100, quanta_per_unit=30)
    assert chunks == {"c0000": ("t0", "t1", "t2"), "c0001": ("t3", "t4", "t5"), "c0002": ("t6",)}
    # One unit a chunk: chunks are named after their unit; units_per_chunk wins over the estimate.
    assert list(chunk_units(units, max_quanta=100, quanta_per_unit=500)) == units
    assert list(chunk_units(units, max_quanta=100, quanta_per_unit=1, units_per_chunk=4)) == [
        "c0000",
        "c0001",
    ]
    # Units moved in (multisite move) never share a chunk with the site's own.
    moved = chunk_units(units[:4], max_quanta=100, quanta_per_unit=30, moves=[0, 0, 1, 1])
    assert moved == {"c0000": ("t0", "t1"), "c0001": ("t2", "t3")}


def test_plan_chunks_are_the_workflow_chunks(plan):
    chunks = plan_chunks(plan, max_quanta=30_000, quanta_per_unit=6_000)
    assert list(chunks.columns) == ["site", "chunk", "unit", "raws"]
    assert sorted(chunks.unit) == sorted(plan.units.names)
    for site in plan.sites:
        mine = chunks[chunks.site == site]
        expected = chunk_units(plan.site_units(site), max_quanta=30_000, quanta_per_unit=6_000)
        assert {c: tuple(g.unit) for c, g in mine.groupby("chunk", sort=False)} == expected
        assert mine.groupby("chunk").size().max() == 5
    raws = plan.unit_table.set_index("unit").raws
    assert (chunks.set_index("unit").raws == raws.reindex(chunks.unit).to_numpy()).all()
    single = plan_chunks(plan, max_quanta=30_000, quanta_per_unit=1, units_per_chunk=1)
    assert (single.chunk == single.unit).all()


def test_write_plan(plan, tmp_path):
    paths = write_plan(plan, tmp_path / "plan")
    assert {name: path.name for name, path in paths.items() if ":" not in name} == {
        "assignment": "assignment.tsv",
        "summary": "summary.tsv",
        "planner": "planner.json",
        "units": "units.tsv",
    }
    assignment = pd.read_csv(paths["assignment"], sep="\t")
    assert list(assignment.columns) == ["unit", "tract", "site"] and len(assignment) == plan.units.n_units
    summary = pd.read_csv(paths["summary"], sep="\t")
    assert list(summary.site) == list(SHARES)
    assert json.loads(paths["planner"].read_text()) == json.loads(json.dumps(plan.to_dict()))
    units = pd.read_csv(paths["units"], sep="\t", keep_default_na=False)
    assert list(units.columns) == ["unit", "tract", "patch", "site"] and set(units.patch) == {""}
    assert list(units.unit) == [u for site in plan.sites for u in plan.site_units(site)]
    assert dict(zip(units.unit, units.site, strict=True)) == dict(
        zip(assignment.unit, assignment.site, strict=True)
    )
    lancs = pd.read_parquet(paths["manifest:lancs"])
    assert len(lancs) == len(plan.manifest("lancs")) and list(lancs.columns) == ["visit", "detector", "bytes"]
