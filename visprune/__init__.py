"""visprune: visual-token pruning for LLaVA-family models, from calibration to deployable engines.

This package holds only what every stage shares: model adapters (`visprune.models`), artifact helpers
(`visprune.artifacts`, `visprune.outputs`, `visprune.manifests`), the dtype table and backend list
(`visprune.dtypes`, `visprune.backends`) and named errors (`visprune.errors`). The
stages are the top-level packages `calibrate`, `exporter`, `engines` and `runtime`; above them `reports` and
`serving`, then `workflows`, and the command line `cli` at the top. A package imports only those below it.
"""

__version__ = "0.1.0"
