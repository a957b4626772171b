"""The threaded engine on the toy model: requests submitted from many threads (or an asyncio loop) at any time
get exactly what they would get alone; cancelling frees the slot; a bad request fails alone."""

from __future__ import annotations

import asyncio
import threading

import pytest

from vlm_runtime import Engine, EngineBusy, GenerationConfig, Request, SamplingParams, generate

from .toy import ByteProcessor, ToyModel

PROMPTS = ["hello", "a longer prompt here", "x", "another one!", "tiny", "mid-size prompt"]


@pytest.fixture(scope="module")
def model() -> ToyModel:
    return ToyModel()


def collect(stream) -> tuple[str, str, list]:
    events = list(stream)
    return "".join(e.text for e in events), events[-1].finish_reason, events


def test_threads_get_their_single_request_outputs(model: ToyModel) -> None:
    processor = ByteProcessor()
    expected = [generate(model, processor, p, max_tokens=10, ignore_eos=True).text for p in PROMPTS]
    results: dict[int, tuple] = {}
    config = GenerationConfig(max_tokens=10, ignore_eos=True)
    with Engine(model, processor, max_batch_size=4) as engine:

        def client(i: int) -> None:
            results[i] = collect(engine.submit(Request(processor.prepare_inputs(PROMPTS[i]), config=config)))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        stats = engine.stats()
    assert [results[i][0] for i in range(len(PROMPTS))] == expected
    assert all(results[i][1] == "length" for i in results)
    assert stats.finished == len(PROMPTS) and stats.generation_tokens == 10 * len(PROMPTS)
    assert stats.active == 0 and stats.waiting == 0
    assert set(stats.latency_s) == {"p50", "p90", "p99"}


def test_asyncio_streams(model: ToyModel) -> None:
    processor = ByteProcessor()
    expected = [generate(model, processor, p, max_tokens=8, ignore_eos=True).text for p in PROMPTS]
    config = GenerationConfig(max_tokens=8, ignore_eos=True)

    async def main(engine: Engine) -> list[str]:
        async def one(prompt: str) -> str:
            stream = engine.submit(Request(processor.prepare_inputs(prompt), config=config))
            return "".join([e.text async for e in stream])

        return await asyncio.gather(*(one(p) for p in PROMPTS))

    with Engine(model, processor) as engine:
        assert asyncio.run(main(engine)) == expected


def test_cancel_frees_the_slot_and_others_continue(model: ToyModel) -> None:
    processor = ByteProcessor()
    alone = generate(model, processor, "survivor", max_tokens=30, ignore_eos=True).text
    with Engine(model, processor, max_batch_size=2) as engine:
        doomed = engine.submit(
            Request(processor.prepare_inputs("doomed"), config=GenerationConfig(max_tokens=10_000, ignore_eos=True))
        )
        survivor = engine.submit(
            Request(processor.prepare_inputs("survivor"), config=GenerationConfig(max_tokens=30, ignore_eos=True))
        )
        seen = 0
        for event in doomed:  # noqa: B007
            seen += 1
            if seen == 3:
                doomed.cancel()
        assert event.finish_reason == "cancelled"
        # The freed slot takes a third request while the survivor runs on.
        third = engine.submit(
            Request(processor.prepare_inputs("third"), config=GenerationConfig(max_tokens=5, ignore_eos=True))
        )
        assert collect(survivor)[0] == alone
        assert collect(third)[1] == "length"
        assert engine.stats().cancelled == 1


def test_bad_request_fails_alone(model: ToyModel) -> None:
    processor = ByteProcessor()
    with Engine(model, processor) as engine:
        good = engine.submit(
            Request(processor.prepare_inputs("fine"), config=GenerationConfig(max_tokens=5, ignore_eos=True))
        )
        bad = engine.submit(Request({"input_ids": [[1, 2], [3, 4]]}))  # two prompts at once: refused
        _text, finish, events = collect(bad)
        assert finish == "error" and "one prompt at a time" in events[-1].error
        assert collect(good)[1] == "length"
        assert engine.stats().errors == 1


def test_seeded_sampling_repeats(model: ToyModel) -> None:
    processor = ByteProcessor()
    sampling = SamplingParams(temperature=1.0, seed=7)
    config = GenerationConfig(max_tokens=12, ignore_eos=True)
    with Engine(model, processor) as engine:
        runs = [
            collect(engine.submit(Request(processor.prepare_inputs("seed"), sampling=sampling, config=config)))[0]
            for _ in range(2)
        ]
    assert runs[0] == runs[1]
    assert runs[0] == generate(model, processor, "seed", max_tokens=12, ignore_eos=True, temperature=1.0, seed=7).text


def test_full_queue_and_closed_engine_refuse(model: ToyModel) -> None:
    processor = ByteProcessor()
    engine = Engine(model, processor, max_batch_size=1, max_waiting=0)
    long = GenerationConfig(max_tokens=10_000, ignore_eos=True)
    first = engine.submit(Request(processor.prepare_inputs("a"), config=long))
    next(iter(first))  # running: the one slot is taken
    with pytest.raises(EngineBusy):
        engine.submit(Request(processor.prepare_inputs("b")))
    engine.close()
    assert collect(first)[1] == "cancelled"
    with pytest.raises(EngineBusy):
        engine.submit(Request(processor.prepare_inputs("c")))


class OnlyAB:
    """A stateful constraint: only 'a' or 'b', and it records the history it was shown."""

    def __init__(self) -> None:
        self.lengths: list[int] = []

    def __call__(self, logits, history, generated):
        import mlx.core as mx

        self.lengths.append(history.shape[1])
        allowed = mx.zeros(logits.shape[-1], dtype=mx.bool_)
        allowed = mx.where(mx.arange(logits.shape[-1]) == ord("a"), True, allowed)
        allowed = mx.where(mx.arange(logits.shape[-1]) == ord("b"), True, allowed)
        return mx.where(allowed[None], logits, float("-inf"))


def test_per_request_constraints(model: ToyModel) -> None:
    processor = ByteProcessor()
    config = GenerationConfig(max_tokens=9, ignore_eos=True)
    constraint = OnlyAB()
    expected = generate(model, processor, "free", max_tokens=9, ignore_eos=True).text
    with Engine(model, processor) as engine:
        constrained = engine.submit(Request(processor.prepare_inputs("abc"), config=config, constraints=[constraint]))
        free = engine.submit(Request(processor.prepare_inputs("free"), config=config))
        text = collect(constrained)[0]
        assert collect(free)[0] == expected  # the neighbour in the batch is untouched
    assert len(text) == 9 and set(text) <= {"a", "b"}
    prompt_length = len(processor.prepare_inputs("abc")["input_ids"][0])
    assert constraint.lengths == list(range(prompt_length, prompt_length + 9))


def test_a_failing_constraint_ends_only_its_request(model: ToyModel) -> None:
    processor = ByteProcessor()
    config = GenerationConfig(max_tokens=8, ignore_eos=True)
    calls = []

    def breaks_on_the_third_token(logits, history, generated):
        calls.append(generated)
        if len(calls) == 3:
            raise RuntimeError("grammar in an error state")
        return logits

    expected = generate(model, processor, "steady", max_tokens=8, ignore_eos=True).text
    with Engine(model, processor) as engine:
        doomed = engine.submit(
            Request(processor.prepare_inputs("doomed"), config=config, constraints=[breaks_on_the_third_token])
        )
        steady = engine.submit(Request(processor.prepare_inputs("steady"), config=config))
        _text, finish, events = collect(doomed)
        assert finish == "error" and "grammar in an error state" in events[-1].error and len(events) == 3
        assert collect(steady)[0] == expected


@pytest.mark.parametrize(
    "cache_options",
    [{"max_kv_size": 6}, {"kv_bits": 8, "kv_group_size": 32}, {"kv_bits": 3.5, "kv_quant_scheme": "turboquant"}],
    ids=["window", "q8", "turboquant"],
)
def test_cache_settings_hold_for_every_request(model: ToyModel, cache_options: dict) -> None:
    """A sliding window shorter than the prompts, or quantized keys/values, for all rows: each request's text
    is what generate gives it alone with the same setting."""
    from vlm_runtime import CacheSettings

    processor = ByteProcessor()
    expected = [generate(model, processor, p, max_tokens=10, ignore_eos=True, **cache_options).text for p in PROMPTS]
    config = GenerationConfig(max_tokens=10, ignore_eos=True)
    with Engine(model, processor, max_batch_size=4, cache_settings=CacheSettings(**cache_options)) as engine:
        streams = [engine.submit(Request(processor.prepare_inputs(p), config=config)) for p in PROMPTS]
        texts = [collect(s)[0] for s in streams]
    assert texts == expected
    assert len(set(expected)) > 1
