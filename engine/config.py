"""JSON/YAML plumbing shared by every config dataclass (model configs and training configs)."""
from __future__ import annotations

import json
from dataclasses import MISSING, asdict, fields, replace
from pathlib import Path


class JsonConfig:
    """Mixin for frozen config dataclasses: `to_json`, and `from_json` that rejects unknown fields by
    name, turns JSON lists into tuples and parses nested config fields with their own class."""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict):
        unknown = sorted(set(obj) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
        values = {}
        for f in fields(cls):
            if f.name not in obj:
                continue
            value = obj[f.name]
            nested = f.default_factory() if f.default_factory is not MISSING else None
            if isinstance(nested, JsonConfig):
                value = type(nested).from_json(value)
            elif isinstance(value, list):
                value = tuple(value)
            values[f.name] = value
        return cls(**values)


def read_config_file(path: str | Path) -> dict:
    """A JSON or YAML config file as a dict."""
    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        import yaml

        return yaml.safe_load(text) or {}
    return json.loads(text)


def load_config(cls, path: str | Path | None, overrides: dict | None = None):
    """A config of class `cls` from a JSON/YAML file (or its defaults), with non-None overrides applied."""
    cfg = cls.from_json(read_config_file(path)) if path else cls()
    return replace(cfg, **{k: v for k, v in (overrides or {}).items() if v is not None})
