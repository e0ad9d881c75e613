"""KV transfer between engines: NIXL transport (``nixl_transport``), handshake side channel (``handshake``),
block leases (``leases``), Prometheus helpers (``metrics``) and errors (``errors``).

NOTE: importing this package stays torch-free and NIXL-free; ``nixl_transport`` imports torch, and NIXL itself
is only imported when a ``NixlKVTransport`` is created.
"""
