"""File formats and output products of nbsim (outside the differentiable path).

Submodules: :mod:`.atomic` (atomic writes), :mod:`.smv` (SMV headers/images), :mod:`.images`
(float/int/pgm pixels and statistics), :mod:`.tables` (HKL, Fdump, matrix, source files),
:mod:`.nexus` (NeXus NXmx, h5py), :mod:`.cbf` (miniCBF, fabio), :mod:`.products` (all output files
at once).
"""

from .atomic import atomic_dir, atomic_write_bytes
from .images import (
    default_int_scale,
    default_pgm_scale,
    image_stats,
    int_image,
    pgm_bytes,
    pgm_image,
    read_float,
    roi_mask,
    write_float,
    write_pgm,
)
from .smv import c_g, parse_smv, read_smv, smv_header, smv_info, write_smv
from .tables import hkl_table, read_fdump, read_hkl, read_matrix, read_sourcefile, write_fdump

__all__ = [
    "atomic_dir",
    "atomic_write_bytes",
    "c_g",
    "default_int_scale",
    "default_pgm_scale",
    "hkl_table",
    "image_stats",
    "int_image",
    "parse_smv",
    "pgm_bytes",
    "pgm_image",
    "read_fdump",
    "read_float",
    "read_hkl",
    "read_matrix",
    "read_smv",
    "read_sourcefile",
    "roi_mask",
    "smv_header",
    "smv_info",
    "write_fdump",
    "write_float",
    "write_pgm",
    "write_products",
    "write_smv",
]


def __getattr__(name):
    # imported lazily: products depends on nbsim.noise, which imports nbsim.io.images
    if name == "write_products":
        from .products import write_products
        return write_products
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
