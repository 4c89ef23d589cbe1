"""Datasets: raw formats, preparation into HDF5 shards, and per-worker loading."""
from .dataset import Piece, ShardedDataset, open_dataset
from .errors import DataError
from .loader import Loader, augment
from .prepare import FORMATS, prepare, prepare_from
from .sources import SOURCES, RawFile, Source
