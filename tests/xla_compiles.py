"""Counting XLA compilations, for tests that a program is compiled once (or not at all)."""

import contextlib

import jax

_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def backend_compiles():
    """Yields a list that gets one entry per XLA backend compilation inside the block."""
    compiles = []

    def listen(event, seconds, **kwargs):
        if event == _EVENT:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
