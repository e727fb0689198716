"""The on-device agent's steps against a real registry, and how a restart picks up where it stopped."""

from __future__ import annotations

import json
import logging

import cv2
import numpy as np
import pytest
from helpers_flower import federation_assets
from helpers_registry import serve_registry

from sdr_edge.artifacts.bundle import load_bundle
from sdr_edge.artifacts.signing import load_public_key
from sdr_edge.routing.signature import Signature
from sdr_edge_client.agent import STATE_FILE, AgentConfig, AgentError
from sdr_edge_client.cli import main as client_main


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


def test_agent_reranks_the_top_m_on_its_labelled_images(registry, tmp_path, caplog, capsys):
    """`[registry] rerank`: the kept sub-net is the best-scored of the signature's top M, and
    changing the option redoes only the sub-net step."""
    from sdr_edge.registry_client import post_route

    data = tmp_path / "images"
    add_images(data)
    config = tmp_path / "agent.toml"
    write_config(config, registry, data)
    with config.open("a") as f:
        f.write('rerank = "knn"\ntop_m = 2\n')
    code, text = agent(config, caplog)
    assert code == 0, text
    state = json.loads((tmp_path / "state" / STATE_FILE).read_text())["steps"]["subnet"]
    assert state["rerank"] == "knn" and state["candidates"] == 2
    sig = json.loads((tmp_path / "state" / "signature.json").read_text())
    top = [r["route"] for r in post_route(registry.url, registry.token, sig, top=2)["scores"]]
    assert state["route"] == top[state["signature_rank"] - 1]
    assert list(load_bundle(tmp_path / "state" / "subnet",
                            load_public_key(registry.pubkey)).route) == state["route"]
    config.write_text(config.read_text().replace("top_m = 2", "top_m = 3"))
    code, text = agent(config, caplog)
    assert code == 0 and "signature: already done" in text and "subnet: starting" in text
    # labelled scores on a folder without class sub-folders: one line, nothing replaced
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, png in enumerate(sorted(data.glob("*/*.png"))):
        (flat / f"{i}.png").write_bytes(png.read_bytes())
    write_config(config, registry, flat)
    with config.open("a") as f:
        f.write('rerank = "logme"\n')
    before = (tmp_path / "state" / "subnet" / "weights.safetensors").read_bytes()
    code, _ = agent(config, caplog)
    assert code == 2 and "registry.rerank = 'logme' needs labels" in capsys.readouterr().err
    assert (tmp_path / "state" / "subnet" / "weights.safetensors").read_bytes() == before


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


def test_agent_config_resolves_paths_against_its_folder_and_defaults_once(tmp_path):
    folder = tmp_path / "etc"
    folder.mkdir()
    config = folder / "agent.toml"
    config.write_text('[agent]\ndata = "images"\ndp_epsilon = 0\n\n'
                      '[registry]\nurl = "https://r:8443"\npubkey = "server.pub"\n'
                      'token_file = ""\ncacert = "ca.crt"\n\n'
                      '[federation]\nsuperlink = "h:9092"\ninsecure = true\ntimeout = 5\n'
                      'node_config = { partition-id = 1, alpha = 0.5 }\n')
    cfg = AgentConfig.load(config)
    assert cfg.data == str(folder / "images")  # a folder, relative to the config file
    assert cfg.state_dir == folder / ".sdr-agent"  # the default, resolved the same way
    assert cfg.pubkey == folder / "server.pub" and cfg.cacert == folder / "ca.crt"
    assert cfg.token_file is None and cfg.token == ""  # an empty string is "not set"
    assert cfg.dp_epsilon is None  # 0 turns the private signature off
    assert cfg.timeout == 5.0 and isinstance(cfg.timeout, float)
    assert cfg.node_config == {"partition-id": 1, "alpha": 0.5}
    assert (cfg.federation_pubkey, cfg.keep_serving, cfg.supernode_bin) == (None, False, "")
    config.write_text('[agent]\ndata = "builtin:digits"\n[registry]\nurl = "u"\npubkey = "k"\n')
    assert AgentConfig.load(config).data == "builtin:digits"  # a source name stays a name


AGENT = '[agent]\ndata = "builtin:digits"\n'
REGISTRY = '[registry]\nurl = "u"\npubkey = "k"\n'


@pytest.mark.parametrize(("text", "line"), [
    ('[agent]\ndata = "x"\nstate = "s"\n' + REGISTRY,
     "unknown key 'state' in [agent] (known: data, state_dir, dp_epsilon)"),
    (AGENT + REGISTRY + "[registy]\nurl = 'u'\n",
     "unknown table [registy] (known: agent, registry, federation)"),
    (AGENT + REGISTRY + '[federation]\ninsecure = "yes"\n',
     "federation.insecure must be true or false, got 'yes'"),
    (AGENT + REGISTRY + "[federation]\ntimeout = -1\n", "federation.timeout must be >= 0.0, got -1"),
    (AGENT + "dp_epsilon = -2.0\n" + REGISTRY, "agent.dp_epsilon must be > 0.0, got -2.0"),
    ("[agent]\ndata = 3\n" + REGISTRY, "agent.data must be a string, got 3"),
    (AGENT + '[registry]\nurl = "u"\npubkey = 1\n',
     "registry.pubkey must be a path (a string), got 1"),
    (AGENT + REGISTRY + "[federation]\nnode_config = { a = { b = 1 } }\n",
     "federation.node_config values must be strings, numbers or booleans (a)"),
    ("agent = 1\n" + REGISTRY, "agent must be a table ([agent]), got 1"),
    (AGENT + '[registry]\nurl = ""\npubkey = "k"\n', "missing registry.url"),
    (AGENT + REGISTRY + "top_m = 0\n", "registry.top_m must be >= 1, got 0"),
    (AGENT + REGISTRY + "top_m = 65\n", "registry.top_m must be <= 64, got 65"),
    (AGENT + REGISTRY + 'rerank = "best"\n',
     "registry.rerank: Input should be 'rankme', 'consensus', 'logme', 'knn' or 'probe'"),
])
def test_agent_config_refuses_each_mistake_in_one_line_naming_file_and_key(tmp_path, text, line):
    config = tmp_path / "agent.toml"
    config.write_text(text)
    with pytest.raises(AgentError) as info:
        AgentConfig.load(config)
    assert str(info.value) == f"{config}: {line}"
