"""The harvesting daemon: token sources, model loading and hooks, batching, sending."""
