"""Placement on a real Butler repository holding the synthetic survey."""

from __future__ import annotations

import numpy as np
import pytest
from lsst.daf.butler import Butler, Config

from multisite.config import load_campaign
from multisite.demo.survey import SurveySpec, make_survey
from multisite.placement import SiteSelection, chunk_data_ids, compute_placement, units_query

from .conftest import REPO, demo_config


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    directory = tmp_path_factory.mktemp("placement")
    campaign = load_campaign(demo_config(directory))
    Butler.makeRepo(campaign.central.repo, config=Config(str(REPO / "multisite" / "demo" / "repo_seed.yaml")))
    butler = Butler.from_config(campaign.central.repo, writeable=True)
    make_survey(butler, SurveySpec(), campaign.raw_collection, campaign.truth_collection)
    return campaign, butler


def test_every_raw_goes_where_it_overlaps_a_unit(survey):
    campaign, butler = survey
    placement = compute_placement(butler, campaign)
    spec = SurveySpec()
    # Recompute overlaps from pixel geometry, independently of the Butler's regions.
    for row in placement.drop_duplicates(["exposure", "detector"]).itertuples():
        region = butler.registry.expandDataId(
            instrument="DemoCam", visit=row.visit, detector=row.detector
        ).region
        box = region.getBoundingBox()
        x0 = (box.getLon().getA().asDegrees() - spec.ra0) / spec.pixel_scale
        y0 = (box.getLat().getA().asDegrees() - spec.dec0) / spec.pixel_scale
        n = spec.detector_pixels
        expected = set()
        for unit in campaign.units:
            (_, patch), *_ = unit.cells
            px, py = (
                (patch % spec.patches_x) * spec.patch_pixels,
                (patch // spec.patches_x) * spec.patch_pixels,
            )
            if x0 < px + spec.patch_pixels and x0 + n > px and y0 < py + spec.patch_pixels and y0 + n > py:
                expected.add(unit.site)
        sites = set(
            placement[(placement.exposure == row.exposure) & (placement.detector == row.detector)].site
        )
        # Regions are conservative (they may touch a patch they only border), never smaller.
        assert expected <= sites, (row, expected, sites)
    # Each raw has exactly one owner, which is one of its sites.
    owners = placement.groupby(["exposure", "detector"])["owner"].nunique()
    assert (owners == 1).all()
    assert (placement.groupby(["exposure", "detector"]).apply(lambda g: g.owner.iloc[0] in set(g.site))).all()
    # Boundary raws go to two sites: the demo exercises duplication.
    assert placement.duplicated(["exposure", "detector"]).any()


def test_site_selection(survey):
    campaign, butler = survey
    placement = compute_placement(butler, campaign)
    selections = {
        s.name: SiteSelection.from_placement(campaign, placement, s.name) for s in campaign.processing_sites
    }
    owned = [sel.visit_detectors_owned for sel in selections.values()]
    # Owned sets partition all raws: the central site gets every data ID exactly once.
    assert (
        sum(len(o) for o in owned)
        == len(set().union(*owned))
        == placement[["visit", "detector"]].drop_duplicates().shape[0]
    )
    visits_owned = [sel.visits_owned for sel in selections.values()]
    assert sum(len(v) for v in visits_owned) == len(set().union(*visits_owned)) == placement.visit.nunique()
    data_id = butler.registry.expandDataId(skymap="demo", tract=0, patch=4)
    assert selections["in2p3"].accepts(data_id, owned=True)
    assert not selections["ral"].accepts(data_id, owned=False)


def test_units_query_is_built_from_integers_only(survey):
    campaign, _ = survey
    query = units_query(campaign, [(0, 4), (0, 1), (1, None)])
    assert (
        query
        == "instrument = 'DemoCam' AND skymap = 'demo' AND (tract = 1 OR (tract = 0 AND patch IN (1, 4)))"
    )


def test_zeropoints_recovered(survey):
    """The demo's global step recovers the injected zero points (science of the demo itself)."""
    from astropy.table import vstack

    from multisite.demo.measurement import measure_stars
    from multisite.demo.tasks import MeasureStarsTask, SolveZeropointsTask

    campaign, butler = survey
    measure = MeasureStarsTask()
    tables = []
    for ref in butler.query_datasets("raw", collections=campaign.raw_collection, limit=None):
        stars = measure.run([butler.get(ref)]).stars
        stars["visit"] = np.full(len(stars), ref.dataId["exposure"])
        tables.append(stars)
    solution = SolveZeropointsTask().run(vstack(tables))
    truth = butler.get("demo_truth_zeropoints", instrument="DemoCam", collections=campaign.truth_collection)
    visits = sorted(solution)
    injected = np.array([truth[str(v)] for v in visits])
    recovered = np.array([solution[v][0] for v in visits])
    residual = (recovered - recovered.mean()) - (injected - injected.mean())
    assert np.std(residual) < 0.01
    assert measure_stars is not None


def test_chunks_of_a_per_visit_stage_partition_the_site_raws(survey):
    campaign, butler = survey
    placement = compute_placement(butler, campaign)
    for site in campaign.processing_sites:
        units = [u.name for u in campaign.units_of(site.name)]
        tables = [chunk_data_ids(campaign, placement, site.name, [unit]) for unit in units]
        pairs = [
            (int(v), int(d))
            for table in tables
            for v, d in zip(table["visit"], table["detector"], strict=True)
        ]
        assert len(pairs) == len(set(pairs)) == len(placement[placement.site == site.name])
