"""Typed configuration: TOML in `conf/`, parsed with `tomllib` into frozen dataclasses.

Every section is validated on construction; errors name the offending key (`models[1].max_num_seqs`)
so a user can fix the file without reading this module. Loading has no side effects.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration file is missing, unparsable or invalid. The message names the key."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind"})
    port: int = field(default=8000, metadata={"help": "TCP port"})
    state_dir: str = field(default=".samullm", metadata={"help": "SQLite, files, journals, profiles"})
    log_json: bool = field(default=False, metadata={"help": "one JSON object per log line"})

    def validate(self, where: str) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"{where}.port: must be in 1..65535, got {self.port}")


@dataclass(frozen=True)
class ArchConfig:
    """Architecture facts of a model (public numbers); read from config.json when a path is given."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    num_experts: int = field(default=1, metadata={"help": "MoE experts (1 = dense)"})
    experts_per_token: int = field(default=1, metadata={"help": "MoE experts active per token"})

    def validate(self, where: str) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) <= 0:
                raise ConfigError(f"{where}.{f.name}: must be positive")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"{where}.hidden_size: not divisible by num_heads")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"{where}.num_kv_heads: must divide num_heads")


@dataclass(frozen=True)
class DemoConfig:
    """How `samullm serve --make-demo-models` builds this model with `samullm tiny-model` if missing."""

    layers: int = 2
    hidden: int = 128
    heads: int = 2
    kv_heads: int = 1
    seed: int = 0

    def validate(self, where: str) -> None:
        if self.hidden % self.heads or self.hidden // self.heads < 32:
            raise ConfigError(f"{where}: hidden/heads must be an integer >= 32 (vLLM CPU attention)")
        if self.heads % self.kv_heads:
            raise ConfigError(f"{where}.kv_heads: must divide heads")


@dataclass(frozen=True)
class ModelConfig:
    name: str = field(metadata={"help": "the name requests use in body.model"})
    path: str | None = field(default=None, metadata={"help": "HF-format directory; None = plan only"})
    dtype: str = field(default="float32", metadata={"help": "float32 on CPU (bf16 SIGILLs here)"})
    max_model_len: int = 2048
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    engine_args: dict[str, Any] = field(default_factory=dict, metadata={"help": "extra vLLM args"})
    arch: ArchConfig | None = field(default=None, metadata={"help": "needed when path is None"})
    demo: DemoConfig | None = field(default=None, metadata={"help": "auto-create with tiny-model"})
    supports_embeddings: bool = False

    def validate(self, where: str) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ConfigError(f"{where}.name: must be a non-empty string")
        if self.dtype not in ("float32", "float16", "bfloat16", "auto"):
            raise ConfigError(f"{where}.dtype: one of float32, float16, bfloat16, auto")
        for key in ("max_model_len", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where}.{key}: must be positive")
        if self.path is None and self.arch is None:
            raise ConfigError(f"{where}: needs `path` (weights) or `arch` (plan-only model)")
        if self.arch is not None:
            self.arch.validate(f"{where}.arch")
        if self.demo is not None:
            self.demo.validate(f"{where}.demo")

    @property
    def dtype_bytes(self) -> int:
        return 4 if self.dtype == "float32" else 2

    def resolved_path(self, base: Path) -> Path | None:
        if self.path is None:
            return None
        p = Path(self.path)
        return p if p.is_absolute() else base / p

    def architecture(self, base: Path) -> ArchConfig:
        """The model's architecture: declared `arch`, else read from `<path>/config.json`."""
        if self.arch is not None:
            return self.arch
        path = self.resolved_path(base)
        assert path is not None
        try:
            hf = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model {self.name!r}: cannot read {path}/config.json: {exc}") from exc
        heads = hf["num_attention_heads"]
        return ArchConfig(
            num_layers=hf["num_hidden_layers"],
            hidden_size=hf["hidden_size"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads", heads),
            intermediate_size=hf.get("intermediate_size", 4 * hf["hidden_size"]),
            vocab_size=hf["vocab_size"],
            num_experts=hf.get("num_local_experts", 1),
            experts_per_token=hf.get("num_experts_per_tok", 1),
        )


# nice 5 gives a process about a third of the CPU weight of a nice-0 one: a busy engine still gets
# every cycle the gateway does not use, but the gateway's API calls wait behind it far less
DEFAULT_CPU_ENGINE_NICE = 5


@dataclass(frozen=True)
class DevicesConfig:
    kind: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    ids: list[int] = field(default_factory=list, metadata={"help": "restrict to these; [] = all"})
    topology_groups: list[list[int]] = field(
        default_factory=list, metadata={"help": "fully connected groups; a TP group never spans two"}
    )
    memory_gib: float = field(default=0.0, metadata={"help": "per-device memory; 0 = detect"})
    cpu_kvcache_gib: float = field(default=1.0, metadata={"help": "VLLM_CPU_KVCACHE_SPACE per engine"})
    gpu_memory_utilization: float = 0.9
    sleep_mode: bool = field(default=False, metadata={"help": "GPU only: sleep engines needed later"})
    max_threads_per_rank: int = field(default=0, metadata={
        "help": "CPU: most cores one TP rank may run on (OpenMP threads); 0 = every core, 1 = one"})
    start_contention: float | None = field(default=None, metadata={
        "help": "β: n engines started together each take load × (1 + β·(n−1)); "
                "unset = the measured CPU default, or 0.1 on GPUs (scheduler.types)"})
    confine_cpu_engines: bool = field(default=True, metadata={
        "help": "CPU: run all of an engine's processes (API server, engine core, workers) on its "
                "planned cores, not only its OpenMP threads"})
    spare_engines: int | None = field(default=None, metadata={
        "help": "CPU: interpreters kept with vLLM's API server imported, so that an engine start "
                "skips that import (~7 s each here, ~700 MB of memory each); unset = one per "
                "core + 1, at most 3; 0 = none (GPUs: always none)"})
    engine_nice: int | None = field(default=None, metadata={
        "help": "niceness added to engine processes; unset = 5 on CPU (engines share the cores "
                "with the gateway, whose API must stay responsive), 0 on GPUs"})

    def effective_engine_nice(self, kind: str) -> int:
        if self.engine_nice is not None:
            return self.engine_nice
        return DEFAULT_CPU_ENGINE_NICE if kind == "cpu" else 0

    def effective_spare_engines(self, kind: str, n_devices: int) -> int:
        if kind != "cpu":
            return 0
        if self.spare_engines is not None:
            return self.spare_engines
        # one per device for a first stage that starts an engine on each, and one more for the
        # next start (its replacement imports on idle CPU only, so it may not be ready in time)
        return min(3, n_devices + 1)

    def validate(self, where: str) -> None:
        if self.spare_engines is not None and not 0 <= self.spare_engines <= 64:
            raise ConfigError(f"{where}.spare_engines: an integer in [0, 64]")
        if self.engine_nice is not None and not 0 <= self.engine_nice <= 19:
            raise ConfigError(f"{where}.engine_nice: an integer in [0, 19]")
        if self.max_threads_per_rank < 0:
            raise ConfigError(f"{where}.max_threads_per_rank: must be >= 0 (0 = every core)")
        if self.start_contention is not None and not 0 <= self.start_contention < 100:
            raise ConfigError(f"{where}.start_contention: must be a number in [0, 100), "
                              f"got {self.start_contention!r}")
        if self.kind not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"{where}.kind: one of auto, cpu, cuda; got {self.kind!r}")
        if any(i < 0 for i in self.ids) or len(set(self.ids)) != len(self.ids):
            raise ConfigError(f"{where}.ids: distinct non-negative integers")
        seen: set[int] = set()
        for g in self.topology_groups:
            if seen & set(g):
                raise ConfigError(f"{where}.topology_groups: a device appears in two groups")
            seen |= set(g)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"{where}.gpu_memory_utilization: must be in (0, 1]")
        if self.cpu_kvcache_gib <= 0:
            raise ConfigError(f"{where}.cpu_kvcache_gib: must be positive")


@dataclass(frozen=True)
class AuthConfig:
    api_keys: list[str] = field(default_factory=list, metadata={"help": "[] = no auth (loopback only)"})

    def validate(self, where: str) -> None:
        if any(not isinstance(k, str) or len(k) < 8 for k in self.api_keys):
            raise ConfigError(f"{where}.api_keys: each key must be a string of at least 8 characters")


@dataclass(frozen=True)
class LimitsConfig:
    max_file_bytes: int = 200 * 1024 * 1024
    max_requests_per_batch: int = 50_000
    completion_windows: list[str] = field(default_factory=lambda: ["24h"])
    max_retries: int = field(default=2, metadata={"help": "re-runs of a request after engine death"})
    # Fixed, not derived from max_model_len: text at a 1M-token context is ~4-8 MB of JSON, but
    # base64 image parts carry no countable tokens and are what makes lines big; 16 MiB holds several
    # while bounding what validating one line holds to the 8 MiB read block plus this.
    max_line_bytes: int = field(default=16 * 1024 * 1024, metadata={
        "help": "longest input line; a longer one is a `line_too_long` error, never read whole"})

    def validate(self, where: str) -> None:
        if self.max_file_bytes <= 0 or self.max_requests_per_batch <= 0:
            raise ConfigError(f"{where}: limits must be positive")
        if self.max_line_bytes <= 0:
            raise ConfigError(f"{where}.max_line_bytes: must be positive, got "
                              f"{self.max_line_bytes}")
        for w in self.completion_windows:
            if not (isinstance(w, str) and w[:-1].isdigit() and w[-1] in "hm"):
                raise ConfigError(f"{where}.completion_windows: {w!r} is not like '24h' or '30m'")


@dataclass(frozen=True)
class SchedulerConfig:
    strategy: str = field(default="samullm", metadata={"help": "samullm | sequential | even-split"})
    top_k: int = 20
    samples: int = field(default=8, metadata={"help": "output-length draws per estimate"})
    seed: int = 0

    def validate(self, where: str) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"{where}.strategy: one of {', '.join(STRATEGIES)}; got {self.strategy!r}")


STRATEGIES = ("samullm", "sequential", "even-split", "per-model-best", "muxserve-greedy")


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    models: list[ModelConfig] = field(default_factory=list)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    base_dir: Path = field(default=Path("."), metadata={"help": "relative paths resolve from here"})

    def validate(self) -> None:
        self.server.validate("server")
        self.devices.validate("devices")
        self.auth.validate("auth")
        self.limits.validate("limits")
        self.scheduler.validate("scheduler")
        names: set[str] = set()
        for i, m in enumerate(self.models):
            m.validate(f"models[{i}]")
            if m.name in names:
                raise ConfigError(f"models[{i}].name: duplicate model name {m.name!r}")
            names.add(m.name)

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)

    @property
    def state_dir(self) -> Path:
        p = Path(self.server.state_dir)
        return p if p.is_absolute() else self.base_dir / p


def _build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a TOML table, checking keys and types; errors name the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.name != "base_dir"}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in data
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        raise ConfigError(f"{where}.{missing[0] if missing else ''}: required key missing") from exc


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if isinstance(value, bool) and tp is not bool or not isinstance(value, tp):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


def parse_config(data: dict[str, Any], base_dir: Path = Path(".")) -> Config:
    """Build and validate a Config from an already-parsed TOML document."""
    cfg = _build(Config, data, "config")
    cfg = dataclasses.replace(cfg, base_dir=base_dir)
    cfg.validate()
    return cfg


def load_config(path: str | Path) -> Config:
    """Load `path` (TOML). Relative paths inside resolve from the current directory, like the CLI."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse_config(data, base_dir=Path("."))
