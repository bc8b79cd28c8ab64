"""Serving: an engine folder behind Triton Inference Server (`visprune serve`), the model repository it
writes (`visprune export-triton`), and a load generator for it. Uses `runtime` only."""
