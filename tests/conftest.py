"""Test configuration: 8 simulated CPU devices, set before JAX initialises."""

import os

# Must happen before jax is imported anywhere, so the pmap/shard_map paths run in CI.
_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests must never read from or write into the user's real dataset cache.
os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)


def pytest_runtest_setup(item):
    """``eight_devices`` tests skip on an accelerator with fewer than 8 devices (a
    run with ``JAX_PLATFORMS=cuda`` sees its one GPU). On the CPU they always run:
    there the 8 devices above are set up, and a test fails loudly without them."""
    if (item.get_closest_marker("eight_devices") is not None
            and jax.default_backend() != "cpu" and jax.device_count() < 8):
        import pytest

        pytest.skip(f"needs 8 devices; {jax.default_backend()} has {jax.device_count()}")
