"""Operations: logging, serving, metrics."""
