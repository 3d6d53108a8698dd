"""Storage ports chosen by URL: :func:`open_object_store` and :func:`open_state_store`."""

from canonflow.stores.object_store import ObjectInfo, ObjectStore, open_object_store
from canonflow.stores.state import StateStore, open_state_store

__all__ = ["ObjectInfo", "ObjectStore", "StateStore", "open_object_store", "open_state_store"]
