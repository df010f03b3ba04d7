"""Shared fixtures: one pool of gloo worker processes per world size for the whole session."""

from __future__ import annotations

import os

import pytest

from harness import DistPool

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Tests never read or write the user's ~/.cache/meshlm."""
    os.environ["MESHLM_CACHE"] = str(tmp_path_factory.mktemp("meshlm-cache"))


@pytest.fixture(scope="session")
def dist():
    """dist(world) -> a DistPool of `world` ranks, started once and reused (restarted after a failure)."""
    pools: dict[int, DistPool] = {}

    def get(world: int) -> DistPool:
        pool = pools.get(world)
        if pool is None or pool.broken:
            if pool is not None:
                pool.close()
            pools[world] = pool = DistPool(world)
        return pool

    yield get
    for pool in pools.values():
        pool.close()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A small token dataset prepared from a slice of the standard library (shared by the session)."""
    from meshlm import data

    files = data.default_corpus()[:40]
    out = tmp_path_factory.mktemp("data") / "stdlib-tiny"
    return data.prepare(inputs=files, out_dir=out, vocab_size=512, progress=False)
