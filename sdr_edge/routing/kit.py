"""The signature kit: a small CNN, distilled from the teacher's codes, that a client runs on-device.

Why a separate network: a client must describe its data without the teacher (too big) and
without torch. The kit maps one image to per-level probabilities over the code digits and is
shipped as ONNX. It is trained with one cross-entropy per level against the residual k-means
codes of the training images; ~10% of them are held out to measure per-level agreement with
the teacher's codes (`agreement_level1`, ... in the returned metrics and in kit.json).

Files written to the kit folder (atomically, as one folder):
    kit.safetensors  weights (metadata: architecture, branching, input spec)
    kit.onnx         input `images`: float32 N x C x H x W, normalised with the input spec
                     (`sdr_edge.data.preprocess.normalize_batch`), dynamic batch;
                     output `probs`: float32 N x sum(B_r), level r's softmax in columns
                     [offset_r, offset_r + B_r) (offsets listed in kit.json)
    kit.json         format, input spec, branching, input/output layout, metrics,
                     sha256 of the two other files, and `run_id`: the run whose codes the
                     kit was distilled from (`sdr_edge.routing.signature.run_id_of`), which
                     every signature computed with it carries so a registry can refuse
                     signatures from another run's kit
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from sdr_edge.artifacts.atomic import sha256_file
from sdr_edge.artifacts.staging import staged_dir
from sdr_edge.artifacts.weights import save_tensors
from sdr_edge.data.pool import ImagePool, MemoryPool, iter_batches
from sdr_edge.data.preprocess import InputSpec, normalize_pool_batch
from sdr_edge.routing.signature import check_run_id_format, run_id_of

log = logging.getLogger(__name__)

KIT_FORMAT = "sdr-signature-kit"
KIT_VERSION = 1
KIT_WEIGHTS = "kit.safetensors"
KIT_ONNX = "kit.onnx"
KIT_JSON = "kit.json"
INPUT_NAME = "images"
OUTPUT_NAME = "probs"
DEFAULT_WIDTHS = (32, 64, 128)
DEFAULT_BATCH = 256


def level_offsets(branching: Sequence[int]) -> list[int]:
    """Column where each level starts in the concatenated output (plus the total at the end)."""
    offsets = [0]
    for b in branching:
        offsets.append(offsets[-1] + int(b))
    return offsets


class SignatureKitNet(nn.Module):
    """Three conv-BN-ReLU blocks (pooling between), global pooling, one linear layer, softmaxes."""

    def __init__(self, in_channels: int, branching: Sequence[int],
                 widths: Sequence[int] = DEFAULT_WIDTHS) -> None:
        super().__init__()
        self.branching = tuple(int(b) for b in branching)
        self.widths = tuple(int(w) for w in widths)
        layers: list[nn.Module] = []
        cin = in_channels
        for i, w in enumerate(self.widths):
            layers += [nn.Conv2d(cin, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            if i < len(self.widths) - 1:
                layers.append(nn.MaxPool2d(2))
            cin = w
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(cin, sum(self.branching))

    def arch_dict(self, in_channels: int) -> dict:
        return {"in_channels": in_channels, "branching": list(self.branching),
                "widths": list(self.widths)}

    def logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One logit tensor per level."""
        return list(torch.split(self.head(self.features(x)), list(self.branching), dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-level softmaxes, concatenated: what the ONNX file outputs."""
        return torch.cat([F.softmax(z, dim=1) for z in self.logits(x)], dim=1)


def _holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_hold = int(round(n * fraction)) if n >= 20 else 0
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


@torch.no_grad()
def predict_digits(net: SignatureKitNet, x: torch.Tensor, batch_size: int = 1024) -> np.ndarray:
    """Argmax digit per level for normalised NCHW inputs: [N, R] int64."""
    net.eval()
    out = []
    for start in range(0, x.shape[0], batch_size):
        logits = net.logits(x[start:start + batch_size])
        out.append(torch.stack([z.argmax(1) for z in logits], dim=1))
    return torch.cat(out).cpu().numpy()


@torch.no_grad()
def predict_pool(net: SignatureKitNet, pool: ImagePool, indices: np.ndarray, spec: InputSpec,
                 device: str = "cpu", batch_size: int = 1024, workers: int = 0) -> np.ndarray:
    """`predict_digits` over pool[indices], read batch by batch: [len(indices), R] int64."""
    net.eval()
    out = [np.empty((0, len(net.branching)), dtype=np.int64)]
    for _, batch in iter_batches(pool, indices, batch_size, workers=workers):
        x = torch.from_numpy(normalize_pool_batch(batch.numpy(), spec)).to(device)
        out.append(torch.stack([z.argmax(1) for z in net.logits(x)], dim=1).cpu().numpy())
    return np.concatenate(out)


def agreement(pred: np.ndarray, codes: np.ndarray) -> dict[str, float]:
    """Per-level (1-based names) and whole-code agreement of predicted digits with codes."""
    metrics = {f"agreement_level{r + 1}": float((pred[:, r] == codes[:, r]).mean())
               for r in range(codes.shape[1])}
    metrics["agreement_all_levels"] = float((pred == codes).all(axis=1).mean())
    return metrics


def _export_onnx(net: SignatureKitNet, spec: InputSpec, path: Path) -> None:
    net = net.cpu().eval()
    example = torch.zeros(2, spec.channels, spec.image_size, spec.image_size)
    batch = torch.export.Dim("batch", min=1)
    # the exporter logs torchvision gaps and optimizer passes: not news for this small net
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(net, (example,), str(path), input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], dynamic_shapes={"x": {0: batch}},
                              external_data=False, dynamo=True, verbose=False)
    finally:
        for q, lv in zip(quiet, levels, strict=True):
            q.setLevel(lv)


def train_signature_kit(images: np.ndarray | ImagePool, codes: np.ndarray,
                        branching: Sequence[int], spec: InputSpec, out_dir: str | Path, *,
                        epochs: int, seed: int, device: str = "cpu", batch_size: int = DEFAULT_BATCH,
                        lr: float = 3e-3, holdout_fraction: float = 0.1,
                        widths: Sequence[int] = DEFAULT_WIDTHS, progress: bool = True,
                        run_id: str | None = None, workers: int = 0) -> dict:
    """Distil the teacher's codes into a small kit network; write kit files; return metrics.

    images, codes and the training options: see `fit_signature_kit`.
    run_id: the run's identity (default: that of the run dir holding out_dir, see write_kit).
    """
    net, metrics = fit_signature_kit(images, codes, branching, spec, epochs=epochs, seed=seed,
                                     device=device, batch_size=batch_size, lr=lr,
                                     holdout_fraction=holdout_fraction, widths=widths,
                                     progress=progress, workers=workers)
    write_kit(net, spec, out_dir, metrics, run_id=run_id)
    log.info("signature kit: %s", json.dumps(metrics))
    return metrics


def fit_signature_kit(images: np.ndarray | ImagePool, codes: np.ndarray,
                      branching: Sequence[int], spec: InputSpec, *, epochs: int, seed: int,
                      device: str = "cpu", batch_size: int = DEFAULT_BATCH, lr: float = 3e-3,
                      holdout_fraction: float = 0.1, widths: Sequence[int] = DEFAULT_WIDTHS,
                      progress: bool = True, workers: int = 0
                      ) -> tuple[SignatureKitNet, dict]:
    """The trained kit network (CPU, eval mode) and its metrics; nothing is written.

    images: an image pool (`sdr_edge.data.pool`) or an N x H x W x C uint8 array at the
    spec's size; codes: N x R digits (the run's codes), indexed like the pool. Each step reads
    only its batch from the pool (`workers` DataLoader processes decode ahead), so memory does
    not grow with N; for an in-memory pool the weights are those of normalising the whole
    pool first (same batches, same order, same arithmetic; test_kit_streamed.py).
    """
    pool = _as_pool(images)
    codes = np.asarray(codes, dtype=np.int64)
    branching = tuple(int(b) for b in branching)
    if pool.channels != spec.channels:
        raise ValueError(f"{pool.name}: images have {pool.channels} channel(s), the input spec "
                         f"{spec.channels}")
    if codes.shape != (len(pool), len(branching)):
        raise ValueError(f"codes must have shape [{len(pool)}, {len(branching)}], "
                         f"got {codes.shape}")
    if ((codes < 0) | (codes >= np.asarray(branching))).any():
        raise ValueError(f"code digits out of range for branching {branching}")
    if epochs < 1:
        raise ValueError("epochs must be at least 1")
    torch.manual_seed(seed)
    start_time = time.perf_counter()
    y_all = torch.from_numpy(codes)
    train_idx, hold_idx = _holdout_split(len(pool), holdout_fraction, seed)
    net = SignatureKitNet(spec.channels, branching, widths).to(device)
    steps_per_epoch = max(1, -(-len(train_idx) // batch_size))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(total=epochs * steps_per_epoch, desc="signature kit", disable=not progress,
               leave=False)
    loss_value = float("nan")
    for _ in range(epochs):
        net.train()
        order = train_idx[torch.randperm(len(train_idx), generator=gen).numpy()]
        for idx, batch in iter_batches(pool, order, batch_size, workers=workers,
                                       pin_memory=device.startswith("cuda")):
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            xb = torch.from_numpy(normalize_pool_batch(batch.numpy(), spec)).to(device, non_blocking=True)
            yb = y_all[torch.from_numpy(idx)].to(device, non_blocking=True)
            logits = net.logits(xb)
            loss = sum(F.cross_entropy(z, yb[:, r]) for r, z in enumerate(logits)) / len(logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_value = float(loss.detach())
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}")
    bar.close()
    metrics: dict = {"kit_train_images": int(len(train_idx)),
                     "kit_holdout_images": int(len(hold_idx)),
                     "loss": loss_value,
                     "kit_params": int(sum(p.numel() for p in net.parameters()))}
    if len(hold_idx):
        pred = predict_pool(net, pool, hold_idx, spec, device=device, batch_size=batch_size,
                            workers=workers)
        metrics.update(agreement(pred, codes[hold_idx]))
    net = net.cpu().eval()
    metrics["kit_train_seconds"] = round(time.perf_counter() - start_time, 3)
    return net, metrics


def _as_pool(images: np.ndarray | ImagePool) -> ImagePool:
    """An array becomes a zero-copy MemoryPool; a pool is used as it is."""
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"images must be N x H x W x C uint8, got {images.dtype} "
                             f"{images.shape}")
        return MemoryPool("images", images)
    return images


def write_kit(net: SignatureKitNet, spec: InputSpec, out_dir: str | Path,
              metrics: dict | None = None, run_id: str | None = None) -> Path:
    """Write kit.safetensors, kit.onnx and kit.json as one folder, atomically.

    The kit lives in RUN_DIR/kit, written after the run's codebooks, so without an explicit
    `run_id` it records the id of the run dir around it (None when there are no codebooks).
    """
    out_dir = Path(out_dir)
    run_id = check_run_id_format(run_id if run_id is not None else run_id_of(out_dir.parent))
    with staged_dir(out_dir) as staging:  # refuses a foreign out_dir; publishes atomically
        staging.chmod(0o755)  # mkdtemp makes it private; the kit is public material
        arch = net.arch_dict(spec.channels)
        save_tensors(staging / KIT_WEIGHTS, net.state_dict(),
                     {"architecture": arch, "input_spec": spec.to_dict()})
        _export_onnx(net, spec, staging / KIT_ONNX)
        offsets = level_offsets(net.branching)
        info = {
            "format": KIT_FORMAT,
            "format_version": KIT_VERSION,
            "branching": list(net.branching),
            "input_spec": spec.to_dict(),
            "architecture": arch,
            "input": {"name": INPUT_NAME, "dtype": "float32", "layout": "NCHW",
                      "shape": ["batch", spec.channels, spec.image_size, spec.image_size],
                      "preprocessing": "sdr_edge.data.preprocess.normalize_batch(input_spec)"},
            "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", offsets[-1]],
                       "layout": "per-level softmax, concatenated",
                       "level_offsets": offsets[:-1]},
            "metrics": metrics or {},
            "run_id": run_id,
            "files": {name: sha256_file(staging / name) for name in (KIT_WEIGHTS, KIT_ONNX)},
        }
        (staging / KIT_JSON).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return out_dir
