"""Latency tables: op-signature LUTs per device x backend x model x scenario, the profiler, the expected-latency model."""

from archquant.latency.loader import TableMismatchWarning, load_table_for, table_path, tables_root
from archquant.latency.model import LatencyModel
from archquant.latency.scenario import Scenario
from archquant.latency.table import LatencyTable, TableError

__all__ = [
    "LatencyModel",
    "LatencyTable",
    "Scenario",
    "TableError",
    "TableMismatchWarning",
    "load_table_for",
    "table_path",
    "tables_root",
]
