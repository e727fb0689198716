"""`sdr-export triton`: the config.pbtxt read by Triton's own schema matches the ONNX graph;
batch rules, versions, refusals, and nothing foreign replaced."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from fixtures_export import ROUTE, trained_digits
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2  # the dev extra: Triton's own config schema

from sdr_edge.export.pipeline import ExportOptions, export_model
from sdr_edge.inference.runners import OrtRunner
from sdr_edge_export.cli import main as export_main

TYPES = {"FLOAT": "TYPE_FP32", "FLOAT16": "TYPE_FP16", "UINT8": "TYPE_UINT8"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The trained digits classifier exported with a dynamic batch, and a fixed-batch copy."""
    root = tmp_path_factory.mktemp("triton")
    model, spec, _ = trained_digits()
    dynamic = export_model(model, spec, ROUTE, root / "digits.onnx",
                           ExportOptions(eval_source="builtin:digits", eval_limit=64,
                                         progress=False)).path
    proto = onnx.load(str(dynamic))
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1  # a batch-1 graph, metadata kept
    fixed = root / "fixed.onnx"
    onnx.save(proto, str(fixed))
    return {"dynamic": dynamic, "fixed": fixed, "labels": spec.label_names}


def _export(onnx_path, repo, *extra):
    return export_main(["triton", "--onnx", str(onnx_path), "--out", str(repo), *extra])


def _parse(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _graph_io(path):
    graph = onnx.load(str(path)).graph

    def describe(values):
        return [(v.name, TYPES[onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type)],
                 [d.dim_value if d.dim_value > 0 else -1 for d in v.type.tensor_type.shape.dim])
                for v in values]
    return describe(graph.input), describe(graph.output)


def _config_io(config):
    enum = model_config_pb2.DataType.Name
    return ([(t.name, enum(t.data_type), list(t.dims)) for t in config.input],
            [(t.name, enum(t.data_type), list(t.dims)) for t in config.output])


def test_repository_parses_with_tritons_schema_and_matches_the_graph(models, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert _export(models["dynamic"], repo, "--name", "digits", "--max-batch", "16",
                   "--dynamic-batching", "--instances", "2", "--kind", "gpu") == 0
    assert "max_batch_size 16" in capsys.readouterr().out
    model_dir = repo / "digits"
    assert sorted(p.name for p in model_dir.iterdir()) == \
        ["1", "config.pbtxt", "labels.txt", "sdr_edge_triton.json"]
    assert (model_dir / "1" / "model.onnx").read_bytes() == models["dynamic"].read_bytes()
    config = _parse(model_dir / "config.pbtxt")
    assert (config.name, config.platform, config.max_batch_size) == \
        ("digits", "onnxruntime_onnx", 16)
    graph_in, graph_out = _graph_io(models["dynamic"])
    conf_in, conf_out = _config_io(config)
    # max_batch_size > 0: Triton adds the batch axis, the config's dims are the rest
    assert all(shape[0] == -1 for _, _, shape in graph_in + graph_out)
    assert conf_in == [(n, t, s[1:]) for n, t, s in graph_in]
    assert conf_out == [(n, t, s[1:]) for n, t, s in graph_out]
    assert model_config_pb2.ModelInput.Format.Name(config.input[0].format) == "FORMAT_NCHW"
    assert config.output[0].label_filename == "labels.txt"
    assert (model_dir / "labels.txt").read_text().splitlines() == list(models["labels"])
    assert len(models["labels"]) == conf_out[0][2][-1]
    group = config.instance_group[0]
    assert (group.count, model_config_pb2.ModelInstanceGroup.Kind.Name(group.kind)) == \
        (2, "KIND_GPU")
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 4, 8, 16]
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    # the served file runs, and a batch of max_batch_size gives the configured output dims
    x = np.zeros((16, *conf_in[0][2]), np.float32)
    assert OrtRunner(model_dir / "1" / "model.onnx").run(x).shape == (16, *conf_out[0][2])


def test_fixed_batch_graph_gets_max_batch_0_and_its_full_shape(models, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert _export(models["fixed"], repo) == 0
    config = _parse(repo / "fixed" / "config.pbtxt")
    assert config.max_batch_size == 0
    graph_in, graph_out = _graph_io(models["fixed"])
    assert _config_io(config) == (graph_in, graph_out)
    assert graph_in[0][2][0] == 1
    assert not config.HasField("dynamic_batching")
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == \
        "KIND_AUTO"
    capsys.readouterr()
    for flags, words in ((["--max-batch", "4"], "fixed first dimension"),
                         (["--dynamic-batching"], "--dynamic-batching needs --max-batch > 0")):
        assert _export(models["fixed"], tmp_path / "other", *flags) == 2
        assert words in capsys.readouterr().err
        assert not (tmp_path / "other").exists()


def test_versions_force_and_foreign_files(models, tmp_path, capsys):
    repo = tmp_path / "repo"
    (repo / "someone_else" / "1").mkdir(parents=True)
    (repo / "someone_else" / "config.pbtxt").write_text('name: "someone_else"\n')
    assert _export(models["dynamic"], repo, "--name", "m") == 0
    assert _export(models["dynamic"], repo, "--name", "m", "--version", "2") == 0
    assert sorted(p.name for p in (repo / "m").iterdir() if p.is_dir()) == ["1", "2"]
    record = json.loads((repo / "m" / "sdr_edge_triton.json").read_text())
    assert set(record["files"]) == {"1/model.onnx", "2/model.onnx", "config.pbtxt",
                                    "labels.txt"}
    capsys.readouterr()

    # an existing version needs --force; with it, the version (ours) is replaced
    assert _export(models["dynamic"], repo, "--name", "m", "--version", "2") == 2
    assert "version 2 already exists" in capsys.readouterr().err
    assert _export(models["dynamic"], repo, "--name", "m", "--version", "2", "--force",
                   "--max-batch", "4") == 0
    assert _parse(repo / "m" / "config.pbtxt").max_batch_size == 4
    capsys.readouterr()

    # a file sdr-edge did not write is never replaced, not even with --force
    (repo / "m" / "2" / "notes.txt").write_text("mine")
    assert _export(models["dynamic"], repo, "--name", "m", "--version", "2", "--force") == 2
    assert "notes.txt was not written by sdr-edge" in capsys.readouterr().err
    assert (repo / "m" / "2" / "notes.txt").read_text() == "mine"
    # an edited config is not overwritten either
    edited = (repo / "m" / "config.pbtxt").read_text() + "# tuned by hand\n"
    (repo / "m" / "config.pbtxt").write_text(edited)
    assert _export(models["dynamic"], repo, "--name", "m", "--version", "3") == 2
    assert "config.pbtxt was changed after sdr-edge wrote it" in capsys.readouterr().err
    assert (repo / "m" / "config.pbtxt").read_text() == edited
    assert not (repo / "m" / "3").exists()
    # another tool's model of the same name is refused and left as it was
    assert _export(models["dynamic"], repo, "--name", "someone_else") == 2
    assert "did not write" in capsys.readouterr().err
    assert sorted(p.name for p in (repo / "someone_else").iterdir()) == ["1", "config.pbtxt"]
    # no staging folder is left behind by any of the refusals
    leftovers = [p for p in repo.rglob(".*")]
    assert leftovers == []


def test_bad_options_are_one_line_errors(models, tmp_path, capsys):
    repo = tmp_path / "repo"
    for flags, words in ((["--name", "../up"], "--name '../up'"),
                         (["--version", "0"], "--version must be >= 1"),
                         (["--instances", "0"], "--instances must be >= 1"),
                         (["--dynamic-batching", "--preferred-batch", "4,64"],
                          "sizes must be between 1 and --max-batch 8")):
        assert _export(models["dynamic"], repo, *flags) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1
    assert not repo.exists()
    assert _export(tmp_path / "missing.onnx", repo) == 2
    assert "not found" in capsys.readouterr().err
