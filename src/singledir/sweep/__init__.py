"""Sweeps: the networks of an experiment as trials, run locally or on Ray, with a
resumable results store in the output folder."""

from singledir.sweep.executors import (
    EXECUTORS,
    LocalExecutor,
    RayExecutor,
    make_executor,
)
from singledir.sweep.store import STORE_NAME, ResultStore, StoreError

__all__ = [
    "EXECUTORS",
    "STORE_NAME",
    "LocalExecutor",
    "RayExecutor",
    "ResultStore",
    "StoreError",
    "make_executor",
]
