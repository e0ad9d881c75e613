"""Tandem's contracts: torch-free and server-free, imported by the engine, the router and the workers.

Everything two components must agree on lives here once: the chained block hasher (``hashing``), the KV
cache event types (``kv_events``), and, as they move in, the API schemas, the chat normaliser and the typed
``KVTransferParams``. NOTE: nothing in this package may import torch, FastAPI or ``tandem.engine``.
"""
