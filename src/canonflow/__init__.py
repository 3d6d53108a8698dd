"""canonflow: sync many tenants' SaaS data into one canonical model, exactly once."""

from canonflow.config import Settings, load_settings
from canonflow.errors import CanonflowError, RetryableError, TerminalError
from canonflow.model import ChunkResult, ChunkSpec, TableRef, TransformRequest, TransformResult

__all__ = [
    "CanonflowError",
    "ChunkResult",
    "ChunkSpec",
    "RetryableError",
    "Settings",
    "TableRef",
    "TerminalError",
    "TransformRequest",
    "TransformResult",
    "load_settings",
]
__version__ = "0.1.0"
