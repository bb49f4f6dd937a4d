"""common/bounded_json: documents are parsed only when what they build is bounded."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from saestream.common import bounded_json
from saestream.common.bounded_json import TooManyValues, count_values


@pytest.mark.parametrize("doc", [
    {}, [], 0, "", {"a": [1, 2, {"b": None}], "c": "x"}, [[], [[]], {}],
    {"text": "{[,,,]}" * 50, 'quo"te': 'a\\"{,'}, ["\\", '\\"[', "]", '\\'],
])  # fmt: skip
def test_values_are_counted_outside_strings_and_bound_what_parsing_builds(doc) -> None:
    text = json.dumps(doc)
    n = count_values(text)
    assert n == count_values(text)

    def built(value) -> int:  # values json.loads builds, beyond the document itself
        if isinstance(value, dict):
            return len(value) + sum(built(v) for v in value.values())
        if isinstance(value, list):
            return len(value) + sum(built(v) for v in value)
        return 0

    assert built(doc) <= n <= built(doc) + text.count("{") + text.count("[") + 1
    assert bounded_json.loads(text) == doc == bounded_json.loads(text.encode())
    # braces and commas inside strings are text: a long string of them costs nothing
    assert count_values(json.dumps({"s": "{[," * 10_000})) == 1


def test_a_document_over_the_limit_is_refused_before_it_is_parsed() -> None:
    text = "[" + ",".join(["{}"] * 101) + "]"
    assert bounded_json.loads(text, limit=202) == [{}] * 101  # 100 commas, 101 {, one [
    with pytest.raises(TooManyValues, match="more than 201 JSON values"):
        bounded_json.loads(text, limit=201)
    assert issubclass(TooManyValues, ValueError)  # callers' "not JSON" handling applies
    with pytest.raises(RecursionError):
        bounded_json.loads("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError):
        bounded_json.loads('{"unterminated": "')


@pytest.mark.parametrize("item", ["{},", '"":0,', '"",,'])
def test_refusing_a_64_mib_document_of_tiny_values_costs_little_memory(item: str) -> None:
    """The case the module exists for, in a fresh process: json.loads of 66 MiB of `{},`
    peaked at 1,667 MiB (measured once, not here: it would cost the suite that much);
    refusing it, at 199 MiB. Strings were removed by a pattern, which built an entry per
    string: 1.2 GB to refuse 64 MiB of `"":0,` (found by review); counted by quotes, the
    three shapes refuse at the text's size and some 40 MiB more."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child of a large test
    # worker starts at the worker's size (662 MiB in one CI run)
    script = (
        "from saestream.common import bounded_json\n"
        f"text = '[' + {item!r} * ((64 << 20) // {len(item)}) + '{{}}]'\n"  # 64 MiB
        "try:\n"
        "    bounded_json.loads(text)\n"
        "except bounded_json.TooManyValues:\n"
        "    print(next(x for x in open('/proc/self/status') if x.startswith('VmHWM'))"
        ".split()[1])\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    peak_mib = int(out) / 1024
    assert peak_mib < 400, f"peak RSS {peak_mib:.0f} MiB"


def test_files_that_grow_with_the_run_are_read_whatever_their_count(tmp_path) -> None:
    """extra.json holds every producer's latest source (up to 64 lists of 256 values) and
    their delivered ranges; eval.json per-latent lists: 64 producers with full sources made
    extra.json 1,048,576 values, which a snapshot must still be read with."""
    from saestream.consumer.checkpoint import (
        EXTRA_JSON_VALUES,
        CheckpointError,
        read_json_file,
    )
    from saestream.evaluator.features_cli import _evaluated

    sources = {f"p{i}": {f"k{j}": list(range(256)) for j in range(64)} for i in range(65)}
    path = tmp_path / "extra.json"
    path.write_text(json.dumps({"ledger": sources}))
    assert bounded_json.count_values(path.read_text()) > bounded_json.MAX_VALUES
    assert read_json_file(path, EXTRA_JSON_VALUES)["ledger"] == sources
    with pytest.raises(CheckpointError, match="more than 1,048,576 JSON values"):
        read_json_file(path)  # cfg.json, trainer.json, run.json: their writers bound them
    evaluated = tmp_path / "eval.json"
    evaluated.write_text(json.dumps({"downstream": sources}))
    _evaluated(evaluated, given=True)  # read (its groups are judged elsewhere), not refused


def test_utf16_and_utf32_bytes_are_no_json_here() -> None:
    """json.loads(bytes) takes UTF-16 and UTF-32, whose bytes the count cannot read: U+2200
    holds a `"` byte, which turned the rest of a document of 2 million `{}` into one string
    for the count (found by review). JSON files and safetensors headers are UTF-8."""
    doc = '["\u2200",' + "{}," * 2_000_000 + '"\u2200"]'
    assert json.loads(doc.encode("utf-16")) is not None  # what json.loads would have done
    for encoding in ("utf-16", "utf-16-le", "utf-32-le"):
        with pytest.raises(ValueError):
            bounded_json.loads(doc.encode(encoding))
    with pytest.raises(TooManyValues):
        bounded_json.loads(doc.encode("utf-8"))


@pytest.mark.parametrize("text", [
    '"' + '\\"' * 200_000,  # unterminated: every later quote used to rescan to the end
    '"' + "ab" * 200_000 + "\\",  # unterminated, ending in a backslash
    '"' + "\\\n" * 200_000,  # escaped newlines
])  # fmt: skip
def test_the_count_is_linear_on_strings_that_never_close(text) -> None:
    """No clock is compared with a number: the same scan over a text 8 times as long must
    cost about 8 times as much (the quadratic scan cost 64 times: 57 s for 128 KiB)."""
    import time

    def cost(t: str) -> float:
        best = float("inf")
        for _ in range(3):
            start = time.process_time()
            count_values(t)
            best = min(best, time.process_time() - start)
        return best

    short, long = cost(text[: len(text) // 8]), cost(text)
    assert long < 20 * short + 0.05, (short, long)
