"""KdV data: the store ``data/kdv.zarr`` (:mod:`.store`), the batched pseudo-spectral ETDRK4
solver (:mod:`.spectral`), the seeded generator of the LPSDA "easy" distribution
(:mod:`.generate`) and the import of LPSDA's HDF5 files (:mod:`.lpsda`).

The model code reads the store through :func:`open_kdv_store` and :func:`split_indices`.
"""

from smnn.data.kdv.store import (
    REMEDY,
    SPLITS,
    build_kdv_dataset,
    open_kdv_store,
    split_indices,
    write_kdv_store,
)

__all__ = [
    "REMEDY",
    "SPLITS",
    "build_kdv_dataset",
    "open_kdv_store",
    "split_indices",
    "write_kdv_store",
]
