"""Operations: logging, serving, metrics."""

__all__: list[str] = []
