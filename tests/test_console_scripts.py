"""The console commands pyproject.toml installs (jaxflip-train, -convert, -eval) are the CLIs."""

import importlib
import tomllib
from pathlib import Path

import pytest

SCRIPTS = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]


def test_the_three_commands_are_declared():
    assert sorted(SCRIPTS) == ["jaxflip-convert", "jaxflip-eval", "jaxflip-train"]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_each_command_is_its_clis_main(name, capsys):
    module, function = SCRIPTS[name].split(":")
    assert module == f"jaxflip.{name.removeprefix('jaxflip-')}.__main__"
    main = getattr(importlib.import_module(module), function)
    with pytest.raises(SystemExit) as exited:  # the installed script runs sys.exit(main())
        main(["--help"])
    assert exited.value.code == 0 and "usage:" in capsys.readouterr().out
