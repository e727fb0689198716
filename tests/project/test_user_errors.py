"""Bad user input that reaches a CLI raises a SdrEdgeError (one line, exit 2 under run_cli) that
is still a ValueError, so callers that catch ValueError keep working."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdr_edge.errors import SdrEdgeError


def _finetune_bad_mode():
    from sdr_edge.training.finetune import FineTuneConfig

    FineTuneConfig(mode="sideways")


def _cuda_without_one():
    from sdr_edge.training.distributed import pick_device

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    pick_device("cuda")


def _batch_too_small_for_ranks():
    from sdr_edge.training.distributed import DistEnv, rank_batches

    rank_batches(np.arange(10), 2, DistEnv(world_size=2))


def _epsilon_zero():
    from sdr_edge.routing.privacy import laplace_scale

    laplace_scale(4, 0.0)


def _probe_one_class():
    from sdr_edge.routing.probe import linear_probe_accuracy

    f = np.ones((4, 3), dtype=np.float32)
    linear_probe_accuracy(f, np.zeros(4), f, np.zeros(4))


def _rankme_one_row():
    from sdr_edge.routing.transferability import rankme

    rankme(np.ones((1, 3)))


def _report_of_an_empty_run_dir(tmp_path):
    from sdr_edge.report.training import make_training_report

    make_training_report(tmp_path)


def _infer_on_an_empty_folder(tmp_path):
    from sdr_edge.inference.predict import collect_images

    collect_images(tmp_path)


def _onnx_runtime_refuses_a_file(tmp_path):
    from sdr_edge.inference.runners import OrtRunner

    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07 not really a model")
    OrtRunner(bad)


def _kit_images_folder_empty(tmp_path):
    from sdr_edge.routing.kit_runtime import _decoded_folder

    next(_decoded_folder(tmp_path, []))


CASES = {
    "finetune": (_finetune_bad_mode, "unknown fine-tune mode"),
    "cuda": (_cuda_without_one, "no CUDA device"),
    "ranks": (_batch_too_small_for_ranks, "fewer than 2 images per rank"),
    "dp": (_epsilon_zero, "dp epsilon must be a positive number"),
    "probe": (_probe_one_class, "at least two classes"),
    "rankme": (_rankme_one_row, "rankme needs"),
    "report": (_report_of_an_empty_run_dir, "nothing to report"),
    "infer": (_infer_on_an_empty_folder, "no image files"),
    "ort": (_onnx_runtime_refuses_a_file, "ONNX Runtime cannot load"),
    "kit": (_kit_images_folder_empty, "no image files"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_errors_are_sdr_edge_errors_and_value_errors(case, tmp_path):
    fn, message = CASES[case]
    args = (tmp_path,) if fn.__code__.co_argcount else ()
    with pytest.raises(SdrEdgeError, match=message) as exc:
        fn(*args)
    assert isinstance(exc.value, ValueError)
    assert "\n" not in str(exc.value)
