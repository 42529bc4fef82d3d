"""Data: the image sets (``sets.py``, ``omniglot.py``, shared pieces in ``base.py``), the fixed
episodes drawn from them (``episodes.py``) and the corruptions used for denoising (``noise.py``)."""
from pyro_kpp.data.base import DataError, ImageData, cache_dir, resolve_data_dir
from pyro_kpp.data.sets import DATASETS, TEST_SEED, clear_memory_cache, load_dataset

__all__ = ["DATASETS", "TEST_SEED", "DataError", "ImageData", "cache_dir", "clear_memory_cache", "load_dataset",
           "resolve_data_dir"]
