"""Running converted classifiers over images of any size: exact tiles, zarr, dask, fallbacks.

``dense_map`` is the entry point (:mod:`.dense`); images are read lazily (:mod:`.images`),
tiled exactly (:mod:`.tiling`), written to memory or a resumable zarr store (:mod:`.store`),
run in process or as dask tasks (:mod:`.distributed`), and models that cannot be converted
are evaluated crop by crop (:mod:`.windows`).
"""

from .dense import TilingWarning, dense_map

__all__ = ["TilingWarning", "dense_map"]
