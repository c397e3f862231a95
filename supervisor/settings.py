"""Daemon settings: a TOML file, then ``TITAN_SUPERVISOR_*`` environment, then flags.

Every field is documented and validated here; a mistake exits the daemon at start with a
message naming the field (``titan-supervisor run`` prints ``config error: <field>: <why>``).
Nested sections map to environment variables with ``__``: ``TITAN_SUPERVISOR_SERVER__PORT=9000``.
The ``[detect]`` and ``[policy]`` tables are passed to the detector and policy Configs, whose
field names and defaults are the documentation (``supervisor/detect/*``, ``supervisor/policy.py``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import sys
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

_FAULT = re.compile(r"^[a-z]+@\d+(:[a-z]+=[\w.*]+)*$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunSettings(_Section):
    run_id: str = Field("run", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$",
                        description="Name of the run; stamped on every record and metric.")
    workdir: Path = Field(Path("runs/default"), description="torchtitan dump folder: checkpoints, spool, logs, journal.")
    preset: str = Field("tiny", description="training.presets name (tiny, small, llmjp3-1.8b, ...).")
    nproc_per_node: int = Field(2, ge=1, le=64, description="Trainer ranks on this node.")
    steps: int | None = Field(None, ge=1, description="Total training steps (default: the preset's).")
    checkpoint_interval: int | None = Field(None, ge=1, description="Steps between checkpoints (default: the preset's).")
    trainer_args: list[str] = Field(default_factory=list, description="Extra torchtitan flags, e.g. ['--debug.seed', '7'].")
    faults: str = Field("", description="Fault-injection spec for drills (training/faults.py); empty in production.")
    python: str = Field("", description="Python interpreter for the ranks (default: the daemon's).")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment for the ranks.")

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
    trainer_token: bool | None = Field(
        None, description="Require the per-run trainer token on /v1/telemetry and /v1/heartbeat (the daemon makes "
                          "one and hands it to the ranks it launches). Default: required when bound beyond loopback.")
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
        return (not self.loopback) if self.trainer_token is None else self.trainer_token


class LaunchSettings(_Section):
    startup_timeout_s: float = Field(180.0, gt=0, description="A generation with no step within this is a failed start.")
    stop_grace_s: float = Field(10.0, ge=0, description="SIGTERM-to-SIGKILL grace when stopping a generation.")
    poll_interval_s: float = Field(0.1, gt=0, le=5, description="How often rank liveness is checked.")
    directive_timeout_s: float = Field(60.0, gt=0, description="A hot directive not acknowledged in this falls back to a cold restart.")


class CheckpointSettings(_Section):
    keep_last: int = Field(0, ge=0, description="Retention: newest valid checkpoints kept (0: keep all). Pinned ones are always kept.")
    in_progress_grace_s: float = Field(300.0, gt=0, description="A step folder without .metadata younger than this is still being written.")
    adaptive: bool = Field(False, description="Apply the Young/Daly interval sqrt(2*C*MTBF) to the live trainer (always computed and exported).")
    min_interval_steps: int = Field(10, ge=1, description="Lower bound for the adaptive interval.")
    max_interval_steps: int = Field(5000, ge=1, description="Upper bound for the adaptive interval.")
    mtbf_prior_hours: float = Field(24.0, gt=0, description="MTBF assumed until the journal has seen failures (the run's own history replaces it).")

    @model_validator(mode="after")
    def _bounds(self) -> "CheckpointSettings":
        if self.min_interval_steps > self.max_interval_steps:
            raise ValueError(f"min_interval_steps {self.min_interval_steps} > max_interval_steps {self.max_interval_steps}")
        return self


class OptimizerSettings(_Section):
    """Overrides of the preset's AdamW settings: passed to the trainer and linted by preflight."""

    lr: float | None = Field(None, gt=0, description="Peak learning rate.")
    eps: float | None = Field(None, ge=0, description="Adam epsilon (the lab's trap: 1e-5 instead of 1e-8).")
    beta1: float | None = Field(None, ge=0, lt=1)
    beta2: float | None = Field(None, ge=0, lt=1)
    weight_decay: float | None = Field(None, ge=0)
    warmup_steps: int | None = Field(None, ge=0)

    def overrides(self) -> dict[str, float]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class PreflightSettings(_Section):
    enabled: bool = Field(True, description="Lint hyperparameters and the parallel plan before every launch.")
    device: str = Field("cpu", description="Accelerator for the memory estimate: H100, H200, B200, B300, A100-80 or cpu.")
    device_memory_gib: float | None = Field(None, gt=0, description="Memory per device (required for cpu; default: this machine's RAM).")
    global_batch: int | None = Field(None, ge=1, description="Global batch in sequences (default: ranks x the preset's local batch).")
    layouts: list[dict[str, Any]] = Field(default_factory=list,
                                          description="Ordered parallel layouts, fastest first ({dp, tp, pp, cp, micro_batch, ...}); default: pure DP over all ranks.")
    override_reason: str = Field("", description="Launch despite preflight errors; the reason is journaled.")


class ConvergenceSettings(_Section):
    reference_spool: Path | None = Field(None, description="A previous run's telemetry spool: the live loss is compared with it by tokens seen.")


class PageSettings(_Section):
    webhook_url: str = Field("", description="POSTed a JSON page when the supervisor stops a run and needs a human.")


class Settings(BaseSettings):
    """All daemon settings. ``Settings.load(path, **flags)`` is the only constructor to use."""

    model_config = SettingsConfigDict(env_prefix="TITAN_SUPERVISOR_", env_nested_delimiter="__", extra="forbid")

    run: RunSettings = Field(default_factory=RunSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    launch: LaunchSettings = Field(default_factory=LaunchSettings)
    checkpoints: CheckpointSettings = Field(default_factory=CheckpointSettings)
    page: PageSettings = Field(default_factory=PageSettings)
    optimizer: OptimizerSettings = Field(default_factory=OptimizerSettings)
    preflight: PreflightSettings = Field(default_factory=PreflightSettings)
    convergence: ConvergenceSettings = Field(default_factory=ConvergenceSettings)
    detect: dict[str, dict[str, Any]] = Field(default_factory=dict, description="DetectorSuite.Config overrides per detector.")
    policy: dict[str, Any] = Field(default_factory=dict, description="Policy.Config overrides.")
    mode: Literal["auto", "advise", "off"] = Field("auto", description="auto: act; advise: propose only; off: record only.")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    _toml_path: Path | None = None

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlSource(settings_cls))

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        self.detector_config()
        self.policy_config()
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

    # --- typed views of the pass-through tables ---------------------------------------------
    def detector_config(self):
        from supervisor.detect.suite import DetectorSuite

        base = DetectorSuite.Config()
        # launch.startup_timeout_s is the failed-start rule: no step within it is a hang
        base.stall = dataclasses.replace(base.stall, startup_timeout=self.launch.startup_timeout_s)
        for name, overrides in self.detect.items():
            if not hasattr(base, name):
                known = ", ".join(f.name for f in dataclasses.fields(base))
                raise ValueError(f"detect.{name}: unknown detector (known: {known})")
            setattr(base, name, _dataclass_with(getattr(base, name), overrides, f"detect.{name}"))
        return base

    def policy_config(self):
        from supervisor.policy import Policy

        return _dataclass_with(Policy.Config(), self.policy, "policy")

    @property
    def journal_path(self) -> Path:
        return self.run.workdir / "supervisor" / "journal.sqlite"

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides) -> "Settings":
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file {p} does not exist")
            _TomlSource.path = p
        else:
            _TomlSource.path = None
        try:
            return cls(**overrides)
        except ValidationError as e:
            raise ConfigError(_explain(e)) from None
        except (ValueError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(str(e)) from None


class ConfigError(ValueError):
    pass


def _dataclass_with(obj, overrides: dict, where: str):
    if not isinstance(overrides, dict):
        raise ValueError(f"{where}: expected a table, got {overrides!r}")
    names = {f.name: f for f in dataclasses.fields(obj)}
    changes = {}
    for key, value in overrides.items():
        if key not in names:
            raise ValueError(f"{where}.{key}: unknown setting (known: {', '.join(names)})")
        current = getattr(obj, key)
        if isinstance(current, bool) and not isinstance(value, bool):
            raise ValueError(f"{where}.{key}: expected true/false, got {value!r}")
        if isinstance(current, (int, float)) and not isinstance(current, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{where}.{key}: expected a number, got {value!r}")
            if isinstance(current, int) and isinstance(value, float) and not value.is_integer():
                raise ValueError(f"{where}.{key}: expected an integer, got {value!r}")
            value = type(current)(value)
        changes[key] = value
    try:
        return dataclasses.replace(obj, **changes)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def _explain(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


class _TomlSource(PydanticBaseSettingsSource):
    path: Path | None = None

    def get_field_value(self, field, field_name):  # pragma: no cover - unused (we override __call__)
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        with open(self.path, "rb") as f:
            try:
                return tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{self.path}: not valid TOML: {e}") from None


if __name__ == "__main__":  # print the effective settings
    print(Settings.load(sys.argv[1] if len(sys.argv) > 1 else None).model_dump_json(indent=2))
