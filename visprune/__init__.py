"""visprune: visual-token pruning for LLaVA-family models, from calibration to deployable engines.

This package holds only what every stage shares: model adapters (`visprune.models`), artifact helpers
(`visprune.artifacts`), named errors (`visprune.errors`) and the command line (`visprune.cli`). The stages
themselves are the top-level packages `calibrate`, `exporter`, `engines` and `runtime`; a stage may import an
earlier stage, never a later one.
"""

__version__ = "0.1.0"
