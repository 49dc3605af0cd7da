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


@pytest.mark.parametrize("command", COMMAND_OPTIONS)
@pytest.mark.parametrize("source", ["absent", "empty_folder", "text_file"])
def test_bad_sources_are_one_line_and_exit_2(command, source, tmp_path, capsys):
    (tmp_path / "empty_folder").mkdir()
    (tmp_path / "text_file").write_text("not a checkpoint")
    assert main([command, str(tmp_path / source), str(tmp_path / "dst")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and source in err
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("with_tokenizer", [True, False])
def test_hf_to_orbax_says_in_one_line_when_the_source_has_no_tokenizer(tmp_path, capsys, with_tokenizer):
    import numpy as np
    from hf_models import random_hf_model, tiny_hf_config

    from jaxflip.data import builtin_tokenizer_dir
    from jaxflip.models.checkpoint_folder import copy_tokenizer_files

    random_hf_model(tiny_hf_config(), np.random.default_rng()).save_pretrained(tmp_path / "hf")
    if with_tokenizer:
        copy_tokenizer_files(builtin_tokenizer_dir(), tmp_path / "hf")
    assert main(["hf-to-orbax", str(tmp_path / "hf"), str(tmp_path / "out")]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "no tokenizer files" in line]
    assert notes == ([] if with_tokenizer else [f"note: {tmp_path / 'hf'} has no tokenizer files; the checkpoint "
                                                f"will have none"])
