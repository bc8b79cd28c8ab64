"""Orchestrations that run every stage in turn: `visprune pipeline` (calibrate -> export -> build -> reports)
and `visprune tradeoff` (accuracy against pruning for several methods). They sit above all stages."""
