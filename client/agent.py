"""The on-device agent: kit -> signature -> verified sub-net -> SuperNode -> fine-tuned bundle.

Each step records its result in `STATE_DIR/agent-state.json` (written atomically) with a
fingerprint of its inputs. A restarted agent skips every step whose fingerprint matches and
whose artifact still verifies, so a crash costs at most the step it interrupted. A SuperNode
left running by a crashed agent is re-attached to rather than started twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import (
    AliasPath,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from sdr_edge.artifacts.atomic import atomic_write_text
from sdr_edge.errors import SdrEdgeError
from sdr_edge.fleet.deployment import free_port, kv_config
from sdr_edge.routing.transferability import RerankMethod

log = logging.getLogger("sdr_edge.agent")

STATE_FILE = "agent-state.json"
STATE_FORMAT = "sdr-agent-state"
STEPS = ("kit", "signature", "subnet", "federation")


class AgentError(SdrEdgeError, RuntimeError):
    """A step cannot complete; the message says which and why."""


# TOML types reach the model as they are: `insecure = "yes"` is a mistake, not a true.
_TYPE_ERRORS = {
    "string_type": "must be a string", "bool_type": "must be true or false",
    "float_type": "must be a number", "int_type": "must be an integer",
    "dict_type": "must be a table", "is_instance_of": "must be a path (a string)",
}  # fmt: skip
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than_equal": "<="}
_DATA_SOURCES = ("builtin:", "fashion-mnist")  # `data` values that name a source, not a folder


def _key(table: str, key: str) -> AliasPath:
    """Where a field lives in agent.toml: `[table] key`."""
    return AliasPath(table, key)


class AgentConfig(BaseModel):
    """agent.toml: `[agent]`, `[registry]`, `[federation]`; paths resolved against its folder.

    Each field names its TOML key once (its alias) and carries its default once. Unknown tables
    and keys are errors (a typo must not silently fall back to a default), values keep their
    TOML type, and an empty string means "not set". `AgentConfig.load` turns every problem into
    one line naming the file and the key.
    """

    model_config = ConfigDict(extra="forbid", strict=True, validate_by_name=True,
                              validate_by_alias=True)

    data: str = Field(validation_alias=_key("agent", "data"))
    state_dir: Path = Field(Path(".sdr-agent"), validation_alias=_key("agent", "state_dir"),
                            validate_default=True)
    dp_epsilon: float | None = Field(None, gt=0, validation_alias=_key("agent", "dp_epsilon"))
    registry_url: str = Field(validation_alias=_key("registry", "url"))
    pubkey: Path = Field(validation_alias=_key("registry", "pubkey"))
    token: str = Field("", validation_alias=_key("registry", "token"))
    token_file: Path | None = Field(None, validation_alias=_key("registry", "token_file"))
    cacert: Path | None = Field(None, validation_alias=_key("registry", "cacert"))
    # `sdr-client fetch --rerank`: download the top M and keep the best on the local images
    rerank: RerankMethod | None = Field(
        None, validation_alias=_key("registry", "rerank"))
    top_m: int = Field(8, ge=1, le=64, validation_alias=_key("registry", "top_m"))
    superlink: str = Field("", validation_alias=_key("federation", "superlink"))
    insecure: bool = Field(False, validation_alias=_key("federation", "insecure"))
    root_certificates: Path | None = Field(
        None, validation_alias=_key("federation", "root_certificates"))
    auth_key: Path | None = Field(None, validation_alias=_key("federation", "auth_key"))
    federation_pubkey: Path | None = Field(None, validation_alias=_key("federation", "pubkey"))
    node_config: dict[str, Any] = Field(default_factory=dict,
                                        validation_alias=_key("federation", "node_config"))
    timeout: float = Field(0.0, ge=0, validation_alias=_key("federation", "timeout"))
    keep_serving: bool = Field(False, validation_alias=_key("federation", "keep_serving"))
    supernode_bin: str = Field("", validation_alias=_key("federation", "supernode_bin"))

    @field_validator("state_dir", "pubkey", "token_file", "cacert", "root_certificates",
                     "auth_key", "federation_pubkey", mode="before")
    @classmethod
    def _resolve_path(cls, v: object, info: ValidationInfo) -> object:
        """A path from the file is relative to the file's folder (context `base`)."""
        if isinstance(v, str):
            v = Path(v).expanduser()
        base = (info.context or {}).get("base")
        return (base / v).resolve() if isinstance(v, Path) and base is not None else v

    @field_validator("data")
    @classmethod
    def _resolve_data(cls, v: str, info: ValidationInfo) -> str:
        base = (info.context or {}).get("base")
        if base is None or v.startswith(_DATA_SOURCES):
            return v
        return str((base / Path(v).expanduser()).resolve())

    @field_validator("dp_epsilon", mode="before")
    @classmethod
    def _zero_is_off(cls, v: object) -> object:
        return None if v == 0 and not isinstance(v, bool) else v

    @field_validator("node_config")
    @classmethod
    def _scalars(cls, v: dict[str, Any]) -> dict[str, Any]:
        """Flower's --node-config takes key=value pairs of TOML scalars."""
        bad = [k for k, x in v.items() if not isinstance(x, str | int | float | bool)]
        if bad:
            raise ValueError(f"values must be strings, numbers or booleans ({', '.join(bad)})")
        return v

    @model_validator(mode="after")
    def _tls_or_insecure(self) -> AgentConfig:
        if self.superlink and not self.insecure and self.root_certificates is None:
            raise ValueError("federation.root_certificates is needed for TLS "
                             "(or insecure = true on a trusted network)")
        return self

    @classmethod
    def file_keys(cls) -> dict[str, dict[str, str]]:
        """table -> TOML key -> field name, read from the fields' aliases."""
        out: dict[str, dict[str, str]] = {}
        for name, info in cls.model_fields.items():
            table, key = info.validation_alias.path  # type: ignore[union-attr]
            out.setdefault(str(table), {})[str(key)] = name
        return out

    @classmethod
    def load(cls, path: str | Path) -> AgentConfig:
        """Read and validate agent.toml; every problem is one line naming the file and key."""
        path = Path(path)
        if not path.is_file():
            raise AgentError(f"agent config {path} does not exist")
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise AgentError(f"{path}: not a TOML text file (byte {exc.start} is not "
                             "UTF-8)") from None
        except tomllib.TOMLDecodeError as exc:
            raise AgentError(f"{path} is not valid TOML: {exc}") from exc
        problems, tables = [], cls.file_keys()
        for table, values in doc.items():
            if table not in tables:
                problems.append(f"unknown table [{table}] (known: {', '.join(tables)})")
            elif not isinstance(values, dict):
                problems.append(f"{table} must be a table ([{table}]), got {values!r}")
            else:
                problems += [f"unknown key {key!r} in [{table}] (known: "
                             f"{', '.join(tables[table])})" for key in values
                             if key not in tables[table]]
        if not problems:
            # an empty string means "not set": the default applies, a required key is missing
            doc = {t: {k: v for k, v in values.items() if v != ""} for t, values in doc.items()}
            doc = {t: values for t, values in doc.items() if values}
            try:
                return cls.model_validate(doc, context={"base": path.parent}, by_alias=True,
                                          by_name=False)
            except ValidationError as exc:
                problems = _describe(exc)
        raise AgentError("\n".join(f"{path}: {line}" for line in problems))

    def registry_token(self) -> str:
        """registry.token, else registry.token_file, else $SDR_REGISTRY_TOKEN (one rule)."""
        from sdr_edge.registry_client import TOKEN_ENV, resolve_token

        return resolve_token(self.token, self.token_file, file_label="registry.token_file",
                             hint="set registry.token_file (or registry.token) in the agent "
                                  f"config, or ${TOKEN_ENV}")

    @property
    def kit_dir(self) -> Path:
        return self.state_dir / "kit"

    @property
    def signature_path(self) -> Path:
        return self.state_dir / "signature.json"

    @property
    def subnet_dir(self) -> Path:
        return self.state_dir / "subnet"

    @property
    def finetuned_dir(self) -> Path:
        return self.state_dir / "finetuned"


def _describe(exc: ValidationError) -> list[str]:
    """The model's errors as lines naming `table.key`; the missing keys share one line."""
    missing, lines = [], []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        kind = error["type"]
        if kind == "missing":
            missing.append(where)
        elif kind in _TYPE_ERRORS:
            lines.append(f"{where} {_TYPE_ERRORS[kind]}, got {error['input']!r}")
        elif kind in _BOUNDS:
            bound = next(iter(error["ctx"].values()))
            lines.append(f"{where} must be {_BOUNDS[kind]} {bound}, got {error['input']!r}")
        elif kind == "value_error":
            msg = str(error["ctx"]["error"]) if "ctx" in error else error["msg"]
            lines.append(f"{where} {msg}" if where else msg)
        else:
            lines.append(f"{where}: {error['msg']}" if where else error["msg"])
    return ([f"missing {', '.join(missing)}"] if missing else []) + lines


def _fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _data_fingerprint(data: str) -> str:
    """A folder's image list with sizes and mtimes (cheap), or the built-in source's name."""
    folder = Path(data)
    if not folder.is_dir():
        return data
    from sdr_edge.data.folder import list_image_files

    return _fingerprint([(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                         for p in list_image_files(folder)])


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


class AgentState:
    """What has been done, persisted after every change (temporary file, fsync, rename)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict = {"format": STATE_FORMAT, "version": 1, "steps": {}}
        if path.is_file():
            try:
                loaded = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise AgentError(f"{path} is corrupt ({exc}); delete it to start over") from exc
            if loaded.get("format") != STATE_FORMAT:
                raise AgentError(f"{path} is not an agent state file")
            self.data = loaded

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=2, sort_keys=True) + "\n")

    def step(self, name: str) -> dict:
        return self.data["steps"].get(name, {})

    def done(self, name: str, fingerprint: str) -> bool:
        entry = self.step(name)
        return bool(entry.get("done")) and entry.get("fingerprint") == fingerprint

    def mark(self, name: str, fingerprint: str, **details: object) -> None:
        self.data["steps"][name] = {"done": True, "fingerprint": fingerprint,
                                    "finished_unix": int(time.time()), **details}
        self.save()

    def update(self, name: str, **details: object) -> None:
        self.data["steps"].setdefault(name, {}).update(details)
        self.save()


def claim_state_dir(state_dir: Path) -> None:
    """The state_dir must be new, empty or an agent's (it holds our agent-state.json).

    The agent replaces kit/, subnet/ and finetuned/ in it; a folder holding anything else is
    refused so that no user file is ever replaced.
    """
    if state_dir.is_symlink() or (state_dir.exists() and not state_dir.is_dir()):
        raise AgentError(f"agent.state_dir {state_dir} exists and is not a folder")
    if state_dir.is_dir() and any(state_dir.iterdir()) and not (state_dir / STATE_FILE).is_file():
        raise AgentError(f"agent.state_dir {state_dir} is not empty and holds no {STATE_FILE}; "
                         "refusing to use it (name a new or empty folder)")
    state_dir.mkdir(parents=True, exist_ok=True)


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    return not cmdline.exists() or b"flower-supernode" in cmdline.read_bytes()


class Agent:
    """Runs the steps in order, skipping what a previous run completed."""

    def __init__(self, cfg: AgentConfig, restart: bool = False) -> None:
        self.cfg = cfg
        claim_state_dir(cfg.state_dir)
        self.state = AgentState(cfg.state_dir / STATE_FILE)
        if restart:  # forget the steps, keep the (checked) state file that marks the folder
            self.state.data["steps"] = {}
        self.state.save()  # from the first moment the folder is recognisably the agent's

    # -- the steps ---------------------------------------------------------------------------
    def run(self) -> Path | None:
        """Every step; returns the fine-tuned bundle (None when no federation is configured)."""
        steps: list[tuple[str, Callable[[], str], Callable[[], dict], Callable[[], bool]]] = [
            ("kit", self._kit_fp, self._fetch_kit, self._kit_ok),
            ("signature", self._signature_fp, self._compute_signature, self._signature_ok),
            ("subnet", self._subnet_fp, self._fetch_subnet, self._subnet_ok),
        ]
        if self.cfg.superlink:
            steps.append(("federation", self._federation_fp, self._federate, self._finetuned_ok))
        for i, (name, fp_fn, action, still_ok) in enumerate(steps, 1):
            fp = fp_fn()
            if self.state.done(name, fp) and still_ok():
                log.info("[%d/%d] %s: already done, skipped", i, len(steps), name)
                continue
            log.info("[%d/%d] %s: starting", i, len(steps), name)
            started = time.time()
            details = action()
            self.state.mark(name, fp, **details)
            log.info("[%d/%d] %s: done in %.1f s %s", i, len(steps), name,
                     time.time() - started, json.dumps(details, sort_keys=True))
        if not self.cfg.superlink:
            log.info("no [federation] superlink configured: the verified sub-net is in %s",
                     self.cfg.subnet_dir)
            return None
        log.info("fine-tuned bundle ready for export: %s (sdr-export onnx --bundle %s ...)",
                 self.cfg.finetuned_dir, self.cfg.finetuned_dir)
        return self.cfg.finetuned_dir

    def _kit_fp(self) -> str:
        return _fingerprint(self.cfg.registry_url, _file_digest(self.cfg.pubkey))

    def _fetch_kit(self) -> dict:
        from sdr_edge.registry_client import get_kit

        path = get_kit(self.cfg.registry_url, self.cfg.registry_token(), self.cfg.pubkey,
                       self.cfg.kit_dir, cacert=self.cfg.cacert)
        return {"path": str(path), "kit_json_sha256": _file_digest(path / "kit.json")}

    def _kit_ok(self) -> bool:
        from sdr_edge.artifacts.signing import load_public_key
        from sdr_edge.routing.kit_runtime import KitError, KitRunner

        try:  # verified again: a kit changed on disk since it was fetched is fetched anew
            KitRunner(self.cfg.kit_dir, pubkey=load_public_key(self.cfg.pubkey))
        except (KitError, OSError, KeyError):
            log.warning("kit in %s no longer loads or verifies: fetching it again",
                        self.cfg.kit_dir)
            return False
        return _file_digest(self.cfg.kit_dir / "kit.json") == \
            self.state.step("kit").get("kit_json_sha256")

    def _signature_fp(self) -> str:
        extra = {k: v for k, v in self.cfg.node_config.items()
                 if k in ("partition-id", "num-partitions", "alpha", "partition-seed", "limit")}
        return _fingerprint(self.state.step("kit").get("kit_json_sha256"), self.cfg.data,
                            _data_fingerprint(self.cfg.data), extra, self.cfg.dp_epsilon)

    def _node_data_config(self):
        from sdr_edge.federated.node_data import NodeDataConfig

        return NodeDataConfig.from_node_config({**self.cfg.node_config, "data": self.cfg.data,
                                                "kit-dir": str(self.cfg.kit_dir)})

    def _compute_signature(self) -> dict:
        from sdr_edge.artifacts.signing import load_public_key
        from sdr_edge.federated.node_data import NodeDataError, load_partition
        from sdr_edge.routing.kit_runtime import KitError, KitRunner, compute_signature

        try:  # the kit runs only once its signed manifest verifies (and names its run)
            runner = KitRunner(self.cfg.kit_dir, pubkey=load_public_key(self.cfg.pubkey))
        except KitError as exc:
            raise AgentError(f"signature: {exc}") from exc
        try:
            source = load_partition(self._node_data_config(), runner.spec.image_size,
                                    runner.spec.channels)
        except NodeDataError as exc:
            raise AgentError(f"signature: {exc}") from exc
        sig = compute_signature(runner, source.images, dp_epsilon=self.cfg.dp_epsilon)
        atomic_write_text(self.cfg.signature_path, sig.to_json() + "\n")
        if source.skipped:
            log.warning("signature: %d unreadable image(s) skipped", len(source.skipped))
        return {"images": sig.count, "skipped": len(source.skipped),
                "signature_sha256": _file_digest(self.cfg.signature_path)}

    def _signature_ok(self) -> bool:
        return _file_digest(self.cfg.signature_path) == \
            self.state.step("signature").get("signature_sha256")

    def _subnet_fp(self) -> str:
        parts = [self.cfg.registry_url, self.state.step("signature").get("signature_sha256"),
                 _file_digest(self.cfg.pubkey)]
        if self.cfg.rerank:  # a re-ranked pick depends on the images and labels too
            parts.append([self.cfg.rerank, self.cfg.top_m, _data_fingerprint(self.cfg.data)])
        return _fingerprint(*parts)  # without rerank: the same fingerprint as before it existed

    def _fetch_subnet(self) -> dict:
        from sdr_edge.registry_client import fetch_bundle

        sig = self.cfg.signature_path.read_text(encoding="utf-8")
        if self.cfg.rerank:
            return self._fetch_reranked(sig)
        path = fetch_bundle(self.cfg.registry_url, self.cfg.registry_token(), sig, self.cfg.pubkey,
                            self.cfg.subnet_dir, cacert=self.cfg.cacert)
        manifest = json.loads((path / "manifest.json").read_text())
        return {"path": str(path), "route": manifest["route"]}

    def _fetch_reranked(self, sig: str) -> dict:
        """The top-M candidates verified in memory, scored on the node's images (labels from
        its class sub-folders for logme, knn and probe), the best one written."""
        from sdr_edge.artifacts.signing import load_public_key
        from sdr_edge.artifacts.staging import check_replaceable_dir, resolve_out
        from sdr_edge.artifacts.transfer import write_files_atomically
        from sdr_edge.federated.node_data import NodeDataError, load_partition
        from sdr_edge.registry_client import fetch_candidates

        try:
            from sdr_edge.routing.device_rerank import (
                candidates_input_shape,
                needs_labels,
                pick_candidate,
            )
        except ImportError as exc:
            raise AgentError(f"subnet: registry.rerank: {exc}") from exc
        check_replaceable_dir(resolve_out(self.cfg.subnet_dir))  # before any download
        candidates = fetch_candidates(self.cfg.registry_url, self.cfg.registry_token(), sig,
                                      self.cfg.pubkey, self.cfg.top_m, cacert=self.cfg.cacert)
        try:
            source = load_partition(self._node_data_config(), *candidates_input_shape(candidates))
        except NodeDataError as exc:
            raise AgentError(f"subnet: {exc}") from exc
        labels = source.labels
        if needs_labels(self.cfg.rerank) and (labels is None or len(set(labels.tolist())) < 2):
            raise AgentError(f"subnet: registry.rerank = {self.cfg.rerank!r} needs labels: "
                             f"agent.data {self.cfg.data!r} must hold one sub-folder per class")
        route, files, choice = pick_candidate(candidates, load_public_key(self.cfg.pubkey),
                                              source.images, self.cfg.rerank, labels)
        path = write_files_atomically(files, self.cfg.subnet_dir)
        return {"path": str(path), "route": list(route), "rerank": self.cfg.rerank,
                "signature_rank": choice.index + 1, "candidates": len(candidates),
                "device_seconds": round(choice.seconds, 3)}

    def _subnet_ok(self) -> bool:
        return self._verifies(self.cfg.subnet_dir, self.cfg.pubkey)

    @staticmethod
    def _verifies(folder: Path, pubkey: Path) -> bool:
        from sdr_edge.artifacts.bundle import BundleError, verify_bundle
        from sdr_edge.artifacts.signing import load_public_key

        if not folder.is_dir():
            return False
        try:
            verify_bundle(folder, load_public_key(pubkey))
        except (BundleError, OSError, ValueError) as exc:
            log.warning("%s does not verify (%s)", folder, exc)
            return False
        return True

    # -- federation ----------------------------------------------------------------------------
    @property
    def _fed_pubkey(self) -> Path:
        return self.cfg.federation_pubkey or self.cfg.pubkey

    def _federation_fp(self) -> str:
        return _fingerprint(self.cfg.superlink, self.state.step("signature").get(
            "signature_sha256"), _file_digest(self._fed_pubkey))

    def _finetuned_ok(self) -> bool:
        return self._verifies(self.cfg.finetuned_dir, self._fed_pubkey)

    def supernode_command(self) -> list[str]:
        exe = self.cfg.supernode_bin or str(Path(sys.executable).parent / "flower-supernode")
        node_config = {**self.cfg.node_config, "data": self.cfg.data,
                       "kit-dir": str(self.cfg.kit_dir), "bundle-dir": str(self.cfg.finetuned_dir),
                       "server-pubkey": str(self._fed_pubkey)}
        if self.cfg.dp_epsilon:
            node_config["dp-epsilon"] = self.cfg.dp_epsilon
        cmd = [exe, "--superlink", self.cfg.superlink, "--port", str(free_port()),
               "--node-config", kv_config(node_config)]
        if self.cfg.insecure:
            cmd.append("--insecure")
        else:
            cmd += ["--root-certificates", str(self.cfg.root_certificates)]
        if self.cfg.auth_key is not None:
            cmd += ["--auth-supernode-private-key", str(self.cfg.auth_key)]
        return cmd

    def _federate(self) -> dict:
        entry = self.state.step("federation")
        pid = entry.get("supernode_pid")
        since = float(entry.get("since", 0.0))
        if _alive(pid):
            log.info("federation: re-attaching to the SuperNode left running (pid %d)", pid)
        else:
            since = time.time()
            log_path = self.cfg.state_dir / "supernode.log"
            with open(log_path, "ab") as out:
                proc = subprocess.Popen(self.supernode_command(), stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            pid = proc.pid
            self.state.update("federation", supernode_pid=pid, since=since, done=False,
                              log=str(log_path))
            log.info("federation: SuperNode started (pid %d, log %s), waiting for the "
                     "fine-tuned bundle", pid, log_path)
        try:
            manifest = self._wait_for_bundle(pid, since)
        except BaseException:
            # A clean stop (error, Ctrl-C, SIGTERM) takes the SuperNode down with the agent;
            # only a hard crash leaves it running for the next start to re-attach to.
            self._stop(pid)
            self.state.update("federation", supernode_pid=None)
            raise
        if not self.cfg.keep_serving:
            self._wait_reply_sent()
            self._stop(pid)
        return {"path": str(self.cfg.finetuned_dir), "route": manifest["route"],
                "final_accuracy": manifest.get("provenance", {}).get("federated", {})
                .get("final_accuracy"), "supernode_pid": pid if self.cfg.keep_serving else None}

    def _wait_for_bundle(self, pid: int, since: float) -> dict:
        from sdr_edge.artifacts.bundle import BundleError, verify_bundle
        from sdr_edge.artifacts.signing import load_public_key

        key = load_public_key(self._fed_pubkey)
        deadline = time.monotonic() + self.cfg.timeout if self.cfg.timeout > 0 else None
        last_note = time.monotonic()
        while True:
            if self.cfg.finetuned_dir.is_dir():
                try:
                    manifest = verify_bundle(self.cfg.finetuned_dir, key)
                except BundleError as exc:
                    raise AgentError(f"federation: received bundle does not verify: {exc}") from exc
                created = manifest.get("provenance", {}).get("created_unix", 0)
                if created >= int(since) - 1:
                    return manifest
            if not _alive(pid):
                tail = self._log_tail()
                raise AgentError(f"federation: the SuperNode (pid {pid}) exited before a "
                                 f"fine-tuned bundle arrived:\n{tail}")
            if deadline is not None and time.monotonic() > deadline:
                raise AgentError(f"federation: no fine-tuned bundle after {self.cfg.timeout:.0f} s")
            if time.monotonic() - last_note > 60:
                log.info("federation: still waiting for the fine-tuned bundle")
                last_note = time.monotonic()
            time.sleep(1.0)

    def _wait_reply_sent(self, timeout: float = 30.0, grace: float = 8.0) -> None:
        """Let the server collect this node's reply to the bundle message before stopping.

        The SuperLink answers "node unavailable" for a reply whose node went offline before
        the ServerApp pulled it (it pulls every 3 s). So: wait (bounded) until the SuperNode
        logs "Sent successfully" after the last message it received, then a short grace.
        """
        path = self.cfg.state_dir / "supernode.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and path.is_file():
            text = path.read_text(errors="replace")
            last_in = text.rfind("Receiving:")
            if last_in >= 0 and text.find("Sent successfully", last_in) >= 0:
                time.sleep(grace)
                return
            time.sleep(0.5)

    def _log_tail(self, n: int = 2000) -> str:
        path = self.cfg.state_dir / "supernode.log"
        return path.read_text(errors="replace")[-n:] if path.is_file() else "(no log)"

    @staticmethod
    def _stop(pid: int) -> None:
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            return
        for _ in range(100):
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:
                if not _alive(pid):
                    return
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)

