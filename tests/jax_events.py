"""Counting JAX's tracing, lowering and compilation in tests."""

import jax


def compile_events(run) -> list[str]:
    """The names of JAX's trace/lower/compile events while ``run()`` runs: each one is
    a cache miss, i.e. work that a warm eager step must not repeat."""
    events = []

    def listener(event, duration, **kwargs):
        if event.startswith("/jax/core/compile/"):
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        run()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return events
