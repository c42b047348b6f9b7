"""The runtime: pollers, dispatcher, effects, the daemon."""
