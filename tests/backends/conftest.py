"""What the backend tests share."""

from __future__ import annotations

import gc
import warnings
from collections.abc import Iterator

import pytest
import redis


@pytest.fixture
def cluster_nodes_collected() -> Iterator[None]:
    """After the test, collect the cluster nodes redis-py 7 dropped without closing them.

    redis-py 7 replaces the node objects of a cluster whose topology it refreshes after a
    connection error without closing the old ones, whose finalizers then warn. They are
    collected here, their warnings ignored, so that a test's own leaks still show.
    """
    yield
    if redis.__version__.startswith("7."):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
