"""Bad inputs across train, convert, eval and the torch bridge, one row each: exactly one
``error:`` line naming the bad thing, exit status 2 for the user's mistakes and 1 for the
environment's, no traceback, and every file that was there before byte-identical after (no
file added either). The CLIs run in-process (their ``main``); the workspace, with its models
of fresh random weights, is built once."""

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "eval"))

from hf_models import random_hf_model, tiny_hf_config  # noqa: E402
from tiny_models import save_checkpoint, tiny_text_model  # noqa: E402

from jaxflip.convert.__main__ import main as convert_main  # noqa: E402
from jaxflip.data import builtin_tokenizer_dir  # noqa: E402
from jaxflip.eval.__main__ import main as eval_main  # noqa: E402
from jaxflip.models.checkpoint_folder import copy_tokenizer_files  # noqa: E402
from jaxflip.torch_bridge.functional import random_bitflip_fn  # noqa: E402
from jaxflip.train.__main__ import main as train_main  # noqa: E402
from jaxflip.train.run_lock import RunLock  # noqa: E402

TRAIN_JOB = {
    "model": {"flavor": "aixsim-debug", "vocab_size": 4096},
    "training": {"seq_len": 32, "local_batch_size": 1, "steps": 2, "log_freq": 1, "save_freq": 2},
    "parallelism": {"fsdp_degree": -1},
    "bitflip": {"enable": False},
    "data": {"dataset": "builtin:moby-dick", "tokenizer": "builtin"},
    "checkpoint": {"async_save": False},
    "metrics": {"tensorboard": False, "plot": False, "progress_bar": False},
}


def edit_model_json(folder: Path, **changes) -> None:
    """Change (or, with None, drop) fields of a jaxflip checkpoint's stored config."""
    metadata = json.loads((folder / "jaxflip_model.json").read_text())
    for name, value in changes.items():
        if value is None:
            del metadata["config"][name]
        else:
            metadata["config"][name] = value
    (folder / "jaxflip_model.json").write_text(json.dumps(metadata))


def truncate_data_files(folder: Path) -> None:
    for path in (folder / "params").rglob("ocdbt.process_0/d/*"):
        with open(path, "r+b") as file:
            file.truncate(10)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The files the rows name: a good tiny jaxflip checkpoint and HF folder, corrupt copies of
    the checkpoint, bad datasets, bitflip configs and train configs, a finished training run."""
    root = tmp_path_factory.mktemp("bad_inputs")
    rng = np.random.default_rng()
    _, model = tiny_text_model(rng)
    good = Path(save_checkpoint(model, root / "model"))
    hf = root / "hf"
    random_hf_model(tiny_hf_config(), rng).save_pretrained(hf)
    copy_tokenizer_files(builtin_tokenizer_dir(), hf)
    corruptions = {
        "model_big": lambda d: edit_model_json(d, hidden_size="big"),
        "model_wide": lambda d: edit_model_json(d, hidden_size=model.config.hidden_size * 2),
        "model_no_vocab": lambda d: edit_model_json(d, vocab_size=None),
        "model_cut_json": lambda d: (d / "jaxflip_model.json").write_text((d / "jaxflip_model.json").read_text()[:40]),
        "model_no_metadata": lambda d: [path.unlink() for path in (d / "params").rglob("_METADATA")],
        "model_cut_data": truncate_data_files,
    }
    for name, corrupt in corruptions.items():
        shutil.copytree(good, root / name)
        corrupt(root / name)
    (root / "empty.jsonl").write_bytes(b"")
    (root / "binary.txt").write_bytes(b"\xff" + rng.bytes(2000))
    (root / "bad.jsonl").write_text('{"text": "a line"}\n{"text": cut off\n')
    (root / "latin1.toml").write_bytes("[bitflip]\nx_p_exp = 0.5 # \xe9t\xe9\n".encode("latin-1"))
    (root / "broken.toml").write_text("[bitflip\nx_p_exp = 0.5\n")
    (root / "train.yaml").write_text(json.dumps(TRAIN_JOB))  # JSON is YAML
    (root / "int_key.yaml").write_text(json.dumps(TRAIN_JOB)[:-1] + ', "training": {"steps": 2, "7": 1}}'
                                       .replace('"7"', "7"))
    (root / "tagged.yaml").write_text("job: !!python/object/apply:os.system ['true']\n")
    (root / "latin1.yaml").write_bytes("job:\n  description: \xe9t\xe9\n".encode("latin-1"))
    (root / "a_file").write_bytes(rng.bytes(8))
    (root / "config_folder").mkdir()
    run = root / "run"  # a finished run: checkpoints, model, metrics
    assert train_main(["--config", str(root / "train.yaml"), "--job.output_dir", str(run)]) == 0
    (root / "blocked_run").mkdir()
    (root / "blocked_run" / "checkpoints").write_bytes(rng.bytes(8))
    (root / "locked_run").mkdir()
    (root / "sweep_out" / "points").mkdir(parents=True)
    (root / "sweep_out" / "points" / "clean.json").write_text('{"name": "clean", "settings"')
    (root / "sweep.toml").write_text('[bitflip]\nx_p_exp = 0.0009765625\nbase_seed = 1\n'
                                     'skip_patterns = ["layers.0.", "self_attn"]\n')
    return SimpleNamespace(root=root, good=good, hf=hf, run=run)


def train(*extra):
    return ("train", lambda w: ["--config", str(w.root / "train.yaml"), "--job.output_dir", str(w.root / "new_run"),
                                *[str(part).format(root=w.root) for part in extra]])


def train_config(name, *extra):
    return ("train", lambda w: ["--config", str(w.root / name), *extra])


def convert(*argv):
    return ("convert", lambda w: [str(part).format(root=w.root, full_disk=getattr(w, "full_disk", None))
                                  for part in argv])


def evaluate(*argv):
    return ("eval", lambda w: [str(part).format(root=w.root) for part in argv])


def ppl(checkpoint="model", *extra):
    return evaluate("ppl", "--checkpoint", f"{{root}}/{checkpoint}", "--seq-len", "16", "--num-sequences", "2", *extra)


def bridge(make_tensor, **settings):
    return ("bridge", lambda w: (make_tensor, settings))


ROWS = [  # id, (command, arguments), exit status, what the error line names
    ("train: --config a folder", train_config("config_folder"), 2, "config_folder is a folder"),
    ("train: --config missing", train_config("absent.toml"), 2, "absent.toml does not exist"),
    ("train: YAML with a non-string key", train_config("int_key.yaml"), 2, "the key training.7 is not a string"),
    ("train: YAML with a python tag", train_config("tagged.yaml"), 2, "tagged.yaml"),
    ("train: config not UTF-8", train_config("latin1.yaml"), 2, "latin1.yaml: cannot be read as text"),
    ("train: bad override value", train("--training.steps", "many"), 2, "training.steps"),
    ("train: unknown override", train("--training.stepz", "3"), 2, "stepz"),
    ("train: malformed --bitflip.rules", train("--bitflip.enable", "true", "--bitflip.rules", "{{bad"), 2,
     "bitflip.rules"),
    ("train: output_dir a file", train("--job.output_dir", "{root}/a_file"), 2, "a_file is a file"),
    ("train: output_dir under a file", train("--job.output_dir", "{root}/a_file/run"), 2, "a_file is a file"),
    ("train: checkpoints a file", train("--job.output_dir", "{root}/blocked_run"), 2, "blocked_run/checkpoints"),
    ("train: output_dir held by a run", train("--job.output_dir", "{root}/locked_run"), 2, "in use by another run"),
    ("train: --model.checkpoint missing", train("--model.checkpoint", "{root}/absent_model"), 2, "absent_model"),
    ("train: --model.hf_model_path missing", train("--model.hf_model_path", "{root}/absent_hf"), 2,
     "absent_hf: no such file or folder"),
    ("train: --model.checkpoint hidden_size 'big'", train("--model.checkpoint", "{root}/model_big"), 2,
     "hidden_size is 'big'"),
    ("train: --model.checkpoint without _METADATA", train("--model.checkpoint", "{root}/model_no_metadata"), 2,
     "model_no_metadata/params/00000"),
    ("train: --model.checkpoint cut data", train("--model.checkpoint", "{root}/model_cut_data"), 2,
     "model_cut_data/params/00000"),
    ("train: --model.hf_model_path a folder without a model", train("--model.hf_model_path", "{root}/config_folder"),
     2, "config_folder"),
    ("train: --model.checkpoint an HF folder of another vocabulary", train("--model.checkpoint", "{root}/hf"), 2,
     "vocabulary"),
    ("train: a tokenizer folder without tokenizer files", train("--data.tokenizer", "{root}/config_folder"), 2,
     "config_folder: not a readable tokenizer folder"),
    ("train: empty dataset", train("--data.dataset", "{root}/empty.jsonl"), 2, "empty.jsonl: holds no documents"),
    ("train: binary dataset", train("--data.dataset", "{root}/binary.txt"), 2, "binary.txt: not a readable text"),
    ("train: malformed jsonl dataset", train("--data.dataset", "{root}/bad.jsonl"), 2, "bad.jsonl: not a readable"),
    ("train: start_over with a binary dataset", train("--job.output_dir", "{root}/run", "--job.start_over", "true",
                                                      "--data.dataset", "{root}/binary.txt"), 2, "binary.txt"),
    ("convert: hf-to-orbax into its source", convert("hf-to-orbax", "{root}/hf", "{root}/hf", "--overwrite"), 2,
     "is the source"),
    ("convert: orbax-to-hf over the folder holding its source",
     convert("orbax-to-hf", "{root}/model/params", "{root}/model", "--overwrite"), 2, "or holds it"),
    ("convert: orbax-to-hf hidden_size 'big'", convert("orbax-to-hf", "{root}/model_big", "{root}/out"), 2,
     "hidden_size is 'big'"),
    ("convert: orbax-to-hf config wider than the weights", convert("orbax-to-hf", "{root}/model_wide", "{root}/out"),
     2, "the config expects"),
    ("convert: orbax-to-hf config without vocab_size", convert("orbax-to-hf", "{root}/model_no_vocab", "{root}/out"),
     2, "missing vocab_size"),
    ("convert: orbax-to-hf cut model JSON", convert("orbax-to-hf", "{root}/model_cut_json", "{root}/out"), 2,
     "model_cut_json/jaxflip_model.json: not readable JSON"),
    ("convert: orbax-to-hf without _METADATA", convert("orbax-to-hf", "{root}/model_no_metadata", "{root}/out"), 2,
     "incomplete Orbax checkpoint"),
    ("convert: orbax-to-hf cut data", convert("orbax-to-hf", "{root}/model_cut_data", "{root}/out"), 2,
     "do not read back"),
    ("convert: orbax-to-hf onto an existing folder", convert("orbax-to-hf", "{root}/model", "{root}/hf"), 2,
     "hf exists"),
    ("convert: orbax-to-hf onto a full disk", convert("orbax-to-hf", "{root}/model", "{full_disk}/out"), 1,
     "No space left on device"),
    ("convert: hf-to-orbax from a missing folder", convert("hf-to-orbax", "{root}/absent_hf", "{root}/out"), 2,
     "absent_hf"),
    ("convert: hf-to-orbax from a jaxflip folder", convert("hf-to-orbax", "{root}/model", "{root}/out"), 2,
     "config.json"),
    ("eval ppl: hidden_size 'big'", ppl("model_big"), 2, "hidden_size is 'big'"),
    ("eval ppl: without _METADATA", ppl("model_no_metadata"), 2, "incomplete Orbax checkpoint"),
    ("eval ppl: cut data", ppl("model_cut_data"), 2, "do not read back"),
    ("eval ppl: cut model JSON", ppl("model_cut_json"), 2, "not readable JSON"),
    ("eval ppl: missing checkpoint", ppl("absent_model"), 2, "absent_model"),
    ("eval ppl: empty dataset", ppl("model", "--dataset", "{root}/empty.jsonl"), 2, "empty.jsonl: holds no documents"),
    ("eval ppl: binary dataset", ppl("model", "--dataset", "{root}/binary.txt"), 2, "binary.txt: not a readable"),
    ("eval ppl: malformed jsonl", ppl("model", "--dataset", "{root}/bad.jsonl"), 2, "bad.jsonl: not a readable"),
    ("eval ppl: a tokenizer folder without tokenizer files", ppl("model", "--tokenizer", "{root}/config_folder"), 2,
     "config_folder: not a readable tokenizer folder"),
    ("eval ppl: bitflip config not UTF-8", ppl("model", "--bitflip-config", "{root}/latin1.toml"), 2,
     "latin1.toml: cannot parse"),
    ("eval ppl: bitflip config not TOML", ppl("model", "--bitflip-config", "{root}/broken.toml"), 2,
     "broken.toml: cannot parse"),
    ("eval generate: no vocab_size", evaluate("generate", "--checkpoint", "{root}/model_no_vocab", "once upon"), 2,
     "missing vocab_size"),
    ("eval generate: a prompt past the model's positions",
     evaluate("generate", "--checkpoint", "{root}/model", "word " * 15_000, "--max-new-tokens", "4"), 2,
     "max_position_embeddings"),
    ("eval sweep: a corrupt point file",
     evaluate("sweep", "--checkpoint", "{root}/model", "--bitflip-config", "{root}/sweep.toml", "--seq-len", "16",
              "--num-sequences", "2", "--seeds", "1", "--grid", "x_p_exp=0.5^4", "--output-dir", "{root}/sweep_out"),
     2, "sweep_out/points/clean.json: not a readable sweep point record"),
    ("eval lm-eval: an unknown task", evaluate("lm-eval", "--checkpoint", "{root}/model", "--tasks", "no_such_task"),
     2, "no_such_task"),
    ("bridge: a sparse tensor", bridge(lambda: torch.randn(8, 8).to_sparse()), None, "sparse_coo"),
    ("bridge: a float64 tensor", bridge(lambda: torch.randn(8, 8, dtype=torch.float64)), None, "float64"),
    ("bridge: a negative seed", bridge(lambda: torch.randn(8, 8), seed_exp=-1), None, "seed_exp"),
]


def tree(folder: Path) -> dict:
    """Every file under ``folder``: relative path -> bytes."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("name, command, status, named", ROWS, ids=[row[0] for row in ROWS])
def test_a_bad_input_is_one_error_line_and_changes_no_file(workspace, tmpfs, capsys, monkeypatch, name, command,
                                                           status, named):
    monkeypatch.setenv("JAXFLIP_COMPILATION_CACHE", "")
    kind, arguments = command
    if "full disk" in name:  # room for the metadata, not for the weights
        workspace = SimpleNamespace(**vars(workspace), full_disk=tmpfs(256 << 10))
    before = tree(workspace.root)
    capsys.readouterr()
    if kind == "bridge":
        make_tensor, settings = arguments(workspace)
        with pytest.raises((TypeError, ValueError)) as raised:
            random_bitflip_fn(make_tensor(), **({"exp_halves": 4, "frac_halves": 4, "seed_exp": 1, "seed_frac": 2,
                                                 "zero_out_threshold": None} | settings))
        lines = [f"error: {raised.value}"]
    else:
        main = {"train": train_main, "convert": convert_main, "eval": eval_main}[kind]
        if name.endswith("held by a run"):
            with RunLock(workspace.root / "locked_run"):
                assert main(arguments(workspace)) == status
        else:
            assert main(arguments(workspace)) == status
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err
        lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    assert named in lines[0], lines[0]
    assert tree(workspace.root) == before
