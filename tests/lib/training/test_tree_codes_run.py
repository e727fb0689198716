"""`[routing] codes = "tree"`: a real training run fits hierarchical k-means, records the kind,
and trains one expert per tree node, each on its own node's images."""

from __future__ import annotations

import numpy as np
import torch
from helpers_rundir import tiny_train_config

from sdr_edge.artifacts import run_dir as rd
from sdr_edge.artifacts.weights import read_metadata
from sdr_edge.clustering.tree_kmeans import tree_nodes
from sdr_edge.training.config import config_from_dict
from sdr_edge.training.pipeline import train


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_a_tree_run_trains_every_node_expert_and_says_it_is_a_tree(tmp_path):
    run = tmp_path / "tree"
    train(config_from_dict(tiny_train_config(routing={"branching": [2, 2], "codes": "tree"})),
          run)
    assert rd.codebook_kind(run) == "tree"
    assert read_metadata(run / rd.CODEBOOKS)["branching"] == [2, 2]
    assert [c.shape[0] for c in rd.load_codebooks(run)] == [2, 4]
    net, _ = rd.load_sdrnet(run)
    assert net.codes == "tree" and net.expert_counts == (2, 4)
    codes, _ = rd.load_codes(run)
    nodes = tree_nodes(codes.numpy(), (2, 2))
    assert set(np.unique(nodes[:, 1])) == {0, 1, 2, 3}  # every node holds images
    teacher, _ = rd.load_teacher(run)
    stage = net.level_stages[1]
    ref = _flat(teacher.stages[stage])
    experts = [_flat(e) for e in net.stages[stage].experts]
    assert all(not torch.equal(e, ref) for e in experts)  # each node's expert was trained
    assert all(not torch.equal(a, b) for i, a in enumerate(experts) for b in experts[i + 1:])
    residual = tmp_path / "residual"
    train(config_from_dict(tiny_train_config()), residual)
    assert rd.codebook_kind(residual) == "residual"
    assert "codes" not in read_metadata(residual / rd.SDRNET)["architecture"]
