"""The demo camera, registered like any Rubin instrument."""

from __future__ import annotations

__all__ = ("DemoCam",)

from lsst.daf.butler import Registry
from lsst.pipe.base import Instrument

from .images import SkyImageFormatter


class DemoCam(Instrument):
    """A four-detector camera with one filter, for the demo campaign."""

    n_detectors = 4
    physical_filter = "demo-r"
    band = "r"

    @classmethod
    def getName(cls) -> str:
        return "DemoCam"

    def register(self, registry: Registry, *, update: bool = False) -> None:
        name = self.getName()
        with registry.transaction():
            registry.syncDimensionData(
                "instrument",
                {
                    "name": name,
                    "detector_max": self.n_detectors,
                    "visit_max": 1_000_000,
                    "exposure_max": 1_000_000,
                    "class_name": f"{type(self).__module__}.{type(self).__qualname__}",
                },
                update=update,
            )
            registry.syncDimensionData(
                "physical_filter", {"instrument": name, "name": self.physical_filter, "band": self.band}
            )
            for detector in range(self.n_detectors):
                registry.syncDimensionData(
                    "detector",
                    {"instrument": name, "id": detector, "full_name": f"D{detector}", "purpose": "SCIENCE"},
                    update=update,
                )

    def getRawFormatter(self, dataId) -> type[SkyImageFormatter]:
        return SkyImageFormatter
