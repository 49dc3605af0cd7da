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


@pytest.mark.parametrize("halves,launch", [(1, kernel.FEW_CALLS_LAUNCH), (12, kernel.FEW_CALLS_LAUNCH),
                                           (13, kernel.MANY_CALLS_LAUNCH), (24, kernel.MANY_CALLS_LAUNCH)])
def test_groups_of_four_or_more_philox_calls_get_warp_blocks_with_early_exit(launch_env, halves, launch):
    assert kernel.default_launch(halves) == launch


def test_environment_overrides_the_default_launch(launch_env):
    launch_env("JAXFLIP_BITFLIP_LAUNCH", "64/2")
    launch_env("JAXFLIP_BITFLIP_EARLY_EXIT", "0")
    assert kernel.default_launch(24) == kernel.Launch(block=64, num_warps=2, early_exit=False)


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
