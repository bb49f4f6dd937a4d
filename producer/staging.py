"""Moving a chunk off the accelerator without making the host wait or regroup.

On CUDA the producer keeps its activations on the device until a whole chunk is cut, then
`to_host` queues, on the current stream: `lz4-shuffle`'s byte regrouping (a transpose of the
bytes, which the GPU does at memory speed and one CPU thread at ~1 GB/s), and non-blocking
copies of the raw and the regrouped bytes into pinned host buffers, with an event behind
them. The model goes on with its next forward; an encoding thread waits for the event, then
only computes crc32 (of the raw bytes) and compresses. The wire bytes are those of the CPU
path, bit for bit (tested in tests/test_staging.py, on CUDA by benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import torch

from saestream.common.wire import regroup_bytes
from saestream.producer.sender import Outgoing


def to_host(item: Outgoing, codec: str) -> Outgoing:
    """`item` with its activations on the host: unchanged when they are there already, else
    pinned copies queued behind the device's work (see the module docstring)."""
    acts = item.acts
    if acts is None or acts.device.type == "cpu":
        return item
    pin = acts.device.type == "cuda"
    host = torch.empty(acts.shape, dtype=acts.dtype, pin_memory=pin)
    host.copy_(acts, non_blocking=pin)
    regrouped = None
    if codec == "lz4-shuffle":
        planes = regroup_bytes(acts)
        regrouped = torch.empty(planes.shape, dtype=torch.uint8, pin_memory=pin)
        regrouped.copy_(planes, non_blocking=pin)
    ready = None
    if pin:
        ready = torch.cuda.Event()
        ready.record()
    return item._replace(acts=host, regrouped=regrouped, ready=ready)
