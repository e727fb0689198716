"""Federated fine-tuning of a routed sub-net: data partitions, local loops, Flower plumbing.

The Flower apps (`server/server_app.py`, `client/client_app.py`) are thin; what they run lives
here so that tests and the in-process benchmark call exactly the same functions.
"""
