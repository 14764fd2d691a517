"""Base class of every config in the tree: frozen, no unknown keys, a description per field."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from exfm_ray.errors import ConfigError


class Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def parse(cls, data: dict[str, Any], *, source: str = "config") -> Self:
        """Validate a mapping, turning pydantic's error into a ConfigError naming each field."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{source}: {format_validation_error(exc)}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> Self:
        return cls.parse(read_yaml(path), source=str(path))

    def replace(self, **changes: Any) -> Self:
        """A validated copy with some fields changed (model_copy does not validate)."""
        return type(self).parse({**self.model_dump(), **changes}, source=type(self).__name__)


def format_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"field {loc!r}: {err['msg']}")
    return "; ".join(parts)


def read_yaml(path: str | Path, *, expect: type = dict) -> Any:
    """The one YAML (or JSON) file reader: a missing file, bad YAML or the wrong top-level kind is a
    ConfigError naming the file. An empty file reads as an empty mapping."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if data is None and expect is dict:
        data = {}
    if not isinstance(data, expect):
        raise ConfigError(f"{path}: expected a {'mapping' if expect is dict else expect.__name__} at the top level")
    return data
