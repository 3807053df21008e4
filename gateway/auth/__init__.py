"""Who may call, and how much: API keys (:mod:`gateway.auth.keys`) and per-key limits
(:mod:`gateway.auth.limits`, and :mod:`gateway.auth.redis_limits` with its Redis scripts
``acquire.lua`` and ``release.lua``).
The guards that apply them to routes are in :mod:`gateway.guards`."""
