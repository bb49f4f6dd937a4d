"""Shared by producer and consumer: the wire format, transport, metrics and logging helpers."""
