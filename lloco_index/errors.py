"""Errors the CLI reports as one line (exit code 2) instead of a traceback."""

from .backbone import UnknownAdapterError
from .generation import PromptTooLongError
from .store import StoreError

USER_ERRORS = (StoreError, PromptTooLongError, UnknownAdapterError, FileNotFoundError, PermissionError,
               ValueError, OSError, ModuleNotFoundError)  # the last: an optional extra is not installed
