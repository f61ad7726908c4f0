"""The transformers engine on a tiny random model: batching is exact, requests are isolated, slots are freed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import TEST_DEVICE, scaled
from tests.pausing import check_pause_resumes_whole
from tokenwire.engine import (
    ChatMessage,
    EngineError,
    EngineErrorCode,
    FinishReason,
    GenerationRequest,
    OutputKind,
    RequestOutput,
)
from tokenwire.engine.detokenizer import decode
from tokenwire.engine.hf.engine import HFEngine, HFEngineConfig
from tokenwire.engine.interface import Continuation, SamplingParams
from tokenwire.engine.scheduler import SchedulerConfig

DEVICE = TEST_DEVICE  # "cuda" on a GPU machine


async def make_engine(model_dir: Path, max_prefill_tokens: int = 16) -> HFEngine:
    eng = HFEngine(
        HFEngineConfig(
            model=str(model_dir),
            device=DEVICE,
            dtype="float32",
            scheduler=SchedulerConfig(max_batch_size=8, max_prefill_tokens=max_prefill_tokens),
        )
    )
    await eng.start()
    return eng


@pytest.fixture
async def engine(tiny_model_dir: Path) -> AsyncIterator[HFEngine]:
    eng = await make_engine(tiny_model_dir)
    yield eng
    await eng.shutdown()


async def run(eng: HFEngine, rid: str, **kw: Any) -> dict[str, Any]:
    params = SamplingParams(**{k: v for k, v in kw.items() if k in SamplingParams.__slots__})
    req = GenerationRequest(
        rid,
        params,
        prompt=kw.get("prompt"),
        messages=kw.get("messages"),
        raw=kw.get("raw", False),
        truncate=kw.get("truncate", False),
        continuation=kw.get("continuation"),
    )
    out: dict[str, Any] = {"text": "", "deltas": 0, "ids": []}
    async for item in eng.generate(req):
        if item.kind is OutputKind.STARTED:
            out["prompt_tokens"] = item.prompt_tokens
            out["dropped"] = item.start.truncated_messages if item.start else 0
        out["text"] += item.text
        out["ids"] += item.token_ids
        out["deltas"] += item.kind is OutputKind.DELTA
        if item.kind is OutputKind.FINISHED:
            out.update(
                reason=item.finish_reason,
                completion=item.completion_tokens,
                cached=item.cached_tokens,
                timings=item.timings,
            )
    return out


def reference_greedy(eng: HFEngine, prompt: str, max_new: int, ignore_eos: bool = False) -> str:
    """What transformers' own generate() produces for the same chat prompt."""
    tok = eng.tokenizer
    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    model = eng.backend.runner.model  # type: ignore[union-attr]
    with torch.inference_mode():
        x = torch.tensor([ids], device=model.device)
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new,
            min_new_tokens=max_new if ignore_eos else None,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    gen = out[0, len(ids) :].tolist()
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    if eos in gen and not ignore_eos:
        gen = gen[: gen.index(eos)]
    return decode(tok, gen).rstrip("\ufffd")


PROMPTS = [
    "Hello world!",
    "What is the capital of France? " * 3,
    "日本語 😀",
    "a",
    "Streaming tokens over a WebSocket" * 4,
]


@pytest.mark.parametrize("prefill_budget", [16, 256])
async def test_concurrent_greedy_generations_equal_transformers_generate(
    tiny_model_dir: Path, prefill_budget: int
) -> None:
    """Requests of different lengths that join and leave the batch at different steps each get exactly the
    tokens that transformers' generate() gives them alone. A budget of 16 prefills long prompts in chunks over
    several steps; 256 prefills prompts of different lengths together in one left-padded forward pass."""
    engine = await make_engine(tiny_model_dir, prefill_budget)
    runner = engine.backend.runner
    assert runner is not None
    batch_sizes: list[int] = []
    real_prefill = runner.prefill

    def spy(first_row: int, chunks: list[list[int]], starts: list[int]) -> torch.Tensor:
        batch_sizes.append(len(chunks))
        return real_prefill(first_row, chunks, starts)

    runner.prefill = spy  # type: ignore[method-assign]
    try:
        lengths = [30, 12, 25, 5, 18]
        results = await asyncio.wait_for(
            asyncio.gather(
                *[
                    run(engine, f"r{i}", prompt=p, max_tokens=n, temperature=0)
                    for i, (p, n) in enumerate(zip(PROMPTS, lengths, strict=True))
                ]
            ),
            scaled(60),
        )
        for p, n, r in zip(PROMPTS, lengths, results, strict=True):
            assert r["text"] == reference_greedy(engine, p, n)
        assert engine.stats().running == 0 and engine.stats().waiting == 0
        if prefill_budget == 256:
            assert max(batch_sizes) >= 2  # prompts of different lengths shared a forward pass
    finally:
        await engine.shutdown()


async def test_same_seed_same_text_and_other_seed_other_text(engine: HFEngine) -> None:
    a, b, c = await asyncio.gather(
        run(engine, "a", prompt="Hello", max_tokens=40, temperature=1.0, seed=123),
        run(engine, "b", prompt="Hello", max_tokens=40, temperature=1.0, seed=123),
        run(engine, "c", prompt="Hello", max_tokens=40, temperature=1.0, seed=999),
    )
    assert a["text"] == b["text"]
    assert a["text"] != c["text"]


async def test_sampling_filters_and_penalties_run(engine: HFEngine) -> None:
    """top_k=1 is greedy whatever the temperature; the other filters and penalties are accepted and run."""
    greedy = await run(engine, "g", prompt="Hello", max_tokens=20, temperature=0)
    topk1 = await run(engine, "k", prompt="Hello", max_tokens=20, temperature=1.5, top_k=1, seed=1)
    assert topk1["text"] == greedy["text"]
    other = await run(
        engine,
        "o",
        prompt="Hello",
        max_tokens=20,
        temperature=0.8,
        top_p=0.5,
        min_p=0.1,
        repetition_penalty=1.3,
        presence_penalty=1.0,
        frequency_penalty=1.0,
        seed=3,
    )
    assert other["reason"] in (FinishReason.LENGTH, FinishReason.STOP)
    penalised = await run(engine, "p", prompt="Hello", max_tokens=20, temperature=0, repetition_penalty=5.0)
    assert penalised["text"] != greedy["text"]


async def test_max_tokens_ends_with_length_and_counts_tokens(engine: HFEngine) -> None:
    r = await run(engine, "m", prompt="Hello", max_tokens=7, temperature=0)
    if r["reason"] is FinishReason.LENGTH:
        assert r["completion"] == 7
    t = r["timings"]
    assert 0 <= t.queue_ms <= t.ttft_ms <= t.total_ms


async def test_stop_string_ends_generation_and_is_not_sent(engine: HFEngine) -> None:
    free = await run(engine, "f", prompt="Hello", max_tokens=30, temperature=0)
    text = free["text"]
    assert len(text) > 6
    stop = text[3:6]
    cut = await run(engine, "s", prompt="Hello", max_tokens=30, temperature=0, stop=(stop,))
    assert cut["reason"] is FinishReason.STOP
    assert cut["text"] == text[: text.index(stop)]


async def test_prompt_longer_than_the_context_is_an_error(engine: HFEngine) -> None:
    with pytest.raises(EngineError) as info:
        await run(engine, "long", prompt="word " * 2000, max_tokens=5)
    assert info.value.code is EngineErrorCode.PROMPT_TOO_LONG
    assert "256" in info.value.message


async def test_truncate_auto_drops_oldest_turns_but_keeps_the_system_message(engine: HFEngine) -> None:
    history = [ChatMessage("system", "You are terse.")]
    for i in range(30):
        history += [ChatMessage("user", f"question {i} " * 5), ChatMessage("assistant", f"answer {i} " * 5)]
    history.append(ChatMessage("user", "last question"))
    with pytest.raises(EngineError):
        await run(engine, "t0", messages=tuple(history), max_tokens=3)
    r = await run(engine, "t1", messages=tuple(history), max_tokens=3, truncate=True)
    assert r["dropped"] > 0 and r["prompt_tokens"] < 256
    kept = engine.prompts._fit_messages(list(history), True, 255)  # type: ignore[union-attr]
    text = engine.tokenizer.decode(kept.token_ids)
    assert text.startswith("<|im_start|>system\nYou are terse.") and "last question" in text


async def test_generation_is_clipped_to_the_context_window(engine: HFEngine) -> None:
    r = await run(engine, "c", prompt="word " * 100, max_tokens=4000, temperature=0, raw=True)
    assert r["prompt_tokens"] + r["completion"] <= 256


async def test_ignore_eos_runs_to_max_tokens(engine: HFEngine) -> None:
    r = await run(engine, "i", prompt="Hello", max_tokens=60, temperature=1.0, ignore_eos=True)
    assert r["reason"] is FinishReason.LENGTH and r["completion"] == 60


async def test_abort_ends_with_cancelled_and_frees_the_slot(tiny_long_model_dir: Path) -> None:
    engine = await make_engine(tiny_long_model_dir)
    try:
        task = asyncio.create_task(run(engine, "x", prompt="Hello", max_tokens=4000, ignore_eos=True))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if engine.stats().running:
                break
        engine.abort("x")
        r = await asyncio.wait_for(task, scaled(10))
        assert r["reason"] is FinishReason.CANCELLED
        assert 0 < r["completion"] < 4000
        assert engine.stats().running == 0
    finally:
        await engine.shutdown()


async def test_closing_the_stream_aborts_the_request(engine: HFEngine) -> None:
    """A consumer that stops reading (client gone) frees its slot: the vLLM-style abort on close."""
    gens = [engine.generate(GenerationRequest(f"c{i}", SamplingParams(max_tokens=4000), prompt="Hi")) for i in range(8)]
    for g in gens:
        await g.__anext__()  # STARTED
    await asyncio.sleep(0.2)
    for g in gens:
        await g.aclose()
    for _ in range(int(scaled(200))):
        if engine.stats().running == 0 and engine.stats().waiting == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.stats().running == 0 and engine.stats().waiting == 0


async def test_duplicate_engine_request_id_is_refused(engine: HFEngine) -> None:
    g = engine.generate(GenerationRequest("dup", SamplingParams(max_tokens=50), prompt="Hi"))
    await g.__anext__()
    with pytest.raises(EngineError) as info:
        await run(engine, "dup", prompt="Hi")
    assert info.value.code is EngineErrorCode.DUPLICATE_ID
    await g.aclose()


def test_a_request_finishing_in_the_step_where_others_prefill_together_keeps_every_row(
    tiny_model_dir: Path,
) -> None:
    """Regression: one request's last decode token and three new prompts' batched prefill fall in the same step.
    The finishing request frees a KV row and rows move; each prompt must still be prefilled into its own row,
    so every request's greedy text equals transformers' generate(). The engine is stepped by hand, no thread."""
    from tokenwire.engine.model_loop import _Add

    eng = HFEngine(
        HFEngineConfig(
            model=str(tiny_model_dir),
            device=DEVICE,
            dtype="float32",
            scheduler=SchedulerConfig(max_batch_size=8, max_prefill_tokens=256),
        )
    )
    eng.load()
    items: list[Any] = []
    eng.emit = items.extend  # type: ignore[method-assign]
    sched = eng.backend.scheduler

    def add(rid: str, prompt: str, n: int) -> None:
        req = GenerationRequest(rid, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), prompt=prompt)
        assert eng.prompts is not None
        eng.model.admit(_Add(req, eng.prompts.build(req), n, 0.0))
        eng.model.admit_waiting()

    add("a", PROMPTS[3], 2)
    eng.model.step()  # a: prefill and first token
    add("b", PROMPTS[0], 12)
    add("c", PROMPTS[1], 12)
    add("d", PROMPTS[4], 12)
    eng.model.step()  # a: second and last token (its row is freed); b, c, d: one batched prefill
    assert sched.get("a") is None and sched.num_decode == 3
    for _ in range(100):
        if not sched.has_work:
            break
        eng.model.step()
    texts: dict[str, str] = {}
    for item in items:
        if isinstance(item, RequestOutput):
            texts[item.request_id] = texts.get(item.request_id, "") + item.text
    for rid, prompt, n in (("b", PROMPTS[0], 12), ("c", PROMPTS[1], 12), ("d", PROMPTS[4], 12)):
        assert texts[rid] == reference_greedy(eng, prompt, n, ignore_eos=True), rid


async def test_a_tokenizer_failure_fails_that_request_and_the_engine_goes_on(
    engine: HFEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = engine.prompts
    assert prompts is not None
    real_build = prompts.build

    def build(request: GenerationRequest) -> Any:
        if request.prompt == "boom":
            raise RuntimeError("the tokenizer refused")
        return real_build(request)

    monkeypatch.setattr(prompts, "build", build)
    with pytest.raises(EngineError) as info:
        await run(engine, "bad", prompt="boom")
    assert info.value.code is EngineErrorCode.INVALID_REQUEST and "tokenizer refused" in info.value.message
    ok = await run(engine, "good", prompt="Hello", max_tokens=3, ignore_eos=True)
    assert ok["completion"] == 3


async def test_int8_engine_generates_and_an_unknown_quantize_is_refused(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown quantize 'int4'; choose none or int8"):
        HFEngine(HFEngineConfig(model=str(tiny_model_dir), quantize="int4"))
    eng = HFEngine(HFEngineConfig(model=str(tiny_model_dir), device="cpu", dtype="bfloat16", quantize="int8"))
    await eng.start()
    try:
        from tokenwire.engine.hf.quant import DualLinear

        runner = eng.backend.runner
        assert runner is not None and any(isinstance(m, DualLinear) for m in runner.model.modules())
        out = await run(eng, "q", prompt="Hello there", max_tokens=12, ignore_eos=True, temperature=0)
        assert out["reason"] is FinishReason.LENGTH and out["completion"] == 12 and out["text"]
    finally:
        await eng.shutdown()


async def test_a_model_that_fails_to_load_fails_start_and_ends_its_thread(tiny_model_dir: Path, tmp_path: Path) -> None:
    for f in tiny_model_dir.iterdir():  # the tiny model's tokenizer, with a config no transformers class reads
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    eng = HFEngine(HFEngineConfig(model=str(tmp_path), device="cpu"))
    with pytest.raises(Exception, match="no-such-architecture"):
        await eng.start()
    assert not eng.ready and eng._thread is not None
    eng._thread.join(timeout=scaled(5))
    assert not eng._thread.is_alive()


POISON_POSITION = 60  # only the poisoned request's prompt reaches this far; the healthy ones stay well below


async def _one_poisoned_among_healthy(engine: HFEngine) -> tuple[list[Any], list[dict[str, Any]]]:
    """Three healthy short requests and one long one, at once; returns the long one's outcome and the others'."""
    healthy = [("h0", "Hello world!"), ("h1", "a"), ("h2", "日本語 😀")]
    alone = [await run(engine, f"{rid}-alone", prompt=p, max_tokens=8, temperature=0) for rid, p in healthy]

    async def poisoned() -> Any:
        try:
            return await run(engine, "poison", prompt="word " * 40, raw=True, max_tokens=8, temperature=0)
        except EngineError as err:
            return err

    results = await asyncio.wait_for(
        asyncio.gather(poisoned(), *[run(engine, rid, prompt=p, max_tokens=8, temperature=0) for rid, p in healthy]),
        scaled(60),
    )
    for got, ref in zip(results[1:], alone, strict=True):
        assert got["text"] == ref["text"]  # the healthy requests are served as if nothing happened
    return results, alone


async def test_a_forward_pass_that_fails_for_one_request_fails_only_that_request(engine: HFEngine) -> None:
    """A batched forward pass that raises because of one request's rows is run again row by row: that request
    ends with generation_failed, the requests that shared its step complete with their usual text."""
    runner = engine.backend.runner
    assert runner is not None
    real_forward = runner._forward

    def forward(ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if int(positions.max()) >= POISON_POSITION:
            raise RuntimeError("this row cannot be computed")
        return real_forward(ids, positions, mask)

    runner._forward = forward  # type: ignore[method-assign]
    results, _ = await _one_poisoned_among_healthy(engine)
    err = results[0]
    assert isinstance(err, EngineError) and err.code is EngineErrorCode.GENERATION_FAILED
    assert "cannot be computed" in err.message
    assert engine.stats().running == 0


async def test_a_row_that_cannot_be_sampled_fails_only_its_request(engine: HFEngine) -> None:
    """Logits that are NaN for one row (what a sampling value of 1e-300 once produced) fail that row's request in
    the sampler; the other rows of the same step are sampled as usual."""
    runner = engine.backend.runner
    assert runner is not None
    real_decode, real_prefill = runner.decode, runner.prefill

    @torch.inference_mode()
    def poison(logits: torch.Tensor, last_positions: list[int]) -> torch.Tensor:
        for row, pos in enumerate(last_positions):
            if pos >= POISON_POSITION:
                logits[row] = float("nan")
        return logits

    def decode(token_ids: list[int], positions: list[int], first_row: int = 0) -> torch.Tensor:
        return poison(real_decode(token_ids, positions, first_row), positions)

    def prefill(first_row: int, chunks: list[list[int]], starts: list[int]) -> torch.Tensor:
        lasts = [s + len(c) - 1 for c, s in zip(chunks, starts, strict=True)]
        return poison(real_prefill(first_row, chunks, starts), lasts)

    runner.decode, runner.prefill = decode, prefill  # type: ignore[method-assign]
    results, _ = await _one_poisoned_among_healthy(engine)
    err = results[0]
    assert isinstance(err, EngineError) and err.code is EngineErrorCode.GENERATION_FAILED
    assert "finite" in err.message


def test_sampling_params_that_cannot_be_sampled_cannot_be_made() -> None:
    """The engine's own check, whatever door a request came through: 1e-300 is refused, naming the parameter."""
    from tokenwire.engine.interface import InvalidParam

    for field, value in (("temperature", 1e-300), ("repetition_penalty", 1e-300), ("top_p", float("nan"))):
        with pytest.raises(InvalidParam) as info:
            SamplingParams(**{field: value})
        assert info.value.param == field and field in str(info.value)


async def test_a_paused_request_resumes_with_the_text_of_an_uninterrupted_run(engine: HFEngine) -> None:
    """Paused mid-answer, a request makes no tokens; continued, it gives the text of a run that never paused."""
    await check_pause_resumes_whole(engine)


def record_prefills(eng: HFEngine) -> list[int]:
    """The number of prompt positions each prefill forward pass of ``eng`` computes, from now on."""
    runner = eng.backend.runner
    assert runner is not None
    sizes: list[int] = []
    original = runner.prefill

    def prefill(first_row: int, chunks: list[list[int]], starts: list[int]) -> torch.Tensor:
        sizes.extend(len(c) for c in chunks)
        return original(first_row, chunks, starts)

    runner.prefill = prefill  # type: ignore[method-assign]
    return sizes


async def test_a_paused_request_keeps_its_kv_generator_and_penalties(engine: HFEngine) -> None:
    """While paused, its KV stays out of the batch; continued, only its last token is computed again, and a seeded,
    penalized, sampled answer is the same text as a run that never paused (same draws, same penalty counts)."""
    from tests.pausing import paused_run

    params = SamplingParams(
        max_tokens=40,
        temperature=0.9,
        seed=1234,
        ignore_eos=True,
        frequency_penalty=0.6,
        presence_penalty=0.4,
        repetition_penalty=1.2,
    )
    prompt = "Tell me a story about a dragon."
    plain = await paused_run(engine, "plain", prompt, 40, pause_after=10_000, pause_s=0, params=params)
    prefills = record_prefills(engine)
    paused = await paused_run(engine, "paused", prompt, 40, pause_after=12, pause_s=0.3, params=params)
    assert paused["text"] == plain["text"] and paused["completion"] == 40
    prompt_len = paused["prompt_tokens"]
    assert paused["kept_kv"] >= prompt_len + 11  # kept: the prompt and every token fed back before the pause
    assert prefills[-1] == 1  # on continuing, only the token sampled last before the pause is computed
    # before it, the prompt (in chunks of 16), less the whole blocks the plain run left in the prefix cache
    assert sum(prefills[:-1]) == prompt_len - (prompt_len - 1) // 32 * 32
    assert engine.stats().kv_cache_tokens_paused == 0  # given back once it continued


@pytest.mark.parametrize("prefix_caching", [False, True])
async def test_kept_kv_gives_way_to_running_requests_and_is_rebuilt(tiny_model_dir: Path, prefix_caching: bool) -> None:
    """Under pressure (a request being admitted needs the KV pool), a paused request's kept KV is dropped; when it
    continues, its prompt plus its generated tokens are computed again, and the text is still whole. With the prefix
    cache on, the dropped KV's whole blocks stay cached (the big request evicts the least recently used blocks,
    not those), so only the tail after them is computed again."""
    from tests.pausing import paused_run

    eng = HFEngine(
        HFEngineConfig(
            model=str(tiny_model_dir),
            device=DEVICE,
            dtype="float32",
            scheduler=SchedulerConfig(
                max_batch_size=8, max_prefill_tokens=256, kv_cache_tokens=260, prefix_caching=prefix_caching
            ),
        )
    )
    await eng.start()
    try:
        prompt = "Tell me a story about a dragon."
        plain = await paused_run(eng, "plain", prompt, 48, pause_after=10_000, pause_s=0)
        seen: dict[str, int] = {}

        async def big_request() -> None:  # it reserves the whole context (256): no room left for the kept KV
            seen["before"] = eng.stats().kv_cache_tokens_paused
            await run(eng, "big", prompt="x", max_tokens=250, ignore_eos=True, temperature=0.0)
            seen["after"] = eng.stats().kv_cache_tokens_paused

        prefills = record_prefills(eng)
        paused = await paused_run(eng, "paused", prompt, 48, pause_after=12, pause_s=0.1, during=big_request)
        assert seen["before"] > 0 and seen["after"] == 0
        assert eng.backend.parked.evicted == 1
        assert paused["text"] == plain["text"] and paused["completion"] == 48
        rebuilt = paused["kept_kv"] + 1  # the prompt and every token it generated before the pause
        assert rebuilt > paused["prompt_tokens"] + 11
        assert prefills[-1] == (rebuilt - (rebuilt - 1) // 32 * 32 if prefix_caching else rebuilt)
    finally:
        await eng.shutdown()


SYSTEM = "You are Ada, the support assistant of Northwind Rail. Answer in two sentences, plainly and politely."


def chat(*turns: str, system: str = SYSTEM) -> tuple[ChatMessage, ...]:
    """A conversation: the system message, then user and assistant turns alternately."""
    roles = ("user", "assistant")
    return (ChatMessage("system", system), *(ChatMessage(roles[i % 2], t) for i, t in enumerate(turns)))


async def test_a_shared_system_prompt_is_computed_once_and_the_next_request_prefills_only_its_suffix(
    engine: HFEngine,
) -> None:
    """The second conversation with the same system prompt reports the whole blocks it found as cached_tokens, and
    its prefill computes only the rest; its greedy text is what generate() gives it alone."""
    first = await run(engine, "a", messages=chat("When is the first train?"), max_tokens=8, temperature=0)
    assert first["cached"] == 0
    prefills = record_prefills(engine)
    question = "How much is a day pass?"
    second = await run(engine, "b", messages=chat(question), max_tokens=8, temperature=0)
    system = [{"role": "system", "content": SYSTEM}]
    shared = len(engine.tokenizer.apply_chat_template(system, tokenize=True, return_dict=False))
    assert second["cached"] == shared // 32 * 32 > 0  # every whole block of the shared system turn
    assert sum(prefills) == second["prompt_tokens"] - second["cached"]
    assert engine.backend.scheduler.blocks.hit_tokens == second["cached"]


async def test_greedy_output_alone_is_the_same_with_the_prefix_cache_on_and_off(tiny_model_dir: Path) -> None:
    """A request run alone gives the same tokens whether its prompt's KV is computed or found in the prefix cache
    (computed earlier, in other chunks), and whether the engine caches at all."""
    texts: dict[str, str] = {}
    for caching in (False, True):
        eng = HFEngine(
            HFEngineConfig(
                model=str(tiny_model_dir),
                device=DEVICE,
                dtype="float32",
                scheduler=SchedulerConfig(max_batch_size=8, max_prefill_tokens=16, prefix_caching=caching),
            )
        )
        await eng.start()
        try:
            for attempt in ("cold", "warm"):
                r = await run(eng, attempt, messages=chat(PROMPTS[1]), max_tokens=40, temperature=0, ignore_eos=True)
                texts[f"{caching}-{attempt}"] = r["text"]
                assert (r["cached"] > 0) == (caching and attempt == "warm")
        finally:
            await eng.shutdown()
    assert len(set(texts.values())) == 1, texts


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


async def test_a_chats_next_turn_reuses_the_blocks_of_the_turn_before_prompt_and_answer(
    tiny_long_model_dir: Path,
) -> None:
    """Each turn sends the whole conversation; the next one finds in the prefix cache the whole blocks of what the
    turns before computed, answers included, as far as its tokens are the same (a random model's answer does not
    tokenize back to the ids it was generated as: the next turn as token ids shows the answer's blocks reused), also
    after the engine went idle between turns."""
    engine = await make_engine(tiny_long_model_dir)
    tok = engine.tokenizer
    turns: list[str] = []
    computed: list[list[int]] = []  # per turn: the tokens whose KV it computed (prompt and answer less its last)
    prompt_before: list[int] = []
    try:
        for i, question in enumerate(("When is the first train?", "How much is a day pass?", "And for a child?")):
            turns.append(question)
            messages = chat(*turns)
            template = [{"role": m.role, "content": m.content} for m in messages]
            ids = tok.apply_chat_template(template, add_generation_prompt=True, tokenize=True, return_dict=False)
            r = await run(engine, f"turn{i}", messages=messages, max_tokens=24, temperature=0, ignore_eos=True)
            found = max((common_prefix(c, ids) for c in computed), default=0)
            assert r["cached"] == min(found, len(ids) - 1) // 32 * 32
            if computed:  # at least the turn before's prompt
                assert r["cached"] >= len(prompt_before) // 32 * 32 > 0
            computed.append(ids + r["ids"][:-1])
            prompt_before = ids
            turns.append(r["text"])
            await asyncio.sleep(0.6)  # the model loop waits for work and goes idle (idle() keeps the cache)
        question = tok.encode("<|im_end|>\n<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n")
        following = Continuation((*computed[-1], r["ids"][-1], *question))
        r = await run(engine, "next", continuation=following, max_tokens=4, temperature=0)
        assert r["cached"] == len(computed[-1]) // 32 * 32  # the last answer's whole blocks too
    finally:
        await engine.shutdown()


@pytest.mark.parametrize("architecture", ["MistralForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"])
async def test_a_model_with_a_sliding_window_starts_and_keeps_its_window(architecture: str, tmp_path: Path) -> None:
    """Gemma 2 has no SDPA attention and did not start; the engine's own 4D mask reached sliding-window layers
    unbanded, so Mistral and Gemma 2/3 attended past their window. With a window of 8 tokens and prompts of
    30 and more, concurrent greedy generations equal transformers' generate(), which applies the window."""
    from tests.tiny import save_tiny_family

    engine = await make_engine(save_tiny_family(tmp_path / architecture, architecture), 16)
    try:
        lengths = [12, 20]
        prompts = [PROMPTS[1], PROMPTS[4]]
        results = await asyncio.wait_for(
            asyncio.gather(
                *[run(engine, f"r{i}", prompt=p, max_tokens=n, temperature=0, ignore_eos=True)
                  for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))]
            ),
            scaled(60),
        )  # fmt: skip
        for p, n, r in zip(prompts, lengths, results, strict=True):
            assert r["prompt_tokens"] > 30
            assert r["text"] == reference_greedy(engine, p, n, ignore_eos=True)
    finally:
        await engine.shutdown()
