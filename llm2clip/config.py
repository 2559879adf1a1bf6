"""Typed run configuration: one dataclass per component, YAML presets, `--set key=value` overrides.

Built on OmegaConf structured configs (the layer under Hydra): YAML and dotted overrides merge into
the dataclass schema, which rejects unknown keys and values of the wrong type before any work starts.
Errors are re-raised as `ConfigError`, naming the full key and the closest valid one.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from .cache import CacheConfig
from .data.readers import DataConfig
from .data.synth import SynthConfig
from .embedder import EmbedderConfig, check_model_ref
from .errors import ConfigError, one_line
from .knowledge.train import KnowledgeConfig
from .stage1.cc import CCConfig
from .stage1.mntp import MNTPConfig
from .stage1.pretrain_lm import PretrainLMConfig
from .stage2.runs import Stage2Config, VisionConfig


@dataclass
class RunConfig:
    out_dir: str = "runs/tiny"  # every output of a run goes under this folder
    seed: int = 0


@dataclass
class PathsConfig:
    # one folder a preset's data keys interpolate (`${paths.data_root}/cc3m/...`), so one override moves them all
    data_root: str = "${run.out_dir}/data"


@dataclass
class Stage1Config:
    pretrain: PretrainLMConfig = field(default_factory=PretrainLMConfig)
    mntp: MNTPConfig = field(default_factory=MNTPConfig)
    cc: CCConfig = field(default_factory=CCConfig)
    cra_data: str | None = "${run.out_dir}/data/test.jsonl"  # captions whose CRA is reported; null: no CRA
    cra_caption_keys: list[str] = field(default_factory=list)  # columns CRA pools; [] = data.long_caption_keys
    cra_second_language_key: str | None = "long_caption_zh"  # the cross_lingual view's partner column
    cra_out: str = "${run.out_dir}/stage1/cra.json"


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    data: DataConfig = field(default_factory=DataConfig)
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    cache: CacheConfig = field(default_factory=CacheConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    knowledge_clip: KnowledgeConfig = field(default_factory=KnowledgeConfig)


def _valid_keys(schema: type, prefix: str, sections: bool) -> list[str]:
    keys = []
    for f in fields(schema):
        if f.default_factory is not MISSING and is_dataclass(sub := f.default_factory()):
            keys += [prefix + f.name] if sections else []
            keys.extend(_valid_keys(type(sub), prefix + f.name + ".", sections))
        else:
            keys.append(prefix + f.name)
    return keys


def all_keys(sections: bool = False) -> list[str]:
    """Every dotted leaf key, e.g. 'synth.num_images' (and section names such as 'stage1.cc' if asked)."""
    return _valid_keys(Config, "", sections)


def _friendly(err: OmegaConfBaseException, origin: str, key: str = "?") -> ConfigError:
    key = err.full_key or key
    if isinstance(err, ConfigKeyError):
        close = difflib.get_close_matches(key, all_keys(sections=True), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        message = f"{origin}: unknown config key '{key}'{hint} (valid keys are listed in docs/CONFIG.md)"
    elif isinstance(err, ValidationError):
        message = f"{origin}: bad value for config key '{key}': {str(err).splitlines()[0]}"
    else:
        where = f"config key '{key}': " if key != "?" else ""
        message = f"{origin}: {where}{str(err).splitlines()[0]}"
    return ConfigError(one_line(message))  # keys and values are echoed: keep the message on one line


def _yaml_error(path, err: Exception) -> ConfigError:
    """PyYAML's multi-line report -> one line with the line and column."""
    mark = getattr(err, "problem_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return ConfigError(f"{path}: not valid YAML{at}: {problem}. Fix the YAML syntax there")


def _mismatched_key(schema, loaded, prefix: str = "") -> str:
    """The first key whose YAML container kind (mapping/list) differs from the schema's ('?' if none)."""
    try:
        return _first_mismatch(schema, loaded, prefix)
    except OmegaConfBaseException:  # e.g. a broken ${interpolation} met on the way: the caller reports it
        return "?"


def _first_mismatch(schema, loaded, prefix: str) -> str:
    from omegaconf import DictConfig, ListConfig

    for key, value in loaded.items_ex(resolve=False):  # resolving could raise on a broken ${...}
        if key not in schema:
            continue
        want, name = schema[key] if not OmegaConf.is_missing(schema, key) else None, f"{prefix}{key}"
        if isinstance(want, DictConfig) and isinstance(value, DictConfig):
            found = _first_mismatch(want, value, name + ".")
            if found != "?":
                return found
        elif isinstance(want, ListConfig | DictConfig) != isinstance(value, ListConfig | DictConfig) or (
                isinstance(want, ListConfig) != isinstance(value, ListConfig)):
            return name
    return "?"


def _quote_brace_items(item: str) -> str | None:
    """`key=[a/{0..2}.tar,b.jsonl]` -> `key=['a/{0..2}.tar','b.jsonl']`: YAML reads an unquoted '{' in a
    list as a mapping, so list items holding brace patterns are quoted. Commas inside braces (`{a,b}`)
    stay in their item. None when the value is no such list."""
    key, value = item.split("=", 1)
    if not (value.startswith("[") and value.endswith("]")) or "{" not in value:
        return None
    items, depth, current = [], 0, ""
    for ch in value[1:-1]:
        if ch in "'\"[]":
            return None  # quoted or nested: left to YAML as typed
        depth += (ch == "{") - (ch == "}")
        if depth < 0:
            return None
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    items.append(current)
    quoted = ",".join(f"'{s.strip()}'" for s in items if s.strip())
    return f"{key}=[{quoted}]" if depth == 0 else None


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Schema defaults <- YAML file <- `key=value` overrides, validated. Raises ConfigError."""
    merged = OmegaConf.structured(Config)
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file '{path}' does not exist; presets live in configs/")
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:  # yaml.YAMLError and friends; report it as a config error, not a traceback
            raise _yaml_error(path, e) from None
        if not isinstance(loaded, type(merged)):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (run:, data:, ...)")
        try:
            merged = OmegaConf.merge(merged, loaded)
        except OmegaConfBaseException as e:
            raise _friendly(e, str(path), _mismatched_key(merged, loaded)) from None
        except (TypeError, ValueError) as e:  # e.g. a mapping where the schema has a list
            raise ConfigError(f"{path}: bad value for config key '{_mismatched_key(merged, loaded)}': "
                              f"{str(e).splitlines()[0]} (valid keys and types: docs/CONFIG.md)") from None
    for item in overrides:
        shown = one_line(item)  # an error message stays one readable line whatever was typed
        if "=" not in item:
            raise ConfigError(f"override '{shown}' must look like key=value, e.g. synth.num_images=200")
        try:
            try:
                dotlist = OmegaConf.from_dotlist([item])
            except yaml.YAMLError:  # brace patterns in a list: quote them and parse again
                dotlist = OmegaConf.from_dotlist([_quote_brace_items(item) or item])
            merged = OmegaConf.merge(merged, dotlist)
        except OmegaConfBaseException as e:
            raise _friendly(e, f"--set {shown}") from None
        except (TypeError, ValueError, IndexError, yaml.YAMLError) as e:  # unparsable key/value, mapping for a list
            key = shown.split("=", 1)[0]
            raise ConfigError(f"--set {shown}: bad value for config key '{key}' ({str(e).splitlines()[0]})") from None
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:  # e.g. a missing '???' value or a broken ${interpolation}
        raise _friendly(e, str(path or "config")) from None
    try:
        validate(cfg)
    except ConfigError as e:  # values are echoed in these messages: keep them on one line
        raise ConfigError(one_line(f"{path}: {e}" if path is not None else str(e))) from None
    return cfg  # type: ignore[return-value]


def validate(cfg: Config, *, require_data: bool = False) -> None:
    """Cross-field checks that the schema's types cannot express. `require_data`: data.path must exist."""
    cfg.synth.validate()
    cfg.data.validate(require_exists=require_data)
    cfg.embedder.validate()
    cfg.stage1.pretrain.validate()
    cfg.stage1.cc.validate()
    cfg.cache.validate()
    cfg.vision.validate()
    cfg.stage2.validate()
    cfg.knowledge_clip.validate()
    # Explicit local paths are checked now; relative ones may be written by an earlier step (e.g.
    # stage1.pretrain.out) and are checked when the step that reads them starts.
    produced = cfg.stage1.pretrain.enabled and cfg.embedder.model == cfg.stage1.pretrain.out
    if cfg.embedder.model.startswith(("/", "~", "./", "../")) and not produced:
        check_model_ref("embedder.model", cfg.embedder.model)
    if cfg.vision.model != "tiny":
        check_model_ref("vision.model", cfg.vision.model)
        if Path(cfg.vision.model).is_dir():  # a hub id is checked once its config is fetched (stage 2)
            from .stage2.runs import check_image_size

            check_image_size(cfg)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
