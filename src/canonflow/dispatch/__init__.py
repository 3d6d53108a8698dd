"""Dispatchers: how chunk and transform tasks reach a worker, chosen by URL."""

from canonflow.dispatch.base import Dispatcher, open_dispatcher

__all__ = ["Dispatcher", "open_dispatcher"]
