"""Data: calibration/validation token blocks, perplexity text and the zero-shot benchmark files (local or from the Hub)."""

from archquant.data.benchmarks import TASKS, load_benchmark
from archquant.data.calibration import calibration_blocks, read_text, token_stream, tokenizer_fingerprint
from archquant.data.config import CALIB_FILES, DATA_SOURCES, DEFAULT_TASK_FILES, DataConfig
from archquant.data.errors import DataFileNotFoundError, DataFormatError, HubUnavailableError
from archquant.data.files import data_root, resolve_data_path
from archquant.data.hub import HUB_FILES, write_hub_file

__all__ = [
    "CALIB_FILES",
    "DATA_SOURCES",
    "DEFAULT_TASK_FILES",
    "HUB_FILES",
    "TASKS",
    "DataConfig",
    "DataFileNotFoundError",
    "DataFormatError",
    "HubUnavailableError",
    "calibration_blocks",
    "data_root",
    "load_benchmark",
    "read_text",
    "resolve_data_path",
    "token_stream",
    "tokenizer_fingerprint",
    "write_hub_file",
]
