"""Test set-up: 8 fake CPU devices (before JAX starts), a per-session corpus
cache, and the `gpu` marker for tests that need a GPU."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["JAX_NUM_CPU_DEVICES"] = "8"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a GPU; skipped elsewhere")
    config.addinivalue_line("markers", "slow: trains for a while (still CPU-sized)")


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def corpus_cache(tmp_path_factory):
    """One corpus cache for the whole session, outside the user's home."""
    path = os.environ.get("ATOLL_TEST_CACHE") or str(tmp_path_factory.mktemp("atoll-cache"))
    os.environ["ATOLL_CACHE"] = path
    return path
