"""The scheduler's shared vocabulary: models, requests, devices, execution plans, stages.

Pure data, no I/O. The runtime builds these from the config and the observed state; the simulator
(`scheduler.simulator`), the latency model (`scheduler.latency`) and the planner (`scheduler.planner`)
consume them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BLOCK_SIZE = 16  # vLLM's default KV block size (tokens per block)


@dataclass(frozen=True)
class ModelSpec:
    """One model as the planner sees it: public architecture facts plus its engine limits."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    dtype_bytes: int = 2
    max_model_len: int = 4096
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    num_experts: int = 1  # MoE: experts per layer (1 = dense)
    experts_per_token: int = 1
    # its engines run with vLLM's automatic prefix caching (`EngineLimits.prefix_caching`)
    prefix_caching: bool = False
    # tokens per KV block of its engines: vLLM's 16 on GPUs, 128 on its CPU backend
    block_size: int = BLOCK_SIZE

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def param_count(self) -> int:
        """Weights (embeddings + LM head untied + attention + gated MLP per expert)."""
        h, kv = self.hidden_size, self.kv_dim
        attn = h * h * 2 + h * kv * 2  # q, o, k, v
        mlp = 3 * h * self.intermediate_size * self.num_experts
        return self.num_layers * (attn + mlp) + 2 * self.vocab_size * h

    @property
    def active_param_count(self) -> int:
        """Weights touched per token (MoE activates `experts_per_token` experts)."""
        h, kv = self.hidden_size, self.kv_dim
        attn = h * h * 2 + h * kv * 2
        mlp = 3 * h * self.intermediate_size * self.experts_per_token
        return self.num_layers * (attn + mlp) + 2 * self.vocab_size * h

    @property
    def weight_bytes(self) -> int:
        return self.param_count * self.dtype_bytes

    @property
    def flops_per_token(self) -> float:
        """Dense linear-layer FLOPs of one token (2 per active weight): the planner's unit of work."""
        return 2.0 * self.active_param_count

    def kv_bytes_per_token(self, tp: int = 1) -> int:
        """KV bytes one token occupies on one TP rank; KV heads are replicated when tp > kv heads."""
        heads = max(1, self.num_kv_heads // tp)
        return 2 * self.num_layers * heads * self.head_dim * self.dtype_bytes

    def valid_tp(self, tp: int) -> bool:
        return tp >= 1 and self.num_heads % tp == 0 and (
            self.num_kv_heads % tp == 0 or tp % self.num_kv_heads == 0
        )


@dataclass
class SimRequest:
    """A request as the simulator sees it. `output_len` is the total output target (sampled or known);
    `generated` tokens already exist (a restarted engine re-prefills prompt + generated).

    Dependent requests (a DAG across models, `scheduler.dag`): `upstream` names the requests, as
    (model, rid) of the same planning problem's work, whose outputs this one's prompt includes; it
    is not admitted before the last of them finished. `prompt_len` then holds only its own tokens
    (template and the outputs of upstream requests that already finished): the planner adds each
    listed request's `output_len` (`scheduler.dag.resolve_prompts`); ids not in the work are
    finished and ignored. `arrival_s`: the earliest admission, in seconds from the simulation's
    start (the simulator's clock; `PlanningProblem`: from now).

    `prefix`: content hashes of the prompt's leading full KV blocks (`BLOCK_SIZE` tokens each) that
    it may share with other requests, a chain as vLLM hashes them (equal hashes at position k mean
    equal tokens in blocks 0..k); it may stop before the prompt's last full block (the gateway keeps
    only the blocks some other request shares). The simulator replays vLLM's prefix cache with it
    when `EngineLimits.prefix_caching` is on. Equal prefixes are usually one shared (interned)
    tuple: pass it on, never copy it per request."""

    rid: int
    prompt_len: int
    output_len: int
    generated: int = 0
    arrival_s: float = 0.0
    upstream: tuple[tuple[str, int], ...] = ()
    prefix: tuple[int, ...] = ()

    @property
    def remaining(self) -> int:
        return max(0, self.output_len - self.generated)


# Start contention β (see `DevicePool.start_factor`) when the config names none.
# CPU: measured on this 2-core machine with `bench/start_contention.py` (the `small` test model,
# enforce_eager, one core per engine; 2026-11-22 03:13-03:30 UTC, other engineers' work running):
# five repeats of "alone, then two at once" gave β = 0.42 (alone 50.7 s, pair 72.6 + 71.1 s, load
# average 3.1), −0.01 (44.7; 44.3 + 44.3; load 2.6), 0.03, 0.03 (43.7; 47.3 + 42.2; load 1.9-2.6)
# and 0.08 (50.2; 56.3 + 52.3; load 1.6): mean 0.11, median 0.03. Contention is small on a quiet
# machine and large on a busy one (the makespan bench's starts, 58 and 62 s against ~49 s alone,
# imply 0.22). We take the mean, 0.1: an engine alone already spreads its API server and engine-core
# processes over both cores, so two starting together share them.
CPU_START_CONTENTION = 0.1
# GPU: an assumption, not a measurement (no GPU here). Weights load onto each GPU's own memory and
# CUDA init is per device; what engines share is the host (disk, Python imports, host RAM), so
# concurrent GPU starts overlap well.
GPU_START_CONTENTION = 0.1


def default_start_contention(kind: str) -> float:
    """β for a pool kind when the config does not set `[devices] start_contention`."""
    return CPU_START_CONTENTION if kind == "cpu" else GPU_START_CONTENTION


@dataclass(frozen=True)
class DevicePool:
    """The devices a plan may use. On CPU a device is a core; on GPUs a GPU.

    `start_contention` (β): n engines started at the same time each take `load × (1 + β·(n−1))`
    (`start_factor`); 0 = starts never slow each other (the planner's behaviour before β existed).
    The runtime sets it from `[devices] start_contention` or `default_start_contention(kind)`."""

    kind: str  # "cpu" | "cuda" | a named GPU kind ("a100", "h100")
    ids: tuple[int, ...]
    memory_bytes: int  # per device (GPU memory; on CPU the KV space given to one engine)
    groups: tuple[tuple[int, ...], ...] = ()  # fully connected groups; empty = one group of all
    start_contention: float = 0.0
    # CPU: most cores one TP rank may use (OpenMP threads, `VLLM_CPU_OMP_THREADS_BIND=0-1`);
    # 1 = one core per rank (the only shape before threads existed). Always 1 on GPUs.
    max_threads: int = 1

    @property
    def count(self) -> int:
        return len(self.ids)

    def start_factor(self, starting: int) -> float:
        """How much longer each of `starting` engines started together takes than one alone."""
        return 1.0 + self.start_contention * max(0, starting - 1)

    def topology_groups(self) -> tuple[tuple[int, ...], ...]:
        return self.groups or (tuple(self.ids),)

    @property
    def signature(self) -> str:
        """Key for latency profiles: the device kind (profiles are per device kind, not per id)."""
        return self.kind


@dataclass(frozen=True)
class ExecPlan:
    """How one model runs in a stage: TP degree × DP replicas on concrete devices, each TP rank on
    `threads` devices (CPU cores running the rank's OpenMP threads; 1 on GPUs).
    `devices` holds tp*threads*dp ids, replica r on devices[r*w:(r+1)*w] with w = tp*threads,
    rank k of a replica on its cores [k*threads:(k+1)*threads]."""

    model: str
    tp: int
    dp: int
    devices: tuple[int, ...] = ()
    threads: int = 1

    @property
    def width(self) -> int:
        """Devices of one replica."""
        return self.tp * self.threads

    @property
    def num_devices(self) -> int:
        return self.width * self.dp

    def replicas(self) -> list[tuple[int, ...]]:
        w = self.width
        return [self.devices[r * w:(r + 1) * w] for r in range(self.dp)]

    def same_shape(self, other: "ExecPlan | None") -> bool:
        return other is not None and (self.model, self.tp, self.dp, self.devices, self.threads) == (
            other.model, other.tp, other.dp, other.devices, other.threads)

    def within(self, other: "ExecPlan | None") -> bool:
        """Every replica of this plan is one of `other`'s (same model, TP and threads): the runtime
        keeps (or wakes) an engine per replica (`runtime.executor.slots`), so fewer replicas of a
        running plan start nothing."""
        return other is not None and (self.model, self.tp, self.threads) == (
            other.model, other.tp, other.threads) and set(self.replicas()) <= set(other.replicas())

    def fits_in(self, tp: int, dp: int, threads: int) -> bool:
        """Whether a shape (tp, dp, threads) can run on some of this plan's replicas."""
        return (self.tp, self.threads) == (tp, threads) and dp <= self.dp


@dataclass
class Stage:
    """Models running concurrently on disjoint devices. A stage ends when its first model finishes
    (with dependent requests, a model that still waits for work outside the stage never ends it)."""

    plans: list[ExecPlan]
    start_s: float
    end_s: float
    finished: list[str] = field(default_factory=list)  # models that finish at end_s
    # predicted finish time of each model if it ran alone on this plan (for Gantt and diagnostics;
    # with dependent requests: of its last request run in this stage)
    predicted_finish_s: dict[str, float] = field(default_factory=dict)
    restarts: list[str] = field(default_factory=list)  # models (re)started at start_s
    # dependent requests (`scheduler.dag`): model -> the other models whose outputs some of its
    # requests wait for during this stage (pending when it starts), sorted. An upstream model in
    # `plans` feeds it as its requests finish (pipelined: it starts on the first released ones);
    # one that is not holds those requests back to a later stage (it works on released ones only).
    # Empty without dependencies.
    waits_on: dict[str, list[str]] = field(default_factory=dict)
    # `level-by-level` only: the topological level whose requests this stage serves (level = 1 +
    # the highest level of a request's upstream requests, 0 without). A level's requests are
    # released when the previous level's last stage ended, with every engine stopped (as a user
    # uploading each level as its own batch would see it); `finished` then names the models done
    # with this level's requests. None: the stage serves every released request.
    level: int | None = None


@dataclass
class Schedule:
    """A complete plan: stages in order; `makespan_s` is the predicted end of the last stage."""

    strategy: str
    stages: list[Stage]
    makespan_s: float
    planning_time_s: float = 0.0
    # where the stages came from: "search" or "baseline:<name>" (samullm keeps a baseline's schedule
    # when the cost model predicts it faster); "" for the baselines themselves
    origin: str = ""
