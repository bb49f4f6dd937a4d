"""Shared by producer and consumer: the wire format, transport, metrics and logging helpers."""

__version__ = "0.1.0"
