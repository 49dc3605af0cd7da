"""The training job config: typed sections loaded from TOML (or YAML), validated at startup.

Section and field names follow NewComputeBench's 70B LoRA config (``[model] flavor,
hf_model_path``; ``[training] ...``; ``[parallelism] fsdp_degree``; ``[lora] r, lora_alpha``;
``[bitflip] ...``), so that file loads unchanged; ``[job]``, ``[data]``, ``[validation]``,
``[checkpoint]`` and ``[metrics]`` are jaxflip's. ``[bitflip]`` is ``jaxflip.bitflip.BitflipConfig``
(the settings evaluation and the torch bridge read too), which checks its own fields. Any field
can be overridden on the command line as ``--section.field VALUE`` (or ``--field VALUE`` when the
name is unique, as the reference's ``--steps``). Every error names the field:
``training.lr: expected a number > 0, got -1``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from jaxflip.bitflip.config import BitflipConfig, parse_none
from jaxflip.data.sources import check_source
from jaxflip.models import get_flavor
from jaxflip.models.flavors import FLAVORS
from jaxflip.models.llama import REMAT_POLICIES

DTYPES = ("float32", "bfloat16")
FLAVOR_ALIASES = {"8B": "llama3-8B", "70B": "llama3-70B", "3.1-8B": "llama3.1-8B"}


class ConfigError(ValueError):
    """A bad config field; the message names it."""


@dataclass
class JobConfig:
    output_dir: str = "runs/default"  # metrics.jsonl, checkpoints, tensorboard, final model
    description: str = ""
    seed: int = 0  # the random init of the model (a flavor's) and of LoRA's adapters, and the data order
    start_over: bool = False  # ignore checkpoints already in output_dir
    resume_anyway: bool = False  # resume even when model, data or flip fields differ from the checkpoint's run


@dataclass
class ModelConfig:
    flavor: str = "aixsim-debug"  # jaxflip.models.FLAVORS, or the reference's "8B" / "70B"
    hf_model_path: str = ""  # start from these HF weights (hub id or folder); "" = flavor's random init
    checkpoint: str = ""  # start from a jaxflip model checkpoint instead (jaxflip.models.save)
    vocab_size: int = 0  # 0: the flavor's; else override (e.g. the built-in tokenizer's 4096)
    remat: str = "none"  # activation checkpointing per decoder layer: none | full | dots | flips | dots_flips


@dataclass
class TrainingConfig:
    dtype: str = "float32"  # storage dtype of frozen weights (LoRA's base); trained weights stay float32
    mixed_precision_param: str = "float32"  # compute dtype of the forward/backward
    mixed_precision_reduce: str = "float32"  # dtype gradients are reduced and accumulated in
    seq_len: int = 2048
    local_batch_size: int = 8  # sequences per device per micro-batch
    gradient_accumulation_steps: int = 1
    steps: int = 1000
    token_scale: float = 0.0  # > 0: --print-config reports steps for a budget of token_scale x params
    lr: float = 1e-4
    weight_decay: float = 0.1
    warmup_steps: int = 100
    decay: str = "cosine"  # cosine | linear | constant, after warmup, to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    max_norm: float = 1.0  # global gradient-norm clip; 0 disables
    log_freq: int = 10
    save_freq: int = 500
    skip_nonfinite: int = 0  # steps with a non-finite loss or gradient skipped (no update) before the run stops


@dataclass
class ParallelismConfig:
    fsdp_degree: int = -1  # -1: all devices not used by data_parallel_replicate_degree
    data_parallel_replicate_degree: int = 1
    coordinator_address: str = ""  # multi-host: host:port of process 0; "" = single host or from the environment
    num_processes: int = 0  # 0: from the environment (SLURM); > 0 needs coordinator_address
    process_id: int = -1  # -1: from the environment; else in [0, num_processes)


@dataclass
class LoraConfig:
    r: int = 0  # 0 (or no [lora] section): full training
    lora_alpha: float = 16.0


@dataclass
class DataConfig:
    dataset: str = "builtin:moby-dick"  # builtin:moby-dick, a local file/folder, or an HF hub dataset
    subset: str = ""  # HF config name, e.g. sample-100BT
    split: str = "train"
    text_field: str = "text"
    tokenizer: str = ""  # "builtin", an HF name or a local folder; "": the weights' own, else builtin
    prefetch: int = 4  # batches prepared ahead in a background thread


@dataclass
class ValidationConfig:
    eval_interval: int = 0  # validation loss every N steps and at the end; 0: none (nothing compiled)
    eval_steps: int = 4  # held-out batches (of the global batch size) per evaluation
    dataset: str = ""  # "": data.dataset
    split: str = "validation"  # the held-out split (builtin:moby-dick has one)


@dataclass
class CheckpointConfig:
    enable: bool = True
    keep: int = 3
    async_save: bool = True
    export_model: bool = True  # write output_dir/model (jaxflip.models.save) at the end


@dataclass
class MetricsConfig:
    tensorboard: bool = True
    plot: bool = True  # loss curve PNG at the end
    progress_bar: bool = True  # on a terminal only (stderr), from the end of the first step: metrics.StepProgress
    wandb: bool = False  # log to Weights & Biases too (pip install wandb; WANDB_MODE=offline works offline)
    wandb_project: str = "jaxflip"


@dataclass
class TrainConfig:
    job: JobConfig = field(default_factory=JobConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    bitflip: BitflipConfig = field(default_factory=BitflipConfig)
    data: DataConfig = field(default_factory=DataConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    @property
    def flavor(self) -> str:
        return FLAVOR_ALIASES.get(self.model.flavor, self.model.flavor)


def _sections() -> dict[str, type]:
    return typing.get_type_hints(TrainConfig)


def _convert(value, hints, where: str):
    """``value`` as the field's declared type (TOML/YAML/CLI strings), or a ConfigError."""
    origin, args = typing.get_origin(hints), typing.get_args(hints)
    if origin in (typing.Union, types.UnionType):
        if parse_none(value) is None:
            if type(None) in args:
                return None
        return _convert(value, next(a for a in args if a is not type(None)), where)
    if hints is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hints is int:
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if hints is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if hints is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hints is dict:
        if isinstance(value, str):
            value = _parse_mapping(value, where)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {hints}")


def _parse_mapping(text: str, where: str) -> dict:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{where}: not a mapping: {' '.join(str(error).split())}") from None


def from_dict(raw: dict) -> TrainConfig:
    """A validated ``TrainConfig`` from nested ``{section: {field: value}}``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a table of sections, got {type(raw).__name__}")
    sections = _sections()
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section (known: {', '.join(sections)})")
    built = {}
    for name, section_type in sections.items():
        values = raw.get(name, {}) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{name}: expected a table of fields, got {values!r}")
        fields = typing.get_type_hints(section_type)
        for key in values:
            if key not in fields:
                raise ConfigError(f"{name}.{key}: unknown field (known: {', '.join(fields)})")
        converted = {key: _convert(value, fields[key], f"{name}.{key}") for key, value in values.items()}
        try:
            built[name] = section_type(**converted)
        except ValueError as error:  # a section that checks itself (BitflipConfig): the message names the field
            raise ConfigError(str(error)) from None
    config = TrainConfig(**built)
    if "lora" in raw and "r" not in (raw["lora"] or {}):
        raise ConfigError("lora.r: required when a [lora] section is given")
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """The fields of every section but ``[bitflip]`` (``BitflipConfig`` checks itself)."""

    def check(ok: bool, where: str, expected: str, value) -> None:
        if not ok:
            raise ConfigError(f"{where}: expected {expected}, got {value!r}")

    m, t, p, lo, d, c = config.model, config.training, config.parallelism, config.lora, config.data, config.checkpoint
    check(config.flavor in FLAVORS, "model.flavor", f"one of {', '.join(list(FLAVORS) + list(FLAVOR_ALIASES))}",
          m.flavor)
    check(not (m.hf_model_path and m.checkpoint), "model.checkpoint", "empty when model.hf_model_path is set",
          m.checkpoint)
    check(m.vocab_size >= 0, "model.vocab_size", "an integer >= 0", m.vocab_size)
    check(m.remat in REMAT_POLICIES, "model.remat", f"one of {', '.join(REMAT_POLICIES)}", m.remat)
    for name in ("dtype", "mixed_precision_param", "mixed_precision_reduce"):
        check(getattr(t, name) in DTYPES, f"training.{name}", f"one of {', '.join(DTYPES)}", getattr(t, name))
    for name in ("seq_len", "local_batch_size", "gradient_accumulation_steps", "steps", "log_freq", "save_freq"):
        check(getattr(t, name) > 0, f"training.{name}", "an integer > 0", getattr(t, name))
    check(0 <= t.token_scale < math.inf, "training.token_scale", "a finite number >= 0", t.token_scale)
    check(t.lr > 0 and math.isfinite(t.lr), "training.lr", "a number > 0", t.lr)
    for name in ("weight_decay", "max_norm", "eps"):
        check(0 <= getattr(t, name) < math.inf, f"training.{name}", "a finite number >= 0", getattr(t, name))
    check(0 <= t.warmup_steps, "training.warmup_steps", "an integer >= 0", t.warmup_steps)
    check(0 <= t.skip_nonfinite, "training.skip_nonfinite", "an integer >= 0 (0: stop at the first)", t.skip_nonfinite)
    check(t.decay in ("cosine", "linear", "constant"), "training.decay", "cosine, linear or constant", t.decay)
    check(0 <= t.min_lr_ratio <= 1, "training.min_lr_ratio", "a number in [0, 1]", t.min_lr_ratio)
    for name in ("beta1", "beta2"):
        check(0 <= getattr(t, name) < 1, f"training.{name}", "a number in [0, 1)", getattr(t, name))
    check(p.fsdp_degree == -1 or p.fsdp_degree > 0, "parallelism.fsdp_degree", "-1 or an integer > 0",
          p.fsdp_degree)
    check(p.data_parallel_replicate_degree > 0, "parallelism.data_parallel_replicate_degree", "an integer > 0",
          p.data_parallel_replicate_degree)
    check(p.num_processes >= 0, "parallelism.num_processes", "an integer >= 0", p.num_processes)
    check(p.num_processes == 0 or p.coordinator_address, "parallelism.coordinator_address",
          "host:port of process 0 when parallelism.num_processes is set", p.coordinator_address)
    check(p.process_id >= -1 and (p.num_processes == 0 or p.process_id < p.num_processes), "parallelism.process_id",
          f"-1 or an integer in [0, {p.num_processes})" if p.num_processes else "-1 or an integer >= 0", p.process_id)
    check(lo.r >= 0, "lora.r", "an integer >= 0", lo.r)
    check(0 < lo.lora_alpha < math.inf, "lora.lora_alpha", "a finite number > 0", lo.lora_alpha)
    if not (m.hf_model_path or m.checkpoint):  # a model from weights: checked once they are read
        check_positions(t.seq_len, get_flavor(config.flavor).max_position_embeddings, f"flavor {config.flavor}")
    check(c.keep > 0, "checkpoint.keep", "an integer > 0", c.keep)
    check(config.validation.eval_interval >= 0, "validation.eval_interval", "an integer >= 0 (0: off)",
          config.validation.eval_interval)
    check(config.validation.eval_steps > 0, "validation.eval_steps", "an integer > 0", config.validation.eval_steps)
    check(d.prefetch >= 1, "data.prefetch", "an integer >= 1", d.prefetch)
    try:
        check_source(d.dataset)
    except ValueError as error:
        raise ConfigError(f"data.dataset: {error}") from None


def check_positions(seq_len: int, positions: int, model: str) -> None:
    """Refuse sequences longer than the model's positions (``max_position_embeddings``): RoPE
    would run on positions the model never saw, and the run would differ from what was asked."""
    if seq_len > positions:
        raise ConfigError(f"training.seq_len: {seq_len} is beyond the {positions} positions of the model "
                          f"({model}); use seq_len <= {positions}")


def read_file(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; pass a .toml or .yaml file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot be read as text ({type(error).__name__}: {error})") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(text) or {}  # safe_load: a !!python/... tag is an error, never code
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    else:
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: not valid TOML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a table of sections, got a {type(raw).__name__}")
    if (where := non_string_key(raw)) is not None:  # YAML allows any key; every config field is named
        raise ConfigError(f"{path}: the key {where} is not a string")
    return raw


def non_string_key(table: dict, within: str = "") -> str | None:
    """Where the first key of ``table`` (nested tables included) that is not a string is, as
    ``section.123``; None when every key is a string."""
    for key, value in table.items():
        where = f"{within}{key!r}" if not isinstance(key, str) else f"{within}{key}"
        if not isinstance(key, str):
            return where
        if isinstance(value, dict) and (inner := non_string_key(value, f"{where}.")) is not None:
            return inner
    return None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``["--training.steps", "100", "--steps=5", ...]`` applied to the raw nested dict."""
    sections = _sections()
    owners: dict[str, list[str]] = {}
    for name, section_type in sections.items():
        for f in dataclasses.fields(section_type):
            owners.setdefault(f.name, []).append(name)
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    i = 0
    while i < len(overrides):
        flag = overrides[i]
        if not flag.startswith("--"):
            raise ConfigError(f"{flag}: expected --section.field VALUE")
        key, sep, value = flag[2:].partition("=")
        if not sep:
            if i + 1 >= len(overrides):
                raise ConfigError(f"{flag}: missing a value")
            value = overrides[i + 1]
            i += 1
        i += 1
        key = key.replace("-", "_")
        if "." in key:
            section, name = key.split(".", 1)
        elif len(owners.get(key, [])) == 1:
            section, name = owners[key][0], key
        else:
            where = f"in sections {', '.join(owners[key])}" if key in owners else "in no section"
            raise ConfigError(f"--{key}: not a unique field name ({where}); write --section.{key}")
        if section not in sections:
            raise ConfigError(f"{section}: unknown section (known: {', '.join(sections)})")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raw[section] = {}
        raw[section][name] = value
    return raw


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    raw = read_file(path) if path is not None else {}
    return from_dict(apply_overrides(raw, list(overrides)))


def to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


# what a resumed run may not change: the model, its data and its flips (the checkpoint holds
# the other run's weights and data position); everything else (steps, lr, log and save
# frequencies, parallelism...) may change, and is reported
RESUME_FIXED_SECTIONS = ("model", "lora", "bitflip", "data")
RESUME_FIXED_FIELDS = ("job.seed", "training.dtype", "training.mixed_precision_param",
                       "training.mixed_precision_reduce", "training.seq_len", "training.local_batch_size",
                       "training.gradient_accumulation_steps")
RESUME_FREE_FIELDS = ("model.remat", "data.prefetch")
RESUME_IGNORED_FIELDS = ("job.output_dir", "job.description", "job.start_over", "job.resume_anyway")


def resume_changes(saved: dict, config: TrainConfig) -> list[str]:
    """Compare the resolved config of the run that wrote the checkpoints (``config.json``)
    with ``config``. Returns the allowed changes (``training.steps 6 -> 8``); raises
    ``ConfigError`` naming the changes that alter the model, data or flips, unless
    ``job.resume_anyway``. Fields the saved config lacks (an older jaxflip) are not compared."""
    now = json.loads(json.dumps(to_dict(config), default=str))
    changes = {f"{section}.{name}": (saved[section][name], value)
               for section, fields in now.items() if isinstance(saved.get(section), dict)
               for name, value in fields.items()
               if name in saved[section] and saved[section][name] != value}
    fixed = [where for where in changes if where not in RESUME_IGNORED_FIELDS and where not in RESUME_FREE_FIELDS
             and (where.split(".")[0] in RESUME_FIXED_SECTIONS or where in RESUME_FIXED_FIELDS)]

    def describe(where):
        before, after = changes[where]
        return f"{where} {json.dumps(before)} -> {json.dumps(after)}"

    if fixed and not config.job.resume_anyway:
        raise ConfigError(f"{', '.join(describe(where) for where in fixed)}: differ from the run whose checkpoints "
                          f"are in {config.job.output_dir} (they change the model, data or flips); "
                          f"--job.start_over true starts over, --job.resume_anyway true resumes anyway")
    return [describe(where) for where in changes if where not in RESUME_IGNORED_FIELDS]
