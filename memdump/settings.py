"""The one settings root: environment variables prefixed ``MEMDUMP_`` (nested with ``__``)
plus a hypervisor inventory file (YAML), e.g. the one ``lab/up`` writes."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import warnings
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from memdump.chunkedgz import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE
from memdump.errors import ConfigError, InvalidIdentifierError
from memdump.identifiers import validate_id
from memdump.runinfo import CAPTURE_FLOW, CAPTURE_PART_FLOW

MiB = 1024 * 1024
MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last
MAX_PART_SIZE = 5 * 1024 * MiB
# Retention's bounds, for the settings and the flow's parameters alike: days must be
# above this, keep_last at least this (0 would delete every dump).
RETENTION_DAYS_ABOVE = 0.0
RETENTION_KEEP_LAST_MIN = 1
# The largest migration max-bandwidth QEMU accepts (a uint64; 7.2 takes 2**64-1).
QEMU_MAX_BANDWIDTH = (1 << 64) - 1
# The disk-space margin's default (Settings.disk_space_margin), also the drivers' default.
DISK_SPACE_MARGIN = 1.1


def _valid_id(v: str, what: str) -> str:
    """validate_id as a pydantic validator: its error becomes a ValueError."""
    try:
        return validate_id(v, what=what)
    except InvalidIdentifierError as exc:
        raise ValueError(str(exc)) from None


class SSHTuning(BaseModel):
    """SSH knobs, measured on loopback: AES-GCM with a 2-8 MiB window and 256 KiB packets
    was 5x faster than large windows with small packets."""

    model_config = ConfigDict(extra="forbid")

    ciphers: tuple[str, ...] = (
        "aes128-gcm@openssh.com",
        "aes256-gcm@openssh.com",
        "aes128-ctr",
        "aes256-ctr",
    )
    # Dump streams through the OpenSSH client (C crypto in its own process, running beside
    # hashing and compression) or paramiko. Both verify host keys against the same
    # known_hosts and never accept an unknown key; commands always use paramiko.
    stream_client: Literal["openssh", "paramiko"] = "openssh"
    window_size: int = Field(default=4 * MiB, ge=64 * 1024)
    max_packet_size: int = Field(default=256 * 1024, ge=32 * 1024)
    recv_size: int = Field(default=16 * MiB, ge=64 * 1024)
    connect_timeout_sec: float = Field(default=15.0, gt=0)
    keepalive_sec: int = Field(default=15, ge=0)
    # No byte for this long on a dump stream means the peer is gone or wedged.
    stall_timeout_sec: float = Field(default=120.0, gt=0)
    # paramiko re-keys every 512 MiB by default; a re-key landing at the end of a stream
    # was seen to hang recv() for 30 s. OpenSSH's own limit for AES is far higher.
    rekey_bytes: int = Field(default=2**36, ge=2**29)
    # Caps on what a command (not a dump stream) may print, for the SSH and local
    # transports alike: past them the command is stopped with OutputTooLargeError, so a
    # hostile hypervisor or QMP reply cannot fill the collector's memory.
    run_max_stdout_bytes: int = Field(default=16 * MiB, ge=64 * 1024)
    run_max_stderr_bytes: int = Field(default=1 * MiB, ge=4 * 1024)


def _plain_path(v: str | None, what: str, max_len: int) -> str | None:
    """An absolute path that can go into a command line or a socat address as is."""
    if v is not None and (
        not re.fullmatch(r"/[A-Za-z0-9._/-]*", v) or "/../" in f"{v}/" or len(v) > max_len
    ):
        raise ValueError(
            f"{what} must be an absolute path of letters, digits and '._/-' (at most {max_len})"
        )
    return v


class HypervisorConfig(BaseModel):
    """One hypervisor of the inventory."""

    # It holds a secret: a validation error must not print its input.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    name: str
    # "libvirt": virsh on the hypervisor; "qemu": QEMU processes not managed by libvirt,
    # each with a QMP socket <qmp_dir>/<vm name>.qmp, spoken to with python3; "proxmox":
    # a Proxmox VE node, through its `qm` command (list, config, status, monitor).
    driver: Literal["libvirt", "qemu", "proxmox"] = "libvirt"
    transport: Literal["ssh", "local"] = "ssh"
    host: str | None = None
    port: int = Field(default=22, ge=1, le=65535)
    user: str = "root"
    key_file: Path | None = None
    key_passphrase: SecretStr | None = None
    known_hosts: Path | None = None
    libvirt_uri: str = "qemu:///system"
    # Absolute directory on this hypervisor for the private temp dirs of file-staged dumps
    # (Settings.staging = "file"); unset: the remote shell's ${TMPDIR:-/tmp}. It needs
    # memory size x disk_space_margin free, checked before the guest is paused.
    staging_dir: str | None = None
    # driver "qemu": the directory of the VMs' QMP unix sockets (one <name>.qmp per VM);
    # unset: /run/memdump-qemu. Its path goes into remote command lines, so it is limited
    # to letters, digits and "._/-".
    qmp_dir: str | None = None
    # driver "qemu": what may serve a VM's QMP socket. fnmatch patterns ("*" also matches
    # "/") of the real path of /proc/PID/exe of the process listening on it (its SO_PEERCRED
    # pid); that file and every directory above it must also be root's and writable by
    # root only. A socket served by anything else is refused. Debian/Ubuntu/Proxmox
    # (/usr/bin/kvm is a link) and RHEL paths by default; add e.g. /opt/qemu/bin/qemu-*.
    qemu_binaries: list[str] = Field(
        default=["/usr/bin/qemu-system-*", "/usr/libexec/qemu-kvm", "/usr/local/bin/qemu-system-*"],
        min_length=1,
        max_length=32,
    )
    # driver "proxmox": the `qm` command on the node (absolute path); unset: "qm" from the
    # remote PATH (/usr/sbin/qm on Proxmox VE).
    qm_command: str | None = None
    # How this hypervisor's VMs are captured; unset: Settings.capture_mode. "paused": the
    # hypervisor's dump (the guest is stopped for the whole dump). "live": QEMU's
    # background-snapshot migration, turned into the same ELF core on the collector (the
    # guest pauses for milliseconds); where live cannot run, the capture falls back to
    # "paused" with the reason in the manifest and the record, never silently.
    capture_mode: Literal["paused", "live"] | None = None
    # Live capture needs QEMU to create a userfaultfd. QEMU running as root (Proxmox) or
    # with CAP_SYS_PTRACE can; QEMU 7.2 as an unprivileged user (libvirt's libvirt-qemu)
    # cannot while the host's vm.unprivileged_userfaultfd is 0 (the usual hardening).
    # "none": memdump never changes the host; such a VM falls back to paused.
    # "sysctl-window": memdump sets vm.unprivileged_userfaultfd=1 only from QEMU's
    # capability check until its write tracking has started (milliseconds), restores the
    # previous value on every exit path, and records this in the manifest.
    live_userfaultfd: Literal["none", "sysctl-window"] = "none"
    # After each live capture, put the guest RAM that was on transparent huge pages before
    # it back on them (sh/hugepages.pl: MADV_COLLAPSE through process_madvise, Linux >=
    # 6.1, perl on the hypervisor; every driver). A capture leaves the guest's RAM on 4 KiB
    # pages (QEMU releases its write protection page by page) until khugepaged joins them
    # again, tens of minutes for GiBs; meanwhile the guest has more TLB misses and its next
    # live capture pauses it ~5x longer (4 GiB: 46-72 ms instead of 11-15). Costs the
    # host's kernel CPU at the end of the capture (khugepaged's same work, done at once);
    # only memory that was a huge page before, so the guest's RSS does not grow.
    live_restore_huge_pages: bool = False

    @field_validator("qemu_binaries")
    @classmethod
    def _binary_patterns(cls, v: list[str]) -> list[str]:
        # One line each: they reach the hypervisor as one newline-separated argument.
        for p in v:
            if not re.fullmatch(r"/[^\x00-\x1f\x7f]{1,255}", p):
                raise ValueError(f"qemu_binaries: {p!r} is not an absolute path pattern")
        return v

    @field_validator("qm_command")
    @classmethod
    def _plain_command(cls, v: str | None) -> str | None:
        return _plain_path(v, "qm_command", 200)

    @field_validator("qmp_dir")
    @classmethod
    def _plain_dir(cls, v: str | None) -> str | None:
        return _plain_path(v, "qmp_dir", 80)

    @field_validator("staging_dir")
    @classmethod
    def _absolute_dir(cls, v: str | None) -> str | None:
        if v is not None and (not v.startswith("/") or "\0" in v or "\n" in v):
            raise ValueError("staging_dir must be an absolute path (one line)")
        return v

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        return _valid_id(v, "hypervisor name")

    def check_complete(self) -> None:
        """SSH needs a host, a key and a known_hosts file: there is no fallback that trusts
        an unknown host."""
        if self.transport != "ssh":
            return
        missing = [f for f in ("host", "key_file", "known_hosts") if getattr(self, f) is None]
        if missing:
            raise ConfigError(
                f"hypervisor {self.name!r}: ssh transport needs {', '.join(missing)}",
                hypervisor=self.name,
            )
        assert self.known_hosts is not None  # noqa: S101 - narrowed by the check above
        if not self.known_hosts.is_file():
            raise ConfigError(
                f"hypervisor {self.name!r}: known_hosts file {self.known_hosts} does not exist",
                hypervisor=self.name,
            )


class S3Settings(BaseModel):
    """Where and how dumps are offloaded. ``access_key_id``/``secret_access_key`` left
    unset means boto3's usual credential chain (environment, profile, instance role)."""

    # It holds a secret: a validation error must not print its input.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    endpoint_url: str | None = None
    region: str = "us-east-1"
    bucket: str = Field(min_length=3, max_length=63)
    prefix: str = "memdump/"
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    sse: Literal["none", "AES256", "aws:kms"] = "none"
    kms_key_id: str | None = None
    part_size: int = Field(default=64 * MiB, ge=MIN_PART_SIZE, le=MAX_PART_SIZE)
    max_attempts: int = Field(default=5, ge=1, le=20)  # botocore attempts per request
    connect_timeout_sec: float = Field(default=10.0, gt=0)
    read_timeout_sec: float = Field(default=60.0, gt=0)
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    keep_local: bool = True
    # S3 Object Lock on every object an offload writes (memdump.storage.s3): the bucket
    # must have it enabled, else the offload fails before uploading. "none": no lock.
    object_lock_mode: Literal["none", "governance", "compliance"] = "none"
    object_lock_days: int | None = Field(default=None, ge=1, le=36500)

    @model_validator(mode="after")
    def _consistent(self) -> S3Settings:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("access_key_id and secret_access_key go together (or neither)")
        if self.kms_key_id is not None and self.sse != "aws:kms":
            raise ValueError("kms_key_id needs sse='aws:kms'")
        # A lock without a period (or a period without a lock) is a mistake, not a default.
        if (self.object_lock_mode == "none") != (self.object_lock_days is None):
            raise ValueError("object_lock_mode and object_lock_days go together (or neither)")
        return self


class InfluxDB3Settings(BaseModel):
    """InfluxDB 3 record store (``MEMDUMP_RECORD_STORE=influxdb3``)."""

    # It holds a secret: a validation error must not print its input.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    url: str = Field(description="e.g. http://127.0.0.1:8181")
    database: str = "memdump"
    token: SecretStr | None = None  # the collectors': writes records
    # The API's (least privilege): a token that may only read the database (InfluxDB 3
    # Enterprise: `influxdb3 create token --permission "db:memdump:read"`). Unset, the API
    # reads with ``token``.
    read_token: SecretStr | None = None
    timeout_sec: float = Field(default=5.0, gt=0)


class APISettings(BaseModel):
    """The REST API (MEMDUMP_API__*)."""

    # The token must not appear in a validation error.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    token: SecretStr | None = None  # when set, every route but /health needs it
    # Without a token the API answers only on loopback: bound elsewhere it refuses to
    # start (Settings.check_api_exposure) unless this explicit override says a trusted
    # proxy in front does the authentication.
    allow_anonymous: bool = False
    # Host header allow-list against DNS rebinding (a page on evil.example whose name
    # now resolves to 127.0.0.1 reaching the loopback API). Unset: localhost, 127.0.0.1,
    # ::1 and host. "name" allows any port, "name:port" only that port, "*" turns the
    # check off. Environment: a JSON list or comma-separated names.
    allowed_hosts: Annotated[list[str], NoDecode] | None = None
    trigger_min_interval_sec: float = Field(default=60.0, ge=0)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    records_max_limit: int = Field(default=1000, ge=1)
    # /status asks Prefect at most once per this many seconds per API process
    status_cache_sec: float = Field(default=0.5, ge=0)
    # `memdump serve` runs the API at this nice level (captures keep the default)
    nice: int = Field(default=5, ge=0, le=19)
    # Hostile or mistaken requests: larger bodies get a 413, longer id lists a 400
    # ("all" covers a whole inventory in one entry).
    max_body_bytes: int = Field(default=256 * 1024, ge=1024)
    trigger_max_vms: int = Field(default=1000, ge=1)

    @field_validator("token")
    @classmethod
    def _token_not_empty(cls, v: SecretStr | None) -> SecretStr | None:
        # An empty SecretStr is falsy: "" would silently mean "no authentication".
        if v is not None and not v.get_secret_value().strip():
            raise ValueError(
                "MEMDUMP_API__TOKEN is empty: set a token, or unset the variable for an API"
                " that answers on loopback only"
            )
        return v

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _host_list(cls, v: object) -> object:
        if isinstance(v, str):
            v = json.loads(v) if v.lstrip().startswith("[") else v.split(",")
        if isinstance(v, list):
            v = [str(h).strip().lower() for h in v if str(h).strip()]
            if not v:
                raise ValueError("MEMDUMP_API__ALLOWED_HOSTS is empty (use * to allow any)")
        return v


class VerifySettings(BaseModel):
    """Verification of stored dumps (MEMDUMP_VERIFY__*): the scheduled flow and /verify."""

    model_config = ConfigDict(extra="forbid")

    # The scheduled verification (flow verify-dumps) checks dumps of the last N days.
    days: float = Field(default=7.0, gt=0)
    # /verify: at most this many verifications at once per API process (each reads a
    # whole dump); past it a 429. A dump whose .gz is larger than background_bytes is
    # verified as a background job the client polls (unless the request says "wait").
    max_concurrent: int = Field(default=2, ge=1)
    background_bytes: int = Field(default=1024 * MiB, ge=0)
    jobs_kept: int = Field(default=100, ge=1)  # finished jobs kept for polling
    # Chunks of a chunked .mem.gz inflated and checked at once per verification (None:
    # every core; the API's background verifications may want fewer).
    threads: int | None = Field(default=None, ge=1, le=256)


class OrchestrationSettings(BaseModel):
    """Prefect (MEMDUMP_ORCHESTRATION__*): retries for retryable errors only; limits hold
    across workers because they are Prefect global concurrency limits."""

    model_config = ConfigDict(extra="forbid")

    capture_retries: int = Field(default=2, ge=0, le=10)
    offload_retries: int = Field(default=3, ge=0, le=10)
    capture_retry_delay_sec: float = Field(default=5.0, ge=0)
    max_concurrent_captures: int = Field(default=3, ge=1)
    max_captures_per_hypervisor: int = Field(default=2, ge=1)
    runner_poll_sec: int = Field(default=1, ge=1)
    # The runner (memdump serve) and the collectors' workers (deployments.worker) fork
    # each flow run from a forkserver that has imported Prefect and memdump already
    # (deployments.warm) instead of spawning a new interpreter: seconds less per trigger.
    # False: Prefect's own spawn (`prefect worker start` on a collector).
    warm_flow_runs: bool = True
    # A worker starting removes .part files and hypervisor temp dirs older than this whose
    # owner is gone (memdump.leftovers); younger ones may belong to a starting capture.
    cleanup_min_age_sec: float = Field(default=60.0, ge=0)
    flow_name: str = CAPTURE_FLOW
    deployment: str = "on-demand"
    # A slot is leased from the Prefect server and renewed while its capture runs; a
    # collector that dies holding one frees it when the lease runs out (the server's
    # minimum is 60 s), so a lost machine cannot block a hypervisor for good.
    slot_lease_sec: float = Field(default=60.0, ge=60)
    # "tasks": one flow run per trigger runs every VM's chain itself (one runner or
    # worker does the whole trigger). "deployments": the trigger's flow run deals its VMs
    # into parts, as many as the global cap allows captures at once, and starts a flow
    # run of the deployment `child_deployment` per part, so every worker of the work pool
    # takes VMs (production on several collectors; see the README).
    fanout: Literal["tasks", "deployments"] = "tasks"
    # Workers (deployments.worker) run flow runs with heartbeats this often; a run missing
    # three is marked Crashed (tasks/automations.py). Prefect's minimum is 30 s.
    heartbeat_sec: int = Field(default=30, ge=30)
    child_deployment: str = f"{CAPTURE_PART_FLOW}/part"
    # Prefect server that `memdump serve` starts when PREFECT_API_URL is not set
    prefect_port: int = Field(default=4200, ge=1, le=65535)
    # Records kept in the outbox while the store was down are replayed this often.
    outbox_replay_sec: float = Field(default=60.0, gt=0)


class AnalysisSettings(BaseModel):
    """Post-capture check that the dump opens in Volatility 3 (memdump.analysis,
    MEMDUMP_ANALYSIS__*); its result goes into the manifest and the record's `analysis`."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    banners: bool = True  # also look for OS banners (Linux, Windows, macOS)
    samples: int = Field(default=32, ge=0, le=4096)
    work_dir: Path | None = None  # temp copy for random access; default: dump dir


class RetentionSettings(BaseModel):
    """Retention (flow apply-retention, daily; MEMDUMP_RETENTION__*): delete dumps older
    than N days and/or beyond the newest K per VM (hypervisor + vmid); records stay,
    marked deleted_at. Both unset: nothing is deleted. The flow's parameters are held to
    the same bounds."""

    model_config = ConfigDict(extra="forbid")

    days: float | None = Field(default=None, gt=RETENTION_DAYS_ABOVE, allow_inf_nan=False)
    keep_last: int | None = Field(default=None, ge=RETENTION_KEEP_LAST_MIN)


# Flat names of the settings now grouped above: (group, field). They keep working for
# one release (environment, .env file and keyword arguments alike) with a
# LegacySettingWarning; where both are given, the grouped name wins.
LEGACY_NAMES: dict[str, tuple[str, str]] = {
    "api_token": ("api", "token"),
    "api_allow_anonymous": ("api", "allow_anonymous"),
    "api_allowed_hosts": ("api", "allowed_hosts"),
    "trigger_min_interval_sec": ("api", "trigger_min_interval_sec"),
    "api_host": ("api", "host"),
    "api_port": ("api", "port"),
    "records_max_limit": ("api", "records_max_limit"),
    "status_cache_sec": ("api", "status_cache_sec"),
    "api_nice": ("api", "nice"),
    "api_max_body_bytes": ("api", "max_body_bytes"),
    "trigger_max_vms": ("api", "trigger_max_vms"),
    "verify_days": ("verify", "days"),
    "verify_max_concurrent": ("verify", "max_concurrent"),
    "verify_background_bytes": ("verify", "background_bytes"),
    "verify_jobs_kept": ("verify", "jobs_kept"),
    **{name: ("orchestration", name) for name in OrchestrationSettings.model_fields},
    "analysis": ("analysis", "enabled"),
    "analysis_banners": ("analysis", "banners"),
    "analysis_samples": ("analysis", "samples"),
    "analysis_work_dir": ("analysis", "work_dir"),
    "retention_days": ("retention", "days"),
    "retention_keep_last": ("retention", "keep_last"),
}


class LegacySettingWarning(FutureWarning):
    """A setting given by its old flat name (see LEGACY_NAMES)."""


def env_name(group: str, field: str) -> str:
    """The environment variable of a grouped setting: MEMDUMP_API__TOKEN."""
    return f"MEMDUMP_{group.upper()}__{field.upper()}"


class _LegacyNamesSource(PydanticBaseSettingsSource):
    """The old flat MEMDUMP_* names found in ``values`` (the environment or the .env
    file), handed on under their old names for Settings._legacy_names to move."""

    def __init__(self, settings_cls: type[BaseSettings], values: Mapping[str, str | None]):
        super().__init__(settings_cls)
        self._values = {k.lower(): v for k, v in values.items()}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # not used: __call__ answers for all at once

    def __call__(self) -> dict[str, Any]:
        found = {old: self._values.get(f"memdump_{old}") for old in LEGACY_NAMES}
        return {old: v for old, v in found.items() if v is not None}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MEMDUMP_",
        env_nested_delimiter="__",
        extra="ignore",
        # Environment variables win over the file; the file is optional.
        env_file=".env",
        env_file_encoding="utf-8",
        # Secrets (API token, S3 key, ...) must not appear in a validation error.
        hide_input_in_errors=True,
    )

    data_dir: Path = Path(".data")
    dump_dir: Path = Path(".data/dumps")
    # Record store: "sqlite" (embedded, default) under data_dir, or "influxdb3".
    record_store: Literal["sqlite", "influxdb3"] = "sqlite"
    sqlite_path: Path | None = None  # default: <data_dir>/records.db
    influxdb3: InfluxDB3Settings | None = None
    # S3 offload (MEMDUMP_S3__BUCKET etc.); off when unset.
    s3: S3Settings | None = None
    inventory_file: Path | None = None
    hypervisors: list[HypervisorConfig] = Field(default_factory=list)
    # ISA-L levels 0-3; level 1 is within a few percent of gzip -1 at several times its speed.
    compression_level: int = Field(default=1, ge=0, le=3)
    # The chunked .mem.gz (memdump.chunkedgz): raw bytes per gzip member (a power of two),
    # and how many threads compress members (default: the machine's cores minus one, for
    # the reader).
    chunk_size: int = Field(default=DEFAULT_CHUNK_SIZE, ge=MIN_CHUNK_SIZE, le=MAX_CHUNK_SIZE)
    compress_threads: int | None = Field(default=None, ge=1, le=256)
    capture_timeout_sec: float = Field(default=300.0, gt=0)
    ssh: SSHTuning = Field(default_factory=SSHTuning)

    analysis: AnalysisSettings = Field(default_factory=AnalysisSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    # Who holds the local copies this process writes (recorded with each dump): retention
    # deletes a local copy only on the collector that holds it. Default: the host name.
    collector_id: str = Field(default_factory=socket.gethostname)
    # The collector's Ed25519 key that signs each manifest (memdump.signing): this file
    # (it must exist), or <data_dir>/keys/collector.key, generated on first use.
    signing_key_file: Path | None = None
    signing_key_passphrase: SecretStr | None = None  # the PEM's passphrase, if encrypted
    # Keys whose signatures `verify` accepts: a file of fingerprints or public keys. Unset:
    # none, not even this collector's own (trust is the examiner's choice, listed).
    trusted_keys: Path | None = None
    # Trusted timestamps (RFC 3161, memdump.timestamping): the TSA each manifest's SHA-256
    # goes to (http or https: the token is signed; unset, no timestamps), the CA its
    # tokens must chain to for `verify` to call them valid, the Authorization header's
    # value it wants (https only), and how long one request may take.
    tsa_url: str | None = None
    tsa_ca_file: Path | None = None
    tsa_authorization: SecretStr | None = None
    tsa_timeout_sec: float = Field(default=10.0, gt=0)
    # Warn (flow state, artifact, log) when the dumps still stored exceed this (1 TB).
    storage_warn_bytes: int = Field(default=10**12, ge=0)

    verify: VerifySettings = Field(default_factory=VerifySettings)
    orchestration: OrchestrationSettings = Field(default_factory=OrchestrationSettings)
    api: APISettings = Field(default_factory=APISettings)

    # Disk-space preflight: a capture needs memory size x this margin free in dump_dir
    # (gzip of incompressible memory is slightly larger than the memory itself).
    disk_space_margin: float = Field(default=DISK_SPACE_MARGIN, ge=0)

    # How a libvirt dump leaves the hypervisor (MEMDUMP_STAGING); recorded in the manifest.
    # "fifo": QEMU writes into a FIFO that `cat` reads straight into the SSH channel:
    #   nothing is written on the hypervisor, but the guest stays paused for the whole
    #   network transfer (and a slow consumer here makes that longer).
    # "file": QEMU first writes a private temp file on the hypervisor (0600, in a 0700 dir
    #   under the hypervisor's staging_dir), so the guest resumes as soon as that local
    #   write is done; the file is then streamed and removed. Needs memory size x
    #   disk_space_margin free there, checked before the guest is paused.
    staging: Literal["fifo", "file"] = "fifo"
    # How VMs are captured (MEMDUMP_CAPTURE_MODE); a hypervisor's capture_mode overrides it.
    # "paused": the hypervisor's memory-only dump, the guest stopped for the whole dump.
    # "live": a point-in-time image while the guest runs (QEMU background-snapshot; see
    # HypervisorConfig.capture_mode), falling back to "paused" with the reason recorded.
    # Live by default: it passed the lab's byte-exact, point-in-time and fault tests on
    # all three drivers, and a hypervisor that cannot do it costs one preflight command.
    capture_mode: Literal["paused", "live"] = "live"
    # Live capture: pages the guest wrote ahead of the sweep wait in memory up to this
    # many bytes, then in a private temp file under dump_dir.
    live_buffer_bytes: int = Field(default=64 << 20, ge=1 << 20)
    # Live capture: a cap (bytes/s) on QEMU's background snapshot, to spare the
    # hypervisor's CPU, disk or network; the guest's write faults last as long as the
    # capture. None (default): no cap, as a paused dump has none. QEMU's snapshot thread
    # ignores the migration max-bandwidth set before it starts (128 MiB/s by default),
    # so the cap is set as max-bandwidth once the snapshot runs, the VM's own value put
    # back after it.
    live_max_bandwidth_bytes: int | None = Field(default=None, ge=1 << 20, le=QEMU_MAX_BANDWIDTH)

    @field_validator("collector_id")
    @classmethod
    def _collector_id(cls, v: str) -> str:
        return _valid_id(v, "collector id")

    @field_validator("chunk_size")
    @classmethod
    def _chunk_size(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError("chunk_size must be a power of two (e.g. 1048576)")
        return v

    @model_validator(mode="after")
    def _tsa(self) -> Settings:
        url = self.tsa_url
        if url is not None and not re.match(r"https?://[^/\s]+", url):
            raise ValueError("tsa_url must be an http:// or https:// URL")
        if self.tsa_authorization is not None and not (url or "").startswith("https://"):
            # A TSA's secret would cross the network in clear.
            raise ValueError("tsa_authorization is sent only to an https:// tsa_url")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The old flat names, each after its new-style counterpart of the same source.
        dotenv_values = getattr(dotenv_settings, "env_vars", {})
        return (
            init_settings,
            env_settings,
            _LegacyNamesSource(settings_cls, os.environ),
            dotenv_settings,
            _LegacyNamesSource(settings_cls, dotenv_values),
            file_secret_settings,
        )

    @model_validator(mode="before")
    @classmethod
    def _legacy_names(cls, data: Any) -> Any:
        """Move settings given by their old flat names into their groups (with a
        warning); a grouped value given as well wins."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for old, (group, field) in LEGACY_NAMES.items():
            if old not in data:
                continue
            value = data[old]
            if old == group and isinstance(value, dict | BaseModel):
                continue  # `analysis` is also the group's own name
            del data[old]
            current = data.get(group) or {}
            if isinstance(current, BaseModel):
                current = {k: getattr(current, k) for k in current.model_fields_set}
            current = dict(current)
            new = env_name(group, field)
            if field in current:
                warnings.warn(
                    f"MEMDUMP_{old.upper()} ({old}) is ignored: {new} is set too",
                    LegacySettingWarning,
                    stacklevel=2,
                )
                continue
            warnings.warn(
                f"MEMDUMP_{old.upper()} ({old}) is deprecated: use {new} ({group}.{field})",
                LegacySettingWarning,
                stacklevel=2,
            )
            current[field] = value
            data[group] = current
        return data

    def allowed_api_hosts(self) -> tuple[str, ...]:
        """Host header values the API accepts (see APISettings.allowed_hosts)."""
        if self.api.allowed_hosts is not None:
            return tuple(self.api.allowed_hosts)
        hosts = ["localhost", "127.0.0.1", "::1"]
        if not _any_address(self.api.host):
            hosts.append(self.api.host.strip("[]").lower())
        return tuple(dict.fromkeys(hosts))

    def check_api_exposure(self, host: str | None = None) -> None:
        """Refuse (ConfigError) to serve the API on ``host`` (default api.host) when that
        is not a loopback address and no token is set, unless api.allow_anonymous."""
        host = self.api.host if host is None else host
        if self.api.token is None and not self.api.allow_anonymous and not is_loopback(host):
            raise ConfigError(
                f"refusing to serve the API on {host!r} without MEMDUMP_API__TOKEN: anyone"
                " who reaches it could start captures. Set MEMDUMP_API__TOKEN, bind"
                " MEMDUMP_API__HOST to 127.0.0.1, or set MEMDUMP_API__ALLOW_ANONYMOUS=true"
                " when a proxy in front authenticates",
                setting="MEMDUMP_API__TOKEN",
            )

    @property
    def compression_workers(self) -> int:
        """compress_threads, or the machine's cores minus one (the reader's), at least 1."""
        if self.compress_threads is not None:
            return self.compress_threads
        return max(1, (os.cpu_count() or 1) - 1)

    @property
    def records_db(self) -> Path:
        return self.sqlite_path or self.data_dir / "records.db"

    @property
    def outbox_db(self) -> Path:
        return self.data_dir / "outbox.db"

    @cached_property
    def inventory(self) -> list[HypervisorConfig]:
        """Hypervisors from the inventory file, then any given inline; names are unique."""
        hvs: list[HypervisorConfig] = []
        if self.inventory_file is not None:
            hvs.extend(load_inventory(self.inventory_file))
        hvs.extend(self.hypervisors)
        seen: set[str] = set()
        for hv in hvs:
            if hv.name in seen:
                raise ConfigError(f"hypervisor {hv.name!r} is defined twice", hypervisor=hv.name)
            seen.add(hv.name)
        return hvs

    def hypervisor(self, name: str) -> HypervisorConfig:
        for hv in self.inventory:
            if hv.name == name:
                return hv
        raise ConfigError(f"no hypervisor named {name!r} in the inventory", hypervisor=name)


def _any_address(host: str) -> bool:
    return host.strip("[]") in ("", "0.0.0.0", "::")  # noqa: S104 - detecting it


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP; a wildcard, another name or address is not."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return bool((mapped or ip).is_loopback)


def load_inventory(path: Path) -> list[HypervisorConfig]:
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read inventory {path}: {exc}", path=str(path)) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"inventory {path} is not valid YAML: {exc}", path=str(path)) from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("hypervisors"), list):
        raise ConfigError(f"inventory {path} needs a 'hypervisors' list", path=str(path))
    try:
        return [HypervisorConfig.model_validate(item) for item in doc["hypervisors"]]
    except ValidationError as exc:
        raise ConfigError(f"inventory {path}: {exc}", path=str(path)) from exc
