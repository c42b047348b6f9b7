"""Adapters: one per service, each its models and its client."""

__all__: list[str] = []
