"""The command-line tools: syncd and syncctl."""
