"""Routing a task to its sub-net: signatures (NumPy only), the signature kit, evaluation.

This package's __init__ imports nothing heavy on purpose: `sdr-client signature` imports
`sdr_edge.routing.signature` and `kit_runtime` without torch.
"""
