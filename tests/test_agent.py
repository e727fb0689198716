"""The on-device agent's steps against a real registry, and how a restart picks up where it stopped."""

from __future__ import annotations

import json
import logging

import cv2
import numpy as np
import pytest
from helpers_flower import federation_assets
from helpers_registry import serve_registry

from client.agent import STATE_FILE, AgentConfig, AgentError
from client.cli import main as client_main
from sdr_edge.artifacts.bundle import load_bundle
from sdr_edge.artifacts.signing import load_public_key
from sdr_edge.routing.signature import Signature


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    assets = federation_assets(tmp_path_factory.getbasetemp())
    with serve_registry(assets["run_dir"], tmp_path_factory.mktemp("agent-registry")) as reg:
        yield reg


def write_config(path, registry, data, **federation) -> None:
    (path.parent / "token").write_text(registry.token)
    lines = ["[agent]", f'data = "{data}"', 'state_dir = "state"', "",
             "[registry]", f'url = "{registry.url}"', 'token_file = "token"',
             f'pubkey = "{registry.pubkey}"']
    if federation:
        lines += ["", "[federation]"] + [f"{k} = {json.dumps(v)}" for k, v in federation.items()]
    path.write_text("\n".join(lines) + "\n")


def agent(config, caplog) -> tuple[int, str]:
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code = client_main(["agent", "--config", str(config)])
    return code, caplog.text


def add_images(folder, n=12):
    rng = np.random.default_rng(1)
    for c in ("left", "right"):
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(n // 2):
            img = np.zeros((16, 16), np.uint8)
            img[:, :8 if c == "left" else 16] = 128
            img[rng.integers(0, 16), :] = 255
            cv2.imwrite(str(folder / c / f"{i}.png"), img)


def test_agent_resumes_after_a_failed_step_and_reverifies(registry, tmp_path, caplog, capsys):
    data = tmp_path / "images"
    data.mkdir()
    config = tmp_path / "agent.toml"
    write_config(config, registry, data)
    state_dir = tmp_path / "state"

    # First run: the kit arrives, then the signature fails on an empty folder (clear error).
    code, _ = agent(config, caplog)
    assert code == 2
    assert "signature" in capsys.readouterr().err
    state = json.loads((state_dir / STATE_FILE).read_text())
    assert state["steps"]["kit"]["done"] and "signature" not in state["steps"]
    kit_mtime = (state_dir / "kit" / "kit.json").stat().st_mtime_ns

    # The data arrives; the restart skips the kit and finishes signature and sub-net.
    add_images(data)
    code, text = agent(config, caplog)
    assert code == 0, text
    assert "kit: already done, skipped" in text
    assert (state_dir / "kit" / "kit.json").stat().st_mtime_ns == kit_mtime
    sig = Signature.from_json((state_dir / "signature.json").read_text())
    assert sig.count == 12
    bundle = load_bundle(state_dir / "subnet", load_public_key(registry.pubkey))
    state = json.loads((state_dir / STATE_FILE).read_text())
    assert list(bundle.route) == state["steps"]["subnet"]["route"]

    # A tampered sub-net no longer verifies: only that step runs again.
    weights = state_dir / "subnet" / "weights.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    code, text = agent(config, caplog)
    assert code == 0
    assert "signature: already done, skipped" in text and "subnet: starting" in text
    load_bundle(state_dir / "subnet", load_public_key(registry.pubkey))

    # New data changes the signature's fingerprint: signature and sub-net are redone.
    add_images(data, n=20)
    code, text = agent(config, caplog)
    assert code == 0 and "signature: starting" in text and "kit: already done" in text
    assert Signature.from_json((state_dir / "signature.json").read_text()).count == 20


def test_agent_config_errors_are_clear(registry, tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text('[agent]\ndata = "x"\n')
    with pytest.raises(AgentError, match="missing registry.url, registry.pubkey"):
        AgentConfig.load(config)
    write_config(config, registry, "builtin:digits", superlink="127.0.0.1:1")
    with pytest.raises(AgentError, match="root_certificates is needed for TLS"):
        AgentConfig.load(config)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / STATE_FILE).write_text("{broken")
    write_config(config, registry, "builtin:digits")
    assert client_main(["agent", "--config", str(config)]) == 2
