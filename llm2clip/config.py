"""Typed run configuration: one dataclass per component, YAML presets, `--set key=value` overrides.

Built on OmegaConf structured configs (the layer under Hydra): YAML and dotted overrides merge into
the dataclass schema, which rejects unknown keys and values of the wrong type before any work starts.
Errors are re-raised as `ConfigError`, naming the full key and the closest valid one.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from .data.readers import DataConfig
from .data.synth import SynthConfig
from .errors import ConfigError

TINY = "tiny"  # model name that builds a tiny model from an HF config instead of loading weights
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class RunConfig:
    out_dir: str = "runs/tiny"  # every output of a run goes under this folder
    seed: int = 0


@dataclass
class ModelsConfig:
    llm: str = TINY  # local folder, hub id, or 'tiny'
    llm_adapter: str | None = None  # peft adapter folder applied on top of `llm`
    vision: str = TINY  # CLIP vision checkpoint: local folder, hub id, or 'tiny'
    trust_remote_code: bool = False  # never run a checkpoint's own Python unless asked


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    data: DataConfig = field(default_factory=DataConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)


def _valid_keys(schema: type, prefix: str) -> list[str]:
    keys = []
    for f in fields(schema):
        keys.append(prefix + f.name)
        if f.default_factory is not MISSING and is_dataclass(sub := f.default_factory()):
            keys.extend(_valid_keys(type(sub), prefix + f.name + "."))
    return keys


def all_keys() -> list[str]:
    """Every dotted config key, e.g. 'synth.num_images' (used for suggestions and the docs check)."""
    return _valid_keys(Config, "")


def _friendly(err: OmegaConfBaseException, origin: str) -> ConfigError:
    key = err.full_key or "?"
    if isinstance(err, ConfigKeyError):
        close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return ConfigError(f"{origin}: unknown config key '{key}'{hint} (valid keys are listed in docs/CONFIG.md)")
    if isinstance(err, ValidationError):
        first = str(err).splitlines()[0]
        return ConfigError(f"{origin}: bad value for config key '{key}': {first}")
    return ConfigError(f"{origin}: {str(err).splitlines()[0]}")


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Schema defaults <- YAML file <- `key=value` overrides, validated. Raises ConfigError."""
    merged = OmegaConf.structured(Config)
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file '{path}' does not exist; presets live in configs/")
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:  # yaml.YAMLError and friends; report it as a config error, not a traceback
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(loaded, type(merged)):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (run:, data:, ...)")
        try:
            merged = OmegaConf.merge(merged, loaded)
        except OmegaConfBaseException as e:
            raise _friendly(e, str(path)) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value, e.g. synth.num_images=200")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise _friendly(e, f"--set {item}") from None
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:  # e.g. a missing '???' value or a broken ${interpolation}
        raise _friendly(e, str(path or "config")) from None
    validate(cfg)
    return cfg  # type: ignore[return-value]


def check_model_ref(key: str, value: str | None) -> None:
    """A model reference is 'tiny', an existing local folder, or a hub id ('org/name')."""
    if value is None or value == TINY or Path(value).expanduser().exists():
        return
    looks_local = value.startswith(("/", "./", "../", "~")) or not _HUB_ID.match(value)
    if looks_local:
        raise ConfigError(f"{key}: local path '{value}' does not exist. Fix: point it at a folder holding "
                          f"config.json, or use a hub id such as 'openai/clip-vit-large-patch14-336'")


def validate(cfg: Config, *, require_data: bool = False) -> None:
    """Cross-field checks that the schema's types cannot express. `require_data`: data.path must exist."""
    cfg.synth.validate()
    cfg.data.validate(require_exists=require_data)
    check_model_ref("models.llm", cfg.models.llm)
    check_model_ref("models.llm_adapter", cfg.models.llm_adapter)
    check_model_ref("models.vision", cfg.models.vision)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
