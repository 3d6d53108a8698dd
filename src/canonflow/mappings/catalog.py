"""Load and cross-check entities and mappings; every error names the file and the field."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from canonflow import yamlio
from canonflow.errors import ConfigError
from canonflow.model import ServiceName, TableName

log = logging.getLogger("canonflow.mappings")
FieldType = Literal["string", "int", "float", "decimal", "bool", "timestamp", "enum"]
Scalar = str | int | float | bool
ITEM = "$item"  # in a child mapping: the exploded array element
EXTRA = "_extra"  # keep_unmapped: the source fields a mapping does not map, as JSON
MAPPING_KEYS = ("source", "entity", "fields")  # a document with two of them is a mapping
ENTITY_KEYS = ("entities", "extends")  # a document of user entities


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FieldDef(_Model):
    type: FieldType
    required: bool = False
    description: str = ""
    values: list[str] | None = Field(default=None, description="allowed values of an enum")

    @model_validator(mode="after")
    def _enum_has_values(self) -> FieldDef:
        if (self.type == "enum") != bool(self.values):
            raise ValueError("an enum field lists its values; only an enum field does")
        return self


class Entity(_Model):
    name: str
    description: str = ""
    primary_key: str | list[str]
    ordering: str
    fields: dict[str, FieldDef]

    @property
    def keys(self) -> list[str]:
        return [self.primary_key] if isinstance(self.primary_key, str) else list(self.primary_key)


class FieldRule(_Model):
    """How one canonical field is computed from a raw record. Exactly one source:
    ``path``, ``coalesce`` (first non-null of several paths), ``template`` (text with
    ``{path}`` placeholders) or ``value`` (a literal)."""

    path: str | None = Field(default=None, description="dotted path into the raw record")
    coalesce: list[str] | None = Field(default=None, description="first non-null of these paths")
    template: str | None = Field(default=None, description="text with {path} placeholders")
    value: Scalar | None = Field(default=None, description="a literal value")
    format: str | None = Field(default=None, description="strptime format for timestamps")
    timezone: str | None = Field(default=None, description="zone of timestamps without offset")
    unit: Literal["s", "ms"] = Field(default="s", description="epoch numbers: seconds or ms")
    values: dict[str, str] | None = Field(default=None, description="value map (enums)")
    nulls: list[str] | None = Field(default=None, description="raw values that mean null")
    array: Literal["first", "join"] | None = Field(
        default=None, description="arrays: take the first element, or join the elements")
    separator: str = ","
    default: Scalar | None = None
    empty: Literal["null", "keep"] = Field(
        default="null", description="text that is empty or only whitespace: null (default) "
        "or kept as it is")
    on_error: Literal["null", "quarantine"] | None = Field(
        default=None, description="a value that cannot be cast: the field becomes null (the "
        "default for optional fields; counted per reason) or the record is quarantined "
        "(always for required fields)")
    unknown: str | None = Field(
        default=None, description="enums, a value outside the enum: 'null', 'quarantine', or "
        "an enum value to map it to (the raw value is kept in the field '<name>_raw')")
    minor_units: str | None = Field(
        default=None, description="money: the value is an integer in the minor unit of the "
        "currency at this path; stored in major units (ISO 4217 exponent 0, 2 or 3)")
    exponents: dict[str, int] | None = Field(
        default=None, description="currency code -> exponent, overriding ISO 4217 "
        "(minor_units)")

    @model_validator(mode="after")
    def _one_source(self) -> FieldRule:
        given = [k for k in ("path", "coalesce", "template", "value")
                 if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of path, coalesce, template, value "
                             f"(got {', '.join(given) or 'none'})")
        if self.coalesce is not None and not self.coalesce:
            raise ValueError("coalesce lists at least one path")
        return self

    @property
    def paths(self) -> list[str]:
        """Every raw path this rule reads."""
        if self.path is not None:
            return [self.path]
        if self.coalesce is not None:
            return list(self.coalesce)
        if self.template is not None:
            return template_paths(self.template)
        return []


def template_paths(template: str) -> list[str]:
    import re

    return re.findall(r"\{([^{}]+)\}", template)


class SourceRef(_Model):
    service: ServiceName
    table: TableName


class ChildMapping(_Model):
    """Explode an array of each record into rows of a child entity."""

    entity: str
    explode: str = Field(description="dotted path of the array to explode")
    fields: dict[str, FieldRule]
    parent_key: dict[str, str] | None = Field(
        default=None,
        description="child field -> parent key field it holds (default: the child fields "
                    "read from the same path as the parent's key fields)")

    def parent_link(self, parent: MappingSpec, parent_entity: Entity) -> dict[str, str]:
        """Child field -> parent key field: how a child row names its parent (the
        per-parent replace of children deletes by it)."""
        if self.parent_key is not None:
            return dict(self.parent_key)
        link: dict[str, str] = {}
        for key in parent_entity.keys:
            rule = parent.fields.get(key)
            path = rule.paths if rule is not None and rule.path is not None else None
            match = [name for name, r in self.fields.items() if path and r.paths == path]
            if len(match) != 1:
                raise ValueError(f"cannot tell which field of {self.entity!r} holds the parent "
                                 f"key {key!r}; name it with parent_key")
            link[match[0]] = key
        return link


class DeletedRule(_Model):
    """Which records are deletions (tombstones): the value at ``path`` is true, or (with
    ``values``) one of those texts. ``at`` says when (a timestamp rule); by default the
    entity's ordering value, else the extraction time."""

    path: str | None = Field(default=None, description="dotted path of the deletion flag")
    values: list[str] | None = Field(
        default=None, description="texts at path that mean deleted (default: true)")
    always: bool = Field(default=False, description="every record of the table is a deletion")
    at: FieldRule | None = Field(default=None, description="when the record was deleted")

    @model_validator(mode="after")
    def _one_source(self) -> DeletedRule:
        if (self.path is None) == (not self.always):
            raise ValueError("give either path (with optional values) or always: true")
        return self


class MappingSpec(_Model):
    source: SourceRef
    entity: str
    fields: dict[str, FieldRule]
    children: list[ChildMapping] = Field(default_factory=list)
    deleted: DeletedRule | None = Field(
        default=None, description="which records are deletions (soft delete: _deleted_at)")
    keep_unmapped: bool = Field(
        default=False, description=f"keep the source fields no rule reads, as JSON text in "
        f"the column {EXTRA}")
    kind: Literal["mapping"] = "mapping"
    origin: str = ""


class Extension(_Model):
    """Fields added to an entity defined elsewhere (a built-in one)."""

    fields: dict[str, FieldDef]


class EntitiesDoc(_Model):
    """A user's entities file: new entities, and fields added to existing ones."""

    kind: Literal["entities"] = "entities"
    entities: dict[str, dict[str, object]] = Field(default_factory=dict)
    extends: dict[str, Extension] = Field(default_factory=dict)


def _validation_message(origin: str, exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    return f"{origin}: at {where}: {first['msg']}"


def _read_yaml(entry: Path | Traversable, origin: str) -> object:
    try:
        return yamlio.load(entry.read_text())
    except (OSError, yamlio.YAMLError) as exc:
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


def _check_fields(origin: str, entity_name: str, fields: dict[str, FieldRule],
                  entities: dict[str, Entity], deletions_only: bool = False) -> None:
    target = entities.get(entity_name)
    if target is None:
        raise ConfigError(f"{origin}: unknown entity {entity_name!r}")
    for fname, rule in fields.items():
        fdef = target.fields.get(fname)
        if fdef is None:
            raise ConfigError(
                f"{origin}: field {fname!r} is not a field of entity {entity_name!r}")
        if rule.values is not None and fdef.values is not None:
            wrong = sorted(set(rule.values.values()) - set(fdef.values))
            if wrong:
                raise ConfigError(f"{origin}: field {fname!r}: value map targets {wrong} "
                                  f"are not values of the enum ({', '.join(fdef.values)})")
        if rule.unknown is not None:
            if fdef.values is None:
                raise ConfigError(f"{origin}: field {fname!r}: unknown is for enum fields")
            if rule.unknown not in ("null", "quarantine"):
                if rule.unknown not in fdef.values:
                    raise ConfigError(
                        f"{origin}: field {fname!r}: unknown {rule.unknown!r} is not a value "
                        f"of the enum ({', '.join(fdef.values)}), 'null' or 'quarantine'")
                raw = target.fields.get(f"{fname}_raw")
                if raw is None or raw.type != "string" or f"{fname}_raw" in fields:
                    raise ConfigError(
                        f"{origin}: field {fname!r}: unknown {rule.unknown!r} keeps the raw "
                        f"value in '{fname}_raw', a string field of {entity_name!r} the "
                        "mapping does not map itself")
        if rule.minor_units is not None and fdef.type not in ("decimal", "float"):
            raise ConfigError(f"{origin}: field {fname!r}: minor_units is for decimal or "
                              f"float fields, not {fdef.type}")
        if fdef.required and rule.on_error == "null":
            raise ConfigError(f"{origin}: field {fname!r} is required: a value that cannot "
                              "be cast always quarantines the record (on_error: null)")
    # a table of deletions only (every record a tombstone) needs the key fields only
    missing = [f for f, d in target.fields.items() if d.required and f not in fields
               and (not deletions_only or f in target.keys)]
    if missing:
        raise ConfigError(f"{origin}: required fields of {entity_name!r} not mapped: {missing}")


def _entity(name: str, body: object, origin: str) -> Entity:
    if not isinstance(body, dict):
        raise ConfigError(f"{origin}:{name}: expected an entity (description, primary_key, "
                          "ordering, fields)")
    try:
        entity = Entity.model_validate({"name": name, **body})
    except ValidationError as exc:
        raise ConfigError(_validation_message(f"{origin}:{name}", exc)) from None
    for key in [*entity.keys, entity.ordering]:
        if key not in entity.fields:
            raise ConfigError(f"{origin}:{name}: {key!r} is not one of its fields")
        if key in entity.keys and not entity.fields[key].required:
            raise ConfigError(f"{origin}:{name}: key field {key!r} must be required")
    return entity


def _user_field_names(origin: str, entity: str, names: Iterable[str]) -> None:
    for fname in names:
        if fname.startswith("_"):
            raise ConfigError(f"{origin}: entity {entity!r}: field {fname!r}: names starting "
                              "with '_' are kept for lineage columns")


def _add_entities(entities: dict[str, Entity], doc: EntitiesDoc, origin: str) -> None:
    """A user's new entities (extensions are applied once every file is read)."""
    for name, body in doc.entities.items():
        if name in entities:
            raise ConfigError(f"{origin}: entity {name!r} is already defined; add fields to "
                              f"it under 'extends: {{{name}: {{fields: ...}}}}'")
        entity = _entity(name, body, origin)
        _user_field_names(origin, name, entity.fields)
        entities[name] = entity


def _extend(entities: dict[str, Entity], doc: EntitiesDoc, origin: str) -> None:
    for name, ext in doc.extends.items():
        target = entities.get(name)
        if target is None:
            raise ConfigError(f"{origin}: extends unknown entity {name!r} "
                              f"(known: {', '.join(sorted(entities))})")
        _user_field_names(origin, name, ext.fields)
        for fname, fdef in ext.fields.items():
            if fname in target.fields:
                raise ConfigError(f"{origin}: extends.{name}: field {fname!r} is already a "
                                  f"field of {name!r}")
            if fdef.required:
                raise ConfigError(f"{origin}: extends.{name}: field {fname!r}: an added field "
                                  "cannot be required (the mappings that do not map it would "
                                  "quarantine every record)")
        entities[name] = target.model_copy(update={"fields": {**target.fields, **ext.fields}})


@dataclass(frozen=True)
class MappingProblem:
    """A mapping file that claims to be a mapping but cannot work."""

    origin: str
    service: str | None
    table: str | None
    entity: str | None
    message: str  # one line, naming the file and the field


@dataclass(frozen=True)
class CatalogCheck:
    catalog: Catalog  # the entities and the valid mappings
    problems: list[MappingProblem] = field(default_factory=list)


def _classify(body: object) -> str | None:
    """'mapping', 'entities', or None (not ours: skipped). A document is a mapping when it
    says ``kind: mapping`` or has at least two of source, entity and fields; user entities
    when it says ``kind: entities`` or has entities/extends (and no mapping keys)."""
    if not isinstance(body, dict):
        return None
    kind = body.get("kind")
    if kind is not None:
        return kind if kind in ("mapping", "entities") else None
    if sum(k in body for k in MAPPING_KEYS) >= 2:
        return "mapping"
    if any(k in body for k in ENTITY_KEYS) and not any(k in body for k in MAPPING_KEYS):
        return "entities"
    return None


def _source_of(body: dict[str, object]) -> tuple[str | None, str | None]:
    src = body.get("source")
    if isinstance(src, dict):
        service, table = src.get("service"), src.get("table")
        return (service if isinstance(service, str) else None,
                table if isinstance(table, str) else None)
    return None, None


def _check_mapping(spec: MappingSpec, entities: dict[str, Entity]) -> None:
    origin = spec.origin
    _check_fields(origin, spec.entity, spec.fields, entities,
                  deletions_only=spec.deleted is not None and spec.deleted.always)
    for fname, rule in spec.fields.items():
        _check_rule(origin, fname, rule, entities[spec.entity].fields[fname])
    for i, child in enumerate(spec.children):
        where = f"{origin}: children[{i}]"
        _check_fields(where, child.entity, child.fields, entities)
        for fname, rule in child.fields.items():
            _check_rule(where, fname, rule, entities[child.entity].fields[fname])
        try:
            link = child.parent_link(spec, entities[spec.entity])
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if sorted(link.values()) != sorted(entities[spec.entity].keys) or any(
                f not in entities[child.entity].fields for f in link):
            raise ConfigError(f"{where}: parent_key must map fields of "
                              f"{child.entity!r} to every key field of {spec.entity!r}")


def _check_rule(origin: str, fname: str, rule: FieldRule, fdef: FieldDef) -> None:
    """What a rule says that cannot work with its field's type: an unknown time zone, a
    literal or default the field's type cannot hold (cast by the mapping engine itself)."""
    if rule.timezone is not None:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(rule.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"{origin}: field {fname!r}: unknown time zone "
                              f"{rule.timezone!r}") from None
    if rule.format is not None and fdef.type != "timestamp":
        raise ConfigError(f"{origin}: field {fname!r}: format is for timestamp fields, not "
                          f"{fdef.type}")
    for what, literal in (("value", rule.value), ("default", rule.default)):
        if literal is None:
            continue
        import pyarrow as pa

        from canonflow.transform.mapping import cast_column  # the engine's own cast

        _, failed = cast_column(pa.array([literal]), fdef.type, rule, fdef)
        if failed[0].as_py():
            allowed = f" (one of {', '.join(fdef.values)})" if fdef.values else ""
            raise ConfigError(f"{origin}: field {fname!r}: {what} {literal!r} cannot be cast "
                              f"to {fdef.type}{allowed}")


def inspect_catalog(extra_dirs: Iterable[str | Path] = ()) -> CatalogCheck:
    """Built-in entities and mappings, plus ``extra_dirs`` (which win): their mappings,
    their entities files (new entities, fields added to existing ones). Each mapping that
    cannot work is a problem of its own; an entities file that cannot work is a
    ConfigError. YAML files that are neither are skipped (logged at DEBUG)."""
    root = resources.files("canonflow.mappings")
    builtin = "builtin:entities.yaml"
    raw = _read_yaml(root / "entities.yaml", builtin)
    if not isinstance(raw, dict):
        raise ConfigError(f"{builtin}: expected a mapping of entities")
    entities = {name: _entity(name, body, "entities.yaml") for name, body in raw.items()}

    bodies: list[tuple[str, dict[str, object]]] = []  # mapping documents, in order
    docs: list[tuple[str, EntitiesDoc]] = []
    sources: list[Path | Traversable] = [root]
    sources += [Path(d) for d in extra_dirs]
    for folder in sources:
        if isinstance(folder, Path) and not folder.is_dir():
            raise ConfigError(f"mapping folder {folder} does not exist")
        for entry in _walk(folder):
            if folder is root and entry.name == "entities.yaml":
                continue
            origin = f"{entry}" if isinstance(entry, Path) else f"builtin:{entry.name}"
            body = _read_yaml(entry, origin)
            kind = _classify(body)
            if kind is None:
                log.debug("not a mapping or entities file; skipped", extra={"file": origin})
                continue
            assert isinstance(body, dict)
            if kind == "mapping":
                bodies.append((origin, body))
                continue
            try:
                doc = EntitiesDoc.model_validate(body)
            except ValidationError as exc:
                raise ConfigError(_validation_message(origin, exc)) from None
            _add_entities(entities, doc, origin)
            docs.append((origin, doc))
    for origin, doc in docs:
        _extend(entities, doc, origin)

    mappings: dict[tuple[str, str], MappingSpec] = {}
    problems: list[MappingProblem] = []
    for origin, body in bodies:
        service, table = _source_of(body)
        entity = body.get("entity")
        try:
            try:
                spec = MappingSpec.model_validate({**body, "origin": origin})
            except ValidationError as exc:
                raise ConfigError(_validation_message(origin, exc)) from None
            _check_mapping(spec, entities)
        except ConfigError as exc:
            problems.append(MappingProblem(origin, service, table,
                                           entity if isinstance(entity, str) else None,
                                           str(exc)))
            if service is not None and table is not None:
                mappings.pop((service, table), None)  # the broken file wins over a built-in
            continue
        mappings[(spec.source.service, spec.source.table)] = spec
    for spec in mappings.values():
        target = entities[spec.entity]
        if spec.keep_unmapped and EXTRA not in target.fields:
            entities[spec.entity] = target.model_copy(update={"fields": {
                **target.fields, EXTRA: FieldDef(
                    type="string", description="Source fields the mapping does not map, "
                    "as JSON (keep_unmapped)")}})
    return CatalogCheck(Catalog(entities, mappings), problems)


def load_catalog(extra_dirs: Iterable[str | Path] = ()) -> Catalog:
    """Built-in entities and mappings, plus entities and mappings from ``extra_dirs``
    (which win); the first mapping that cannot work is a ConfigError."""
    check = inspect_catalog(extra_dirs)
    if check.problems:
        raise ConfigError(check.problems[0].message)
    return check.catalog
