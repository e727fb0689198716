"""Deploying a Flower fleet: SuperLink/SuperNode process supervision and their certificates.

Beside the Flower app (`sdr_edge.federated`), not in it: the FAB never needs these, the
programs that start and key the processes do (`sdr-server fleet-keys`, the demo, the agent).
"""
