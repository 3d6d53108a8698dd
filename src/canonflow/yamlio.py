"""All YAML reading goes through here: PyYAML's safe loader, on libyaml's C parser when
PyYAML was built with it (ten times faster on the mapping catalog a worker loads at start)."""

from __future__ import annotations

import yaml

YAMLError = yaml.YAMLError
_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load(text: str) -> object:
    """The document in ``text``, as plain Python values (the safe schema)."""
    return yaml.load(text, Loader=_LOADER)
