"""The Flower app (federated fine-tuning of a routed sub-net), laid out as Flower's quickstart.

`client_app` and `server_app` hold the ClientApp and ServerApp that pyproject's
`[tool.flwr.app.components]` name, with thin handlers; `task` is what a node does per message,
`server_flow` the server's run, `strategy` the aggregation, `config` the run config. Tests and
the in-process benchmark call the same functions (`testing.LocalGrid` delivers the messages).
Deploying the fleet (SuperLink, SuperNodes, certificates) lives beside it, in `sdr_edge.fleet`.
"""
