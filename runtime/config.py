"""Typed configuration: TOML in `conf/`, parsed with `tomllib` into frozen dataclasses.

Every section is validated on construction; errors name the offending key (`models[1].max_num_seqs`)
so a user can fix the file without reading this module. Loading has no side effects.

Long: one dataclass per config table with help text on every field; splitting the tables apart
would scatter one schema. The annotated config printed from that help is `runtime.config_help`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from runtime.endpoints import GENERATING, endpoints_error, served_endpoints
from scheduler.planner import STRATEGIES

# whose request a model's engines take next (`runtime.executor.queues`)
FAIRNESS = ("fair", "fifo")
# what the gateway does with idle devices (`runtime.executor.autoprofile`)
AUTO_PROFILE = ("off", "idle")
# the batch events a [[webhooks]] endpoint may take (OpenAI's names)
WEBHOOK_EVENTS = ("batch.completed", "batch.failed", "batch.cancelled", "batch.expired")


class ConfigError(ValueError):
    """A configuration file is missing, unparsable or invalid. The message names the key."""


def check_choice(where: str, key: str, value: object, choices: tuple[str, ...]) -> None:
    """ConfigError naming `where.key` unless `value` is one of `choices`."""
    if value not in choices:
        raise ConfigError(f"{where}.{key}: one of {', '.join(choices)}; got {value!r}")


@dataclass(frozen=True)
class ServerConfig:
    host: str = field(default="127.0.0.1", metadata={
        "help": "address the API binds; anything but loopback needs [auth] api_keys "
                "(`serve --host` overrides)"})
    port: int = field(default=8000, metadata={"help": "TCP port of the API (`serve --port` overrides)"})
    state_dir: str = field(default=".samullm", metadata={
        "help": "directory of the SQLite database, stored files, journals, engine logs and measured "
                "profiles, relative to the current directory; one gateway at a time may use it "
                "(`serve --state-dir` overrides)"})
    log_json: bool = field(default=False, metadata={
        "help": "log one JSON object per line instead of plain text"})

    def validate(self, where: str) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"{where}.port: must be in 1..65535, got {self.port}")


@dataclass(frozen=True)
class ArchConfig:
    """Architecture facts of a model (public numbers); read from config.json when a path is given."""

    num_layers: int = field(metadata={"help": "transformer layers (HF num_hidden_layers)",
                                      "example": 2})
    hidden_size: int = field(metadata={"help": "model width (HF hidden_size)", "example": 128})
    num_heads: int = field(metadata={
        "help": "attention heads (HF num_attention_heads); must divide hidden_size", "example": 2})
    num_kv_heads: int = field(metadata={
        "help": "KV heads (HF num_key_value_heads; = num_heads without GQA); must divide num_heads",
        "example": 1})
    intermediate_size: int = field(metadata={
        "help": "inner width of the gated MLP (HF intermediate_size)", "example": 512})
    vocab_size: int = field(metadata={"help": "vocabulary size (HF vocab_size)", "example": 2048})
    num_experts: int = field(default=1, metadata={
        "help": "MoE experts per layer (HF num_local_experts); 1 = dense"})
    experts_per_token: int = field(default=1, metadata={
        "help": "MoE experts each token runs through (HF num_experts_per_tok)"})

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

    layers: int = field(default=2, metadata={"help": "transformer layers (`tiny-model --layers`)"})
    hidden: int = field(default=128, metadata={
        "help": "model width; hidden / heads must be an integer >= 32 (`tiny-model --hidden`)"})
    heads: int = field(default=2, metadata={"help": "attention heads (`tiny-model --heads`)"})
    kv_heads: int = field(default=1, metadata={
        "help": "KV heads; must divide heads (`tiny-model --kv-heads`)"})
    seed: int = field(default=0, metadata={"help": "seed of the random weights (`tiny-model --seed`)"})

    def validate(self, where: str) -> None:
        if self.hidden % self.heads or self.hidden // self.heads < 32:
            raise ConfigError(f"{where}: hidden/heads must be an integer >= 32 (vLLM CPU attention)")
        if self.heads % self.kv_heads:
            raise ConfigError(f"{where}.kv_heads: must divide heads")


@dataclass(frozen=True)
class ModelConfig:
    name: str = field(metadata={"help": "the name requests use in body.model", "example": "tiny"})
    path: str | None = field(default=None, metadata={
        "help": "HF-format model directory (config.json, weights, tokenizer), relative to the "
                "current directory; unset = a plan-only model: `samullm plan` plans it from `arch`, "
                "and `serve` fails its requests",
        "example": ".samullm/models/tiny"})
    dtype: str = field(default="float32", metadata={
        "help": "vLLM --dtype: float32 | float16 | bfloat16 | auto; float32 on CPU (bfloat16 SIGILLs "
                "here); the planner counts 4 bytes per weight for float32, else 2"})
    max_model_len: int = field(default=2048, metadata={
        "help": "vLLM --max-model-len: most tokens (prompt + output) of one request; a request "
                "without max_tokens is planned to run up to it"})
    max_num_seqs: int = field(default=64, metadata={
        "help": "vLLM --max-num-seqs: most requests one engine runs at once; the gateway keeps 1.5 x "
                "as many in flight per engine"})
    max_num_batched_tokens: int = field(default=2048, metadata={
        "help": "vLLM --max-num-batched-tokens: most tokens one engine iteration schedules"})
    engine_args: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "extra vLLM api_server flags, e.g. { enforce_eager = true } (key = flag with _ for -; "
                "true = --flag, false = --no-flag); they override the flags samullm sets"})
    arch: ArchConfig | None = field(default=None, metadata={
        "help": "architecture numbers; required when `path` is unset, and used instead of "
                "<path>/config.json when set"})
    demo: DemoConfig | None = field(default=None, metadata={
        "help": "`serve --make-demo-models` writes a random-weight model at `path` with these sizes "
                "when it is missing; unset = never"})
    endpoints: list[str] = field(default_factory=list, metadata={
        "help": "the batch endpoints it serves (GET /v1/models lists them; a line for another "
                "fails as unsupported_endpoint); [] = from engine_args (vLLM's --runner, "
                "--convert): runner = \"pooling\" or convert = \"embed\" serves /v1/embeddings "
                "only, else /v1/chat/completions, /v1/completions, /v1/responses. Declare "
                "[\"/v1/embeddings\"] for a model vLLM pools by its architecture (BERT-like, "
                "sentence-transformers)"})

    def validate(self, where: str) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ConfigError(f"{where}.name: must be a non-empty string")
        check_choice(where, "dtype", self.dtype, ("float32", "float16", "bfloat16", "auto"))
        for key in ("max_model_len", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where}.{key}: must be positive")
        if self.path is None and self.arch is None:
            raise ConfigError(f"{where}: needs `path` (weights) or `arch` (plan-only model)")
        if self.arch is not None:
            self.arch.validate(f"{where}.arch")
        if self.demo is not None:
            self.demo.validate(f"{where}.demo")
        if (wrong := endpoints_error(self.engine_args, self.endpoints)) is not None:
            raise ConfigError(f"{where}.{wrong[0]}: {wrong[1]}")

    @functools.cached_property  # validation asks once a line
    def served_endpoints(self) -> tuple[str, ...]:
        """The batch endpoints its engines serve (`runtime.endpoints`)."""
        return served_endpoints(self.engine_args, self.endpoints)

    @property
    def generates(self) -> bool:
        """Whether its engines generate text (what the profiler measures) rather than pool."""
        return any(e in GENERATING for e in self.served_endpoints)

    @property
    def dtype_bytes(self) -> int:
        return 4 if self.dtype == "float32" else 2

    def kv_block_size(self, device_kind: str) -> int:
        """Tokens per KV block of its engines: engine_args' `block_size`, else vLLM's default for
        the device kind (128 on its CPU backend, `vllm/platforms/cpu.py`; 16 on GPUs)."""
        size = self.engine_args.get("block_size")
        if isinstance(size, int) and size > 0:
            return size
        return 128 if device_kind == "cpu" else 16

    @property
    def prefix_caching(self) -> bool:
        """Whether its engines cache prompt prefixes: vLLM's default, unless engine_args say
        `enable_prefix_caching = false`."""
        return bool(self.engine_args.get("enable_prefix_caching", True))

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
    kind: str = field(default="auto", metadata={
        "help": "auto | cpu | cuda; auto = cuda when NVML finds a GPU, else cpu (a device is then "
                "a core)"})
    ids: list[int] = field(default_factory=list, metadata={
        "help": "the core or GPU ids plans may use; [] = every core this process may run on / "
                "every GPU found"})
    topology_groups: list[list[int]] = field(default_factory=list, metadata={
        "help": "fully connected device groups, e.g. [[0, 1], [2, 3]] for GPUs NVLinked in pairs; "
                "a TP group never spans two; [] = NVLink groups detected on GPUs, none on CPU"})
    memory_gib: float = field(default=0.0, metadata={
        "help": "memory of one device the planner assumes, in GiB; 0 = detect (GPU: the smallest "
                "chosen GPU's, by NVML; CPU: cpu_kvcache_gib)"})
    cpu_kvcache_gib: float = field(default=1.0, metadata={
        "help": "CPU: KV cache space of each engine rank, in GiB, passed to vLLM exactly as "
                "--kv-cache-memory-bytes (VLLM_CPU_KVCACHE_SPACE is removed from the engine's "
                "environment: it takes whole GiB only and would override the flag)"})
    gpu_memory_utilization: float = field(default=0.9, metadata={
        "help": "GPU: vLLM --gpu-memory-utilization, the fraction in (0, 1] of a GPU's memory an "
                "engine may use for weights and KV cache"})
    sleep_mode: bool = field(default=False, metadata={
        "help": "GPU only: put an engine whose model has work for a later stage to sleep (level "
                "1) instead of stopping it; needs engine_args { enable_sleep_mode = true } and "
                "VLLM_SERVER_DEV_MODE=1; an engine that cannot sleep is stopped"})
    cpu_sleep_gib: float | None = field(default=None, metadata={
        "help": "CPU: host memory that sleeping engines may hold in all, in GiB. An engine whose "
                "cores a new stage takes sleeps frozen (SIGSTOP: no CPU, its memory kept) instead "
                "of stopping while this allows; a later stage that wants it back wakes it instead "
                "of starting one, a small batch of its model wakes it as a guest beside the "
                "stage's engines, and it stops once its model has had no work for "
                "engine_linger_s; unset = a quarter of the host's memory; 0 = stop them",
        "example": 6.0})
    max_threads_per_rank: int = field(default=0, metadata={
        "help": "CPU: most cores one TP rank may run on (OpenMP threads); 0 = every core, 1 = one"})
    start_contention: float | None = field(default=None, metadata={
        "help": "β in [0, 100): the planner assumes n engines started together each take load "
                "time × (1 + β·(n−1)); 0 = starts never slow each other; unset = the measured CPU "
                "default, or 0.1 on GPUs (scheduler.types)",
        "example": 0.1})
    confine_cpu_engines: bool = field(default=True, metadata={
        "help": "CPU: run all of an engine's processes (API server, engine core, workers) on its "
                "planned cores, not only its OpenMP threads"})
    spare_engines: int | None = field(default=None, metadata={
        "help": "CPU: processes kept with vLLM's API server imported, so that an engine start "
                "skips that import (~7 s here): forks of one zygote that imports once (~640 MB), "
                "~130 MB of memory each; unset = one per core + 1, at most 3; 0 = none (and no "
                "zygote; GPUs: always none)",
        "example": 3})
    engine_linger_s: float = field(default=180.0, metadata={
        "help": "seconds an engine whose model has no work left stays up (warm) for the next "
                "batch of that model, unless a plan needs its devices (freed at once then); "
                "0 = stop it when its work is done"})
    engine_nice: int | None = field(default=None, metadata={
        "help": "niceness added to engine processes; unset = 5 on CPU (engines share the cores "
                "with the gateway, whose API must stay responsive), 0 on GPUs; in [0, 19]",
        "example": 5})

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
        # next start (replacements are forked at once, `runtime.engines.spares`)
        return min(3, n_devices + 1)

    def validate(self, where: str) -> None:
        if self.spare_engines is not None and not 0 <= self.spare_engines <= 64:
            raise ConfigError(f"{where}.spare_engines: an integer in [0, 64]")
        if not 0 <= self.engine_linger_s <= 86400:
            raise ConfigError(f"{where}.engine_linger_s: seconds in [0, 86400]")
        if self.cpu_sleep_gib is not None and not 0 <= self.cpu_sleep_gib <= 1 << 20:
            raise ConfigError(f"{where}.cpu_sleep_gib: GiB in [0, 1048576]")
        if self.engine_nice is not None and not 0 <= self.engine_nice <= 19:
            raise ConfigError(f"{where}.engine_nice: an integer in [0, 19]")
        if self.max_threads_per_rank < 0:
            raise ConfigError(f"{where}.max_threads_per_rank: must be >= 0 (0 = every core)")
        if self.start_contention is not None and not 0 <= self.start_contention < 100:
            raise ConfigError(f"{where}.start_contention: must be a number in [0, 100), "
                              f"got {self.start_contention!r}")
        check_choice(where, "kind", self.kind, ("auto", "cpu", "cuda"))
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
    api_keys: list[str] = field(default_factory=list, metadata={
        "help": "accepted bearer keys, at least 8 characters each; each key sees only its own files "
                "and batches; [] = no auth, and the server refuses to bind a non-loopback host"})

    def validate(self, where: str) -> None:
        if any(not isinstance(k, str) or len(k) < 8 for k in self.api_keys):
            raise ConfigError(f"{where}.api_keys: each key must be a string of at least 8 characters")


@dataclass(frozen=True)
class LimitsConfig:
    max_file_bytes: int = field(default=200 * 1024 * 1024, metadata={
        "help": "largest upload, in bytes (200 MiB); a larger one is refused"})
    max_requests_per_batch: int = field(default=50_000, metadata={
        "help": "most request lines in one batch's input file; more fail it as too_many_tasks"})
    completion_windows: list[str] = field(default_factory=lambda: ["24h"], metadata={
        "help": "the completion_window values a batch may ask for, like '24h' or '30m'; a batch "
                "not done within it expires"})
    max_retries: int = field(default=2, metadata={
        "help": "times a request is re-run after its engine died under it; then it fails as "
                "engine_failed; 0 = never re-run"})
    # Fixed, not derived from max_model_len: text at a 1M-token context is ~4-8 MB of JSON, but
    # base64 image parts carry no countable tokens and are what makes lines big; 16 MiB holds several
    # while bounding what validating one line holds to the 8 MiB read block plus this.
    max_line_bytes: int = field(default=16 * 1024 * 1024, metadata={
        "help": "longest input line, in bytes (16 MiB); a longer one is a `line_too_long` error, "
                "never read whole"})
    max_dependencies: int = field(default=64, metadata={
        "help": "most custom_ids one request line may list in `depends_on` (the requests whose "
                "generated text its {{custom_id}} placeholders take in); more fail it as "
                "too_many_dependencies"})
    max_queued_requests_per_key: int = field(default=0, metadata={
        "help": "most requests one API key (all callers, without [auth].api_keys) may have queued "
                "in batches not yet finished (validating, in_progress, finalizing, cancelling), "
                "the new batch's included; a create over it is refused with 429 "
                "rate_limit_exceeded; 0 = no limit"})

    def validate(self, where: str) -> None:
        if self.max_file_bytes <= 0 or self.max_requests_per_batch <= 0:
            raise ConfigError(f"{where}: limits must be positive")
        if self.max_queued_requests_per_key < 0:
            raise ConfigError(f"{where}.max_queued_requests_per_key: must be 0 (no limit) or "
                              f"positive, got {self.max_queued_requests_per_key}")
        if self.max_line_bytes <= 0:
            raise ConfigError(f"{where}.max_line_bytes: must be positive, got "
                              f"{self.max_line_bytes}")
        if self.max_dependencies < 1:
            raise ConfigError(f"{where}.max_dependencies: must be at least 1, got "
                              f"{self.max_dependencies}")
        for w in self.completion_windows:
            if not (isinstance(w, str) and w[:-1].isdigit() and w[-1] in "hm"):
                raise ConfigError(f"{where}.completion_windows: {w!r} is not like '24h' or '30m'")


@dataclass(frozen=True)
class SchedulerConfig:
    strategy: str = field(default="samullm", metadata={
        "help": f"how batches are planned, one of {' | '.join(STRATEGIES)} (the baselines: "
                f"scheduler.baselines); a batch's metadata.strategy overrides it"})
    top_k: int = field(default=20, metadata={
        "help": "samullm search: partial stage groups kept after each model is added (by "
                "throughput and by estimated makespan, top_k each); larger plans slower"})
    samples: int = field(default=8, metadata={
        "help": "`samullm plan`: output-length draws each strategy's schedule is replayed on for "
                "the makespan's mean and spread (`--samples` overrides)"})
    seed: int = field(default=0, metadata={
        "help": "seed of the output-length draws (plan n of a pool draws with [seed, n])"})
    online_calibration: bool = field(default=True, metadata={
        "help": "correct the latency model (profile, else roofline) per (model, TP, threads, "
                "device kind) by the requests the engines serve: per-token and per-step scales "
                "and a fresh engine's one-off costs, fitted to the served requests' times before "
                "every re-plan (scheduler.online), kept in <state_dir>/calibration.json; "
                "`samullm plan` reads them too"})
    fairness: str = field(default="fair", metadata={
        "help": "whose request a model's engines take next when several batches queue for it: "
                "fair = the batch with the least left, aged by its wait (shortest remaining "
                "first: a small one is not stuck behind a big one, none starves); fifo = the "
                "earliest batch first"})
    batch_slack: float = field(default=0.02, metadata={
        "help": "samullm's second objective, the batches' own completions: of the schedules "
                "the search finds whose predicted makespan is within this share of the "
                "shortest, the one whose pooled batches complete soonest in sum (a small "
                "batch's model run before a big batch's where the pool ends alike); a running "
                "engine is never stopped for it; 0 = the makespan alone decides"})
    calibration_window: int = field(default=512, metadata={
        "help": "served requests kept per (model, TP, threads, device kind) for the online "
                "calibration (of each engine its first quarter and its newest); a fit replays "
                "them (~15 ms per 100, in a thread)"})
    auto_profile: str = field(default="off", metadata={
        "help": "idle = while no batch runs (none validating, queued or in progress, no engine "
                "up), profile one by one the shapes (model, TP, threads) the planner may choose "
                "on these devices that have no profile under <state_dir>/profiles yet: `samullm "
                "profile --quick` at nice 19 on the shape's cores; a batch arriving kills it at "
                "once (nothing saved; retried at the next idle time); each profile is used from "
                "the next plan on. Costs the shape's cores for ~45 s per shape for the demo "
                "models on this 2-core CPU (a quick sweep, an engine start, the served "
                "calibration; longer for bigger models); off = profiles only by hand"})

    def validate(self, where: str) -> None:
        check_choice(where, "auto_profile", self.auto_profile, AUTO_PROFILE)
        check_choice(where, "strategy", self.strategy, STRATEGIES)
        check_choice(where, "fairness", self.fairness, FAIRNESS)
        if not 0 <= self.batch_slack <= 1:
            raise ConfigError(f"{where}.batch_slack: a share in [0, 1]; got {self.batch_slack}")
        if self.calibration_window < 16:
            raise ConfigError(f"{where}.calibration_window: at least 16; got {self.calibration_window}")


# where engines run (`[cluster] backend`): this machine, or the nodes of a Ray cluster
CLUSTER_BACKENDS = ("local", "ray")


@dataclass(frozen=True)
class ClusterConfig:
    backend: str = field(default="local", metadata={
        "help": "local = engines on this machine's cores or GPUs ([devices]); ray = on the nodes "
                "of a Ray cluster (runtime.engines.ray_launcher): each node's cores (or GPUs) "
                "one topology group, a placement group per engine on its planned node; "
                "[devices] ids and topology_groups then do not apply"})
    address: str = field(default="auto", metadata={
        "help": "ray: the cluster to join: auto (the one `ray start` runs on this machine), "
                "host:port of its GCS, ray://host:10001 (Ray Client), or local:N = start an "
                "in-process test cluster of N nodes on this machine's cores (split evenly)"})
    namespace: str = field(default="samullm", metadata={
        "help": "ray: the namespace the gateway's placement groups are named in (each name "
                "starts with samullm-<hash of host and state dir>-, so a restarted gateway "
                "finds and removes what its predecessor left)"})
    node_poll_s: float = field(default=2.0, metadata={
        "help": "ray: seconds between two reads of the cluster's nodes; a node joining or "
                "leaving re-plans (a node lost is an engine death for each engine on it)"})

    def validate(self, where: str) -> None:
        check_choice(where, "backend", self.backend, CLUSTER_BACKENDS)
        a = self.address
        if a.startswith("local:") and not (a[6:].isdigit() and int(a[6:]) >= 1):
            raise ConfigError(f"{where}.address: local:N with N a positive integer; got {a!r}")
        if not a:
            raise ConfigError(f"{where}.address: auto, host:port, ray://host:port or local:N")
        if not 0.1 <= self.node_poll_s <= 3600:
            raise ConfigError(f"{where}.node_poll_s: seconds in [0.1, 3600]")


@dataclass(frozen=True)
class WebhookConfig:
    url: str = field(metadata={
        "help": "where the events are POSTed (http:// or https://)",
        "example": "http://127.0.0.1:9000/webhooks"})
    secret: str = field(metadata={
        "help": "the signing key as OpenAI gives it: whsec_ + base64 of the key bytes (make one: "
                "python -c \"import base64,os; print('whsec_' + base64.b64encode(os.urandom(32))"
                ".decode())\"); receivers verify with the openai SDK's client.webhooks.unwrap(body, "
                "headers, secret=...)",
        "example": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"})
    events: list[str] = field(default_factory=lambda: list(WEBHOOK_EVENTS), metadata={
        "help": f"the events sent to this url, of {', '.join(WEBHOOK_EVENTS)}"})
    timeout_s: float = field(default=10.0, metadata={
        "help": "seconds one delivery attempt may take; a slower answer is a failed attempt"})
    retry_first_s: float = field(default=5.0, metadata={
        "help": "seconds before the first retry of a failed delivery (no 2xx answer); each "
                "further wait doubles, up to retry_max_s"})
    retry_max_s: float = field(default=3600.0, metadata={
        "help": "longest wait between two attempts, in seconds"})
    retry_for_s: float = field(default=86400.0, metadata={
        "help": "seconds after its status change an event is retried for (24 h; OpenAI: 72 h); "
                "then it is given up and logged. A restarted gateway retries pending events at "
                "once"})

    def validate(self, where: str) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{where}.url: an http:// or https:// URL, got {self.url!r}")
        try:
            key = base64.b64decode(self.secret.removeprefix("whsec_"), validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if not self.secret.startswith("whsec_") or not key:
            raise ConfigError(f"{where}.secret: whsec_ followed by the base64 of the key bytes")
        if not self.events or any(e not in WEBHOOK_EVENTS for e in self.events):
            raise ConfigError(f"{where}.events: a non-empty list of {', '.join(WEBHOOK_EVENTS)}; "
                              f"got {self.events!r}")
        for key_name in ("timeout_s", "retry_first_s", "retry_max_s", "retry_for_s"):
            if not getattr(self, key_name) > 0:
                raise ConfigError(f"{where}.{key_name}: must be positive")
        if self.retry_max_s < self.retry_first_s:
            raise ConfigError(f"{where}.retry_max_s: must be at least retry_first_s")


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig, metadata={
        "help": "the HTTP API and the state it keeps"})
    models: list[ModelConfig] = field(default_factory=list, metadata={
        "help": "the models batches may address, one [[models]] table each; [] = none"})
    devices: DevicesConfig = field(default_factory=DevicesConfig, metadata={
        "help": "the cores or GPUs engines run on"})
    auth: AuthConfig = field(default_factory=AuthConfig, metadata={"help": "who may call the API"})
    limits: LimitsConfig = field(default_factory=LimitsConfig, metadata={
        "help": "bounds on uploads, batches and retries"})
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig, metadata={
        "help": "how the pooled batches are planned"})
    cluster: ClusterConfig = field(default_factory=ClusterConfig, metadata={
        "help": "where engines run: this machine, or the nodes of a Ray cluster"})
    webhooks: list[WebhookConfig] = field(default_factory=list, metadata={
        "help": "endpoints told when a batch ends (batch.completed, .failed, .cancelled, .expired), "
                "signed as OpenAI signs its webhooks (Standard Webhooks), one [[webhooks]] table "
                "each; [] = none"})
    base_dir: Path = field(default=Path("."), metadata={
        "help": "not a TOML key: the directory relative paths (`state_dir`, a model's `path`) "
                "resolve from; the current directory when loaded from a file"})

    def validate(self) -> None:
        self.server.validate("server")
        self.devices.validate("devices")
        self.auth.validate("auth")
        self.limits.validate("limits")
        self.scheduler.validate("scheduler")
        self.cluster.validate("cluster")
        if self.cluster.backend == "ray" and (self.devices.ids or self.devices.topology_groups):
            raise ConfigError("devices.ids / devices.topology_groups: not with [cluster] backend "
                              "= \"ray\" (the cluster's nodes are the devices and their groups)")
        _validate_entries(self.models, "models", "name", "model name")
        _validate_entries(self.webhooks, "webhooks", "url", "webhook url")

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)

    @property
    def state_dir(self) -> Path:
        p = Path(self.server.state_dir)
        return p if p.is_absolute() else self.base_dir / p


def _validate_entries(entries: list[Any], table: str, key: str, what: str) -> None:
    """Validate each entry of an array of tables, whose `key` must differ from entry to entry."""
    seen: set[Any] = set()
    for i, entry in enumerate(entries):
        entry.validate(f"{table}[{i}]")
        value = getattr(entry, key)
        if value in seen:
            raise ConfigError(f"{table}[{i}].{key}: duplicate {what} {value!r}")
        seen.add(value)


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
