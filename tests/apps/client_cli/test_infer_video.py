"""`sdr-client infer --video` and `--provider`: frames as JSON lines, equal to the same frames as
images, clear errors for what cannot be opened or named."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
from fixtures_export import trained_digits

from sdr_edge.artifacts.model_metadata import read_sidecar
from sdr_edge.data.sources import load_digits_raw
from sdr_edge.export.onnx_export import add_raw_input, attach_metadata
from sdr_edge.export.pipeline import ExportOptions, export_model
from sdr_edge_client.cli import main as client_main

FRAMES = 20


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A trained digits model (normalised input and its raw-input twin) and a short MJPG video."""
    root = tmp_path_factory.mktemp("video")
    model, spec, _ = trained_digits()
    plain = root / "digits.onnx"
    export_model(model, spec, (0, 1), plain, ExportOptions(eval_source="builtin:digits",
                                                           eval_limit=100, progress=False))
    meta, _ = read_sidecar(plain.with_suffix(".json"))
    raw = add_raw_input(plain, root / "tmp_raw.onnx", spec)
    raw_meta = dataclasses.replace(meta, extra={**meta.extra, "input_layout": "uint8_nhwc"})
    attach_metadata(raw, root / "digits_raw.onnx", raw_meta)
    # Digits the model never trained on, as 48 x 48 colour frames (a camera's BGR).
    images, labels = load_digits_raw()
    video = root / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (48, 48))
    assert writer.isOpened()
    for i in range(FRAMES):
        gray = cv2.resize(images[1500 + i], (48, 48), interpolation=cv2.INTER_LINEAR)
        writer.write(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR))
    writer.release()
    # The same frames as OpenCV decodes them, saved losslessly as images.
    frames_dir = root / "frames"
    frames_dir.mkdir()
    cap = cv2.VideoCapture(str(video))
    decoded = []
    while (got := cap.read())[0]:
        decoded.append(got[1])
    cap.release()
    assert len(decoded) == FRAMES
    for i, frame in enumerate(decoded):
        assert cv2.imwrite(str(frames_dir / f"frame_{i:03d}.png"), frame)
    return {"plain": plain, "raw": root / "digits_raw.onnx", "video": video,
            "frames": frames_dir, "labels": labels[1500:1500 + FRAMES]}


def _lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.mark.parametrize("which", ["plain", "raw"])
def test_video_frames_predict_as_the_same_frames_as_images(setup, which, capsys):
    assert client_main(["infer", "--model", str(setup[which]), "--video", str(setup["video"]),
                        "--batch", "8"]) == 0
    *frames, summary = _lines(capsys.readouterr().out)
    assert [f["frame"] for f in frames] == list(range(FRAMES))
    assert summary["throughput"]["frames"] == FRAMES and summary["batch"] == 8
    assert summary["throughput"]["frames_per_s"] > 0
    assert summary["provider"] == "CPUExecutionProvider"
    assert summary["input_layout"] == ("uint8_nhwc" if which == "raw" else
                                       "float32_nchw_normalized")
    assert summary["note"] == "converted 3 -> 1 channel(s)"
    assert client_main(["infer", "--model", str(setup[which]), "--images", str(setup["frames"]),
                        "--json", "--batch", "5"]) == 0
    images = json.loads(capsys.readouterr().out)["predictions"]
    assert [Path(p["path"]).name for p in images] == [f"frame_{i:03d}.png" for i in range(FRAMES)]
    for f, p in zip(frames, images, strict=True):
        assert (f["label"], f["index"]) == (p["label"], p["index"])
        assert abs(f["score"] - p["score"]) <= 1e-5
    correct = np.mean([f["label"] == str(y) for f, y in zip(frames, setup["labels"], strict=True)])
    assert correct >= 0.8


def test_max_frames_stops_the_stream(setup, capsys):
    assert client_main(["infer", "--model", str(setup["plain"]), "--video", str(setup["video"]),
                        "--max-frames", "5", "--batch", "2"]) == 0
    *frames, summary = _lines(capsys.readouterr().out)
    assert [f["frame"] for f in frames] == [0, 1, 2, 3, 4]
    assert summary["throughput"]["frames"] == 5
    assert client_main(["infer", "--model", str(setup["plain"]), "--images",
                        str(setup["frames"]), "--max-frames", "5"]) == 2
    assert "--max-frames applies to --video only" in capsys.readouterr().err


def test_a_video_that_cannot_be_opened_is_a_clear_error(setup, tmp_path, capsys):
    fake = tmp_path / "clip.avi"
    fake.write_text("not a video\n")
    cases = {str(fake): f"OpenCV cannot open video {fake}",
             str(tmp_path / "missing.avi"): "video file not found",
             "9": "OpenCV cannot open camera 9"}
    for source, message in cases.items():
        assert client_main(["infer", "--model", str(setup["plain"]), "--video", source]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert any(message in line and line.startswith("sdr-client infer: error:")
                   for line in err), err


def test_provider_fallback_and_unknown_names_on_the_command_line(setup, caplog, capsys):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider: nothing to fall back from")
    with caplog.at_level(logging.WARNING):
        assert client_main(["infer", "--model", str(setup["plain"]), "--images",
                            str(setup["frames"]), "--provider", "cuda", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["provider"] == "CPUExecutionProvider"
    assert "CUDAExecutionProvider" in doc["provider_warnings"][0]
    assert "CUDAExecutionProvider" in caplog.text and "falling back" in caplog.text
    assert client_main(["infer", "--model", str(setup["plain"]), "--images",
                        str(setup["frames"]), "--provider", "tpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sdr-client infer: error: unknown execution provider 'tpu': choose one of "
                   "cpu, cuda, tensorrt, auto"]
