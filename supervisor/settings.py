"""Daemon settings: one typed tree. A TOML file, then ``TITAN_SUPERVISOR_*`` environment, then flags.

Why one tree: every tunable number belongs to the component that uses it, as that component's own
``Config`` dataclass (``DetectorSuite.Config``, ``Policy.Config``, ``Preflight.Config``,
``Journal.Config``, ``Catalog.Config``, ``LocalLauncher.Config``). ``Settings`` holds those very
dataclasses, so pydantic validates every field from every source with the ranges declared next to
it (``supervisor/config_types.py``) and nothing is passed through as an untyped dict.
``titan-supervisor config --defaults`` prints the whole tree with each field's doc.

Failure model: a mistake exits the daemon at start with a message naming the dotted field
(``titan-supervisor run`` prints ``config error: <dotted.field>: <why>``, exit 2); nothing is
clamped or ignored. Nested fields map to environment variables with ``__``:
``TITAN_SUPERVISOR_SERVER__PORT=9000``, ``TITAN_SUPERVISOR_DETECT__STALL__HEARTBEAT_TIMEOUT=2.5``;
lists in the environment are JSON.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
import tomllib
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from supervisor.alert_receiver import AlertReceiver
from supervisor.checkpoints import Catalog
from supervisor.config_types import PositiveInt, Seconds, quoted_scalars
from supervisor.detect.suite import DetectorSuite
from supervisor.journal import Journal
from supervisor.launch.agents import AgentLauncher
from supervisor.launch.kubernetes import KubernetesLauncher
from supervisor.launch.local import LocalLauncher
from supervisor.launch.torchft import TorchftLauncher
from supervisor.model_table import PRESET_TRAINING
from supervisor.policy import Policy
from supervisor.preflight import Layout, Preflight
from supervisor.ratelimit import RateLimiter

_FAULT = re.compile(r"^[a-z]+@\d+(:[a-z]+=[\w.*]+)*$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v: Any, info) -> Any:
        """pydantic reads true as 1; a boolean where a number is meant is a mistake."""
        if isinstance(v, bool):
            ann = cls.model_fields[info.field_name].annotation
            if bool not in (ann, *typing.get_args(ann)) and Any not in (ann, *typing.get_args(ann)):
                raise ValueError(f"expected {getattr(ann, '__name__', ann)}, got {v!r}")
        return v


class RunSettings(_Section):
    run_id: str = Field("run", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$",
                        description="Name of the run; stamped on every record and metric.")
    workdir: Path = Field(Path("runs/default"), description="torchtitan dump folder: checkpoints, spool, logs, journal.")
    preset: str = Field("tiny", description="training.presets name (tiny, small, llmjp3-1.8b, ...).")
    nproc_per_node: int = Field(2, ge=1, le=64, description="Trainer ranks on this node.")
    # below 2**53, as every step on the wire (supervisor/wire.py): 10**29 steps was accepted
    steps: int | None = Field(None, ge=1, lt=2**53, description="Total training steps (default: the preset's).")
    checkpoint_interval: int | None = Field(None, ge=1, lt=2**53,
                                            description="Steps between checkpoints (default: the preset's).")
    faults: str = Field("", description="Fault-injection spec for drills (training/faults.py); empty in production.")
    python: str = Field("", description="Python interpreter for the ranks (default: the daemon's).")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment for the ranks.")

    @model_validator(mode="before")
    @classmethod
    def _no_trainer_args(cls, data: Any) -> Any:
        if isinstance(data, dict) and "trainer_args" in data:
            raise ValueError("trainer_args: removed: free torchtitan flags bypassed preflight; set the typed "
                             "[training] fields (seed, local_batch_size, global_batch_size, seq_len) instead")
        return data

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        if v not in PRESET_TRAINING:
            raise ValueError(f"unknown preset {v!r} (known: {', '.join(PRESET_TRAINING)})")
        return v

    @field_validator("faults")
    @classmethod
    def _faults(cls, v: str) -> str:
        for part in filter(None, (p.strip() for p in v.split(","))):
            if not _FAULT.match(part):
                raise ValueError(f"fault {part!r} is not KIND@STEP[:key=value...]")
        return v


class ServerSettings(_Section):
    host: str = Field("127.0.0.1", description="Bind address for telemetry, API and /metrics. Loopback by default.")
    port: int = Field(8642, ge=0, le=65535, description="TCP port (0: pick a free one).")
    token_file: Path | None = Field(None, description="Bearer tokens file (required to bind beyond loopback): JSON "
                                    "lines of {name, role, sha256}, written by `titan-supervisor token add` "
                                    "(supervisor/auth.py). TITAN_SUPERVISOR_TOKENS may add name:role:sha256 entries.")
    tls_cert_file: Path | None = Field(None, description="TLS certificate (PEM) for the API; set with tls_key_file.")
    tls_key_file: Path | None = Field(None, description="TLS private key (PEM) for the API; set with tls_cert_file.")
    plaintext_behind_tls_proxy: bool = Field(
        False, description="Allow a non-loopback bind without tls_cert_file because a proxy in front terminates TLS.")
    trainer_token: bool = Field(
        True, description="Require the per-run trainer token on /v1/telemetry and /v1/heartbeat (the daemon makes "
                          "one and hands it to the ranks it launches; only its hash is journaled). On by default, "
                          "loopback included: any local process could otherwise forge a rank.")
    clock_skew_s: Seconds = Field(30.0, description="A wall_time from the wire may be at most this far ahead of the "
                                                    "daemon's clock (a forged future time cannot defer a hang).")
    max_record_age_s: Seconds = Field(86_400.0, description="A wall_time from the wire may be at most this old.")
    rate_limit: RateLimiter.Config = Field(default_factory=RateLimiter.Config,
                                           description="Requests per second per route class (429 beyond).")
    alerts: AlertReceiver.Config = Field(default_factory=AlertReceiver.Config,
                                         description="The Alertmanager receiver's queue, de-duplication and caps.")
    allow_unauthenticated_loopback: bool = Field(
        False, description="With no tokens configured, accept operator/admin commands from loopback as actor "
                           "'local' (reads from loopback are always allowed then). Off by default: configure a "
                           "token file instead. Ignored once tokens are configured.")

    @model_validator(mode="after")
    def _tls_pair(self) -> "ServerSettings":
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("server.tls_cert_file and server.tls_key_file must be set together")
        for f in (self.tls_cert_file, self.tls_key_file):
            if f is not None and not f.is_file():
                raise ValueError(f"TLS file {f} does not exist")
        return self

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        if v != "localhost":
            try:
                ipaddress.ip_address(v)
            except ValueError:
                raise ValueError(f"{v!r} is not an IP address or 'localhost'") from None
        return v

    @property
    def loopback(self) -> bool:
        return self.host == "localhost" or ipaddress.ip_address(self.host).is_loopback

    @property
    def require_trainer_token(self) -> bool:
        return self.trainer_token


class TrainingSettings(_Section):
    """torchtitan settings the run overrides on top of its preset. ``run_plan.trainer_flags`` turns
    them into the trainer's flags and ``run_plan.plan_dict`` into the plan preflight lints: one
    source, so the numbers linted are the numbers trained with. Unset: the preset's value."""

    seed: int | None = Field(None, ge=0, description="Random seed for every rank (torchtitan --debug.seed); unset: not seeded.")
    local_batch_size: int | None = Field(None, ge=1, description="Sequences per rank per forward pass (default: the preset's).")
    global_batch_size: int | None = Field(None, ge=1, description="Sequences per optimizer step, all ranks together; "
                                          "a multiple of ranks x local_batch_size means gradient accumulation "
                                          "(default: ranks x local_batch_size).")
    seq_len: int | None = Field(None, ge=1, description="Tokens per sequence (default: the preset's).")


class LaunchSettings(_Section):
    stop_grace_s: float = Field(10.0, ge=0, allow_inf_nan=False, description="SIGTERM-to-SIGKILL grace when stopping a generation.")
    poll_interval_s: float = Field(0.1, gt=0, le=5, description="How often rank liveness is checked.")
    directive_timeout_s: float = Field(60.0, gt=0, allow_inf_nan=False, description="A hot directive not acknowledged in this falls back to a cold restart.")
    directive_poll_s: Seconds = Field(0.05, description="How often a waiting action checks for the trainer's acknowledgement or exit.")
    stack_dump_chars: PositiveInt = Field(20_000, description="Characters of a hang's stack dump kept in the action outcome.")
    backend: Literal["local", "kubernetes", "agents"] = Field(
        "local", description="Where generations run: local (torchrun on this machine), kubernetes (one JobSet per "
                             "generation) or agents (one `titan-supervisor agent` per node).")
    warm_spare: bool = Field(
        False, description="Keep a warm spare generation (torchrun up, torch/torchtitan imported in every rank, "
                           "parked) while a generation trains, and hand it the next restart instead of a cold start "
                           "(supervisor/launch/spare.py). Local launcher only (not torchft mode, not kubernetes/agents). "
                           "Costs the parked ranks' memory (README, \"Benchmarks\": bench/warm_spare.py). Its imports "
                           "run at the lowest CPU priority (a SCHED_IDLE thread in sessions at autogroup nice 19), so "
                           "they never slow the training generation; on a machine with no idle CPU they finish only "
                           "when the restart needs them.")
    local: LocalLauncher.Config = Field(default_factory=LocalLauncher.Config, description="The single-machine launcher.")
    kubernetes: KubernetesLauncher.Config = Field(default_factory=KubernetesLauncher.Config,
                                                  description="The Kubernetes launcher (supervisor/launch/kubernetes.py).")
    agents: AgentLauncher.Config = Field(default_factory=AgentLauncher.Config,
                                         description="Generations on node agents (supervisor/launch/agents.py).")



class DaemonSettings(_Section):
    """Bounds of the daemon's own in-memory state and of its catch-up after a restart."""

    step_time_window: PositiveInt = Field(500, description="Recent step times kept for the median step time (lost GPU-hours, Young/Daly).")
    directive_acks_kept: PositiveInt = Field(1000, description="Directive acknowledgements remembered for operator commands.")
    catchup_journal_steps: PositiveInt = Field(100_000, description="Journaled steps of the generation compared with the spool on a restart.")


class CheckpointSettings(_Section):
    catalog: Catalog.Config = Field(default_factory=Catalog.Config, description="Checkpoint catalog and retention.")
    lkg_healthy_steps: PositiveInt = Field(3, description="Healthy steps after a checkpoint before it is pinned as last-known-good.")
    interval_hysteresis: float = Field(0.2, ge=0, allow_inf_nan=False, description="The adaptive interval is changed only when the "
                                       "recommendation differs from the current one by more than this fraction.")
    adaptive: bool = Field(False, description="Apply the Young/Daly interval sqrt(2*C*MTBF) to the live trainer (always computed and exported).")
    min_interval_steps: int = Field(10, ge=1, description="Lower bound for the adaptive interval.")
    max_interval_steps: int = Field(5000, ge=1, description="Upper bound for the adaptive interval.")
    mtbf_prior_hours: float = Field(24.0, gt=0, allow_inf_nan=False, description="MTBF assumed until the journal has seen failures (the run's own history replaces it).")
    async_mode: Literal["disabled", "async", "async_with_pinned_mem"] = Field(
        "disabled", description="torchtitan's checkpoint.async_mode, passed to the trainer: 'async' writes the "
        "checkpoint from a background thread after a short staging copy, so training stalls for the copy only "
        "(bench/checkpoint_stall.py); 'async_with_pinned_mem' stages into pinned memory (GPU only: the trainer refuses "
        "it without one). A checkpoint "
        "being written is not valid until its .metadata and every shard are complete; the interval advisor's "
        "save cost is the measured stall.")

    @model_validator(mode="after")
    def _bounds(self) -> "CheckpointSettings":
        if self.min_interval_steps > self.max_interval_steps:
            raise ValueError(f"min_interval_steps {self.min_interval_steps} > max_interval_steps {self.max_interval_steps}")
        return self


class OptimizerSettings(_Section):
    """Overrides of the preset's AdamW settings: passed to the trainer and linted by preflight."""

    lr: float | None = Field(None, gt=0, allow_inf_nan=False, description="Peak learning rate.")
    eps: float | None = Field(None, ge=0, allow_inf_nan=False, description="Adam epsilon (the lab's trap: 1e-5 instead of 1e-8).")
    beta1: float | None = Field(None, ge=0, lt=1, description="Adam beta1.")
    beta2: float | None = Field(None, ge=0, lt=1, description="Adam beta2.")
    weight_decay: float | None = Field(None, ge=0, allow_inf_nan=False, description="AdamW weight decay.")
    warmup_steps: int | None = Field(None, ge=0, description="Linear LR warmup steps.")

    def overrides(self) -> dict[str, float]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class PreflightSettings(_Section):
    enabled: bool = Field(True, description="Lint hyperparameters and the parallel plan before every launch.")
    device: str = Field("cpu", description="Accelerator for the memory estimate: H100, H200, B200, B300, A100-80 or cpu.")
    device_memory_gib: float | None = Field(None, gt=0, allow_inf_nan=False, description="Memory per device (required for cpu; default: this machine's RAM).")
    layouts: list[Layout] = Field(default_factory=list,
                                  description="Ordered parallel layouts, fastest first ({dp, tp, pp, cp, dp_shard, micro_batch, "
                                              "activation_checkpointing, name}); default: pure DP over all ranks "
                                              "with micro_batch = training.local_batch_size.")
    override_reason: str = Field("", description="Launch despite preflight errors; the reason is journaled.")
    thresholds: Preflight.Config = Field(default_factory=Preflight.Config, description="The lint rules' thresholds.")


class ConvergenceSettings(_Section):
    reference_spool: Path | None = Field(None, description="A previous run's telemetry spool: the live loss is compared with it by tokens seen.")


class PageSettings(_Section):
    webhook_url: str = Field("", description="POSTed a JSON page when the supervisor stops a run and needs a human.")
    attempts: PositiveInt = Field(5, description="POST attempts before the page is counted as failed.")
    backoff_max_s: Seconds = Field(8.0, description="Exponential backoff between attempts (1, 2, 4, ... s) is capped at this.")
    timeout_s: Seconds = Field(5.0, description="Timeout of one POST.")


class GrafanaSettings(_Section):
    """Incident annotations (supervisor/annotations.py): off while `url` is empty."""

    url: str = Field("", description="Grafana base URL (http(s)://host:port, without /api); opened/acted/resolved "
                                     "incident events are posted to it as annotations. Empty: off.")
    token_file: Path | None = Field(None, description="File holding a Grafana service-account token (Editor role) "
                                    "alone; never logged. None: no Authorization header.")
    dashboard_uid: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$",
                                      description="Attach the annotations to this dashboard (e.g. "
                                      "titan-run-overview); None: organization-wide, matched by tags.")
    timeout_s: Seconds = Field(5.0, description="Timeout of one POST to Grafana.")
    attempts: PositiveInt = Field(5, description="POST attempts per annotation before it is given up (counted, logged).")
    backoff_initial_s: Seconds = Field(0.5, description="First wait between attempts; doubles each time.")
    backoff_max_s: Seconds = Field(30.0, description="Cap of the wait between attempts.")
    queue_size: PositiveInt = Field(1000, description="Annotations waiting to be sent; a full queue drops new ones (counted).")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        from urllib.parse import urlsplit

        if v and (urlsplit(v).scheme not in ("http", "https") or not urlsplit(v).hostname):
            raise ValueError(f"must be an http(s):// URL with a host, got {v!r}")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _token(self) -> "GrafanaSettings":
        if self.token_file is not None:
            if not self.url:
                raise ValueError("token_file is set but url is empty")
            self.read_token()  # unreadable or empty: a config error at start, not at the first incident
        return self

    def read_token(self) -> str:
        if self.token_file is None:
            return ""
        try:
            token = self.token_file.read_text().strip()
        except OSError as e:
            raise ValueError(f"token_file {self.token_file}: {e.strerror}") from None
        if not token or any(c.isspace() for c in token):
            raise ValueError(f"token_file {self.token_file} must hold one token alone")
        return token


class Settings(BaseSettings):
    """All daemon settings. ``Settings.load(path, **flags)`` is the only constructor to use."""

    model_config = SettingsConfigDict(env_prefix="TITAN_SUPERVISOR_", env_nested_delimiter="__", extra="forbid")

    run: RunSettings = Field(default_factory=RunSettings, description="What is trained, where.")
    training: TrainingSettings = Field(default_factory=TrainingSettings, description="torchtitan overrides of the preset.")
    server: ServerSettings = Field(default_factory=ServerSettings, description="HTTP server and authentication.")
    launch: LaunchSettings = Field(default_factory=LaunchSettings, description="Starting and stopping generations.")
    fault_tolerance: TorchftLauncher.Config = Field(
        default_factory=TorchftLauncher.Config,
        description="torchft replica groups (supervisor/launch/torchft.py): mode off, or torchft with a Lighthouse.")
    daemon: DaemonSettings = Field(default_factory=DaemonSettings, description="The daemon's own bookkeeping.")
    checkpoints: CheckpointSettings = Field(default_factory=CheckpointSettings, description="Catalog, retention, interval.")
    journal: Journal.Config = Field(default_factory=Journal.Config, description="The SQLite journal.")
    page: PageSettings = Field(default_factory=PageSettings, description="Paging a human.")
    grafana: GrafanaSettings = Field(default_factory=GrafanaSettings, description="Incident annotations in Grafana.")
    optimizer: OptimizerSettings = Field(default_factory=OptimizerSettings, description="AdamW overrides of the preset.")
    preflight: PreflightSettings = Field(default_factory=PreflightSettings, description="Linting before every launch.")
    convergence: ConvergenceSettings = Field(default_factory=ConvergenceSettings, description="Reference curve.")
    detect: DetectorSuite.Config = Field(default_factory=lambda: _daemon_detectors(),
                                         description="The detectors (supervisor/detect/).")
    policy: Policy.Config = Field(default_factory=Policy.Config, description="The policy ladder's budgets (supervisor/policy.py).")
    mode: Literal["auto", "advise", "off"] = Field("auto", description="auto: act; advise: propose only; off: record only.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level of the daemon's JSON log.")

    _sources_off: ClassVar[bool] = False  # set by defaults(): no file, no environment

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        if cls._sources_off:
            return (init_settings,)
        return (init_settings, env_settings, _TomlSource(settings_cls))

    @field_validator("detect", mode="before")
    @classmethod
    def _daemon_startup_default(cls, v: Any) -> Any:
        """A partial [detect] / [detect.stall] table keeps the daemon's startup_timeout default."""
        if isinstance(v, dict):
            stall = v.get("stall", {})
            if isinstance(stall, dict) and "startup_timeout" not in stall:
                v = {**v, "stall": {**stall, "startup_timeout": DAEMON_STARTUP_TIMEOUT_S}}
        return v

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        if self.fault_tolerance.mode == "torchft" and self.launch.backend != "local":
            raise ValueError(f"fault_tolerance.mode = \"torchft\" runs replica groups with the local launcher; "
                             f"launch.backend is {self.launch.backend!r}")
        if self.launch.backend == "agents" and \
                2 * self.launch.agents.report_interval_s > self.detect.stall.heartbeat_timeout:
            # heartbeats reach the daemon inside the agents' reports: a healthy rank must not look silent
            raise ValueError(f"launch.agents.report_interval_s ({self.launch.agents.report_interval_s:g}) must be at "
                             f"most half of detect.stall.heartbeat_timeout ({self.detect.stall.heartbeat_timeout:g}): "
                             "the ranks' heartbeats reach the daemon in their agent's reports")
        if not self.server.loopback and self.server.token_file is None:
            raise ValueError(f"server.host {self.server.host} is not loopback: set server.token_file "
                             "(bearer tokens) before exposing the supervisor beyond this machine")
        if not self.server.loopback and self.server.tls_cert_file is None and not self.server.plaintext_behind_tls_proxy:
            raise ValueError(f"server.host {self.server.host} is not loopback: set server.tls_cert_file and "
                             "server.tls_key_file (or server.plaintext_behind_tls_proxy = true when a proxy "
                             "terminates TLS) so tokens never cross the network in clear text")
        if self.server.token_file is not None:
            from supervisor.auth import load_token_file

            load_token_file(self.server.token_file)  # a bad token file is a config error at start
        return self

    def check_startup(self) -> None:
        """What `run` checks before it creates anything: the workdir can be written and the port is
        free. A `ConfigError` naming the field (exit 2), never a traceback after half a start."""
        _check_writable(self.run.workdir)
        if self.server.port:
            _check_port_free(self.server.host, self.server.port)

    # --- the component configs (kept by name for the daemon and replay) ---------------------
    def detector_config(self) -> DetectorSuite.Config:
        return self.detect

    def policy_config(self) -> Policy.Config:
        return self.policy

    @property
    def journal_path(self) -> Path:
        return self.run.workdir / "supervisor" / "journal.sqlite"

    @classmethod
    def defaults(cls) -> "Settings":
        """The built-in defaults: no file, no environment, no flags."""
        cls._sources_off = True
        try:
            return cls()
        finally:
            cls._sources_off = False

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides) -> "Settings":
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file {p} does not exist")
            with open(p, "rb") as f:
                try:
                    data = tomllib.load(f)
                except tomllib.TOMLDecodeError as e:
                    raise ConfigError(f"{p}: not valid TOML: {e}") from None
            quoted = quoted_scalars(data, cls)
            if quoted:
                raise ConfigError("; ".join(quoted))
            _TomlSource.data = data
        else:
            _TomlSource.data = {}
        try:
            return cls(**overrides)
        except ValidationError as e:
            raise ConfigError(_explain(e)) from None
        except ValueError as e:
            raise ConfigError(str(e)) from None


#: the daemon's failed-start rule: a generation with no step within this is a hang. The stall
#: detector's standalone default (900 s) suits replays of unknown runs; the daemon's is shorter.
DAEMON_STARTUP_TIMEOUT_S = 180.0


def _daemon_detectors() -> DetectorSuite.Config:
    from dataclasses import replace

    c = DetectorSuite.Config()
    c.stall = replace(c.stall, startup_timeout=DAEMON_STARTUP_TIMEOUT_S)
    return c


class ConfigError(ValueError):
    pass


def _check_writable(workdir: Path) -> None:
    p = Path(workdir).absolute()
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"run.workdir: {probe} is not a directory")
    for d in (probe, p / "supervisor") if p.exists() else (probe,):
        if d.exists() and not os.access(d, os.W_OK | os.X_OK):
            raise ConfigError(f"run.workdir: {d} is not writable by this user")


def _check_port_free(host: str, port: int) -> None:
    import errno
    import socket

    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1" if host == "localhost" else host, port))
        except OSError as e:
            why = "is already in use" if e.errno == errno.EADDRINUSE else f"cannot be bound: {e.strerror}"
            raise ConfigError(f"server.port: {host}:{port} {why}") from None


def _explain(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            msg = "unknown setting"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


class _TomlSource(PydanticBaseSettingsSource):
    """The run file's settings, parsed and checked by `Settings.load`."""

    data: dict[str, Any] = {}

    def get_field_value(self, field, field_name):  # pragma: no cover - unused (we override __call__)
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return self.data


if __name__ == "__main__":  # print the effective settings
    print(Settings.load(sys.argv[1] if len(sys.argv) > 1 else None).model_dump_json(indent=2))
