"""The training daemon: receiving, shuffle buffer, the SAE and its losses, trainer, checkpoints."""
