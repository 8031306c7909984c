"""asgi-supervise: a production process manager for ASGI apps."""
