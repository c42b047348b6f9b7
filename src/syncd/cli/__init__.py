"""The command-line tools: syncd and syncctl."""

__all__: list[str] = []
