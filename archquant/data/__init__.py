"""Data: calibration/validation token blocks, perplexity text and the zero-shot benchmark files."""

from archquant.data.benchmarks import TASKS, load_benchmark
from archquant.data.calibration import calibration_blocks, read_text, token_stream, tokenizer_fingerprint
from archquant.data.config import DEFAULT_TASK_FILES, DataConfig
from archquant.data.files import DataFileNotFoundError, DataFormatError, data_root, resolve_data_path

__all__ = [
    "DEFAULT_TASK_FILES",
    "TASKS",
    "DataConfig",
    "DataFileNotFoundError",
    "DataFormatError",
    "calibration_blocks",
    "data_root",
    "load_benchmark",
    "read_text",
    "resolve_data_path",
    "token_stream",
    "tokenizer_fingerprint",
]
