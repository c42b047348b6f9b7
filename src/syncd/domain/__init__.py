"""The pure domain: the linked-order statechart, the order types and the mapping rules."""

__all__: list[str] = []
