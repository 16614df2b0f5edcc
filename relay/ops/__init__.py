"""Operations: the CLI commands, the admin HTTP listener, Prometheus metrics and the worker
supervisor."""
