"""The main process's view of N media workers: capacity and admission, the start-up
send-cost probe, the control channel, worker processes and their pool, and the
in-process backend for ``--workers 1``. See DESIGN.md §3 for a line per module."""
