"""The canonical transform: request validation, file discovery, mapping, upsert, quarantine."""

from canonflow.transform.run import run_transform

__all__ = ["run_transform"]
