"""The typed schemas of the artifacts the stages hand to each other, one module per kind, each with its reader.

- `schema_ids`: every artifact kind's schema id, version and file name (what visprune/outputs.py recognises);
- `common`: the strict base model, parsing, sealing and file digests every schema shares;
- `onnx_set`: `manifest.json` of an ONNX set (`visprune export`), read by `read_onnx_set`;
- `engine_set`: `engine.json` of an engine folder (`visprune build`), read by `read_engine_set`;
- `reports`: the parity, latency and evaluation reports' JSON files.
The recipe's schema is `calibrate.recipe.Recipe`, its reader `calibrate.recipe.load_recipe`.

Import from the module that owns a name; this package re-exports nothing, so that visprune/outputs.py can read
`schema_ids` without importing the schemas (they import visprune.models, which imports visprune/outputs.py).
"""
