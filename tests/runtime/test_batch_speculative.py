"""Speculative decoding inside the batching engine follows plain batched decoding: ragged rows, each accepting
its own number of proposals, give token for token what they give without a drafter (greedy), whatever the
drafter, the draft length, the cache kind, the request's rules and when each request joins."""

from __future__ import annotations

import warnings

import mlx.core as mx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm_runtime import ArraysCache, CacheSettings, GenerationConfig, Request, SamplingParams
from vlm_runtime.batch import BatchGenerator
from vlm_runtime.batch_cache import BatchKVCache
from vlm_runtime.recurrent_cache import RecurrentCache
from vlm_runtime.speculative import ModelDrafter
from vlm_runtime.thinking import ThinkingConfig

from .toy import END_THINK, EOS, ByteProcessor, ToyModel

TARGET = ToyModel(layers=2, seed=3)
SAME = ModelDrafter(ToyModel(layers=2, seed=3))  # agrees with the target everywhere
OTHER = ModelDrafter(ToyModel(layers=1, seed=11))  # mostly disagrees
PROCESSOR = ByteProcessor()
PROMPTS = ["hello", "a much longer prompt than the others here", "x", "mid-size prompt", "another one!"]


def request(
    prompt: str, *, sampling: SamplingParams = SamplingParams(), thinking=ThinkingConfig(), **config
) -> Request:
    config.setdefault("ignore_eos", True)
    constraints = config.pop("constraints", ())
    return Request(
        PROCESSOR.prepare_inputs(prompt), sampling, GenerationConfig(**config), thinking, constraints=constraints
    )


def run(requests: list[Request], drafter=None, *, join_every: int = 0, **engine) -> list[list]:
    """Every request's events, in submission order. ``join_every``: submit one request per that many steps
    (continuous batching), else all at once."""
    generator = BatchGenerator(TARGET, PROCESSOR, drafter=drafter, **engine)
    order: dict[int, int] = {}
    waiting = list(enumerate(requests))
    events: list[list] = [[] for _ in requests]
    steps = 0
    while waiting or generator.has_work():
        if waiting and (join_every == 0 or steps % join_every == 0):
            for i, req in waiting if join_every == 0 else waiting[:1]:
                order[generator.submit(req)] = i
            waiting = [] if join_every == 0 else waiting[1:]
        for event in generator.step():
            events[order[event.uid]].append(event)
        steps += 1
    return events


def tokens(events: list[list]) -> list[list[int]]:
    return [[e.token for e in row if e.token is not None] for row in events]


@settings(max_examples=8, deadline=None)
@given(
    max_tokens=st.integers(1, 90),
    drafter=st.sampled_from(["same", "other"]),
    n=st.integers(1, 7),
    join_every=st.sampled_from([0, 3]),
)
def test_greedy_rows_equal_plain_batched_decoding(max_tokens: int, drafter: str, n: int, join_every: int) -> None:
    requests = [request(p, max_tokens=max_tokens, num_draft_tokens=n) for p in PROMPTS]
    plain = run(requests, join_every=join_every)
    fast = run(requests, SAME if drafter == "same" else OTHER, join_every=join_every)
    assert tokens(fast) == tokens(plain)
    assert all(len(row) == max_tokens for row in tokens(fast))  # max_tokens exactly, drafts or not
    assert [[e.text for e in row] for row in fast] == [[e.text for e in row] for row in plain]


def test_each_row_keeps_its_own_number_of_tokens_over_200_steps() -> None:
    """Rows of other lengths and other drafts: the agreeing drafter's rows keep everything, and the verify
    pass feeds rows of different widths, which the caches take back row by row."""
    requests = [request(p, max_tokens=200, num_draft_tokens=1 + i) for i, p in enumerate(PROMPTS)]
    plain = run(requests)
    for drafter in (SAME, OTHER):
        fast = run(requests, drafter)
        assert tokens(fast) == tokens(plain)
        last = [row[-1] for row in fast]
        if drafter is SAME:
            assert all(e.accepted_draft_tokens == e.draft_tokens >= 99 for e in last)  # 1..5 per round
        else:
            assert all(e.accepted_draft_tokens < e.draft_tokens for e in last)
            # The schedule pauses a drafter this wrong, row by row.
            assert all(e.draft_tokens < 120 for e in last)


@pytest.mark.parametrize(
    "options",
    [
        dict(stop=("aa", "xyz", "e"), ignore_eos=False),
        dict(logprobs=True, top_logprobs=3),
        dict(sampling=SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, logit_bias={ord("a"): 3.0})),
        dict(ignore_eos=False, sampling=SamplingParams(logit_bias={EOS: 3.5})),
    ],
    ids=["stop", "logprobs", "processors", "eos"],
)
@pytest.mark.parametrize("drafter", [SAME, OTHER], ids=["same", "other"])
def test_request_rules_hold_row_by_row(options: dict, drafter) -> None:
    # Mixed rows: half follow the option, half are plain greedy requests.
    requests = [
        request(p, max_tokens=48, num_draft_tokens=5, **(options if i % 2 else {})) for i, p in enumerate(PROMPTS)
    ]
    plain, fast = run(requests), run(requests, drafter)
    assert tokens(fast) == tokens(plain)
    for a_row, b_row in zip(fast, plain):
        assert [(e.text, e.finish_reason, e.stop_string) for e in a_row] == [
            (e.text, e.finish_reason, e.stop_string) for e in b_row
        ]
        for a, b in zip(a_row, b_row):
            assert (a.logprob is None) == (b.logprob is None)
            if a.logprob is not None:
                assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
                assert [t for t, _ in a.top_logprobs] == [t for t, _ in b.top_logprobs]


@pytest.mark.parametrize(
    "cache",
    [
        CacheSettings(kv_bits=8, kv_group_size=32),
        CacheSettings(kv_bits=3.5, kv_quant_scheme="turboquant"),
        CacheSettings(max_kv_size=12),  # shorter than most prompts: rows slide their window while drafting
    ],
    ids=["q8", "turboquant", "window"],
)
def test_batched_cache_kinds_take_back_each_rows_proposals(cache: CacheSettings) -> None:
    requests = [request(p, max_tokens=60, num_draft_tokens=4) for p in PROMPTS]
    plain = run(requests, cache_settings=cache, max_batch_size=4)
    for drafter in (SAME, OTHER):
        assert tokens(run(requests, drafter, cache_settings=cache, max_batch_size=4)) == tokens(plain)


def test_the_thinking_budget_closes_each_rows_block_at_the_same_token() -> None:
    thinking = ThinkingConfig(budget=6)
    requests = [request(p + "<think>", max_tokens=30, thinking=thinking, num_draft_tokens=4) for p in PROMPTS[:3]]
    plain = run(requests)
    assert all(END_THINK in row for row in tokens(plain))
    assert tokens(run(requests, SAME)) == tokens(plain)
    fast = run(requests, OTHER)
    assert tokens(fast) == tokens(plain)
    assert ["".join(e.reasoning for e in row) for row in fast] == ["".join(e.reasoning for e in row) for row in plain]


class OnlyAB:
    """A stateful constraint (as a grammar is): it sees every history in order, one token longer each call.
    Its forks (which mask the drafter's proposals) record nothing."""

    def __init__(self, lengths: list[int] | None = None) -> None:
        self.lengths = lengths

    def fork(self) -> OnlyAB:
        return OnlyAB(None)

    def __call__(self, logits: mx.array, history: mx.array, generated: int) -> mx.array:
        if self.lengths is not None:
            self.lengths.append(history.shape[1])
        allowed = (mx.arange(logits.shape[-1]) == ord("a")) | (mx.arange(logits.shape[-1]) == ord("b"))
        return mx.where(allowed[None], logits, float("-inf"))


def test_a_constraint_decides_every_verified_position_in_order() -> None:
    results = {}
    for drafter in (None, SAME):
        constraint = OnlyAB([])
        requests = [
            request("abc", max_tokens=20, constraints=[constraint]),
            *(request(p, max_tokens=20) for p in PROMPTS),
        ]
        events = run(requests, drafter)
        results[drafter is None] = tokens(events)
        prompt = len(PROCESSOR.prepare_inputs("abc")["input_ids"][0])
        assert constraint.lengths == list(range(prompt, prompt + 20))  # once per emitted token, never ahead
        assert set(tokens(events)[0]) <= {ord("a"), ord("b")}
        if drafter is not None:  # the grammar masked the proposals too: the agreeing drafter's are all kept
            assert events[0][-1].accepted_draft_tokens == events[0][-1].draft_tokens > 10
    assert results[True] == results[False]


def test_a_constraint_masks_the_single_stream_drafts_too() -> None:
    from vlm_runtime.generate import run_generation

    outputs = {}
    for drafter in (None, SAME):
        req = request("abc", max_tokens=30, constraints=[OnlyAB([])])
        outputs[drafter is None] = list(run_generation(TARGET, PROCESSOR, req, drafter=drafter))
    assert [e.token for e in outputs[False]] == [e.token for e in outputs[True]]
    assert outputs[False][-1].accepted_draft_tokens == outputs[False][-1].draft_tokens > 10


def test_a_fork_that_fails_or_allows_nothing_only_ends_the_draft() -> None:
    class Failing(OnlyAB):
        def fork(self):
            return lambda logits, history, generated: (_ for _ in ()).throw(RuntimeError("fork in an error state"))

    class Nothing(OnlyAB):
        def fork(self):
            return lambda logits, history, generated: mx.full(logits.shape, -mx.inf, logits.dtype)

    for kind in (Failing, Nothing):
        requests = [request("abc", max_tokens=20, constraints=[kind([])]), request("free", max_tokens=20)]
        events = run(requests, SAME)
        assert tokens(events) == tokens(run([request("abc", max_tokens=20, constraints=[OnlyAB([])]), requests[1]]))
        assert all(e.finish_reason in (None, "length") for row in events for e in row)
        assert events[0][-1].draft_tokens == 0  # every draft ended before its first proposal


class Breaks:
    """A per-row drafter (a draft model's, without the batched form) that breaks after a few tokens."""

    target_layers = ()

    def __init__(self) -> None:
        self.inner = ModelDrafter(ToyModel(layers=2, seed=3))

    def spawn(self) -> Breaks:
        return Breaks()

    def begin(self, inputs, features=None) -> None:
        self.inner.begin(inputs)

    def propose(self, emitted, n, features=None, mask=None):
        if len(emitted) > 5:
            raise RuntimeError("the drafter broke")
        return self.inner.propose(emitted, n, features, mask)


class BreaksTogether(ModelDrafter):
    """The batched form of a draft model, breaking at its fourth round."""

    def for_batch(self):
        batched, calls = super().for_batch(), []

        class Breaking:
            def propose_rows(self, rows):
                calls.append(1)
                if len(calls) > 3:
                    raise RuntimeError("the batched drafter broke")
                return batched.propose_rows(rows)

        return Breaking()


def test_a_failing_drafter_costs_the_drafts_never_the_tokens_or_the_batch() -> None:
    requests = [request(p, max_tokens=40, num_draft_tokens=3) for p in PROMPTS]
    plain = tokens(run(requests))
    with pytest.warns(UserWarning, match="speculative decoding stopped for a request: RuntimeError: the drafter"):
        events = run(requests, Breaks())
    assert tokens(events) == plain
    assert all(row[-1].finish_reason == "length" and 0 < row[-1].draft_tokens < 20 for row in events)
    with pytest.warns(UserWarning, match="speculative decoding stopped: RuntimeError: the batched drafter broke"):
        events = run(requests, BreaksTogether(ToyModel(layers=2, seed=3)))
    assert tokens(events) == plain
    assert all(row[-1].finish_reason == "length" and 0 < row[-1].draft_tokens <= 9 for row in events)


def test_a_draft_model_drafts_for_every_row_in_shared_passes(monkeypatch) -> None:
    """The batched draft model: each draft step is one forward pass over all the rows, and what it proposes is
    what each row's own drafter would (the agreeing drafter's proposals are all kept)."""
    draft = ToyModel(layers=2, seed=3)
    shapes = []
    original = draft.hidden_states

    def recording(inputs_embeds, **kwargs):
        shapes.append(inputs_embeds.shape[0])
        return original(inputs_embeds, **kwargs)

    monkeypatch.setattr(draft, "hidden_states", recording)
    requests = [request(p, max_tokens=60, num_draft_tokens=1 + i) for i, p in enumerate(PROMPTS)]
    events = run(requests, ModelDrafter(draft))
    assert tokens(events) == tokens(run(requests))
    assert all(row[-1].accepted_draft_tokens == row[-1].draft_tokens > 20 for row in events)
    assert max(shapes) == len(PROMPTS) and shapes.count(len(PROMPTS)) > len(shapes) // 2


def test_seeded_sampled_rows_draw_from_their_own_key_sequence() -> None:
    """Each emitted token takes one draw from the request's key, as plain decoding does, and a proposal is kept
    exactly when the draw agrees with it: the sampled text follows the target's distribution (here, on these
    float32 logits, the very same draws)."""
    sampling = [SamplingParams(temperature=1.0, seed=s) for s in range(len(PROMPTS))]
    requests = [request(p, max_tokens=40, sampling=s, num_draft_tokens=3) for p, s in zip(PROMPTS, sampling)]
    plain = run(requests)
    assert tokens(run(requests, SAME)) == tokens(plain)
    assert tokens(run(requests, OTHER)) == tokens(plain)


def test_recurrent_layers_decode_plainly_with_one_warning() -> None:
    class Recurrent(ToyModel):
        def make_cache(self):
            return [RecurrentCache() for _ in self.qkv]

    with pytest.warns(UserWarning, match="speculative decoding is off"):
        generator = BatchGenerator(Recurrent(), PROCESSOR, drafter=SAME)
    assert not generator.drafting
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert BatchGenerator(TARGET, PROCESSOR, drafter=SAME).drafting
    assert not isinstance(ArraysCache(1), BatchKVCache)
    # A recurrent draft model cannot draft batched, nor alone: its requests decode plainly, each with one line.
    with pytest.warns(UserWarning, match="speculative decoding stopped for a request: ValueError: the draft model"):
        events = run([request("a draft with a state", max_tokens=12)], ModelDrafter(Recurrent()))
    assert tokens(events) == tokens(run([request("a draft with a state", max_tokens=12)]))


def test_trim_rows_keeps_rows_right_aligned_and_positions_unchanged() -> None:
    cache = BatchKVCache([0, 2, 1])
    keys = mx.random.normal((3, 2, 6, 4))
    cache.update_and_fetch(keys, keys)
    before = mx.array(cache.position_delta) + cache.offset
    cache.trim_rows([1, 3, 2])
    stored, _ = cache.state
    assert cache.offset == 5 and cache.padding == [0, 4, 2]
    # Each row's next rotary position is its old one minus what it dropped.
    assert (mx.array(cache.position_delta) + cache.offset).tolist() == (before - mx.array([1, 3, 2])).tolist()
    assert mx.array_equal(stored[0, :, :5], keys[0, :, :5])
    assert mx.array_equal(stored[1, :, 4:], keys[1, :, 2:3])
    assert mx.array_equal(stored[2, :, 2:], keys[2, :, 1:4])
    assert stored[1, :, :2].abs().max().item() == 0  # the columns shifted in are empty


class FeatureCheckingDrafter(ModelDrafter):
    """Drafts as ``SAME`` does, and checks that the target's features it is handed are exactly those a full
    forward pass gives at the positions the target kept, in order, none missing and none rejected."""

    target_layers = (0, 2)

    def __init__(self) -> None:
        super().__init__(ToyModel(layers=2, seed=3))
        self.checked = 0

    def spawn(self) -> FeatureCheckingDrafter:
        return type(self)()

    def begin(self, inputs, features=None) -> None:
        super().begin(inputs)
        assert features is not None and features.shape[1] == len(self._prompt)
        self._seen = [features]

    def propose(self, emitted, n, features=None, mask=None):
        if features is not None:  # None: nothing fed since the last call (the first token came from the prefill)
            self._seen.append(features)
        sequence = self._prompt + list(emitted)
        fed = mx.concatenate(self._seen, axis=1)
        assert fed.shape[1] == len(sequence) - 1, "the target has fed every token but the last emitted one"
        _, expected = TARGET.hidden_states_and_layers(
            TARGET.embed_tokens(mx.array([sequence[:-1]])), cache=None, layers=self.target_layers
        )
        assert mx.allclose(fed, expected, atol=1e-4).item()
        self.checked += 1
        return super().propose(emitted, n)


class MissingFeatureDrafter(FeatureCheckingDrafter):
    """Its first proposal of each round is wrong: rounds reject, then it is paused and the target decodes plainly
    for a while (those positions' features reach it when it drafts again)."""

    def propose(self, emitted, n, features=None, mask=None):
        proposals = super().propose(emitted, n, features)
        return [(t + 1) % 256 for t in proposals[:1]] + proposals[1:]


def test_drafters_that_read_the_targets_features_get_those_of_every_kept_position() -> None:
    from vlm_runtime import stream_generate

    requests = [request(p, max_tokens=160, num_draft_tokens=3) for p in PROMPTS]
    plain = run(requests)
    for drafter in (FeatureCheckingDrafter(), MissingFeatureDrafter()):
        assert tokens(run(requests, drafter, join_every=2)) == tokens(plain)
        fast = stream_generate(TARGET, PROCESSOR, "features", max_tokens=160, ignore_eos=True, draft_model=drafter)
        slow = stream_generate(TARGET, PROCESSOR, "features", max_tokens=160, ignore_eos=True)
        assert [r.token for r in fast] == [r.token for r in slow]
        assert drafter.checked > 5


def test_a_target_that_hides_its_layers_is_refused_with_one_line() -> None:
    class Blind:
        def __init__(self) -> None:
            self.model = TARGET

        def __getattr__(self, name):
            if name == "hidden_states_and_layers":
                raise AttributeError(name)
            return getattr(self.model, name)

    with pytest.raises(ValueError, match=r"reads the target's hidden states .* Blind does not expose"):
        BatchGenerator(Blind(), PROCESSOR, drafter=FeatureCheckingDrafter())
