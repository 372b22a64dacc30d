"""Former home of the Zarr store helpers, kept importable: see :mod:`smnn.data.store`."""

from smnn.data.store import (
    DEFAULT_REMEDY,
    FOREIGN_FILES,
    StoreError,
    checksummed_encoding,
    load_variables,
    open_dataset,
    store_read_errors,
    write_dataset_atomic,
)

__all__ = [
    "StoreError",
    "DEFAULT_REMEDY",
    "FOREIGN_FILES",
    "write_dataset_atomic",
    "checksummed_encoding",
    "open_dataset",
    "load_variables",
    "store_read_errors",
]
