"""Forward hooks that read or replace one module's output during a full forward pass.

Evaluation runs the model's whole forward (to the logits), so unlike the producer's
`HookedModel` these hooks never stop the forward early. Position 0 of every context is never
replaced: the producer never trains an SAE on it (its norm is an outlier), so the SAE has
nothing to say about it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from saestream.producer.hooks import named_hidden_state


def _with_hidden(output: object, new: torch.Tensor) -> object:
    """`output` with its hidden state swapped for `new` (same container type)."""
    if isinstance(output, torch.Tensor):
        return new
    rest = list(output[1:])  # type: ignore[index]
    return type(output)([new, *rest]) if isinstance(output, list) else (new, *rest)


@contextlib.contextmanager
def capture(model: nn.Module, hooks: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, each forward stores every hooked module's hidden state
    ([batch, seq, d_model]) in the yielded dict under the hook's name."""
    captured: dict[str, torch.Tensor] = {}

    def make(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: object, output: object) -> None:
            captured[name] = named_hidden_state(name, output)

        return hook

    handles = [model.get_submodule(h).register_forward_hook(make(h)) for h in hooks]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def splice(
    model: nn.Module, hook: str, replacement: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """Within the block, the output of module `hook` is replaced at positions 1..T−1.

    :param replacement: maps the hook's hidden state h [batch, T, d] to what positions
        1..T−1 become, [batch, T−1, d] (or anything broadcasting to it, e.g. a [d] mean);
        cast to h's dtype. Position 0 keeps h.
    """

    def hook_fn(module: nn.Module, args: object, output: object) -> object:
        h = named_hidden_state(hook, output)
        new = replacement(h).to(h.dtype).expand(h.shape[0], h.shape[1] - 1, h.shape[2])
        return _with_hidden(output, torch.cat([h[:, :1], new], dim=1))

    handle = model.get_submodule(hook).register_forward_hook(hook_fn)
    try:
        yield
    finally:
        handle.remove()
