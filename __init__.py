"""saestream: stream language-model activations over ZeroMQ and train TopK SAEs on them online.

The repository root is this package (pyproject maps `saestream` onto it), so the import names
mirror the folders: `saestream.common` is `common/`, `saestream.producer` is `producer/`,
`saestream.consumer` is `consumer/`, `saestream.tools` is `tools/`. See ARCHITECTURE.md.
"""

__version__ = "0.1.0"
