"""The runtime: pollers, dispatcher, effects, the daemon."""

__all__: list[str] = []
