"""Capturing block outputs (the residual stream) with forward hooks, and stopping the forward
pass as soon as the last requested hook has fired, so later blocks and the LM head never run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class HookError(ValueError):
    """A hook name that is not a module of the model, or a module whose output is not a
    hidden state; the message is one line."""


class _StopForward(Exception):
    """Raised by the last hook to fire; caught around the forward by `HookedModel`."""


def hidden_state(output: object) -> torch.Tensor:
    """The hidden state in a module's output: the tensor itself, or the first of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find a hidden-state tensor in a {type(output).__name__} output")


def named_hidden_state(name: str, output: object) -> torch.Tensor:
    """`hidden_state` of hook `name`'s output, or HookError (one line) when it has none
    (`--hook model` gives the model's output object)."""
    try:
        return hidden_state(output)
    except TypeError:
        raise HookError(f"hook {name!r} produced a {type(output).__name__}, not a "
                        "[batch, seq, d_model] tensor: hook a transformer block instead"
                        ) from None


def validate_hooks(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Check every name is a module path of `model`; returns them deduplicated, order kept."""
    seen: list[str] = []
    for name in names:
        if not name.strip():  # get_submodule("") is the model itself: its output is logits
            raise HookError(f"hook {name!r}: give a module path, e.g. model.layers.4")
        try:
            model.get_submodule(name)
        except AttributeError:
            raise HookError(
                f"unknown hook {name!r}: not a module of the model"
            ) from None
        if name not in seen:
            seen.append(name)
    if not seen:
        raise HookError("no hook given")
    return seen


class HookedModel:
    """Runs `model` on token ids and returns the outputs of the hooked modules.

    Each hooked tensor is the module's output hidden state ([batch, seq, d_model]); for a
    transformer block that is the residual stream after the block, equal to
    `output_hidden_states[i + 1]` for block i (except where a model normalises the last one).
    With `early_stop` (the default) the forward is abandoned once every hook has fired.
    """

    def __init__(self, model: nn.Module, hooks: Sequence[str], *, early_stop: bool = True,
                 residual: bool = False) -> None:
        """:param residual: every hooked output must be d_model wide (the producer streams
            the residual stream); otherwise any [batch, seq, width] passes (the evaluators
            read SAEs trained on any module, e.g. an MLP's up-projection)."""
        self.model = model
        self.hooks = validate_hooks(model, hooks)
        self.early_stop = early_stop
        self._captured: dict[str, torch.Tensor] = {}
        width = getattr(getattr(model, "config", None), "hidden_size", None)
        self._width = width if residual and isinstance(width, int) else None
        """d_model, the last dimension every hooked output must have (None: any)."""
        self._ids_shape: tuple[int, ...] = ()
        """[batch, seq] of the forward in progress."""
        self._handles = [
            model.get_submodule(name).register_forward_hook(self._make_hook(name))
            for name in self.hooks
        ]

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: object, output: object) -> None:
            self._captured[name] = self._checked(name, output)
            if self.early_stop and len(self._captured) == len(self.hooks):
                raise _StopForward

        return hook

    def _checked(self, name: str, output: object) -> torch.Tensor:
        """The hidden state in `output`, or HookError naming the hook and what it produced:
        a module that is not a residual-stream module (`model.rotary_emb` returns (cos,
        sin) of shape [1, seq, head_dim]) would otherwise stream wrong data, or fail later
        in a traceback. Raised inside the forward, before any of it reaches a chunk."""
        h = named_hidden_state(name, output)
        width = self._width if self._width is not None else (h.shape[-1] if h.ndim else -1)
        expected = (*self._ids_shape, width)
        if tuple(h.shape) != expected:
            shape = ", ".join(str(n) for n in h.shape)
            what = (f"a tensor of shape [{shape}]" if isinstance(output, torch.Tensor) else
                    f"a {type(output).__name__} whose first tensor has shape [{shape}]")
            want = ", ".join(str(n) for n in expected)
            raise HookError(f"hook {name!r} produced {what}, not [batch, seq, d_model] = "
                            f"[{want}]: hook a transformer block instead")
        return h

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """:param input_ids: [batch, seq] token ids. Returns hook name -> [batch, seq, d_model]."""
        self._captured = {}
        self._ids_shape = tuple(input_ids.shape)
        try:
            self.model(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
        captured, self._captured = self._captured, {}
        missing = [h for h in self.hooks if h not in captured]
        if missing:
            raise HookError(f"hook(s) {', '.join(missing)} never fired during the forward pass")
        return captured

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
