"""Resolution-staged HDF5 data sets (`hpc-dualbatch prepare`), sharding and batch loaders.

See docs/data.md for the file layout and usage.
"""

from hpc_dualbatch.data.layout import FORMAT_VERSION
from hpc_dualbatch.data.loader import EvalLoader, TrainLoader, clear_memory_cache, eval_indices, shard_indices
from hpc_dualbatch.data.sources import SOURCES
from hpc_dualbatch.data.stage import prepare
from hpc_dualbatch.data.staged import StagedData, open_staged
from hpc_dualbatch.data.synthetic import SyntheticSpec

__all__ = [
    "FORMAT_VERSION",
    "SOURCES",
    "EvalLoader",
    "StagedData",
    "SyntheticSpec",
    "TrainLoader",
    "clear_memory_cache",
    "eval_indices",
    "open_staged",
    "prepare",
    "shard_indices",
]
