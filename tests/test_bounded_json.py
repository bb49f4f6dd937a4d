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
    assert n == count_values(text.encode())

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


def test_refusing_a_64_mib_document_of_empty_maps_costs_little_memory() -> None:
    """The case the module exists for, in a fresh process: json.loads of the same text
    peaked at 1.7 GB (measured once, not here: it would cost the suite that much);
    refusing it, at 143 MB."""
    script = (
        "import resource, sys\n"
        "from saestream.common import bounded_json\n"
        "text = '[' + '{},' * (22 << 20) + '{}]'\n"  # 66 MiB
        "try:\n"
        "    bounded_json.loads(text)\n"
        "except bounded_json.TooManyValues:\n"
        "    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    peak_mib = int(out) / 1024
    assert peak_mib < 600, f"peak RSS {peak_mib:.0f} MiB"


def test_the_feature_browsers_eval_json_of_a_million_values_is_one_line(tmp_path) -> None:
    """The other readers are tested where their commands are (test_recording,
    test_train_hostile, test_producer)."""
    from saestream.common.errors import UserError
    from saestream.evaluator.features_cli import _evaluated

    path = tmp_path / "eval.json"
    path.write_text('{"downstream": [' + "{}," * (1 << 20) + "{}]}")
    with pytest.raises(UserError, match="more than 1,048,576 JSON values"):
        _evaluated(path, given=True)
