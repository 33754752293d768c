"""One worker's media plane: a sans-IO engine (router, ingest, egress, layers, feedback,
viewers' bandwidth estimates and headroom probes, timers, relay copies) and its thin
asyncio driver (transport.MediaWorker).

Imports flow downward only: ``media`` uses ``protocol`` and the compiled ``_fastpath``;
``workers`` and ``http`` use ``media``. See DESIGN.md §3 for a line per module.
"""
