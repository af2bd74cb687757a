"""The batching engine (``Engine``): continuous batching over the slot cache.

See ``engine.py`` for one step's walk, docs/ARCHITECTURE.md for the whole way of a token.
"""
from ..output import Event, Output
from .engine import Engine
from .scheduler import PREFILL_TOKENS

__all__ = ["Engine", "Event", "Output", "PREFILL_TOKENS"]
