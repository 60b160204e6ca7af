"""A small sky image type and its Butler formatter.

The demo has no ``afw``: images are numpy arrays on a flat (tangent-plane) pixel
grid whose origin and scale travel with the pixels, stored as ``.npz``.
"""

from __future__ import annotations

__all__ = ("SkyImage", "SkyImageFormatter")

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from lsst.daf.butler import FormatterV2


@dataclass
class SkyImage:
    """Pixels on a flat sky grid.

    Parameters
    ----------
    pixels : `numpy.ndarray`
        Image, indexed ``[y, x]``.
    ra0, dec0 : `float`
        Sky position (degrees) of the centre of pixel ``[0, 0]``.
    scale : `float`
        Pixel size in degrees.
    variance : `numpy.ndarray`, optional
        Per-pixel variance, same shape as ``pixels``.
    """

    pixels: np.ndarray
    ra0: float
    dec0: float
    scale: float
    variance: np.ndarray | None = None

    def sky_to_pixel(self, ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return the pixel ``(x, y)`` of sky positions (degrees)."""
        return (np.asarray(ra) - self.ra0) / self.scale, (np.asarray(dec) - self.dec0) / self.scale

    def pixel_to_sky(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return the sky ``(ra, dec)`` (degrees) of pixel positions."""
        return self.ra0 + np.asarray(x) * self.scale, self.dec0 + np.asarray(y) * self.scale


class SkyImageFormatter(FormatterV2):
    """Read and write `SkyImage` as a compressed numpy ``.npz`` file."""

    default_extension = ".npz"
    supported_extensions = frozenset({".npz"})
    can_read_from_local_file = True

    def read_from_local_file(self, path: str, component: str | None = None, expected_size: int = -1) -> Any:
        with np.load(path) as data:
            variance = data["variance"] if "variance" in data.files else None
            return SkyImage(
                pixels=data["pixels"],
                ra0=float(data["ra0"]),
                dec0=float(data["dec0"]),
                scale=float(data["scale"]),
                variance=variance,
            )

    def to_bytes(self, in_memory_dataset: Any) -> bytes:
        image: SkyImage = in_memory_dataset
        arrays = {"pixels": image.pixels, "ra0": image.ra0, "dec0": image.dec0, "scale": image.scale}
        if image.variance is not None:
            arrays["variance"] = image.variance
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        return buffer.getvalue()
