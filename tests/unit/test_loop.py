"""The engine core every backend shares, on a scripted backend: pause and continue, fair admission, queue timeout."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from tests.conftest import scaled, wait_until
from tokenwire.engine.backend import LoadedModel, StepOutput
from tokenwire.engine.interface import (
    Continuation,
    EngineError,
    EngineErrorCode,
    EngineStats,
    FinishReason,
    GenerationRequest,
    OutputKind,
    RequestOutput,
    SamplingParams,
)
from tokenwire.engine.loop import LoopEngine

EOS = 99_999


class ScriptedBackend:
    """Each step, every running request gets one token, a function of its whole sequence so far: so a request that
    continues from its prompt plus the tokens it generated goes on exactly as if it had never stopped."""

    name = "scripted"
    kind = "scripted"

    def __init__(self, tokenizer: Any, rows: int = 2, step_s: float = 0.002) -> None:
        self.tokenizer = tokenizer
        self.rows = rows
        self.step_s = step_s
        self.letters = [tokenizer.encode(c)[0] for c in "abcdefghijklmnop"]
        self.running: dict[str, list[int]] = {}
        self.added: list[tuple[str, int]] = []  # (request id, prompt length) in order of admission
        self.continued: dict[str, int] = {}  # request id -> `continued` of its last add
        self.parked: set[str] = set()  # parked and not removed: what a backend may keep state for
        self.max_running = 0
        self.lock = threading.Lock()

    @property
    def alive(self) -> bool:
        return True

    def load(self) -> LoadedModel:
        return LoadedModel(self.tokenizer, frozenset({EOS}), 4096)

    def close(self) -> None:
        pass

    def add(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, max_new_tokens: int, continued: int = 0
    ) -> None:
        with self.lock:
            self.running[request_id] = list(prompt_ids)
            self.parked.discard(request_id)  # what was kept for it is used now
            self.added.append((request_id, len(prompt_ids)))
            self.continued[request_id] = continued
            self.max_running = max(self.max_running, len(self.running))

    def park(self, request_id: str) -> None:
        with self.lock:
            self.running.pop(request_id, None)
            self.parked.add(request_id)

    def remove(self, request_id: str) -> None:
        with self.lock:
            self.running.pop(request_id, None)
            self.parked.discard(request_id)

    def forgive(self, request_id: str) -> None:
        pass

    @property
    def has_work(self) -> bool:
        return bool(self.running)

    def step(self) -> StepOutput:
        time.sleep(self.step_s)
        out = StepOutput()
        with self.lock:
            for rid, seq in self.running.items():
                token = self.letters[(sum(seq) * 7 + len(seq)) % len(self.letters)]
                seq.append(token)
                out.tokens[rid] = [token]
        return out

    def idle(self) -> None:
        pass

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self.running), waiting=0, max_batch_size=self.rows)


def request(rid: str, max_tokens: int = 20, connection: str = "c1", tenant: str = "") -> GenerationRequest:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return GenerationRequest(rid, params, prompt="dragon", raw=True, tenant=tenant, connection=connection)


async def started(backend: ScriptedBackend, queue_timeout: float = 0.0) -> LoopEngine:
    engine = LoopEngine(backend, "scripted", 100, queue_timeout)
    await engine.start()
    return engine


async def collect(engine: LoopEngine, req: GenerationRequest) -> list[RequestOutput]:
    return [out async for out in engine.generate(req)]


def text(outs: list[RequestOutput]) -> str:
    return "".join(o.text for o in outs)


async def test_a_paused_request_computes_nothing_and_continues_seamlessly(byte_tokenizer: Any) -> None:
    """Paused, a request leaves the backend and gets no tokens; unpaused, it is re-admitted with its prompt plus
    the tokens it generated, and its text and token count equal those of a run that never paused."""
    backend = ScriptedBackend(byte_tokenizer, step_s=0.01)
    engine = await started(backend)
    try:
        reference = await collect(engine, request("ref", 40))
        outs: list[RequestOutput] = []

        async def consume() -> None:
            async for out in engine.generate(request("p", 40)):
                outs.append(out)

        task = asyncio.create_task(consume())
        await wait_until(lambda: sum(o.num_tokens for o in outs) >= 5)
        engine.pause("p")
        await wait_until(lambda: "p" not in backend.running)
        await wait_until(lambda: engine.stats().paused == 1)
        frozen = sum(o.num_tokens for o in outs)
        await asyncio.sleep(0.1)
        assert sum(o.num_tokens for o in outs) == frozen, "a paused request got tokens"
        engine.unpause("p")
        await asyncio.wait_for(task, scaled(10))
        assert text(outs) == text(reference)
        end = outs[-1]
        assert end.kind is OutputKind.FINISHED and end.finish_reason is FinishReason.LENGTH
        assert end.completion_tokens == 40 == reference[-1].completion_tokens
        prompt_len = reference[-1].prompt_tokens
        readds = [n for rid, n in backend.added if rid == "p"]
        assert readds[0] == prompt_len and readds[1] == prompt_len + frozen  # it continued from what it had made
        assert backend.continued["p"] == frozen  # ... and the backend knows which of its prompt ids it made
        assert engine.stats().paused == 0 and not backend.parked
    finally:
        await engine.shutdown()


async def test_a_paused_request_frees_its_row_for_a_waiting_one(byte_tokenizer: Any) -> None:
    """With one row, pausing the running request lets a waiting one run to its end."""
    backend = ScriptedBackend(byte_tokenizer, rows=1, step_s=0.005)
    engine = await started(backend)
    try:
        first = asyncio.create_task(collect(engine, request("a", 400)))
        await wait_until(lambda: "a" in backend.running)
        second = asyncio.create_task(collect(engine, request("b", 10, connection="c2")))
        await asyncio.sleep(0.05)
        assert not second.done()  # it waits for the only row
        engine.pause("a")
        outs = await asyncio.wait_for(second, scaled(5))
        assert outs[-1].completion_tokens == 10
        assert backend.max_running == 1
        assert backend.parked == {"a"}  # parked, not removed: the backend may keep its state
        engine.abort("a")
        a_outs = await asyncio.wait_for(first, scaled(5))
        assert a_outs[-1].finish_reason is FinishReason.CANCELLED  # an abort ends a paused request
        await wait_until(lambda: not backend.parked)  # ... and the backend forgets what it kept
    finally:
        await engine.shutdown()


async def test_a_continued_request_ended_before_it_is_readmitted_is_forgotten_by_the_backend(
    byte_tokenizer: Any,
) -> None:
    """Paused, continued, then cancelled while it waits for a row again: what the backend kept for it is freed."""
    backend = ScriptedBackend(byte_tokenizer, rows=1, step_s=0.005)
    engine = await started(backend)
    try:
        first = asyncio.create_task(collect(engine, request("a", 400)))
        await wait_until(lambda: "a" in backend.running and len(backend.running["a"]) > 8)
        engine.pause("a")
        await wait_until(lambda: backend.parked == {"a"})
        hog = asyncio.create_task(collect(engine, request("hog", 400, connection="c2")))
        await wait_until(lambda: "hog" in backend.running)
        engine.unpause("a")  # first in line again, but the only row is the hog's
        await wait_until(lambda: engine.stats().paused == 0)
        assert "a" not in backend.running and backend.parked == {"a"}
        engine.abort("a")
        a_outs = await asyncio.wait_for(first, scaled(5))
        assert a_outs[-1].finish_reason is FinishReason.CANCELLED
        await wait_until(lambda: not backend.parked)
        engine.abort("hog")
        await asyncio.wait_for(hog, scaled(5))
    finally:
        await engine.shutdown()


async def test_a_request_paused_before_it_had_a_row_keeps_its_place(byte_tokenizer: Any) -> None:
    """Pausing a request that still waits takes it out of the queue; unpausing puts it back, and it runs whole."""
    backend = ScriptedBackend(byte_tokenizer, rows=1, step_s=0.005)
    engine = await started(backend)
    try:
        hog = asyncio.create_task(collect(engine, request("hog", 60)))
        await wait_until(lambda: "hog" in backend.running)
        waiting = asyncio.create_task(collect(engine, request("w", 5)))
        await wait_until(lambda: engine.stats().waiting == 1)
        engine.pause("w")
        await wait_until(lambda: engine.stats().paused == 1)
        await hog
        assert not waiting.done()
        engine.unpause("w")
        outs = await asyncio.wait_for(waiting, scaled(5))
        assert outs[-1].completion_tokens == 5
    finally:
        await engine.shutdown()


async def test_admission_is_round_robin_over_connections(byte_tokenizer: Any) -> None:
    """One connection's twelve queued requests do not hold up another connection's single request: with two rows,
    it starts at the next free row."""
    backend = ScriptedBackend(byte_tokenizer, rows=2, step_s=0.002)
    engine = await started(backend)
    try:
        many = [asyncio.create_task(collect(engine, request(f"a{i}", 10, connection="A"))) for i in range(12)]
        await wait_until(lambda: engine.stats().waiting >= 10)
        single = asyncio.create_task(collect(engine, request("b", 10, connection="B")))
        await asyncio.gather(single, *many)
        order = [rid for rid, _ in backend.added]
        assert order.index("b") <= 3, order  # the two running, at most one more of A's, then B's
    finally:
        await engine.shutdown()


async def test_admission_is_round_robin_over_tenants_before_connections(byte_tokenizer: Any) -> None:
    """A tenant (API key) with many connections does not outweigh another tenant: admissions alternate by key."""
    backend = ScriptedBackend(byte_tokenizer, rows=1, step_s=0.002)
    engine = await started(backend)
    try:
        hog = asyncio.create_task(collect(engine, request("hog", 40, connection="h", tenant="X")))
        await wait_until(lambda: "hog" in backend.running)
        tasks = [
            asyncio.create_task(collect(engine, request(f"x{i}", 3, connection=f"x{i}", tenant="X"))) for i in range(6)
        ]
        await wait_until(lambda: engine.stats().waiting == 6)
        tasks += [
            asyncio.create_task(collect(engine, request(f"y{i}", 3, connection="y", tenant="Y"))) for i in range(2)
        ]
        await asyncio.gather(hog, *tasks)
        order = [rid for rid, _ in backend.added][1:]
        assert order[:4] == ["x0", "y0", "x1", "y1"], order
    finally:
        await engine.shutdown()


async def test_a_request_waiting_past_the_queue_timeout_fails_overloaded_with_a_retry_hint(
    byte_tokenizer: Any,
) -> None:
    """When no row frees within the queue timeout, the waiting request ends with ``overloaded`` and retry_after;
    the running one is untouched."""
    backend = ScriptedBackend(byte_tokenizer, rows=1, step_s=0.01)
    engine = await started(backend, queue_timeout=0.3)
    try:
        hog = asyncio.create_task(collect(engine, request("hog", 200)))
        await wait_until(lambda: "hog" in backend.running)
        with pytest.raises(EngineError) as err:
            await asyncio.wait_for(collect(engine, request("late", 5, connection="c2")), scaled(5))
        assert err.value.code is EngineErrorCode.OVERLOADED
        assert err.value.retry_after is not None and err.value.retry_after >= 1
        assert "queue timeout" in err.value.message
        assert not hog.done()
        engine.abort("hog")
        assert (await hog)[-1].finish_reason is FinishReason.CANCELLED
        assert engine.stats().waiting == 0
    finally:
        await engine.shutdown()


async def test_a_paused_request_does_not_time_out_in_the_queue(byte_tokenizer: Any) -> None:
    """The queue timeout is for new requests: a paused one waits for its reader as long as the server keeps it."""
    backend = ScriptedBackend(byte_tokenizer, rows=1, step_s=0.005)
    engine = await started(backend, queue_timeout=0.2)
    try:
        outs: list[RequestOutput] = []

        async def consume() -> None:
            async for out in engine.generate(request("p", 30)):
                outs.append(out)

        task = asyncio.create_task(consume())
        await wait_until(lambda: sum(o.num_tokens for o in outs) >= 3)
        engine.pause("p")
        await asyncio.sleep(0.5)
        engine.unpause("p")
        await asyncio.wait_for(task, scaled(5))
        assert outs[-1].completion_tokens == 30
    finally:
        await engine.shutdown()


async def test_an_exception_in_one_requests_output_fails_only_that_request(byte_tokenizer: Any) -> None:
    """A bug that strikes one request's output side (its detokenizer, say) fails it with generation_failed; the
    request next to it ends normally and the engine stays ready."""
    backend = ScriptedBackend(byte_tokenizer, rows=2, step_s=0.005)
    engine = await started(backend)
    try:
        outputs = engine.model.outputs
        assert outputs is not None
        real = outputs.tokens

        def tokens(rid: str, ids: Any, now: float) -> Any:
            if rid == "bad":
                raise RuntimeError("boom")
            return real(rid, ids, now)

        outputs.tokens = tokens  # type: ignore[method-assign]
        good = asyncio.create_task(collect(engine, request("good", 20)))
        with pytest.raises(EngineError) as err:
            await collect(engine, request("bad", 20, connection="c2"))
        assert err.value.code is EngineErrorCode.GENERATION_FAILED and "boom" in err.value.message
        assert (await good)[-1].completion_tokens == 20
        assert engine.ready and engine.health() is None
        assert "bad" not in backend.running
    finally:
        await engine.shutdown()


class CrashingBackend(ScriptedBackend):
    def step(self) -> StepOutput:
        raise RuntimeError("the kernel exploded")


async def test_a_crashed_model_loop_fails_its_requests_and_says_why(byte_tokenizer: Any) -> None:
    """The loop dies: the running request fails with generation_failed (not a hang), health() names the cause,
    the engine is not ready, and a new request is refused with the cause."""
    engine = await started(CrashingBackend(byte_tokenizer))
    try:
        with pytest.raises(EngineError) as err:
            await asyncio.wait_for(collect(engine, request("r")), scaled(5))
        assert err.value.code is EngineErrorCode.GENERATION_FAILED
        await wait_until(lambda: engine.health() is not None)
        assert "the kernel exploded" in str(engine.health()) and not engine.ready
        with pytest.raises(EngineError) as again:
            await collect(engine, request("next"))
        assert again.value.code is EngineErrorCode.GENERATION_FAILED and "crashed" in again.value.message
    finally:
        await engine.shutdown()


class HangingBackend(ScriptedBackend):
    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer)
        self.release = threading.Event()

    def step(self) -> StepOutput:
        self.release.wait(30)
        return StepOutput()


async def test_a_hung_model_loop_is_detected_and_its_requests_fail_instead_of_waiting(byte_tokenizer: Any) -> None:
    """A step that never ends: past the hang timeout, health() says the loop hangs, the waiting request fails with
    generation_failed, and new requests are refused."""
    backend = HangingBackend(byte_tokenizer)
    engine = LoopEngine(backend, "scripted", 100, hang_timeout=0.3)
    await engine.start()
    try:
        task = asyncio.create_task(collect(engine, request("r")))
        await wait_until(lambda: "r" in backend.running)
        assert engine.health() is None
        await wait_until(lambda: engine.health() is not None)
        assert "hangs" in str(engine.health()) and not engine.ready
        with pytest.raises(EngineError) as err:
            await asyncio.wait_for(task, scaled(5))
        assert err.value.code is EngineErrorCode.GENERATION_FAILED
        with pytest.raises(EngineError):
            await collect(engine, request("next"))
    finally:
        backend.release.set()
        await engine.shutdown()


async def test_a_generation_continued_from_its_prompt_and_tokens_gives_the_rest_of_its_text(
    byte_tokenizer: Any,
) -> None:
    """What failover relies on: the STARTED output carries the prompt's ids and each output its tokens' ids; a new
    request continuing from the prompt ids and the ids of the first outputs delivers exactly the rest of the text,
    its tokens counting towards max_tokens."""
    backend = ScriptedBackend(byte_tokenizer)
    engine = await started(backend)
    try:
        whole = await collect(engine, request("whole", 30))
        prompt_ids = whole[0].start.prompt_ids if whole[0].start else ()
        assert len(prompt_ids) == whole[0].prompt_tokens > 0
        deltas = [o for o in whole if o.kind is OutputKind.DELTA]
        assert all(len(o.token_ids) == o.num_tokens for o in whole)
        first = deltas[:7]
        generated = tuple(t for o in first for t in o.token_ids)
        params = SamplingParams(max_tokens=30, temperature=0.0)
        cont = GenerationRequest("rest", params, continuation=Continuation(prompt_ids, generated))
        rest = await collect(engine, cont)
        assert text(first) + text(rest) == text(whole)
        assert rest[-1].completion_tokens == 30 and rest[-1].finish_reason is FinishReason.LENGTH
        assert backend.continued["rest"] == len(generated)
        done = GenerationRequest("done", params, continuation=Continuation(prompt_ids, tuple([1] * 30)))
        ended = await collect(engine, done)  # nothing left to generate: it ends at once
        assert ended[-1].kind is OutputKind.FINISHED and ended[-1].finish_reason is FinishReason.LENGTH
    finally:
        await engine.shutdown()


@pytest.mark.parametrize("action", ["abort", "pause"])
async def test_an_abort_or_pause_while_the_prompt_is_tokenized_is_not_lost(
    byte_tokenizer: Any, monkeypatch: pytest.MonkeyPatch, action: str
) -> None:
    """A cancel that arrives while the request's prompt is still being tokenized (a client that sends generate
    then cancel at once) ends it, cancelled, as soon as it is added; it used to reach the model thread first, find
    nothing, and the request ran to its max_tokens. A pause asked then holds it the same way."""
    backend = ScriptedBackend(byte_tokenizer, step_s=0.005)
    engine = await started(backend)
    try:
        assert engine.prompts is not None
        build = engine.prompts.build
        tokenizing = threading.Event()

        def slow_build(req: GenerationRequest) -> Any:
            tokenizing.set()
            time.sleep(0.2)
            return build(req)

        monkeypatch.setattr(engine.prompts, "build", slow_build)
        outs: list[RequestOutput] = []

        async def consume() -> None:
            async for out in engine.generate(request("x", 2000)):
                outs.append(out)

        task = asyncio.create_task(consume())
        await wait_until(tokenizing.is_set)
        getattr(engine, action)("x")
        if action == "abort":
            await asyncio.wait_for(task, scaled(5))
            end = outs[-1]
            assert end.kind is OutputKind.FINISHED and end.finish_reason is FinishReason.CANCELLED
            assert end.completion_tokens < 100
        else:
            await wait_until(lambda: engine.stats().paused == 1)
            await asyncio.sleep(0.1)
            assert sum(o.num_tokens for o in outs) == 0 and "x" not in backend.running
            engine.unpause("x")
            await asyncio.wait_for(task, scaled(30))
            assert outs[-1].finish_reason is FinishReason.LENGTH and outs[-1].completion_tokens == 2000
    finally:
        await engine.shutdown()


class DyingBackend(ScriptedBackend):
    """Its "process" dies (every running request lost, as the OpenVINO worker's death hands them back) when told
    to, or whenever a poisoned request has run ``poison_steps`` steps since it was added."""

    def __init__(self, tokenizer: Any, rows: int = 4) -> None:
        super().__init__(tokenizer, rows=rows)
        self.poisoned: set[str] = set()
        self.poison_steps = 3
        self.kill_now = threading.Event()
        self.deaths: list[set[str]] = []  # who was in it, each time it died
        self.died_at: list[int] = []  # len(batches) at each death
        self.forgiven: list[str] = []
        self.batches: list[set[str]] = []  # who ran together, each step
        self.steps_in: dict[str, int] = {}

    def add(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, max_new_tokens: int, continued: int = 0
    ) -> None:
        super().add(request_id, prompt_ids, params, max_new_tokens, continued)
        self.steps_in[request_id] = 0

    def step(self) -> StepOutput:
        with self.lock:
            for rid in self.running:
                self.steps_in[rid] += 1
            dies = self.kill_now.is_set() or any(
                self.steps_in[rid] >= self.poison_steps for rid in self.running if rid in self.poisoned
            )
            if dies:
                self.kill_now.clear()
                self.deaths.append(set(self.running))
                self.died_at.append(len(self.batches))
                out = StepOutput(lost=list(self.running))
                self.running.clear()
                return out
            self.batches.append(set(self.running))
        return super().step()

    def forgive(self, request_id: str) -> None:
        self.forgiven.append(request_id)


async def test_requests_lost_with_the_backend_process_go_on_where_they_were(byte_tokenizer: Any) -> None:
    """The backend's process dies under three running requests and comes back: each goes on from its prompt plus
    the tokens it made (first in line), and its text and token count equal those of a run that never died."""
    backend = DyingBackend(byte_tokenizer)
    engine = await started(backend)
    try:
        whole = text(await collect(engine, request("whole", 40)))
        backend.steps_in.clear()
        tasks = {rid: asyncio.create_task(collect(engine, request(rid, 40, connection=rid))) for rid in "abc"}
        await wait_until(lambda: len(backend.running) == 3 and min(backend.steps_in.values()) >= 5)
        backend.kill_now.set()
        for rid, task in tasks.items():
            outs = await asyncio.wait_for(task, scaled(10))
            assert outs[-1].finish_reason is FinishReason.LENGTH and outs[-1].completion_tokens == 40
            assert text(outs) == whole, rid  # the same prompt: the same text
        assert backend.deaths == [{"a", "b", "c"}] and backend.forgiven == []
        assert all(backend.continued[rid] > 0 for rid in "abc")
    finally:
        await engine.shutdown()


async def test_a_request_that_kills_the_backend_process_is_found_and_fails_alone(byte_tokenizer: Any) -> None:
    """A poisoned request kills the process three steps after each admission. First death: all go on. Second:
    all have two strikes, so each runs alone for a probe, one at a time; the poisoned one dies alone and is the
    culprit: it alone fails (generation_failed, saying why), its deaths are forgiven, the others complete whole
    with the text of an undisturbed run."""
    backend = DyingBackend(byte_tokenizer)
    engine = await started(backend)
    try:
        whole = text(await collect(engine, request("whole", 60)))
        backend.poisoned.add("bad")
        backend.batches.clear()
        tasks = {rid: asyncio.create_task(collect(engine, request(rid, 60, connection=rid))) for rid in ("a", "b")}
        await wait_until(lambda: len(backend.running) == 2)
        bad = asyncio.create_task(collect(engine, request("bad", 60, connection="bad")))
        with pytest.raises(EngineError) as err:
            await asyncio.wait_for(bad, scaled(10))
        assert err.value.code is EngineErrorCode.GENERATION_FAILED and "taken to be the cause" in err.value.message
        for task in tasks.values():
            outs = await asyncio.wait_for(task, scaled(10))
            assert text(outs) == whole and outs[-1].completion_tokens == 60
        assert len(backend.deaths) == 3 and backend.deaths[-1] == {"bad"}
        assert backend.forgiven == ["bad"]
        assert backend.deaths[0] == backend.deaths[1] == {"a", "b", "bad"}
        probes = backend.batches[backend.died_at[1] : backend.died_at[2]]
        assert probes and all(len(batch) == 1 for batch in probes)  # suspects ran alone, one at a time
        assert {next(iter(batch)) for batch in probes} == {"a", "b", "bad"}
    finally:
        await engine.shutdown()
