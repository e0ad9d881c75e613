"""HTTP plumbing shared by the engine's server and the router: error responses and API-key auth.

Starlette-level code only (no torch, no ``tandem.engine``): the router imports it.
"""
