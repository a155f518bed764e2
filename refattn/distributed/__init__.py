"""Exact attention past one machine, on Dask (``pip install refattn[distributed]``).

The float64 reference for long-context kernels, at lengths whose inputs outgrow one machine:
:func:`scaled_dot_product_attention` and its backward take dask arrays chunked along the
sequence axis and build a graph of (query block, key block) tasks, each running refattn's own
tiled kernel, merged by LSE-combine trees (:mod:`refattn.distributed.attention`; the block
math is in :mod:`refattn.distributed.blocks`). The same graph runs on a ``LocalCluster``, on
Slurm/PBS through dask-jobqueue, on Kubernetes, and on GPUs with CuPy chunks (dask-cuda).
``refattn reference`` is the command line for ``.npy`` inputs (docs/distributed.md).

Importing :mod:`refattn` does not import this package, nor Dask.
"""

from .attention import scaled_dot_product_attention, sdpa_backward, vjp
from .cluster import local_cluster, peak_memory

__all__ = [
    "local_cluster",
    "peak_memory",
    "scaled_dot_product_attention",
    "sdpa_backward",
    "vjp",
]
