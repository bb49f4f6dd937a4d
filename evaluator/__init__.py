"""Evaluation of trained SAEs by the metrics of Gao et al. 2024 (`saestream eval`).

It needs the language model and its hooks (producer side) and the SAE files (consumer side),
so it stands above both: it imports `saestream.producer` and `saestream.consumer`, and
neither of them imports it.
"""
