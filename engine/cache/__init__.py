"""Cached artifacts: their keys, one get-or-compute helper, and one module per artifact.

| module | artifact | stored as |
|---|---|---|
| `keys` | the key of every artifact (and of app requests), torch-free | - |
| `artifacts` | `get_or_compute`: look up, load, or compute, save and record | - |
| `lookups` | answers from the store without loading a model (torch-free) | - |
| `windows` | token windows of a text | array |
| `calibration` | calibration statistics per input site | record + array |
| `spectra` | weight and feature spectra of every decoder linear | rows |
| `evaluation` | the original model's perplexity on an evaluation set | record |
| `factorization` | a method's factors of every decoder linear, up to the largest rank that saves parameters | record + array |
| `reference` | the original model's next-token distribution on evaluation windows | record + array |

Every artifact is keyed by content (model fingerprint, text fingerprint, windowing, method, versions),
so changing any input never returns a stale result, and a deleted or damaged array file is
recomputed. This package only orchestrates: the maths lives in `engine.calibration`,
`engine.spectra`, `engine.metrics` and `engine.methods`; persistence in `engine.store`.
"""
