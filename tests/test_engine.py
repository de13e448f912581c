"""The AR decoding engine in-process: KV pool, scheduler, and exactness against transformers.

Steps are driven by hand (`engine.step()`), so arrivals between steps are exact, not timed.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from reference import load_reference
from safetensors.torch import load_file, save_file

from granite_speech_triton.model.config import ARModelConfig, read_config_json
from granite_speech_triton.model.decoder import ARDecoder, load_ar_decoder
from granite_speech_triton.model.engine import EngineConfig, Finish, Overloaded, Policy, Row, Scheduler, Sequence
from granite_speech_triton.model.errors import RequestError
from granite_speech_triton.model.kv_cache import KVLayout, KVPool
from granite_speech_triton.model.projector import num_audio_tokens
from granite_speech_triton.model.prompts import SpeechRequest

EOS_BOOST = 2.0  # scales the end-of-text row of the tiny LM head: some requests then end early


@pytest.fixture(scope="module")
def tiny_ar_eos_checkpoint(tiny_ar_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny AR checkpoint with a stronger end-of-text logit, so that rows end by end of text."""
    target = tmp_path_factory.mktemp("tiny-ar-eos") / "checkpoint"
    shutil.copytree(tiny_ar_checkpoint, target)
    tensors = load_file(target / "model.safetensors")
    eos = read_config_json(target)["text_config"]["eos_token_id"]
    tensors["language_model.lm_head.weight"][eos] *= EOS_BOOST
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def audio_rows(checkpoint: Path, frames: int, seed: int) -> torch.Tensor:
    cfg = ARModelConfig.from_dict(read_config_json(checkpoint))
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_audio_tokens(frames, cfg.projector), cfg.text["hidden_size"], generator=generator)


def reference_tokens(checkpoint: Path, seq: Sequence) -> list[int]:
    """transformers' greedy generate for this request alone (audio rows spliced into its prompt)."""
    model, _ = load_reference(checkpoint)
    ids = torch.tensor([seq.prompt_ids])
    with torch.inference_mode():
        embeds = model.model.get_merged_audio_embeddings(ids, seq.audio_embeds)
        out = model.generate(
            inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=seq.max_new_tokens
        )
    return out[0].tolist()


def decoder_for(checkpoint: Path, **engine) -> ARDecoder:
    return load_ar_decoder(checkpoint, engine=EngineConfig(**engine))


REQUESTS = [  # (options, encoder frames): prompts of 6 to 123 audio tokens, budgets of 1 to 40
    (SpeechRequest(max_new_tokens=3), 10),
    (SpeechRequest(max_new_tokens=40), 600),
    (SpeechRequest(punctuate=True, max_new_tokens=17), 90),
    (SpeechRequest(task="translate", target_language="ja", max_new_tokens=11), 200),
    (SpeechRequest(max_new_tokens=1), 31),
    (SpeechRequest(keywords=("Granite", "Triton"), max_new_tokens=25), 45),
    (SpeechRequest(task="translate", language="de", target_language="en", max_new_tokens=30), 300),
]


def test_kv_pool_grows_keeps_rows_and_moves_them():
    layout = KVLayout(layers=2, kv_heads=2, head_dim=4)
    pool = KVPool(layout, max_rows=4, max_tokens=600, device=torch.device("cpu"), dtype=torch.float32)
    assert pool.allocated_bytes() == 0 and pool.max_bytes() == 4 * 600 * layout.bytes_per_position(torch.float32)
    pool.reserve(1, 10)
    pool.keys[1][0, :, :10] = 7.0
    pool.lengths[0] = 10
    pool.reserve(3, 300)  # grows both ways, keeping row 0
    assert (pool.rows, pool.capacity) == (3, 512)
    assert bool((pool.keys[1][0, :, :10] == 7.0).all())
    pool.move_row(0, 2)
    assert bool((pool.keys[1][2, :, :10] == 7.0).all()) and pool.lengths.tolist()[:3] == [0, 0, 10]
    with pytest.raises(ValueError, match="exceed the pool"):
        pool.reserve(5, 10)
    assert layout.bytes_per_position(torch.bfloat16) * 2 == layout.bytes_per_position(torch.float32)


def fake(prompt_length: int) -> Sequence:
    return Sequence([0] * prompt_length, torch.zeros(0, 1), max_new_tokens=4)


@pytest.mark.parametrize("policy", list(Policy))
def test_scheduler_admits_first_come_first_served_within_its_bounds(policy):
    scheduler = Scheduler(EngineConfig(max_rows=3, prefill_token_budget=100, policy=policy))
    scheduler.waiting.extend(fake(n) for n in (60, 30, 30, 5))
    first = scheduler.admit()
    if policy is Policy.INFLIGHT:  # at most one prefill budget per step, always at least one request
        assert [s.prompt_length for s in first] == [60, 30]
    else:  # a static batch takes every free row at once, prefilled in budget-sized packs
        assert [s.prompt_length for s in first] == [60, 30, 30]
        assert [[s.prompt_length for s in p] for p in scheduler.packs(first)] == [[60, 30], [30]]
    scheduler.running.extend(Row(seq) for seq in first)
    second = scheduler.admit()
    assert [s.prompt_length for s in second] == ([30] if policy is Policy.INFLIGHT else [])
    scheduler.waiting.appendleft(fake(500))
    scheduler.running.clear()
    assert [s.prompt_length for s in scheduler.admit()][:1] == [500]  # over the budget: a pack of its own


def test_staggered_arrivals_equal_transformers_alone(tiny_ar_checkpoint):
    """Requests join while others decode (exactly between chosen steps), rows leave as they end,
    a full pool makes newcomers wait: every request still gets transformers' tokens for it alone."""
    decoder = decoder_for(tiny_ar_checkpoint, max_rows=3, prefill_token_budget=150)
    engine = decoder.engine
    seqs = [decoder.sequence(r, audio_rows(tiny_ar_checkpoint, f, i)) for i, (r, f) in enumerate(REQUESTS)]
    reports = []
    engine.observers.append(reports.append)
    arrivals = {0: seqs[:2], 2: seqs[2:4], 5: seqs[4:6], 9: seqs[6:]}  # step index -> requests arriving before it
    joined_while_decoding = []
    step = 0
    while step <= max(arrivals) or not engine.idle:
        for seq in arrivals.get(step, []):
            engine.submit(seq)
        decoding = bool(engine.scheduler.running)
        seen = len(reports)
        engine.step()
        if decoding:
            joined_while_decoding += [s for r in reports[seen:] for s in r.admitted]
        step += 1
    for seq in seqs:
        assert seq.finish in (Finish.EOS, Finish.LENGTH)
        assert seq.tokens == reference_tokens(tiny_ar_checkpoint, seq)
    assert joined_while_decoding, "no request was admitted while others were decoding"
    assert max(r.rows for r in reports) == 3  # the pool's bound, reached
    assert any(len(r.admitted) > 1 for r in reports)  # packed prefill of several prompts
    assert int(engine.pool.lengths.sum()) == 0  # every row freed


def test_rows_ending_by_end_of_text_and_by_budget_are_exact(tiny_ar_eos_checkpoint):
    decoder = decoder_for(tiny_ar_eos_checkpoint, max_rows=8)
    requests = [(SpeechRequest(max_new_tokens=40), f) for f in (10, 50, 90, 150, 200, 300, 30, 70)]
    seqs = [decoder.sequence(r, audio_rows(tiny_ar_eos_checkpoint, f, 100 + i)) for i, (r, f) in enumerate(requests)]
    decoder.engine.generate(seqs)
    eos = read_config_json(tiny_ar_eos_checkpoint)["text_config"]["eos_token_id"]
    finishes = {s.finish for s in seqs}
    assert finishes == {Finish.EOS, Finish.LENGTH}, "the test needs rows ending both ways"
    for seq in seqs:
        assert seq.tokens == reference_tokens(tiny_ar_eos_checkpoint, seq)
        assert (seq.tokens[-1] == eos) == (seq.finish is Finish.EOS)
        assert seq.tokens.count(eos) <= 1


@pytest.mark.parametrize("policy", list(Policy))
def test_a_late_request_joins_in_flight_or_waits_for_the_static_batch(tiny_ar_checkpoint, policy):
    decoder = decoder_for(tiny_ar_checkpoint, max_rows=4, policy=policy)
    engine = decoder.engine
    first = [decoder.sequence(r, audio_rows(tiny_ar_checkpoint, f, i)) for i, (r, f) in enumerate(REQUESTS[:2])]
    options, frames = REQUESTS[2]
    late = decoder.sequence(options, audio_rows(tiny_ar_checkpoint, frames, 2))
    for seq in first:
        engine.submit(seq)
    engine.step()
    engine.submit(late)
    joined_a_running_batch = False
    while not engine.idle:
        engine.step()
        if late.rows or late.finish:
            joined_a_running_batch |= any(s.finish is None for s in first)
    assert joined_a_running_batch == (policy is Policy.INFLIGHT)
    for seq in [*first, late]:
        assert seq.tokens == reference_tokens(tiny_ar_checkpoint, seq)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_cancelled_and_expired_requests_leave_at_the_next_step(tiny_ar_checkpoint):
    decoder = decoder_for(tiny_ar_checkpoint, max_rows=4)
    engine = decoder.engine
    clock = FakeClock()
    engine.clock = clock
    flags = {"gone": False}
    options = SpeechRequest(max_new_tokens=40)
    keep = decoder.sequence(options, audio_rows(tiny_ar_checkpoint, 120, 1))
    by_key = decoder.sequence(options, audio_rows(tiny_ar_checkpoint, 60, 2), key="k1")
    by_flag = decoder.sequence(options, audio_rows(tiny_ar_checkpoint, 30, 3), is_cancelled=lambda: flags["gone"])
    late = decoder.sequence(options, audio_rows(tiny_ar_checkpoint, 90, 4), deadline=clock.now + 5)
    queued = decoder.sequence(options, audio_rows(tiny_ar_checkpoint, 90, 5), key="k2")
    ended: list[Sequence] = []
    for seq in (keep, by_key, by_flag, late, queued):
        seq.notify = lambda s: ended.append(s) if s.finish else None
        engine.submit(seq)
    for _ in range(3):
        engine.step()
    assert len(engine.scheduler.running) == 4 and list(engine.scheduler.waiting) == [queued]
    engine.cancel("k1")
    engine.cancel("k2")  # still waiting: it never takes a row
    flags["gone"] = True
    clock.now += 6  # past `late`'s deadline, and past the cancellation poll interval
    engine.step()
    assert {s.finish for s in (by_key, by_flag, queued)} == {Finish.CANCELLED}
    assert late.finish is Finish.DEADLINE and "deadline" in late.message
    assert engine.scheduler.running_sequences() == [keep] and keep.rows[0].index == 0
    assert int(engine.pool.lengths[0]) == keep.prompt_length + len(keep.tokens) - 1
    assert int(engine.pool.lengths[1:].sum()) == 0  # the dropped rows are free
    assert {id(s) for s in ended} == {id(s) for s in (by_key, by_flag, late, queued)}
    assert len(by_key.tokens) == 4 and queued.tokens == []
    while not engine.idle:
        engine.step()
    assert keep.tokens == reference_tokens(tiny_ar_checkpoint, keep)


def test_requests_that_cannot_fit_are_refused_before_they_start(tiny_ar_checkpoint):
    decoder = decoder_for(tiny_ar_checkpoint, max_tokens_per_row=100)
    with pytest.raises(RequestError, match="exceeds the 100 positions"):
        decoder.sequence(SpeechRequest(max_new_tokens=90), audio_rows(tiny_ar_checkpoint, 30, 0))
    seq = decoder.sequence(SpeechRequest(max_new_tokens=5), audio_rows(tiny_ar_checkpoint, 30, 0))
    seq.audio_embeds = seq.audio_embeds[:-1]
    with pytest.raises(RequestError, match="audio rows"):
        decoder.engine.check(seq)


def test_a_failed_forward_fails_its_requests_and_the_engine_goes_on(tiny_ar_checkpoint):
    decoder = decoder_for(tiny_ar_checkpoint)
    engine = decoder.engine
    seq = decoder.sequence(SpeechRequest(max_new_tokens=5), audio_rows(tiny_ar_checkpoint, 30, 0))
    broken = decoder.sequence(SpeechRequest(max_new_tokens=5), audio_rows(tiny_ar_checkpoint, 30, 1))
    broken.audio_embeds = torch.randn(broken.audio_embeds.shape[0], 3)  # wrong width: the prefill raises
    engine.submit(seq)
    engine.inbox.put(broken)  # past `submit`'s checks, as a bug would be
    with pytest.raises(RuntimeError):
        engine.step()
    engine.fail_all("internal error: test")
    assert seq.finish is Finish.ERROR and broken.finish is Finish.ERROR
    again = decoder.sequence(SpeechRequest(max_new_tokens=5), audio_rows(tiny_ar_checkpoint, 30, 0))
    assert engine.generate([again])[0] == reference_tokens(tiny_ar_checkpoint, again)


def test_a_full_queue_refuses_and_a_long_wait_drops_with_overloaded(tiny_ar_checkpoint):
    decoder = decoder_for(tiny_ar_checkpoint, max_rows=1, max_waiting=2, max_wait_s=10.0)
    engine = decoder.engine
    clock = FakeClock()
    engine.clock = clock
    options = SpeechRequest(max_new_tokens=30)
    seqs = [decoder.sequence(options, audio_rows(tiny_ar_checkpoint, 30, i)) for i in range(4)]
    engine.submit(seqs[0])
    engine.step()  # seqs[0] takes the only row
    engine.submit(seqs[1])
    engine.submit(seqs[2])
    with pytest.raises(Overloaded, match="queue is full"):
        engine.submit(seqs[3])
    clock.now += 11
    engine.step()
    assert seqs[1].finish is Finish.OVERLOADED and seqs[2].finish is Finish.OVERLOADED
    assert "queue_timeout_us" in seqs[1].message and seqs[0].finish is None
    while not engine.idle:
        engine.step()
    assert seqs[0].tokens == reference_tokens(tiny_ar_checkpoint, seqs[0])


class CountingTurn:
    """A stand-in for the CPU lease: counts the steps it was held for, and who was inside."""

    def __init__(self) -> None:
        self.entered = 0
        self.inside = False

    def __enter__(self) -> None:
        assert not self.inside
        self.inside = True
        self.entered += 1

    def __exit__(self, *exc) -> None:
        self.inside = False


def test_the_serving_loop_steps_inside_its_turn_and_not_when_idle(tiny_ar_checkpoint):
    decoder = decoder_for(tiny_ar_checkpoint, max_rows=2)
    engine, turn, stop = decoder.engine, CountingTurn(), threading.Event()
    ended = threading.Event()
    seq = decoder.sequence(SpeechRequest(max_new_tokens=6), audio_rows(tiny_ar_checkpoint, 60, 1))
    seq.notify = lambda s: ended.set() if s.finish else None
    loop = threading.Thread(target=engine.serve, args=(stop, turn))
    loop.start()
    try:
        engine.submit(seq)
        assert ended.wait(60)
        steps = turn.entered
        assert 1 <= steps <= len(seq.tokens)  # the prefill's step and one per further token
        time.sleep(0.3)  # idle now: no more turns taken
        assert turn.entered == steps
    finally:
        stop.set()
        engine.wake.set()
        loop.join(60)
