"""The prefix cache on the toy model: chained keys and the block pool against a naive reference, warm requests
equal to cold ones, tenants apart, eviction, skipped cache kinds, and the disk tier's checksums."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import mlx.core as mx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm_runtime import CacheSettings, stream_generate
from vlm_runtime.block_pool import Block, BlockPool, Segment, block_keys, joined_layer, namespace_key
from vlm_runtime.prefill import drop_prefix, prefill
from vlm_runtime.prefix_cache import PrefixCache, PrefixCacheSettings

from .toy import BOS, ByteProcessor, ToyModel

SYSTEM = "You are a careful assistant. Answer in one short sentence, and never guess. " * 2


@pytest.fixture(scope="module")
def toy() -> tuple[ToyModel, ByteProcessor]:
    model = ToyModel()
    mx.eval(model.parameters())
    return model, ByteProcessor()


def run(toy, prompt: str, cache: PrefixCache | None, tenant: str = "", **options) -> tuple[list[int], int]:
    model, processor = toy
    tokens, cached = [], 0
    for event in stream_generate(
        model, processor, prompt, prefix_cache=cache, prefix_cache_tenant=tenant, max_tokens=8, **options
    ):
        tokens.append(event.token)
        cached = event.cached_tokens
    return tokens, cached


def last_logits(toy, prompt: str, cache: PrefixCache | None) -> tuple[mx.array, int]:
    """The prompt's last logits, prefilled over what ``cache`` holds of it (all of it without a cache)."""
    model, processor = toy
    inputs = processor.prepare_inputs(prompt)
    embedded = model.embed_prompt(**inputs)
    if cache is None:
        return prefill(model, embedded, model.make_cache(), 2048), 0
    ids = inputs["input_ids"][0].tolist()
    match = cache.lookup(model, CacheSettings(), ids, inputs, embedded)
    logits = prefill(model, drop_prefix(embedded, match.cached_tokens), match.layers, 2048)
    cache.store(match, match.layers)
    cache.release(match)
    return logits, match.cached_tokens


# -- keys and pool against a naive reference

token_lists = st.lists(st.integers(0, 5), min_size=0, max_size=24)


@settings(max_examples=200, deadline=None)
@given(
    a=token_lists,
    b=token_lists,
    media=st.sampled_from([None, "m1", "m2"]),
    other=st.sampled_from([None, "m1", "m2"]),
    first_a=st.integers(0, 24),
    first_b=st.integers(0, 24),
    tenants=st.sampled_from([("x", "x"), ("x", "y")]),
)
def test_chained_keys_equal_exactly_when_the_naive_prefix_description_does(
    a, b, media, other, first_a, first_b, tenants
):
    size = 4

    def naive(tokens, digest, first, tenant, i):
        """Block i's content, spelled out: the tenant, every token up to its end, and the media digest where
        some media position falls at or before it."""
        stop = (i + 1) * size
        return (tenant, tuple(tokens[:stop]), digest if digest is not None and first < stop else None)

    keys_a = block_keys(namespace_key("m", CacheSettings(), tenants[0]), a, size, media, first_a)
    keys_b = block_keys(namespace_key("m", CacheSettings(), tenants[1]), b, size, other, first_b)
    assert len(keys_a) == len(a) // size
    for i in range(min(len(keys_a), len(keys_b))):
        same = all(
            naive(a, media, first_a, tenants[0], j) == naive(b, other, first_b, tenants[1], j) for j in range(i + 1)
        )
        assert (keys_a[i] == keys_b[i]) == same


def _block() -> Block:
    return Block([[mx.zeros((1, 1, 4, 2))]], (("KVCache", "{}"),))


@settings(max_examples=100, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["store", "look", "hold", "free"]), st.lists(st.integers(0, 2), max_size=12)),
        max_size=30,
    ),
    cap=st.integers(1, 6),
)
def test_the_pool_matches_only_true_prefixes_and_never_evicts_held_blocks(ops, cap):
    """A naive reference remembers every stored prefix (as token tuples, no eviction): the pool's match is
    never longer than the reference's, equals it while nothing was evicted, keeps within its cap (held blocks
    aside), and never loses a held block."""
    size, namespace = 2, namespace_key("m", CacheSettings(), "")
    pool, stored, held = BlockPool(cap), set(), []
    for op, tokens in ops:
        keys = block_keys(namespace, tokens, size)
        prefixes = [tuple(tokens[: (i + 1) * size]) for i in range(len(keys))]
        if op == "store":
            for key, prefix in reversed(list(zip(keys, prefixes))):
                if pool.put(key, _block()):
                    stored.add(prefix)
                stored.add(prefix)
        elif op == "look":
            naive = 0
            while naive < len(prefixes) and prefixes[naive] in stored:
                naive += 1
            found = pool.matched(keys)
            assert found <= naive
            if pool.evictions == 0 and len(pool) < cap:
                assert found == naive
        elif op == "hold":
            n = pool.matched(keys)
            pool.acquire(keys[:n])
            held.append(keys[:n])
        elif held:
            pool.release(held.pop())
        for keys_held in held:
            assert all(k in pool for k in keys_held)
        n_held = len({k for ks in held for k in ks})
        assert len(pool) <= max(cap, n_held + 1)


@settings(max_examples=50, deadline=None)
@given(sizes=st.lists(st.integers(1, 64), min_size=1, max_size=40), cap_blocks=st.integers(1, 10))
def test_the_byte_cap_holds_and_keeps_the_most_recent(sizes, cap_blocks):
    """Blocks of various sizes under a byte cap: the pool's bytes stay within it (nothing is held), its byte
    count is the sum of what it holds, and what it keeps is the most recently stored run that fits."""
    cap = cap_blocks * 64 * 4  # float32 blocks of up to 64 values
    pool = BlockPool(1_000, max_bytes=cap)
    blocks = [Block([[mx.zeros((n,))]], (("KVCache", "{}"),)) for n in sizes]
    for i, block in enumerate(blocks):
        pool.put(f"k{i}", block)
        assert pool.nbytes <= cap
    kept = [i for i in range(len(blocks)) if f"k{i}" in pool]
    assert pool.nbytes == sum(blocks[i].nbytes for i in kept)
    assert kept == list(range(len(blocks) - len(kept), len(blocks)))  # a suffix: the oldest went first
    if kept[0] > 0:  # the one evicted last would not have fitted beside them
        assert pool.nbytes + blocks[kept[0] - 1].nbytes > cap


@settings(max_examples=60, deadline=None)
@given(
    runs=st.lists(st.integers(1, 6), min_size=1, max_size=6),
    picks=st.lists(st.integers(0, 40), min_size=1, max_size=12),
    arrays=st.integers(1, 3),
)
def test_blocks_viewing_segments_join_like_their_own_arrays(runs, picks, arrays):
    """Blocks cut from a few segments (as stores leave them), taken in any order with repeats: joining
    them per layer equals concatenating each block's own arrays (what a block-per-array pool would do)."""
    size = 3
    blocks = []
    for n, blocks_in_run in enumerate(runs):
        tokens = blocks_in_run * size
        layer = [
            mx.arange(tokens * 2 * (j + 1), dtype=mx.float32).reshape(1, j + 1, tokens, 2) + 1000 * n
            for j in range(arrays)
        ]
        segment = Segment([layer, []])
        blocks += [
            Block(None, (("KVCache", "{}"),) * 2, segment=segment, start=i * size, stop=(i + 1) * size)
            for i in range(blocks_in_run)
        ]
    chosen = [blocks[p % len(blocks)] for p in picks]
    joined = joined_layer(chosen, 0)
    for j in range(arrays):
        expected = mx.concatenate([b.layers[0][j] for b in chosen], axis=-2)
        assert joined[j].shape == expected.shape and mx.array_equal(joined[j], expected)
    assert joined_layer(chosen, 1) == []


@settings(max_examples=60, deadline=None)
@given(
    runs=st.lists(st.integers(1, 8), min_size=1, max_size=8),
    cap_blocks=st.integers(1, 12),
    held_run=st.integers(0, 7),
)
def test_the_byte_cap_counts_a_segment_while_any_of_its_blocks_is_kept(runs, cap_blocks, held_run):
    """Segments of several blocks under a byte cap: the pool's byte count is the sum of the distinct segments
    it still has a block of (their memory cannot go before), and it stays within the cap once nothing is
    held."""
    size, per_block = 2, 2 * 2 * 4  # float32, 2 tokens x 2 values per block
    pool = BlockPool(1_000, max_bytes=cap_blocks * per_block)
    held: list[str] = []
    for n, count in enumerate(runs):
        segment = Segment([[mx.zeros((1, 1, count * size, 2))]])
        for i in reversed(range(count)):
            block = Block(None, (("KVCache", "{}"),), segment=segment, start=i * size, stop=(i + 1) * size)
            pool.put(f"s{n}b{i}", block)
        if n == held_run and f"s{n}b0" in pool:
            pool.acquire([f"s{n}b0"])
            held.append(f"s{n}b0")
        kept = {b.segment for b in pool._blocks.values()}
        assert pool.nbytes == sum(seg.nbytes for seg in kept)
    pool.release(held)
    assert pool.nbytes <= cap_blocks * per_block
    assert pool.nbytes == sum(seg.nbytes for seg in {b.segment for b in pool._blocks.values()})


# -- generation


def test_a_warm_request_equals_a_cold_one(toy):
    cache = PrefixCache(PrefixCacheSettings(block_size=8))
    prompt = SYSTEM + "What is two plus two?"
    cold, cold_cached = run(toy, prompt, None)
    first, first_cached = run(toy, prompt, cache)
    warm, warm_cached = run(toy, prompt, cache)
    assert cold == first == warm and cold_cached == first_cached == 0
    n_tokens = len(prompt) + 1  # bytes and BOS
    assert warm_cached == (n_tokens - 1) // 8 * 8 > 0
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.matched_tokens) == (1, 1, warm_cached)
    # Another question after the same system prompt reuses the system prompt's blocks.
    other = SYSTEM + "Name a colour."
    assert run(toy, other, cache) == (run(toy, other, None)[0], len(SYSTEM) // 8 * 8)


def test_warm_logits_are_within_1e5_of_cold(toy):
    cache = PrefixCache(PrefixCacheSettings(block_size=4))
    prompt = SYSTEM + "Say yes."
    cold, _ = last_logits(toy, prompt, None)
    last_logits(toy, prompt, cache)
    warm, reused = last_logits(toy, prompt, cache)
    assert reused > 100
    assert float(mx.abs(warm - cold).max()) <= 1e-5


def test_another_tenant_never_hits(toy):
    cache = PrefixCache(PrefixCacheSettings(block_size=8))
    prompt = SYSTEM + "Hello."
    run(toy, prompt, cache, tenant="alice")
    assert run(toy, prompt, cache, tenant="bob")[1] == 0
    assert run(toy, prompt, cache, tenant="")[1] == 0
    assert run(toy, prompt, cache, tenant="alice")[1] > 0


def test_eviction_under_a_small_cap_stays_correct(toy):
    cache = PrefixCache(PrefixCacheSettings(block_size=8, max_blocks=5))
    prompts = [f"{i} " + SYSTEM[: 40 + 7 * i] + "?" for i in range(6)]
    expected = {p: run(toy, p, None)[0] for p in prompts}
    for _ in range(2):
        for p in prompts + prompts[::-1]:
            assert run(toy, p, cache)[0] == expected[p]
    stats = cache.stats()
    assert stats.evictions > 0 and stats.memory_blocks <= 5 and stats.hits > 0


def test_quantized_keys_and_values_are_cut_into_blocks_too(toy):
    cache = PrefixCache(PrefixCacheSettings(block_size=8))
    prompt = SYSTEM + "Quantized?"
    options = dict(kv_bits=8, kv_group_size=32)
    cold, _ = run(toy, prompt, None, **options)
    run(toy, prompt, cache, **options)
    warm, cached = run(toy, prompt, cache, **options)
    assert warm == cold and cached > 0
    assert run(toy, prompt, cache)[1] == 0  # float caches are another namespace


def test_a_sliding_window_is_skipped_with_one_log_line(toy, caplog):
    cache = PrefixCache(PrefixCacheSettings(block_size=8))
    prompt = SYSTEM + "Window?"
    cold, _ = run(toy, prompt, None, max_kv_size=64)
    with caplog.at_level(logging.INFO, logger="vlm_runtime.prefix_cache"):
        outputs = [run(toy, prompt, cache, max_kv_size=64) for _ in range(3)]
    assert all(out == (cold, 0) for out in outputs)
    lines = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == 1 and "RotatingKVCache" in lines[0].getMessage()
    assert cache.stats().skipped == 3


def test_a_prompt_cache_and_a_prefix_cache_together_are_refused(toy):
    from vlm_runtime import PromptCache

    with pytest.raises(ValueError, match="not both"):
        list(stream_generate(*toy, "hi", prompt_cache=PromptCache(), prefix_cache=PrefixCache(), max_tokens=2))


def test_one_unnamed_cache_refuses_a_second_model(toy):
    cache = PrefixCache()
    run(toy, SYSTEM, cache)
    with pytest.raises(ValueError, match="another model"):
        run((ToyModel(seed=1), toy[1]), SYSTEM, cache)


def test_reset_drops_every_block(toy):
    cache = PrefixCache(PrefixCacheSettings(block_size=8))
    run(toy, SYSTEM, cache)
    assert cache.reset() > 0 and cache.stats().memory_blocks == 0
    assert run(toy, SYSTEM, cache)[1] == 0


# -- disk tier


def disk_cache(folder: Path, **options) -> PrefixCache:
    return PrefixCache(PrefixCacheSettings(block_size=8, disk_dir=folder, **options), model_id="toy")


def test_a_new_cache_on_the_same_folder_hits_what_the_last_one_wrote(toy, tmp_path):
    prompt = SYSTEM + "From disk?"
    cold, _ = run(toy, prompt, None)
    first = disk_cache(tmp_path)
    run(toy, prompt, first)
    first.close()
    assert first.stats().disk_writes == len(list(tmp_path.glob("*.safetensors"))) > 0
    second = disk_cache(tmp_path)
    warm, cached = run(toy, prompt, second)
    assert warm == cold and cached == (len(prompt) // 8) * 8
    assert second.stats().disk_hits == cached // 8
    # The shards are plain safetensors.
    arrays = mx.load(str(next(tmp_path.glob("*.safetensors"))))
    assert all(a.shape[2] % 8 == 0 for a in arrays.values())
    second.close()


def test_a_long_prompt_is_written_in_shards_of_many_blocks(toy, tmp_path, monkeypatch):
    """A prompt's new blocks go to disk as few shards (up to SHARD_BLOCKS blocks each), not one file per
    block; a new cache on the folder reads them all back and answers as a cold run does."""
    from vlm_runtime import prefix_disk

    monkeypatch.setattr(prefix_disk, "SHARD_BLOCKS", 5)
    prompt = SYSTEM * 2 + "Many shards?"
    cold, _ = run(toy, prompt, None)
    first = disk_cache(tmp_path)
    run(toy, prompt, first)
    first.close()
    n_blocks = len(prompt) // 8
    shards = list(tmp_path.glob("*.safetensors"))
    assert len(shards) == -(-n_blocks // 5) and first.stats().disk_blocks == n_blocks
    second = disk_cache(tmp_path)
    warm, cached = run(toy, prompt, second)
    assert warm == cold and cached == n_blocks * 8 and second.stats().disk_hits == n_blocks
    second.close()


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_a_corrupt_or_truncated_shard_is_ignored_and_removed(toy, tmp_path, damage, caplog):
    prompt = SYSTEM + "Damaged?"
    cold, _ = run(toy, prompt, None)
    first = disk_cache(tmp_path)
    run(toy, prompt, first)
    first.close()
    shards = sorted(tmp_path.glob("*.safetensors"))
    # Damage the shard of the first block: the whole prefix hangs on it.
    keys = block_keys(namespace_key(first._identity, CacheSettings(), ""), [BOS, *prompt.encode()], 8)
    victim = tmp_path / f"{keys[0]}.safetensors"
    assert victim in shards
    raw = victim.read_bytes()
    if damage == "flip":
        raw = raw[:-5] + bytes([raw[-5] ^ 0x40]) + raw[-4:]
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw = b""
    victim.write_bytes(raw)
    second = disk_cache(tmp_path)
    with caplog.at_level(logging.WARNING, logger="vlm_runtime.prefix_cache"):
        warm, cached = run(toy, prompt, second)
    assert warm == cold and cached == 0
    assert second.stats().disk_corrupt == 1
    assert any("corrupt" in r.getMessage() for r in caplog.records)
    second.flush()  # the request rewrote the block whole
    assert victim.exists() and victim.read_bytes() != raw
    second.close()


def test_the_disk_tier_keeps_within_its_cap(toy, tmp_path):
    cache = disk_cache(tmp_path, disk_max_bytes=6_000)
    for i in range(4):
        run(toy, f"{i} {SYSTEM}", cache)
    cache.flush()
    stats = cache.stats()
    assert stats.disk_evictions > 0 and 0 < stats.disk_bytes <= 6_000
    assert sum(p.stat().st_size for p in tmp_path.glob("*.safetensors")) == stats.disk_bytes
    assert not list(tmp_path.glob(".tmp-*"))
    cache.close()


def test_a_disk_tier_needs_a_model_id(tmp_path):
    with pytest.raises(ValueError, match="model_id"):
        PrefixCache(PrefixCacheSettings(disk_dir=tmp_path))


def test_stale_temporary_files_are_removed_on_start_and_fresh_ones_kept(tmp_path):
    import os
    import time

    stale, fresh = tmp_path / ".tmp-abc-1-2", tmp_path / ".tmp-def-3-4"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"another process writing")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    disk_cache(tmp_path).close()
    assert not stale.exists() and fresh.exists()


# -- the batching engine


def test_32_threads_with_shared_and_private_prefixes_get_their_outputs_alone(toy):
    """Clients submitting at once, some sharing a system prompt (in two tenants), some with one of their own;
    twice over, so the second round hits blocks the first stored while other rows decode."""
    from vlm_runtime import Engine, GenerationConfig, Request, generate

    model, processor = toy
    prompts = [(SYSTEM if i % 3 else f"private {i} " * 9) + f"question {i}?" for i in range(32)]
    tenants = ["a" if i % 2 else "b" for i in range(32)]
    expected = [generate(model, processor, p, max_tokens=6, ignore_eos=True).text for p in prompts]
    config = GenerationConfig(max_tokens=6, ignore_eos=True)
    cache = PrefixCache(PrefixCacheSettings(block_size=8, max_blocks=200))
    with Engine(model, processor, max_batch_size=8, prefix_cache=cache) as engine:
        for _ in range(2):
            results: dict[int, tuple[str, int]] = {}

            def client(i: int, results: dict[int, tuple[str, int]] = results) -> None:
                request = Request(processor.prepare_inputs(prompts[i]), config=config, prefix_cache_tenant=tenants[i])
                events = list(engine.submit(request))
                results[i] = ("".join(e.text for e in events), events[-1].cached_tokens)

            threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert [results[i][0] for i in range(32)] == expected
    stats = cache.stats()
    assert stats.hits >= 32 and stats.misses + stats.hits == 64
    assert all(results[i][1] > 0 for i in range(32))  # the second round: every prompt was seen before


@pytest.mark.parametrize("kv", [{}, {"kv_bits": 8, "kv_group_size": 32}], ids=["float", "quantized"])
def test_misses_prefilled_together_keep_their_blocks_row_by_row(toy, kv):
    """Short prompts submitted at once are prefilled as one padded batch; each row's blocks are cut from it, so
    the next round hits every prompt, with the tokens each gets alone."""
    from vlm_runtime import BatchGenerator, GenerationConfig, Request

    model, processor = toy
    prompts = [f"shared start, then {i} " * (i + 2) for i in range(6)]
    config = GenerationConfig(max_tokens=5, ignore_eos=True)
    settings = CacheSettings(**kv)
    expected = [run(toy, p, None, **kv)[0][:5] for p in prompts]
    cache = PrefixCache(PrefixCacheSettings(block_size=8))
    engine = BatchGenerator(model, processor, max_batch_size=8, cache_settings=settings, prefix_cache=cache)
    for round_ in range(2):
        uids = {engine.submit(Request(processor.prepare_inputs(p), config=config)): i for i, p in enumerate(prompts)}
        tokens: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
        reused: dict[int, int] = {}
        while engine.has_work():
            for event in engine.step():
                tokens[uids[event.uid]].append(event.token)
                reused[uids[event.uid]] = event.cached_tokens
        assert [tokens[i] for i in range(len(prompts))] == expected
        assert all((reused[i] > 0) == (round_ == 1) for i in range(len(prompts)))
