"""The demo pipeline's tasks: small numpy versions of Rubin's DRP steps.

- `MeasureStarsTask` (step1, per visit and detector): background-subtract a raw and
  measure its stars.
- `SolveZeropointsTask` (step2, global): solve every visit's photometric zero point
  from stars seen in several visits, like FGCM does over the whole survey.
- `MakeCoaddTask` (step3, per patch): calibrate, stack and measure a patch coadd.
"""

from __future__ import annotations

__all__ = (
    "FAILURE_ENV",
    "MakeCoaddTask",
    "MeasureStarsTask",
    "SolveZeropointsTask",
)

import os

import lsst.pex.config as pexConfig
import numpy as np
from astropy.table import Table, vstack
from lsst.pipe.base import (
    PipelineTask,
    PipelineTaskConfig,
    PipelineTaskConnections,
    QuantumContext,
    Struct,
)
from lsst.pipe.base import connectionTypes as cT
from lsst.pipe.base.connections import InputQuantizedConnection, OutputQuantizedConnection
from lsst.sphgeom import LonLat

from .images import SkyImage
from .measurement import ZERO_POINT, match_positions, measure_stars, solve_zeropoints

FAILURE_ENV = "MULTISITE_DEMO_FAIL"
"""Environment variable naming quanta to fail, as ``label:key=value[,label:key=value]``.

It stands for a node or software failure in tests; it is read at run time so the
task configuration (and so the output collections) do not change between attempts.
"""


def _fail_if_requested(label: str, data_id: dict) -> None:
    for spec in filter(None, os.environ.get(FAILURE_ENV, "").split(",")):
        task, _, condition = spec.partition(":")
        key, _, value = condition.partition("=")
        if task == label and str(data_id.get(key)) == value:
            raise RuntimeError(f"Injected failure for {label} {key}={value} ({FAILURE_ENV}).")


class MeasureStarsConnections(PipelineTaskConnections, dimensions=("instrument", "visit", "detector")):
    raws = cT.Input(
        doc="Raw exposures of this visit and detector.",
        name="raw",
        storageClass="SkyImage",
        dimensions=("instrument", "exposure", "detector"),
        multiple=True,
    )
    image = cT.Output(
        doc="Background-subtracted image with variance.",
        name="preliminary_visit_image",
        storageClass="SkyImage",
        dimensions=("instrument", "visit", "detector"),
    )
    stars = cT.Output(
        doc="Stars measured on the image (instrumental fluxes).",
        name="single_visit_star",
        storageClass="ArrowAstropy",
        dimensions=("instrument", "visit", "detector"),
    )


class MeasureStarsConfig(PipelineTaskConfig, pipelineConnections=MeasureStarsConnections):
    threshold = pexConfig.Field[float](doc="Detection threshold (sigma).", default=5.0)
    gain = pexConfig.Field[float](doc="Electrons per count, for the variance.", default=1.0)


class MeasureStarsTask(PipelineTask):
    """Background-subtract a raw and measure its stars."""

    ConfigClass = MeasureStarsConfig
    _DefaultName = "measureStars"
    config: MeasureStarsConfig

    def runQuantum(
        self,
        butlerQC: QuantumContext,
        inputRefs: InputQuantizedConnection,
        outputRefs: OutputQuantizedConnection,
    ) -> None:
        _fail_if_requested(self.getName(), dict(butlerQC.quantum.dataId.mapping))
        super().runQuantum(butlerQC, inputRefs, outputRefs)

    def run(self, raws: list[SkyImage]) -> Struct:
        """Subtract the median background and measure stars on a raw.

        Parameters
        ----------
        raws : `list` [`SkyImage`]
            The visit's exposures (one per visit in the demo).

        Returns
        -------
        result : `lsst.pipe.base.Struct`
            ``image`` (`SkyImage`) and ``stars`` (`astropy.table.Table`).
        """
        raw = raws[0]
        background = float(np.median(raw.pixels))
        variance = np.clip(raw.pixels, 0, None) / self.config.gain
        image = SkyImage(raw.pixels - background, raw.ra0, raw.dec0, raw.scale, variance)
        return Struct(image=image, stars=measure_stars(image, self.config.threshold))


class SolveZeropointsConnections(PipelineTaskConnections, dimensions=("instrument",)):
    stars = cT.Input(
        doc="Stars of every visit and detector of the campaign.",
        name="single_visit_star",
        storageClass="ArrowAstropy",
        dimensions=("instrument", "visit", "detector"),
        multiple=True,
    )
    zeropoints = cT.Output(
        doc="Photometric zero point of each visit.",
        name="visit_zeropoint",
        storageClass="StructuredDataDict",
        dimensions=("instrument", "visit"),
        multiple=True,
    )


class SolveZeropointsConfig(PipelineTaskConfig, pipelineConnections=SolveZeropointsConnections):
    match_radius = pexConfig.Field[float](doc="Match radius (degrees).", default=0.0015)


class SolveZeropointsTask(PipelineTask):
    """Solve every visit's zero point from stars measured in several visits."""

    ConfigClass = SolveZeropointsConfig
    _DefaultName = "solveZeropoints"
    config: SolveZeropointsConfig

    def runQuantum(
        self,
        butlerQC: QuantumContext,
        inputRefs: InputQuantizedConnection,
        outputRefs: OutputQuantizedConnection,
    ) -> None:
        # Sort by data ID so that the solution does not depend on input order.
        refs = sorted(inputRefs.stars, key=lambda ref: (ref.dataId["visit"], ref.dataId["detector"]))
        tables = []
        for ref in refs:
            table = butlerQC.get(ref)
            table["visit"] = np.full(len(table), ref.dataId["visit"], dtype=np.int64)
            tables.append(table)
        solution = self.run(vstack(tables))
        for ref in outputRefs.zeropoints:
            offset, n_stars = solution[ref.dataId["visit"]]
            butlerQC.put({"zeropoint": ZERO_POINT - offset, "delta_mag": offset, "n_stars": n_stars}, ref)

    def run(self, stars: Table) -> dict[int, tuple[float, int]]:
        """Solve per-visit magnitude offsets.

        Parameters
        ----------
        stars : `astropy.table.Table`
            All measurements, with a ``visit`` column.

        Returns
        -------
        solution : `dict` [`int`, `tuple` [`float`, `int`]]
            Visit id to (magnitude offset, number of stars).
        """
        flux = np.asarray(stars["inst_flux"])
        mag = -2.5 * np.log10(flux)
        mag_err = 1.0857 * np.asarray(stars["inst_flux_err"]) / flux
        group = match_positions(np.asarray(stars["ra"]), np.asarray(stars["dec"]), self.config.match_radius)
        return solve_zeropoints(np.asarray(stars["visit"]), group, mag, mag_err)


class MakeCoaddConnections(PipelineTaskConnections, dimensions=("skymap", "tract", "patch")):
    images = cT.Input(
        doc="Background-subtracted images overlapping the patch.",
        name="preliminary_visit_image",
        storageClass="SkyImage",
        dimensions=("instrument", "visit", "detector"),
        multiple=True,
    )
    zeropoints = cT.Input(
        doc="Zero points of the visits overlapping the patch.",
        name="visit_zeropoint",
        storageClass="StructuredDataDict",
        dimensions=("instrument", "visit"),
        multiple=True,
    )
    coadd = cT.Output(
        doc="Calibrated coadd of the patch (flux in units of a zero point of 27).",
        name="deep_coadd",
        storageClass="SkyImage",
        dimensions=("skymap", "tract", "patch"),
    )
    objects = cT.Output(
        doc="Objects measured on the coadd, with calibrated magnitudes.",
        name="object_catalog",
        storageClass="ArrowAstropy",
        dimensions=("skymap", "tract", "patch"),
    )


class MakeCoaddConfig(PipelineTaskConfig, pipelineConnections=MakeCoaddConnections):
    pixel_scale = pexConfig.Field[float](doc="Coadd pixel size (degrees).", default=0.001)
    threshold = pexConfig.Field[float](doc="Detection threshold (sigma).", default=5.0)


class MakeCoaddTask(PipelineTask):
    """Calibrate, stack and measure the images overlapping a patch."""

    ConfigClass = MakeCoaddConfig
    _DefaultName = "makeCoadd"
    config: MakeCoaddConfig

    def runQuantum(
        self,
        butlerQC: QuantumContext,
        inputRefs: InputQuantizedConnection,
        outputRefs: OutputQuantizedConnection,
    ) -> None:
        _fail_if_requested(self.getName(), dict(butlerQC.quantum.dataId.mapping))
        box = butlerQC.quantum.dataId.region.getBoundingBox()
        corner = LonLat(box.getLon().getA(), box.getLat().getA())
        refs = sorted(inputRefs.images, key=lambda ref: (ref.dataId["visit"], ref.dataId["detector"]))
        images = [(ref.dataId["visit"], butlerQC.get(ref)) for ref in refs]
        zeropoints = {ref.dataId["visit"]: butlerQC.get(ref)["zeropoint"] for ref in inputRefs.zeropoints}
        size = round((box.getLon().getB() - box.getLon().getA()).asDegrees() / self.config.pixel_scale)
        result = self.run(images, zeropoints, corner.getLon().asDegrees(), corner.getLat().asDegrees(), size)
        butlerQC.put(result, outputRefs)

    def run(
        self,
        images: list[tuple[int, SkyImage]],
        zeropoints: dict[int, float],
        ra0: float,
        dec0: float,
        size: int,
    ) -> Struct:
        """Stack calibrated images on the patch grid and measure the coadd.

        Parameters
        ----------
        images : `list` [`tuple` [`int`, `SkyImage`]]
            Visit id and image of each input.
        zeropoints : `dict` [`int`, `float`]
            Zero point of each visit.
        ra0, dec0 : `float`
            Lower-left corner of the patch (degrees).
        size : `int`
            Patch size in pixels (square).

        Returns
        -------
        result : `lsst.pipe.base.Struct`
            ``coadd`` (`SkyImage`) and ``objects`` (`astropy.table.Table`).
        """
        scale = self.config.pixel_scale
        grid = SkyImage(np.zeros((size, size)), ra0 + scale / 2, dec0 + scale / 2, scale)
        weighted_sum = np.zeros((size, size))
        weight_sum = np.zeros((size, size))
        for visit, image in images:
            # Scale every visit to the nominal zero point before stacking.
            factor = 10 ** (0.4 * (ZERO_POINT - zeropoints[visit]))
            # Input pixels sit on the same lattice as the patch: a shift, no resampling.
            x0, y0 = (round(v) for v in grid.sky_to_pixel(image.ra0, image.dec0))
            ny, nx = image.pixels.shape
            gx0, gy0 = max(x0, 0), max(y0, 0)
            gx1, gy1 = min(x0 + nx, size), min(y0 + ny, size)
            if gx0 >= gx1 or gy0 >= gy1:
                continue
            src = np.s_[gy0 - y0 : gy1 - y0, gx0 - x0 : gx1 - x0]
            weight = 1.0 / (image.variance[src] * factor**2)
            weighted_sum[gy0:gy1, gx0:gx1] += weight * image.pixels[src] * factor
            weight_sum[gy0:gy1, gx0:gx1] += weight
        covered = weight_sum > 0
        grid.pixels[covered] = weighted_sum[covered] / weight_sum[covered]
        grid.variance = np.where(covered, 1.0 / np.where(covered, weight_sum, 1.0), np.inf)
        objects = measure_stars(grid, self.config.threshold)
        objects["mag"] = ZERO_POINT - 2.5 * np.log10(objects["inst_flux"])
        return Struct(coadd=grid, objects=objects)
