"""The mesh a config asks for against the visible devices (8 CPU devices in the tests)."""

import jax
import pytest

from jaxflip.train.__main__ import main
from jaxflip.train.train_config import ConfigError, load_config
from jaxflip.train.setup import build_mesh, mesh_mismatch


@pytest.mark.parametrize("flags, fix", [
    (["--parallelism.fsdp_degree", "3"], "pass --parallelism.fsdp_degree -1 to use all"),
    (["--parallelism.data_parallel_replicate_degree", "3"],
     "pass --parallelism.fsdp_degree -1 --parallelism.data_parallel_replicate_degree 1 to use all"),
])
def test_a_mesh_the_devices_do_not_fit_names_the_flags_that_fix_it(flags, fix):
    config = load_config("configs/quickstart.toml", flags)
    with pytest.raises(ConfigError, match=f"but {jax.device_count()} are visible .*; {fix}$"):
        build_mesh(config)
    fixed = load_config("configs/quickstart.toml", flags + fix.split()[1:-3])
    assert mesh_mismatch(fixed, jax.device_count()) is None
    assert build_mesh(fixed).size == jax.device_count()


@pytest.mark.parametrize("name", ["aixsim-60M", "aixsim-200M", "aixsim-400M", "aixsim-1.1B"])
def test_shipped_pretraining_configs_take_every_visible_device(name, capsys):
    assert main(["--config", f"configs/{name}.toml", "--print-config"]) == 0
    assert capsys.readouterr().err == ""
    assert mesh_mismatch(load_config(f"configs/{name}.toml"), 1) is None  # one GPU runs them too


def test_print_config_warns_when_a_run_would_stop_on_the_mesh(capsys):
    assert main(["--config", "configs/aixsim-60M.toml", "--print-config", "--parallelism.fsdp_degree", "2"]) == 0
    error = capsys.readouterr().err
    assert error.startswith("warning: ") and "pass --parallelism.fsdp_degree -1" in error and error.count("\n") == 1
