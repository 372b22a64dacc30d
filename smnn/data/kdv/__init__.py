"""KdV data: the store ``data/kdv.zarr`` (:mod:`.store`), the batched pseudo-spectral ETDRK4
solver (:mod:`.spectral`), the seeded generator of the LPSDA "easy" distribution
(:mod:`.generate`) and the import of LPSDA's HDF5 files (:mod:`.lpsda`).

The model code reads the store through :func:`open_kdv_store` and :func:`split_indices`; any
trajectory can be recomputed with :func:`solve_kdv` (explicit initial conditions) or
:func:`regenerate` (by split and index, as the generator made it).
"""

from smnn.data.kdv.generate import KdvGenerateSettings, generate_kdv, regenerate
from smnn.data.kdv.lpsda import KdvFileError, KdvLpsdaSettings, import_lpsda
from smnn.data.kdv.spectral import solve_kdv
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
    "KdvFileError",
    "KdvGenerateSettings",
    "KdvLpsdaSettings",
    "build_kdv_dataset",
    "generate_kdv",
    "import_lpsda",
    "open_kdv_store",
    "regenerate",
    "solve_kdv",
    "split_indices",
    "write_kdv_store",
]
