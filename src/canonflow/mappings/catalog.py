"""Load and cross-check entities and mappings; every error names the file and the field."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from canonflow.errors import ConfigError
from canonflow.model import ServiceName, TableName

FieldType = Literal["string", "int", "float", "decimal", "bool", "timestamp"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FieldDef(_Model):
    type: FieldType
    required: bool = False
    description: str = ""


class Entity(_Model):
    name: str
    description: str = ""
    primary_key: str
    ordering: str
    fields: dict[str, FieldDef]


class FieldRule(_Model):
    path: str = Field(description="dotted path into the raw record")
    format: str | None = Field(default=None, description="strptime format for timestamps")
    timezone: str | None = Field(default=None, description="zone of timestamps without offset")
    default: str | int | float | bool | None = None


class SourceRef(_Model):
    service: ServiceName
    table: TableName


class MappingSpec(_Model):
    source: SourceRef
    entity: str
    fields: dict[str, FieldRule]
    origin: str = ""


def _validation_message(origin: str, exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    return f"{origin}: at {where}: {first['msg']}"


def _read_yaml(entry: Path | Traversable, origin: str) -> object:
    try:
        return yaml.safe_load(entry.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{origin}: cannot load: {exc}") from None


@dataclass(frozen=True)
class Catalog:
    entities: dict[str, Entity]
    mappings: dict[tuple[str, str], MappingSpec]

    def mapping_for(self, service: str, table: str) -> MappingSpec:
        try:
            return self.mappings[(service, table)]
        except KeyError:
            raise ConfigError(
                f"no mapping for {service}.{table}: add a mapping YAML for it"
            ) from None

    def entity_for(self, service: str, table: str) -> Entity:
        return self.entities[self.mapping_for(service, table).entity]


def _walk(folder: Path | Traversable) -> Iterable[Path | Traversable]:
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.is_dir():
            yield from _walk(entry)
        elif entry.name.endswith((".yaml", ".yml")):
            yield entry


def load_catalog(extra_dirs: Iterable[str | Path] = ()) -> Catalog:
    """Built-in entities and mappings, plus mappings from ``extra_dirs`` (which win)."""
    root = resources.files("canonflow.mappings")
    raw = _read_yaml(root / "entities.yaml", "builtin:entities.yaml")
    if not isinstance(raw, dict):
        raise ConfigError("builtin:entities.yaml: expected a mapping of entities")
    entities: dict[str, Entity] = {}
    for name, body in raw.items():
        try:
            entity = Entity.model_validate({"name": name, **body})
        except ValidationError as exc:
            raise ConfigError(_validation_message(f"entities.yaml:{name}", exc)) from None
        for key in (entity.primary_key, entity.ordering):
            if key not in entity.fields:
                raise ConfigError(f"entities.yaml:{name}: {key!r} is not one of its fields")
        entities[name] = entity

    mappings: dict[tuple[str, str], MappingSpec] = {}
    sources: list[Path | Traversable] = [root]
    sources += [Path(d) for d in extra_dirs]
    for folder in sources:
        for entry in _walk(folder):
            if entry.name == "entities.yaml":
                continue
            origin = f"{entry}" if isinstance(entry, Path) else f"builtin:{entry.name}"
            body = _read_yaml(entry, origin)
            if not isinstance(body, dict):
                raise ConfigError(f"{origin}: expected a mapping document")
            try:
                spec = MappingSpec.model_validate({**body, "origin": origin})
            except ValidationError as exc:
                raise ConfigError(_validation_message(origin, exc)) from None
            target = entities.get(spec.entity)
            if target is None:
                raise ConfigError(f"{origin}: unknown entity {spec.entity!r}")
            for fname in spec.fields:
                if fname not in target.fields:
                    raise ConfigError(
                        f"{origin}: field {fname!r} is not a field of entity {spec.entity!r}"
                    )
            missing = [f for f, d in target.fields.items() if d.required and f not in spec.fields]
            if missing:
                raise ConfigError(f"{origin}: required entity fields not mapped: {missing}")
            mappings[(spec.source.service, spec.source.table)] = spec
    return Catalog(entities, mappings)
