"""Tools that stand above both daemons: the command group, the demo, and `saestream status`."""
