"""Running converted classifiers over images of any size: exact tiles, zarr, dask, fallbacks.

``dense_map`` is the entry point (:mod:`.dense`); images are read lazily (:mod:`.images`),
tiled exactly (:mod:`.tiling`), written to memory or a resumable zarr store (:mod:`.store`),
run in process or as dask tasks (:mod:`.distributed`), and models that cannot be converted
are evaluated crop by crop (:mod:`.windows`). Image pyramids (``scales=``) resize the image
tile by tile (:mod:`.resize`) and give each scale's map with its geometry in the original
image's pixels (:mod:`.pyramid`).
"""

from .dense import TilingWarning, dense_map
from .pyramid import ScaledGeometry, ScaledMap, ScaleWarning

__all__ = ["ScaleWarning", "ScaledGeometry", "ScaledMap", "TilingWarning", "dense_map"]
