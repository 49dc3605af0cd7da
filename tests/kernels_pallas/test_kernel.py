"""The kernel's launch settings: defaults, the environment's overrides and their errors."""

import pytest

from jaxflip.kernels_pallas import kernel


@pytest.fixture
def launch_env(monkeypatch):
    """Set the launch variables for one test; the cached default is re-read before and after."""
    monkeypatch.delenv("JAXFLIP_BITFLIP_LAUNCH", raising=False)
    monkeypatch.delenv("JAXFLIP_BITFLIP_EARLY_EXIT", raising=False)
    kernel.default_launch.cache_clear()
    yield monkeypatch.setenv
    kernel.default_launch.cache_clear()


def test_environment_overrides_the_default_launch(launch_env):
    assert kernel.default_launch() == kernel.DEFAULT_LAUNCH
    kernel.default_launch.cache_clear()
    launch_env("JAXFLIP_BITFLIP_LAUNCH", "32/1")
    launch_env("JAXFLIP_BITFLIP_EARLY_EXIT", "0")
    assert kernel.default_launch() == kernel.Launch(block=32, num_warps=1, early_exit=False)


@pytest.mark.parametrize("name,value,message", [
    ("JAXFLIP_BITFLIP_LAUNCH", "32", "must be BLOCK/WARPS"),
    ("JAXFLIP_BITFLIP_LAUNCH", "48/1", "Launch.block must be a power of two >= 16"),
    ("JAXFLIP_BITFLIP_LAUNCH", "8/1", "Launch.block must be a power of two >= 16"),
    ("JAXFLIP_BITFLIP_LAUNCH", "64/3", "Launch.num_warps must be a power of two"),
    ("JAXFLIP_BITFLIP_EARLY_EXIT", "yes", "must be 0 or 1"),
])
def test_bad_launch_settings_are_one_line_errors(launch_env, name, value, message):
    launch_env(name, value)
    with pytest.raises(ValueError, match=message):
        kernel.default_launch()
