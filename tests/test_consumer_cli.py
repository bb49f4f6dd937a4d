"""`--sae` specs and `--hook`s → SAESpec list (in-process; the CLI's exit codes are tested in
test_consumer.py)."""

from __future__ import annotations

import pytest

from saestream.common.errors import UserError
from saestream.consumer.cli import build_sae_specs, parse_sae_spec


def test_spec_values_are_typed() -> None:
    spec = parse_sae_spec("name=k32, latents=16_384,k=32,multi_topk=yes,lr=1e-4,dead_tokens=1e7")
    assert spec == {"name": "k32", "latents": 16384, "k": 32, "multi_topk": True, "lr": 1e-4,
                    "dead_tokens": 10_000_000}


@pytest.mark.parametrize("text", ["latents", "k=3.5", "lr=fast", "multi_topk=maybe", "k=1,k=2"])
def test_malformed_specs_are_user_errors(text: str) -> None:
    with pytest.raises(UserError):
        parse_sae_spec(text)


def test_no_sae_means_one_default_sae_per_hook_named_after_it() -> None:
    hooks, specs = build_sae_specs([], ["model.layers.4", "model.layers.8"])
    assert hooks == ["model.layers.4", "model.layers.8"]
    assert [(s.name, s.hook, s.latents, s.k) for s in specs] == [
        ("model.layers.4", "model.layers.4", 16384, 32),
        ("model.layers.8", "model.layers.8", 16384, 32),
    ]


def test_a_spec_without_hook_serves_every_hook() -> None:
    _, specs = build_sae_specs(["name=k32,k=32", "name=k64,k=64"], ["a", "b"])
    assert [(s.name, s.hook) for s in specs] == [
        ("k32-a", "a"), ("k32-b", "b"), ("k64-a", "a"), ("k64-b", "b"),
    ]


def test_hooks_can_come_from_the_specs() -> None:
    hooks, specs = build_sae_specs(["hook=x,latents=64,k=4", "hook=y,latents=64,k=8"], [])
    assert hooks == ["x", "y"]
    assert [s.name for s in specs] == ["x-k4-l64", "y-k8-l64"]


def test_unnamed_specs_on_one_hook_get_distinct_names() -> None:
    _, specs = build_sae_specs(["k=16", "k=32"], ["h"])
    assert [s.name for s in specs] == ["h-k16-l16384", "h-k32-l16384"]


@pytest.mark.parametrize(
    "saes, hooks",
    [
        (["name=a/b"], ["h"]),
        (["input_normalization=batch"], ["h"]),
        (["latents=64,k=32,multi_topk=true"], ["h"]),
        (["lr=0"], ["h"]),
        ([], []),
    ],
)
def test_invalid_combinations_are_user_errors(saes: list[str], hooks: list[str]) -> None:
    with pytest.raises(UserError):
        build_sae_specs(saes, hooks)
