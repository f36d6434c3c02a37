"""The data errors; each message names the config key (or the command) that fixes it."""

from __future__ import annotations

from archquant.utils.errors import UserError


class DataFileNotFoundError(UserError, FileNotFoundError):
    """A configured data file does not exist (nor could the Hub provide it); the message names the fix."""


class DataFormatError(UserError, ValueError):
    """A data file exists but does not follow its schema (missing field, bad label, bad JSON)."""


class HubUnavailableError(UserError, ConnectionError):
    """``datasets`` could not read a dataset from the Hugging Face Hub (no network, offline mode, gone)."""
