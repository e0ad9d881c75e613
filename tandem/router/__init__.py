"""Tandem's prefix-aware router: an OpenAI-compatible front door for prefill, decode and aggregated workers.

NOTE: nothing in this package imports torch or transformers (a test asserts it): the router tokenizes with
``tokenizers`` and renders chat templates with jinja2, and hashes blocks with ``tandem.protocol.hashing``.
"""
