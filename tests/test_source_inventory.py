"""Planning from a source Butler: its raws, and its skymap's tracts as units."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
from lsst.daf.butler import Butler, Config, DatasetType
from lsst.sphgeom import ConvexPolygon, LonLat, UnitVector3d

from multisite.cli import main
from multisite.demo.images import SkyImage
from multisite.demo.instrument import DemoCam
from multisite.demo.survey import register_visit
from multisite.source_inventory import inventory_from_butler, skymap_tracts

from .conftest import REPO

RINGS, PER_RING, RAW_COLLECTION = 2, 4, "DemoCam/raw/all"


def box(ra: float, dec: float, width: float, height: float) -> ConvexPolygon:
    corners = [(ra, dec), (ra + width, dec), (ra + width, dec + height), (ra, dec + height)]
    return ConvexPolygon([UnitVector3d(LonLat.fromDegrees(*corner)) for corner in corners])


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    """Return a source repository: a ring skymap of 2 x 4 one-degree tracts, 30 four-detector visits."""
    repo = str(tmp_path_factory.mktemp("source") / "repo")
    Butler.makeRepo(repo, config=Config(str(REPO / "multisite" / "demo" / "repo_seed.yaml")))
    butler = Butler.from_config(repo, writeable=True)
    registry = butler.registry
    DemoCam().register(registry)
    registry.syncDimensionData(
        "skymap",
        {
            "name": "rings",
            "hash": hashlib.sha1(b"rings").digest(),
            "tract_max": 8,
            "patch_nx_max": 1,
            "patch_ny_max": 1,
        },
    )
    registry.insertDimensionData(
        "tract",
        *[
            {
                "skymap": "rings",
                "id": ring * PER_RING + j,
                "region": box(150 + j - 0.05, ring - 0.05, 1.1, 1.1),
            }
            for ring in range(RINGS)
            for j in range(PER_RING)
        ],
    )
    registry.syncDimensionData("day_obs", {"instrument": "DemoCam", "id": 20261125})
    registry.syncDimensionData("visit_system", {"instrument": "DemoCam", "id": 0, "name": "one-to-one"})
    raw = DatasetType("raw", ("instrument", "exposure", "detector"), "SkyImage", universe=butler.dimensions)
    registry.registerDatasetType(raw)
    registry.registerRun(RAW_COLLECTION)
    rng = np.random.default_rng(7)
    for index in range(30):
        ra, dec = rng.uniform(150, 153.6), rng.uniform(0, 1.6)
        detectors = {d: box(ra + 0.2 * (d % 2), dec + 0.2 * (d // 2), 0.2, 0.2) for d in range(4)}
        register_visit(registry, 2000 + index, index, 20261125, box(ra, dec, 0.4, 0.4), detectors)
        for detector in detectors:
            image = SkyImage(np.zeros((2, 2)), ra, dec, 0.1)
            butler.put(
                image, raw, instrument="DemoCam", exposure=2000 + index, detector=detector, run=RAW_COLLECTION
            )
    return repo


def test_inventory_and_tracts_from_the_source_butler(source):
    butler = Butler.from_config(source)
    tracts = skymap_tracts(butler, "rings")
    assert tracts.n_tracts == 8 and list(tracts.ring) == [0] * 4 + [1] * 4
    assert np.allclose(tracts.ra[:4], [150.5, 151.5, 152.5, 153.5], atol=0.01)
    inventory = inventory_from_butler(butler, RAW_COLLECTION, "DemoCam", "rings")
    assert len(inventory) == 120
    # A raw's tracts are those its detector region overlaps, checked against the boxes' geometry
    # (away from the edges, where great circles and boxes differ by a hair).
    frame = inventory.frame()
    assert frame["bytes"].gt(0).all()
    checked = 0
    for i, (ra, dec) in enumerate(zip(frame["ra"], frame["dec"], strict=True)):
        low = [(150 + j - 0.05, ring - 0.05) for ring in range(RINGS) for j in range(PER_RING)]
        gaps = [
            min(abs(ra - 0.1 - (x + 1.1)), abs(ra + 0.1 - x), abs(dec - 0.1 - (y + 1.1)), abs(dec + 0.1 - y))
            for x, y in low
        ]
        if min(gaps) < 0.01:
            continue
        expected = [
            t
            for t, (x, y) in enumerate(low)
            if ra - 0.1 < x + 1.1 and ra + 0.1 > x and dec - 0.1 < y + 1.1 and dec + 0.1 > y
        ]
        assert inventory.tracts_of(i) == expected, (i, ra, dec)
        checked += 1
    assert checked > 60
    assert any(len(inventory.tracts_of(i)) > 1 for i in range(len(inventory)))  # boundary raws


def test_plan_command_from_the_source_butler(source, tmp_path):
    out = tmp_path / "plan"
    status = main(
        [
            "plan",
            "--butler",
            source,
            "--collection",
            RAW_COLLECTION,
            "--instrument",
            "DemoCam",
            "--skymap",
            "rings",
            "--share",
            "usdf=0.5",
            "--share",
            "in2p3=0.5",
            "-o",
            str(out),
        ]
    )
    assert status == 0
    units = pd.read_csv(out / "units.tsv", sep="\t")
    assert sorted(units.tract) == list(range(8)) and set(units.site) == {"usdf", "in2p3"}
    summary = pd.read_csv(out / "summary.tsv", sep="\t")
    assert (summary["share_minus_target_pp"].abs() < 25).all()


def test_plan_command_from_a_visits_table_with_the_skymap_of_a_butler(source, tmp_path, capsys):
    inventory = inventory_from_butler(Butler.from_config(source), RAW_COLLECTION, "DemoCam", "rings")
    table = tmp_path / "visits.csv"
    inventory.frame(tracts=True).to_csv(table, index=False)
    shares = ["--share", "usdf=0.5", "--share", "in2p3=0.5"]
    out = tmp_path / "plan"
    common = ["plan", "--visits-table", str(table), *shares, "-o", str(out)]
    assert main([*common, "--butler", source, "--skymap", "rings"]) == 0
    # Units are the skymap's tracts, raws or not, placed by the skymap's centres.
    units = pd.read_csv(out / "units.tsv", sep="\t")
    assert sorted(units.tract) == list(range(8)) and set(units.site) == {"usdf", "in2p3"}
    assert main([*common, "--butler", source, "--skymap", "nosuch"]) == 2
    assert "skymap 'nosuch'" in capsys.readouterr().err
    # Without the Butler, the tracts are those the raws overlap, with the same assignment of raws.
    assert main([*common[:-1], str(tmp_path / "own")]) == 0
    own = pd.read_csv(tmp_path / "own" / "units.tsv", sep="\t")
    assert set(own.tract) == {t for i in range(len(inventory)) for t in inventory.tracts_of(i)}


def test_plan_command_refuses_unknown_butler_names(source, tmp_path, capsys):
    arguments = ["plan", "--butler", source, "--share", "usdf=1", "-o", str(tmp_path / "plan")]
    assert main([*arguments, "--collection", "no/such", "--instrument", "DemoCam", "--skymap", "rings"]) == 2
    assert "raws of 'no/such'" in capsys.readouterr().err
    assert not (tmp_path / "plan").exists()
