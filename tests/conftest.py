"""Test set-up: 8 fake CPU devices (before JAX starts), a per-session corpus
cache, and the `gpu` marker for tests that need a GPU."""

import os
import subprocess
import sys

from atoll.parallel import runtime  # os only: JAX must not start before the variables below are set

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["JAX_NUM_CPU_DEVICES"] = "8"


def _xla_knows(flag: str) -> bool:
    """Whether this jaxlib accepts `flag` (XLA aborts the process on an unknown
    one): probed once in a child process, remembered in the environment for
    the xdist workers and every subprocess a test starts."""
    name = "ATOLL_TEST_KNOWS_" + flag.split("=")[0].upper()
    if name not in os.environ:
        try:  # the CPU client parses XLA_FLAGS when it starts: an unknown flag aborts jax.devices()
            known = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True,
                                   env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--{flag}"),
                                   timeout=300).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            known = False
        os.environ[name] = "1" if known else "0"
    return os.environ[name] == "1"


# The suite's time is mostly XLA compiling many small programs that then run
# for milliseconds. Two settings, here and in every subprocess a test starts
# (speed ratios are not tested; results agree to float rounding):
# - most optimizations off: about 40% less;
# - XLA:CPU's fusion emitters (its newer code generator) off: they cost more
#   to compile than they save at run time here. pytest took 9:52 instead of
#   13:52 for the whole suite on the 2-core CI machine type (jax 0.10.2).
#   A flag the user set in XLA_FLAGS wins.
# atoll itself keeps XLA's defaults.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
_flags = runtime.xla_flags_overriding(os.environ.get("XLA_FLAGS", ""), {"xla_force_host_platform_device_count": "8"})
if _xla_knows("xla_cpu_use_fusion_emitters=false"):
    _flags = runtime.xla_flags_with_defaults(_flags, {"xla_cpu_use_fusion_emitters": "false"})
os.environ["XLA_FLAGS"] = _flags

import atexit  # noqa: E402
import functools  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

# Most of the suite's time is XLA compiling the same tiny programs again (every
# train() call, resumed runs, notebook kernels, subprocesses): a persistent
# compilation cache shared by all of them, fresh for each session.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="atoll-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
_COMPILE_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
jax.config.update("jax_compilation_cache_dir", _COMPILE_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a GPU; skipped elsewhere")
    config.addinivalue_line("markers", "slow: trains for a while (still CPU-sized)")


ROOT = Path(__file__).resolve().parents[1]

# Modules whose tests run for tens of seconds each (end-to-end runs, notebooks,
# subprocesses). They are handed to the xdist workers first so that the end of
# the session is short tests filling in, not one worker finishing a long test
# while the other idles (the notebooks collect last otherwise).
_LONG_FIRST = (
    "tests/test_notebook.py", "tests/experiments/test_launch.py", "tests/experiments/test_train_policy.py",
    "tests/experiments/test_reproduce_async.py", "tests/experiments/test_train_islands.py",
    "tests/experiments/test_train_lm.py", "tests/experiments/test_reproduce_metaworld.py",
    "tests/experiments/test_reproduce_moe.py", "tests/experiments/test_reproduce_heterogeneous.py",
    "tests/experiments/test_reproduce_low_communication.py", "tests/kernels/test_attention_pallas.py",
)


def _long_first_rank(item) -> int:
    path = item.nodeid.split("::")[0]
    return _LONG_FIRST.index(path) if path in _LONG_FIRST else len(_LONG_FIRST)


@functools.lru_cache(maxsize=None)
def _has_module_fixture(path: str) -> bool:
    return 'scope="module"' in (ROOT / path).read_text()


def pytest_xdist_make_scheduler(config, log):
    """`make test` (pytest -n 2): every test is its own unit, handed to a worker as
    it frees up, in collection order (long modules first, below), except that the
    tests of a module with a module-scoped fixture (a benchmark run, a loaded
    corpus) stay on one worker so that fixture runs once. (xdist's own
    --dist loadgroup would do this with marks, but under pytest 9 it no longer
    sees them.)"""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class OneTestOrOneModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::")[0]
            return module if _has_module_fixture(module) else nodeid

    return OneTestOrOneModule(config, log)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_long_first_rank)  # stable: the order within a module is kept
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
