"""A test-double launcher: engines that answer chat completions after a short delay, can be killed,
can fail to start, and check the invariants a real node enforces (one engine per device at a time).

With `step_s` for a model, its engines serve like a (very regular) vLLM engine instead: at most
`max_num_seqs` requests run at once, the others wait their turn (the best `priority` first, then
in order, as vLLM's priority policy admits them), each running request takes `step_s` per output
token (a decode step whose cost does not depend on the batch), and a request whose connection is
closed (its task cancelled) is aborted: it leaves its seat or its place in the queue."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any

from runtime.engines.engine import EngineDied, EngineError, EngineSpec


class FakeEngine:
    def __init__(self, spec: EngineSpec, launcher: "FakeLauncher", pid: int) -> None:
        self.spec = spec
        self.launcher = launcher
        self.pid = pid
        self.base_url = f"fake://{pid}"
        self.start_time_s = launcher.start_delay_s
        self.spare_used = False
        self.inflight = 0
        self.max_inflight = 0
        self.served = 0
        self.stopped = False
        self.asleep = False
        self.frozen = False  # CPU sleep: its processes stopped (SIGSTOP), its memory kept
        self.cores = tuple(spec.devices)  # where its threads run (`Engine.pin`)
        self.seats = max(1, spec.model.max_num_seqs)  # step_s mode: free seats, and who waits
        self.waiting: list[tuple[int, int, asyncio.Future]] = []
        self._order = itertools.count()
        self.aborted = 0  # requests whose connection closed before their answer
        self.reaped = False  # stop() completed: the whole process group is gone (kill() is not enough)
        self._exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def alive(self) -> bool:
        return not self._exit.done()

    # CPU sleep (`Engine.freeze`): only when the launcher is `freezable` (a Ray engine is not)
    @property
    def freezable(self) -> bool:
        return self.launcher.freezable

    def memory_bytes(self) -> int:
        return self.launcher.memory_bytes

    def freeze(self) -> bool:
        if not self.alive():
            return False
        self.frozen = True
        self.launcher.freezes.append(self.spec.model.name)
        return True

    def pin(self, cores: tuple[int, ...]) -> None:
        self.cores = tuple(cores)

    def thaw(self) -> bool:
        self.frozen = False
        return self.alive()

    def kill(self, code: int = -9) -> None:
        """The process dies (as if SIGKILLed or OOM-killed)."""
        if not self._exit.done():
            self._exit.set_result(code)

    async def stop(self, timeout_s: float = 30) -> None:
        # like Engine.stop: idempotent from its first line, so a stop cut short leaves an orphan
        if self.stopped:
            return
        self.stopped = True
        await asyncio.sleep(self.launcher.stop_delays.get(self.spec.model.name,
                                                          self.launcher.stop_delay_s))
        self.kill(0)
        self.reaped = True

    async def wait_exit(self) -> int:
        return await asyncio.shield(self._exit)

    async def _serve(self, tokens: int, priority: int) -> None:
        name = self.spec.model.name
        step = self.launcher.step_s.get(name)
        if step is None:
            await asyncio.sleep(self.launcher.delay_s.get(name, 0.01))
            return
        await self._admit(priority)
        try:
            await asyncio.sleep(step * tokens)
        finally:
            self._leave()

    async def _admit(self, priority: int) -> None:
        if self.seats > 0 and not self.waiting:
            self.seats -= 1
            return
        turn = asyncio.get_running_loop().create_future()
        heapq.heappush(self.waiting, (priority, next(self._order), turn))
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # admitted as it was aborted: leave the seat
                self._leave()
            raise

    def _leave(self) -> None:
        """A running request is done or aborted: its seat goes to the best waiting one."""
        while self.waiting:
            _, _, turn = heapq.heappop(self.waiting)
            if not turn.done():  # (an aborted waiting request's turn is cancelled)
                turn.set_result(None)
                return
        self.seats += 1

    async def post(self, url: str, body: dict) -> tuple[int, dict]:
        if not self.alive():
            raise EngineDied(f"engine {self.pid} is gone")
        if self.frozen:  # a real one would not answer until thawed
            self.launcher.overlaps.append(f"request sent to frozen {self.spec.model.name}")
        self.launcher.posts.append((self.spec.model.name, body.get("custom_tag") or url))
        if url in ("/sleep?level=1", "/wake_up"):  # vLLM's sleep-mode endpoints (dev mode)
            self.asleep = url != "/wake_up"
            return 200, {}
        if body.get("model") != self.spec.model.name:
            return 404, {"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                   "type": "NotFoundError", "param": None, "code": 404}}
        if "messages" not in body:
            return 400, {"error": {"message": "messages: field required", "type": "BadRequestError",
                                   "param": None, "code": 400}}
        if body.get("fail_with") == 500:  # a live engine failing one request
            return 500, {"error": {"message": "boom", "type": "InternalServerError", "code": 500}}
        if body.get("fail_with") in ("drop_live", "drop_live_once"):  # the server lives on
            tag = body.get("custom_tag")
            if body["fail_with"] == "drop_live" or tag not in self.launcher.dropped:
                self.launcher.dropped.add(tag)
                raise ConnectionResetError("Server disconnected")
        if body.get("fail_with") == "drop":  # the server drops the connection, then exits
            asyncio.get_running_loop().call_later(0.05, self.kill, -9)
            raise ConnectionResetError("Server disconnected")
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            if self.launcher.die_on_post.get(self.spec.model.name):
                self.kill(-9)
            sleep = asyncio.ensure_future(self._serve(min(int(body.get("max_tokens", 16)),
                                                          self.launcher.output_tokens),
                                                      int(body.get("priority", 0))))
            try:
                done, _ = await asyncio.wait({sleep, self._exit},
                                             return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:  # the connection closed: vLLM aborts the request
                sleep.cancel()
                self.aborted += 1
                raise
            if sleep not in done:
                sleep.cancel()
                raise EngineDied(f"engine {self.pid} died with code {self._exit.result()}")
        finally:
            self.inflight -= 1
        self.served += 1
        cap = int(body.get("max_tokens", 16))
        n = min(cap, self.launcher.output_tokens)
        self.launcher.bodies.append(body)
        content = "x " * n
        if self.launcher.echo:  # the answer names its model and repeats the prompt it was sent
            content = f"<{self.spec.model.name}: {body['messages'][-1]['content']}>"
        return 200, {
            "id": f"chatcmpl-{self.pid}-{self.served}", "object": "chat.completion",
            "model": self.spec.model.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "length" if n == cap else "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n},
        }


@dataclass
class FakeLauncher:
    start_delay_s: float = 0.02
    delay_s: dict[str, float] = field(default_factory=dict)  # per-request service time per model
    step_s: dict[str, float] = field(default_factory=dict)  # per model: seconds per output token
    stop_delay_s: float = 0.0
    stop_delays: dict[str, float] = field(default_factory=dict)  # per model, else stop_delay_s
    output_tokens: int = 8
    fail_start: set[str] = field(default_factory=set)  # models whose engines fail to start
    die_on_post: dict[str, bool] = field(default_factory=dict)  # models whose engines die when used
    engines: list[FakeEngine] = field(default_factory=list)
    posts: list[tuple[str, Any]] = field(default_factory=list)
    bodies: list[dict] = field(default_factory=list)  # every body answered 200, in order
    echo: bool = False  # answers repeat their prompt (to see what was substituted)
    dropped: set[Any] = field(default_factory=set)  # tags whose connection was dropped once
    overlaps: list[str] = field(default_factory=list)  # invariant violations: devices double-booked
    _pids: Any = field(default_factory=lambda: itertools.count(1000))
    spares: Any = None  # no spare engine processes
    freezable: bool = False  # engines can sleep frozen on CPU (`Engine.freeze`)
    memory_bytes: int = 2**30  # what each one holds while frozen
    freezes: list[str] = field(default_factory=list)  # the model of each engine frozen, in order
    started: bool = False
    closed: bool = False

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    def alive(self, model: str | None = None) -> list[FakeEngine]:
        return [e for e in self.engines if e.alive() and (model is None or e.spec.model.name == model)]

    def in_spare(self, spec: EngineSpec) -> bool:
        return False  # its `spares`, when a test sets some, are never ready

    async def launch(self, spec: EngineSpec) -> FakeEngine:
        for other in self.alive():
            if not other.frozen and set(other.spec.devices) & set(spec.devices):
                self.overlaps.append(f"{spec.model.name}{spec.devices} vs "
                                     f"{other.spec.model.name}{other.spec.devices}")
        engine = FakeEngine(spec, self, next(self._pids))
        self.engines.append(engine)
        try:
            await asyncio.sleep(self.start_delay_s)
        except asyncio.CancelledError:
            await engine.stop()  # like Engine.start: a cancelled start stops what it spawned
            raise
        if spec.model.name in self.fail_start:
            await engine.stop()
            raise EngineError(f"engine {spec.model.name!r} exited with code 1 while starting; log:\n"
                              "torch.OutOfMemoryError: CUDA out of memory (fake)")
        return engine
