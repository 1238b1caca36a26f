"""Spawned ranks (ddp_spawn, mp.spawn) import this package first: it registers the destruction
of their gloo group at exit (tests/_gloo.py; tests/ is on sys.path, as pytest puts it there)."""

from _gloo import end_process_group

__all__ = ["end_process_group"]
