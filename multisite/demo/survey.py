"""A small synthetic survey: one tract of patches, dithered visits, star fields.

`make_survey` writes everything into a Butler repository the way a real survey's
central repository holds it: instrument and skymap dimension records (with real
`lsst.sphgeom` regions), exposures and visits, raw images ingested as ``raw``, and
the truth (star magnitudes and each visit's injected zero-point error) for QA.
"""

from __future__ import annotations

__all__ = ("SurveySpec", "TRUTH_COLLECTION_SUFFIX", "insert_skymap", "make_survey", "register_visit")

import hashlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.table import Table
from lsst.daf.butler import Butler, DatasetRef, DatasetType, FileDataset
from lsst.sphgeom import ConvexPolygon, LonLat, UnitVector3d

from .images import SkyImage, SkyImageFormatter
from .instrument import DemoCam
from .measurement import ZERO_POINT

_LOG = logging.getLogger(__name__)

TRUTH_COLLECTION_SUFFIX = "truth"


@dataclass(frozen=True)
class SurveySpec:
    """Sizes and seed of the synthetic survey.

    Defaults give a 3x2-patch tract observed by 12 four-detector visits, small
    enough that the whole campaign runs in minutes on two cores.
    """

    skymap: str = "demo"
    tract: int = 0
    ra0: float = 150.0
    dec0: float = 2.0
    pixel_scale: float = 0.001
    patch_pixels: int = 100
    patches_x: int = 3
    patches_y: int = 2
    detector_pixels: int = 60
    n_visits: int = 12
    n_stars: int = 250
    sky_level: float = 100.0
    psf_sigma: float = 1.2
    zeropoint_scatter: float = 0.05
    seed: int = 20261125

    @property
    def n_patches(self) -> int:
        return self.patches_x * self.patches_y

    def box_polygon(self, x0: float, y0: float, nx: float, ny: float) -> ConvexPolygon:
        """Region of a pixel box, in tract pixel coordinates."""
        s = self.pixel_scale
        corners = [(x0, y0), (x0 + nx, y0), (x0 + nx, y0 + ny), (x0, y0 + ny)]
        return ConvexPolygon(
            [UnitVector3d(LonLat.fromDegrees(self.ra0 + x * s, self.dec0 + y * s)) for x, y in corners]
        )


def insert_skymap(butler: Butler, spec: SurveySpec) -> None:
    """Register the demo skymap, its tract and its patches (idempotent)."""
    registry = butler.registry
    p = spec.patch_pixels
    registry.syncDimensionData(
        "skymap",
        {
            "name": spec.skymap,
            "hash": hashlib.sha1(repr(spec).encode()).digest(),
            "tract_max": spec.tract + 1,
            "patch_nx_max": spec.patches_x,
            "patch_ny_max": spec.patches_y,
        },
    )
    registry.syncDimensionData(
        "tract",
        {
            "skymap": spec.skymap,
            "id": spec.tract,
            "region": spec.box_polygon(0, 0, p * spec.patches_x, p * spec.patches_y),
        },
    )
    registry.insertDimensionData(
        "patch",
        *[
            {
                "skymap": spec.skymap,
                "tract": spec.tract,
                "id": iy * spec.patches_x + ix,
                "cell_x": ix,
                "cell_y": iy,
                "region": spec.box_polygon(ix * p, iy * p, p, p),
            }
            for iy in range(spec.patches_y)
            for ix in range(spec.patches_x)
        ],
        skip_existing=True,
    )


def _render(spec: SurveySpec, x0: int, y0: int, stars: Table, flux_scale: float, rng) -> np.ndarray:
    """Render the stars on a detector whose lower-left pixel is ``(x0, y0)``."""
    n = spec.detector_pixels
    ys, xs = np.mgrid[0:n, 0:n]
    sx = np.asarray(stars["x"]) - x0
    sy = np.asarray(stars["y"]) - y0
    near = (sx > -6) & (sx < n + 6) & (sy > -6) & (sy < n + 6)
    norm = 1.0 / (2 * np.pi * spec.psf_sigma**2)
    flux = np.asarray(stars["flux"])[near] * flux_scale
    model = np.full((n, n), spec.sky_level)
    for fx, fy, f in zip(sx[near], sy[near], flux, strict=True):
        model += f * norm * np.exp(-((xs - fx) ** 2 + (ys - fy) ** 2) / (2 * spec.psf_sigma**2))
    return rng.poisson(model).astype(np.float64)


def register_visit(
    registry, visit: int, index: int, day_obs: int, region: ConvexPolygon, detector_regions: dict
) -> None:
    """Register a one-exposure DemoCam visit: exposure, visit, their link and the detector regions.

    Parameters
    ----------
    registry : `lsst.daf.butler.Registry`
        Writeable registry holding the instrument, ``day_obs`` and visit system 0.
    visit : `int`
        Visit (and exposure) id.
    index : `int`
        Sequence number in the night.
    day_obs : `int`
        Observing day.
    region : `lsst.sphgeom.ConvexPolygon`
        The visit's region.
    detector_regions : `dict` [`int`, `lsst.sphgeom.ConvexPolygon`]
        Region of each detector.
    """
    instrument = DemoCam()
    name = instrument.getName()
    centre = LonLat(region.getCentroid())
    registry.syncDimensionData("group", {"instrument": name, "name": f"g{visit}"})
    common = {
        "instrument": name,
        "id": visit,
        "day_obs": day_obs,
        "physical_filter": instrument.physical_filter,
    }
    registry.syncDimensionData(
        "exposure",
        common
        | {
            "group": f"g{visit}",
            "obs_id": f"DM_{visit}",
            "exposure_time": 30.0,
            "observation_type": "science",
            "seq_num": index,
            "tracking_ra": centre.getLon().asDegrees(),
            "tracking_dec": centre.getLat().asDegrees(),
            "can_see_sky": True,
        },
    )
    registry.syncDimensionData(
        "visit", common | {"name": f"DM_{visit}", "seq_num": index, "exposure_time": 30.0, "region": region}
    )
    registry.syncDimensionData("visit_definition", {"instrument": name, "exposure": visit, "visit": visit})
    registry.syncDimensionData(
        "visit_system_membership", {"instrument": name, "visit_system": 0, "visit": visit}
    )
    for detector, detector_region in detector_regions.items():
        registry.syncDimensionData(
            "visit_detector_region",
            {"instrument": name, "visit": visit, "detector": detector, "region": detector_region},
        )


def make_survey(butler: Butler, spec: SurveySpec, raw_collection: str, truth_collection: str) -> int:
    """Write the synthetic survey into a Butler repository.

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        Writeable Butler of the (central) repository.
    spec : `SurveySpec`
        Survey sizes and seed.
    raw_collection : `str`
        RUN collection for the raws.
    truth_collection : `str`
        RUN collection for the truth tables.

    Returns
    -------
    n_raws : `int`
        Number of raws ingested.
    """
    rng = np.random.default_rng(spec.seed)
    instrument = DemoCam()
    name = instrument.getName()
    instrument.register(butler.registry)
    insert_skymap(butler, spec)
    registry = butler.registry

    width = spec.patch_pixels * spec.patches_x
    height = spec.patch_pixels * spec.patches_y
    margin = 10
    stars = Table(
        {
            "x": rng.uniform(-margin, width + margin, spec.n_stars),
            "y": rng.uniform(-margin, height + margin, spec.n_stars),
            "mag": rng.uniform(16.5, 20.5, spec.n_stars),
        }
    )
    stars["flux"] = 10 ** (-0.4 * (stars["mag"] - ZERO_POINT))
    stars["ra"] = spec.ra0 + stars["x"] * spec.pixel_scale
    stars["dec"] = spec.dec0 + stars["y"] * spec.pixel_scale

    day_obs = 20261125
    registry.syncDimensionData("day_obs", {"instrument": name, "id": day_obs})
    registry.syncDimensionData("visit_system", {"instrument": name, "id": 0, "name": "one-to-one"})
    field = 2 * spec.detector_pixels
    zeropoint_errors = rng.normal(0.0, spec.zeropoint_scatter, spec.n_visits)
    raw_type = DatasetType(
        "raw", ("instrument", "exposure", "detector"), "SkyImage", universe=butler.dimensions
    )
    butler.registry.registerDatasetType(raw_type)
    registry.registerRun(raw_collection)
    datasets = []
    staging = Path(tempfile.mkdtemp(prefix="raws-", dir=butler._config.configDir.ospath))
    for index in range(spec.n_visits):
        visit = 1000 + index
        # Integer pixel dithers keep every image on the tract's pixel lattice.
        vx0 = int(rng.integers(-margin, width - field + margin + 1))
        vy0 = int(rng.integers(-margin, height - field + margin + 1))
        detector_origins = {
            detector: (
                vx0 + (detector % 2) * spec.detector_pixels,
                vy0 + (detector // 2) * spec.detector_pixels,
            )
            for detector in range(instrument.n_detectors)
        }
        register_visit(
            registry,
            visit,
            index,
            day_obs,
            spec.box_polygon(vx0, vy0, field, field),
            {
                detector: spec.box_polygon(x0, y0, spec.detector_pixels, spec.detector_pixels)
                for detector, (x0, y0) in detector_origins.items()
            },
        )
        flux_scale = 10 ** (-0.4 * zeropoint_errors[index])
        for detector, (dx0, dy0) in detector_origins.items():
            pixels = _render(spec, dx0, dy0, stars, flux_scale, rng)
            image = SkyImage(
                pixels,
                spec.ra0 + (dx0 + 0.5) * spec.pixel_scale,
                spec.dec0 + (dy0 + 0.5) * spec.pixel_scale,
                spec.pixel_scale,
            )
            path = staging / f"raw_{visit}_{detector}.npz"
            path.write_bytes(SkyImageFormatter.to_bytes(None, image))
            data_id = registry.expandDataId(instrument=name, exposure=visit, detector=detector)
            datasets.append(
                FileDataset(path=str(path), refs=[DatasetRef(raw_type, data_id, run=raw_collection)])
            )
    butler.ingest(*datasets, transfer="move")
    staging.rmdir()

    truth_stars = DatasetType("demo_truth_stars", ("instrument",), "ArrowAstropy", universe=butler.dimensions)
    truth_zp = DatasetType(
        "demo_truth_zeropoints", ("instrument",), "StructuredDataDict", universe=butler.dimensions
    )
    for dataset_type in (truth_stars, truth_zp):
        registry.registerDatasetType(dataset_type)
    registry.registerRun(truth_collection)
    butler.put(stars["ra", "dec", "mag"], truth_stars, instrument=name, run=truth_collection)
    butler.put(
        {str(1000 + i): float(e) for i, e in enumerate(zeropoint_errors)},
        truth_zp,
        instrument=name,
        run=truth_collection,
    )
    _LOG.info("Wrote %d raws of %d visits into %s.", len(datasets), spec.n_visits, raw_collection)
    return len(datasets)
