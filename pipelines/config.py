"""One typed schema for every run: YAML block = dataclass = saved config.yaml, key for key.

A run config names the data and an ordered list of stages; each stage names its kind and its
`training:` block, and the kind supplies its `model:` dataclass. This module knows no kind: its
parsers take the kinds as a mapping, and `registry.load_config`/`registry.parse_run_config` bind
the registered ones, so that the schema imports nothing above the data layer. Parsing fails
before any work on an unknown key, a wrong type or an impossible value, with a message that
names the key and what would be valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import yaml
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .data import DataConfig

STAGE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
DEFAULT_LICENSE = "mit"  # the model card's license when the config names none
# {kind name: stage class}; each class carries its `model_config` dataclass (see registry.py).
StageKinds = Mapping[str, Any]


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message says where and why."""


@dataclass
class TrainingConfig:
    """The `training:` block of a stage: one schema for the one training loop."""

    max_steps: int = 1000
    batch_size: int = 32  # per process
    learning_rate: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    lr_scheduler: Literal["constant", "cosine"] = "cosine"
    lr_warmup_steps: int = 0
    gradient_accumulation_steps: int = 1
    max_grad_norm: Optional[float] = 1.0
    # Skip (log and count) up to this many steps whose loss or gradients are NaN/inf instead of
    # stopping at the first; 0 stops at the first, naming the step.
    max_nonfinite_skips: int = 0
    ema_decay: Optional[float] = None
    # Early stopping on the validation split (the seed's practice for flows): validate every
    # `eval_every` steps, stop after `early_stopping_patience` validations without improvement,
    # and keep the best weights (they are the ones exported).
    eval_every: Optional[int] = None
    early_stopping_patience: Optional[int] = None
    log_every: int = 10
    sample_every: Optional[int] = None
    checkpointing_steps: Optional[int] = None
    checkpoints_total_limit: Optional[int] = 2
    resume_from_checkpoint: Optional[str] = None  # "latest" or a checkpoint folder
    # Loading (torch DataLoader's options; for a stream, num_workers decoding threads). pin_memory
    # applies on a CUDA device only: batches in page-locked memory, copied to the device without
    # blocking. persistent_workers and prefetch_factor apply when num_workers > 0 (None: torch's 2).
    num_workers: int = 0
    pin_memory: bool = True
    persistent_workers: bool = True
    prefetch_factor: Optional[int] = None

    def __post_init__(self):
        _require(self.max_steps >= 1, "max_steps", self.max_steps, "an integer >= 1")
        _require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        _require(self.learning_rate > 0, "learning_rate", self.learning_rate, "a number > 0")
        _require(0 <= self.adam_beta1 < 1, "adam_beta1", self.adam_beta1, "a number in [0, 1)")
        _require(0 <= self.adam_beta2 < 1, "adam_beta2", self.adam_beta2, "a number in [0, 1)")
        _require(self.lr_warmup_steps >= 0, "lr_warmup_steps", self.lr_warmup_steps, "an integer >= 0")
        _require(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps",
                 self.gradient_accumulation_steps, "an integer >= 1")
        _require(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm",
                 self.max_grad_norm, "a number > 0 or null")
        _require(self.max_nonfinite_skips >= 0, "max_nonfinite_skips", self.max_nonfinite_skips, "an integer >= 0")
        _require(self.ema_decay is None or 0 < self.ema_decay < 1, "ema_decay", self.ema_decay,
                 "a number in (0, 1) or null")
        _require(self.log_every >= 1, "log_every", self.log_every, "an integer >= 1")
        _require(self.early_stopping_patience is None or self.eval_every is not None, "early_stopping_patience",
                 self.early_stopping_patience, "null unless eval_every is set (it counts validations)")
        for key in ("eval_every", "early_stopping_patience", "sample_every", "checkpointing_steps",
                    "checkpoints_total_limit"):
            value = getattr(self, key)
            _require(value is None or value >= 1, key, value, "an integer >= 1 or null")
        _require(self.num_workers >= 0, "num_workers", self.num_workers, "an integer >= 0")
        _require(self.prefetch_factor is None or (self.prefetch_factor >= 1 and self.num_workers > 0),
                 "prefetch_factor", self.prefetch_factor, "null, or an integer >= 1 when num_workers > 0")


@dataclass
class StageConfig:
    """One entry of `stages:`. `model` is the dataclass its kind registers (see registry.py)."""

    name: str
    kind: str
    input: Optional[str] = None  # an earlier stage whose outputs this one trains on (e.g. a vae)
    model: Any = None
    training: TrainingConfig = field(default_factory=TrainingConfig)


@dataclass
class RunConfig:
    """A whole job: data, then stages trained in order, each into `output_dir/<stage name>/`."""

    output_dir: str = "runs/default"
    seed: int = 0
    # Process-wide Accelerate settings (one Accelerator per job). auto: fp32 on CPU (bf16
    # autocast measured from 5-9x slower to no faster than fp32 there), bf16 on GPUs that support it, else fp16.
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    device: Literal["auto", "cpu"] = "auto"
    log_with: Literal["auto", "none", "tensorboard"] = "auto"  # auto: tensorboard when installed
    data: DataConfig = field(default_factory=DataConfig)
    stages: list[StageConfig] = field(default_factory=list)
    # At the end of the run, push the last stage's folder (the final pipeline) to this hub repo.
    push_to_hub: bool = False
    # Also push the last stage's weights at each of its checkpoints (a commit per checkpoint).
    push_every_checkpoint: bool = False
    hub_model_id: Optional[str] = None  # USER/NAME
    hub_private: bool = False
    hub_license: str = DEFAULT_LICENSE  # the model card's license

    def __post_init__(self):
        _require(not self.push_to_hub or self.hub_model_id is not None, "hub_model_id", self.hub_model_id,
                 "a hub repository id USER/NAME when push_to_hub is true")
        _require(not self.push_every_checkpoint or self.push_to_hub, "push_every_checkpoint", self.push_every_checkpoint,
                 "false unless push_to_hub is true")
        if self.hub_model_id is not None:
            check_repo_id(self.hub_model_id, "hub_model_id")

    def stage(self, name: str) -> StageConfig:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise ConfigError(f"stages: no stage named {name!r}; stages are {[s.name for s in self.stages]}")


def check_repo_id(repo_id: str, key: str) -> None:
    """Raise a ValueError naming `key` unless `repo_id` is a valid USER/NAME hub repository id."""
    try:
        validate_repo_id(repo_id)
        valid = repo_id.count("/") == 1
    except HFValidationError:
        valid = False
    if not valid:
        raise ValueError(f"{key}: {repo_id!r} is not a valid hub repository id; expected USER/NAME "
                         "(letters, digits, '-', '_', '.'; at most 96 characters)")


def _require(ok: bool, key: str, value: Any, valid: str) -> None:
    if not ok:
        raise ValueError(f"{key}: {value!r} is not valid; expected {valid}")


# --------------------------------------------------------------------------- parsing


def load_config(path: str | Path, overrides: list[str], kinds: StageKinds) -> RunConfig:
    """Read a YAML run config, take the stages it names `from:` other configs, apply `key.sub=value`
    overrides, validate it against the schema with the stage kinds `kinds`."""
    path = Path(path)
    raw = _read_mapping(path)
    _take_stages_from(raw, path, chain=(path.resolve(),))
    for override in overrides:
        apply_override(raw, override)
    try:
        return parse_run_config(raw, kinds)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def _read_mapping(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of run keys at the top level, got {type(raw).__name__}")
    return raw


def _take_stages_from(raw: dict, path: Path, chain: tuple[Path, ...]) -> None:
    """Replace each stage entry with `from: FILE` or `from: FILE#STAGE` by that config's stage
    (STAGE, else the entry's own name), with the entry's other keys merged over it (mappings key
    by key, any other value replaced). FILE is relative to the config that names it. Configs
    that share an output_dir share a stage this way without copying its block, and the same
    block is the same fingerprint: the finished stage is reused, not retrained."""
    stages = raw.get("stages")
    for index, entry in enumerate(stages if isinstance(stages, list) else []):
        if not isinstance(entry, dict) or "from" not in entry:
            continue
        where = f"{path}: stages[{index}].from"
        reference = entry["from"]
        file_name, _, stage_name = reference.partition("#") if isinstance(reference, str) else ("", "", "")
        if not file_name:
            raise ConfigError(f"{where}: {reference!r} is not valid; expected FILE or FILE#STAGE, FILE a config "
                              f"relative to {path.parent}")
        stage_name = stage_name or entry.get("name")
        if not isinstance(stage_name, str):
            raise ConfigError(f"{where}: {reference!r} names no stage; write FILE#STAGE or give the entry a `name`")
        source = (path.parent / file_name).resolve()
        if source in chain:
            cycle = " -> ".join(str(p) for p in (*chain, source))
            raise ConfigError(f"{where}: {reference!r} takes stages from itself: {cycle}")
        try:
            source_raw = _read_mapping(source)
            _take_stages_from(source_raw, source, (*chain, source))
        except ConfigError as err:  # say which entry led there
            raise ConfigError(f"{where}: {err}") from None
        found = [s for s in source_raw.get("stages") or [] if isinstance(s, dict) and s.get("name") == stage_name]
        if not found:
            names = [s.get("name") for s in source_raw.get("stages") or [] if isinstance(s, dict)]
            raise ConfigError(f"{where}: {source} has no stage named {stage_name!r}; its stages are {names}")
        stages[index] = _merged(found[0], {key: value for key, value in entry.items() if key != "from"})


def _merged(base: Any, own: Any) -> Any:
    if not (isinstance(base, dict) and isinstance(own, dict)):
        return own
    return {**base, **{key: _merged(base.get(key), value) for key, value in own.items()}}


def parse_run_config(raw: dict, kinds: StageKinds) -> RunConfig:
    """Validate a raw run config (a mapping, as read from YAML) with the stage kinds `kinds`."""
    raw = dict(raw)
    stages = raw.pop("stages", [])
    if not isinstance(stages, list) or not stages:
        raise ConfigError("stages: expected a non-empty list of stages, each with `name` and `kind`")
    config = _build(RunConfig, raw, "")
    config.stages = [_parse_stage(stage, f"stages[{i}]", kinds) for i, stage in enumerate(stages)]
    names = [s.name for s in config.stages]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ConfigError(f"stages: stage names must be unique; repeated: {duplicated}")
    for index, stage in enumerate(config.stages):
        if stage.input is not None and stage.input not in names[:index]:
            raise ConfigError(f"stages.{stage.name}.input: {stage.input!r} is not an earlier stage; "
                              f"earlier stages are {names[:index]}")
    return config


def _parse_stage(raw: Any, where: str, kinds: StageKinds) -> StageConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with `name` and `kind`, got {raw!r}")
    raw = dict(raw)
    for key in ("name", "kind"):
        if not isinstance(raw.get(key), str):
            raise ConfigError(f"{where}.{key}: required, a string")
    if not STAGE_NAME.fullmatch(raw["name"]):  # it names the folder output_dir/<name>/: no '/', no '..'
        raise ConfigError(f"{where}.name: {raw['name']!r} is not valid; expected a folder name of letters, "
                          "digits, '_', '-' and '.', not starting with '.' or '-'")
    where = f"stages.{raw['name']}"
    try:
        kind = lookup_kind(kinds, raw["kind"])
    except KeyError as err:
        raise ConfigError(f"{where}.kind: {err.args[0]}") from None
    model = _build(kind.model_config, raw.pop("model", None) or {}, f"{where}.model")
    stage = _build(StageConfig, raw, where)
    stage.model = model
    return stage


def lookup_kind(kinds: StageKinds, kind: str):
    """The stage class of `kind`; a KeyError that lists the known kinds."""
    try:
        return kinds[kind]
    except KeyError:
        raise KeyError(f"unknown stage kind {kind!r}; known kinds: {', '.join(kinds)}") from None


def _build(cls: type, raw: Any, where: str):
    """Instantiate dataclass `cls` from a mapping, checking keys and types recursively."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of {cls.__name__} keys, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{_join(where, key)}: unknown key{hint}; valid keys: {', '.join(fields)}")
    values = {key: _coerce(hints[key], value, _join(where, key)) for key, value in raw.items()
              if not (cls is StageConfig and key == "model")}
    try:
        return cls(**values)
    except ValueError as err:
        prefix = f"{where}." if where and not str(err).startswith(f"{where}.") else ""
        raise ConfigError(f"{prefix}{err}") from None


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(option, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {options}")
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return origin(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{where}: expected float, got an integer of {len(str(abs(value)))} digits, "
                              "beyond the range of a float") from None
    if hint is float and isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{where}: expected {name}, got {value!r} ({type(value).__name__})")


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


# --------------------------------------------------------------------------- overrides


def apply_override(raw: dict, override: str) -> None:
    """Set `a.b.c=value` in a raw config mapping; `stages.NAME.x=v` addresses a stage by name.

    The value is read as YAML, so `true`, `3`, `1e-4`, `[32, 64]` and `null` keep their types.
    """
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key.sub=value")
    dotted, text = override.split("=", 1)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {override!r}: value is not valid YAML: {err}") from None
    keys = dotted.strip().split(".")
    node: Any = raw
    for depth, key in enumerate(keys[:-1]):
        if isinstance(node, list):  # the stages list, addressed by stage name
            matches = [s for s in node if isinstance(s, dict) and s.get("name") == key]
            if not matches:
                names = [s.get("name") for s in node if isinstance(s, dict)]
                raise ConfigError(f"override {override!r}: no stage named {key!r}; stages are {names}")
            node = matches[0]
        else:
            if node.get(key) is None:  # absent, or left empty in YAML (`model:`)
                node[key] = {}
            node = node[key]
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {override!r}: {'.'.join(keys[:depth + 1])} is not a mapping")
    if isinstance(node, list):
        raise ConfigError(f"override {override!r}: name a key inside a stage, e.g. stages.NAME.training.max_steps")
    node[keys[-1]] = value


# --------------------------------------------------------------------------- saving


def config_to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def non_default_values(config: Any) -> dict:
    """The keys of a config (nested dataclasses) whose values differ from their defaults: what a
    fingerprint hashes, so that adding a schema key with a default does not change old runs' identity."""
    found = {}
    for spec in dataclasses.fields(config):
        value = getattr(config, spec.name)
        if dataclasses.is_dataclass(value):
            found[spec.name] = non_default_values(value)
        elif isinstance(value, list) and value and all(dataclasses.is_dataclass(v) for v in value):
            found[spec.name] = [non_default_values(v) for v in value]
        elif spec.default is not dataclasses.MISSING and value == spec.default:
            continue
        elif spec.default_factory is not dataclasses.MISSING and value == spec.default_factory():
            continue
        else:
            found[spec.name] = value
    return found


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config; `load_config` on the result gives an equal config. Written under a
    temporary name and renamed: a kill leaves no half-written config that a rerun would take for
    another run's."""
    path = Path(path)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    partial.replace(path)
