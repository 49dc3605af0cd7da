"""The command line: every command documents its options."""

import pytest

from jaxflip.convert.__main__ import main

COMMAND_OPTIONS = {
    "hf-to-orbax": ["--dtype", "--overwrite", "--max-shard-size"],
    "orbax-to-hf": ["--dtype", "--merge-lora"],
    "titan-to-orbax": ["--flavor", "--config", "--tokenizer"],
    "orbax-to-titan": ["--merge-lora", "--key-names"],
}


@pytest.mark.parametrize("command", COMMAND_OPTIONS)
def test_help_lists_the_options(command, capsys):
    with pytest.raises(SystemExit) as exit:
        main([command, "--help"])
    assert exit.value.code == 0
    usage = capsys.readouterr().out
    assert all(option in usage for option in COMMAND_OPTIONS[command]), usage


def test_a_bad_size_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["hf-to-orbax", "a", "b", "--max-shard-size", "lots"])
    assert exit.value.code == 2
    assert "--max-shard-size" in capsys.readouterr().err
