"""`sdr-client infer`: training's eval transform, bad files, model sniffing, no torch for ONNX."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from fixtures_export import SIZE, trained_digits, write_digit_pngs

from sdr_edge.data.augment import normalize_tensor, to_unit_tensor
from sdr_edge.data.folder import scan_folder
from sdr_edge.data.preprocess import InputSpec, normalize_batch, prepare_uint8, preprocess_images
from sdr_edge.export.pipeline import ExportOptions, export_model
from sdr_edge.inference.model_file import ENGINE, ONNX, ModelFileError, detect_model_format
from sdr_edge.inference.predict import load_for_model, prepare_for_model
from sdr_edge_client.cli import main as client_main

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    model, spec, _ = trained_digits()
    out = tmp_path_factory.mktemp("infer") / "digits.onnx"
    export_model(model, spec, (0, 1), out, ExportOptions(eval_source="builtin:digits",
                                                         eval_limit=200, progress=False))
    return out


def _mixed_images(folder: Path) -> list[Path]:
    """Files a device might hold: gray, BGR, BGRA, 16-bit, various sizes and codecs."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    images = {
        "gray8.png": rng.integers(0, 256, (8, 8), dtype=np.uint8),
        "bgr20.jpg": rng.integers(0, 256, (20, 20, 3), dtype=np.uint8),
        "bgra30.png": rng.integers(0, 256, (30, 24, 4), dtype=np.uint8),
        "gray16bit.png": rng.integers(0, 65536, (12, 12), dtype=np.uint16),
        "bgr16.bmp": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
    }
    for name, img in images.items():
        assert cv2.imwrite(str(folder / name), img)
    return sorted(folder / n for n in images)


@pytest.mark.parametrize("channels", [1, 3])
def test_preprocessing_equals_the_training_eval_transform(tmp_path, channels):
    paths = _mixed_images(tmp_path / "imgs")
    spec = InputSpec(SIZE, channels, (0.3, 0.4, 0.5)[:channels], (0.2, 0.25, 0.3)[:channels])
    # The device path: decode + prepare per file, then normalise the batch.
    prepared = [load_for_model(p, spec) for p in paths]
    assert all(reason is None for _, _, reason in prepared)
    device = normalize_batch(np.stack([img for img, _, _ in prepared]), spec)
    # Training: sources store prepare_uint8 images; evaluation normalises them as tensors ...
    scan = scan_folder(tmp_path / "imgs", SIZE, channels)
    assert [p.name for p in scan.paths] == [p.name for p in paths]
    train = normalize_tensor(to_unit_tensor(scan.images), spec.mean, spec.std).numpy()
    assert device.shape == train.shape == (len(paths), channels, SIZE, SIZE)
    assert np.abs(device - train).max() <= 1e-6
    # ... or with normalize_batch (what embedding for kNN/probes uses), and the one-call form.
    assert np.abs(device - normalize_batch(scan.images, spec)).max() <= 1e-6
    decoded = [cv2.imdecode(np.fromfile(str(p), np.uint8), cv2.IMREAD_UNCHANGED) for p in paths]
    decoded = [cv2.convertScaleAbs(d, alpha=255.0 / d.max()) if d.dtype != np.uint8 else d
               for d in decoded]
    assert np.abs(device - preprocess_images(decoded, spec)).max() <= 1e-6
    one = normalize_tensor(to_unit_tensor(prepare_uint8(decoded[1], SIZE, channels)[None]),
                           spec.mean, spec.std)
    assert torch.allclose(torch.from_numpy(device[1:2]), one, atol=1e-6)


def test_unconvertible_channel_count_is_reported_not_raised():
    spec = InputSpec(SIZE, 1, (0.5,), (0.5,))
    image, note, reason = prepare_for_model(np.zeros((8, 8, 2), np.uint8), spec)
    assert image is None and note is None
    assert "has 2 channel(s), the model takes 1" in reason
    image, note, reason = prepare_for_model(np.zeros((9, 9, 3), np.uint8), spec)
    assert image.shape == (SIZE, SIZE, 1) and note == "converted 3 -> 1 channel(s)" and not reason


def _gray_alpha_png(path: Path) -> None:
    """A gray+alpha PNG (colour type 4), written by hand: OpenCV cannot write one."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    w = h = 8
    rows = b"".join(b"\x00" + bytes([200, 255] * w) for _ in range(h))
    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, 4, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) +
                     chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_infer_reports_bad_files_and_keeps_going(onnx_model, tmp_path, capsys):
    folder = tmp_path / "device_images"
    good = write_digit_pngs(folder, 30, start=1500)  # never trained on
    raw = cv2.imread(str(good[0]), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(folder / f"colour_label{good[0].stem[-1]}.png"),
                cv2.cvtColor(raw, cv2.COLOR_GRAY2BGR))
    _gray_alpha_png(folder / "gray_alpha.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image, not even looked at")
    rc = client_main(["infer", "--model", str(onnx_model), "--images", str(folder),
                      "--batch", "8", "--json", "--threads", "1"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    preds = {Path(p["path"]).name: p for p in doc["predictions"]}
    assert len(preds) == 32
    assert {Path(s["path"]).name for s in doc["skipped"]} == {"corrupt.png", "empty.jpg"}
    assert all("unreadable" in s["reason"] for s in doc["skipped"])
    colour = next(p for n, p in preds.items() if n.startswith("colour"))
    assert colour["note"] == "converted 3 -> 1 channel(s)"
    assert colour["label"] == preds[good[0].name]["label"]
    assert preds["gray_alpha.png"]["note"] == "converted 4 -> 1 channel(s)"
    correct = [preds[p.name]["label"] == p.stem[-1] for p in good]
    assert np.mean(correct) >= 0.8, f"accuracy {np.mean(correct):.2f} on held-out digits"
    assert all(0.0 < p["score"] <= 1.0 for p in doc["predictions"])
    assert doc["throughput"]["images"] == 32 and doc["throughput"]["images_per_s"] > 0


def test_infer_onnx_never_imports_torch(onnx_model, tmp_path):
    write_digit_pngs(tmp_path / "imgs", 5, start=1600)
    code = (
        "import sys\n"
        "from sdr_edge_client.cli import main\n"
        f"rc = main(['infer', '--model', {str(onnx_model)!r}, '--images', "
        f"{str(tmp_path / 'imgs')!r}, '--no-progress'])\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "print('TORCH_MODULES', loaded)\n"
        "sys.exit(rc)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "TORCH_MODULES []" in proc.stdout
    assert "5 image(s) in" in proc.stdout and "images/s" in proc.stdout


def test_model_files_are_told_apart_by_their_bytes(onnx_model, tmp_path, capsys):
    assert detect_model_format(onnx_model) == ONNX
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(onnx_model.read_bytes())
    assert detect_model_format(renamed) == ONNX
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"ftrt" + bytes(60))
    assert detect_model_format(engine) == ENGINE
    fake = tmp_path / "fake.onnx"
    fake.write_text("this is a text file, not a model\n")
    with pytest.raises(ModelFileError, match="neither an ONNX model"):
        detect_model_format(fake)
    from onnx import numpy_helper

    tensor = tmp_path / "tensor.onnx"  # a valid protobuf, but a TensorProto, not a ModelProto
    tensor.write_bytes(numpy_helper.from_array(np.ones((4, 4), np.float32)).SerializeToString())
    with pytest.raises(ModelFileError, match="neither"):
        detect_model_format(tensor)
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ModelFileError, match="empty"):
        detect_model_format(tmp_path / "empty.onnx")
    imgs = tmp_path / "imgs"
    write_digit_pngs(imgs, 2)
    assert client_main(["infer", "--model", str(fake), "--images", str(imgs)]) == 2
    assert "neither an ONNX model" in capsys.readouterr().err
    assert client_main(["infer", "--model", str(tmp_path / "nope.onnx"),
                        "--images", str(imgs)]) == 2
    assert "model file not found" in capsys.readouterr().err


def test_engine_without_tensorrt_says_what_is_missing(tmp_path, capsys):
    from sdr_edge.inference.cuda_device import find_nvidia_gpu, tensorrt_module

    if tensorrt_module()[0] is not None and find_nvidia_gpu()[0] is not None:
        pytest.skip("TensorRT and a GPU are present: the gating message does not apply")
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"ftrt" + bytes(60))
    write_digit_pngs(tmp_path / "imgs", 2)
    assert client_main(["infer", "--model", str(engine), "--images",
                        str(tmp_path / "imgs")]) == 2
    err = capsys.readouterr().err
    assert "running a TensorRT engine needs" in err and "sdr-edge[trt]" in err


def test_no_readable_image_is_an_error(onnx_model, tmp_path, capsys):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"garbage")
    assert client_main(["infer", "--model", str(onnx_model), "--images", str(folder),
                        "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert "skipped" in captured.out and "no readable image" in captured.err
    assert client_main(["infer", "--model", str(onnx_model), "--images",
                        str(tmp_path / "missing")]) == 2
    assert "image folder not found" in capsys.readouterr().err
