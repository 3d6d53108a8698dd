"""Canonical entities and the per-service mappings into them (YAML beside this module)."""

from canonflow.mappings.catalog import (
    Catalog,
    ChildMapping,
    Entity,
    FieldDef,
    FieldRule,
    MappingSpec,
    load_catalog,
)

__all__ = [
    "Catalog",
    "ChildMapping",
    "Entity",
    "FieldDef",
    "FieldRule",
    "MappingSpec",
    "load_catalog",
]
