"""AR decoding engine: in-flight batching of greedy decoding over transformers' Granite.

    submit(Sequence) -> waiting --Scheduler.admit--> packed prefill: the first token of each
                                                  -> decode steps: every live row, one forward per step
                                                  -> done: end of text, budget, cancelled or past deadline

The scheduler decides who runs in a step, `GraniteRunner` runs one forward, `KVPool` owns the
cache memory. New requests join at every step boundary and leave the moment they end. A
request's tokens never depend on its batch-mates: new prompts are packed into one sequence with
a block-diagonal causal mask and positions restarting per prompt (never padded to the longest),
and each decode row attends only to its own cache row, so every request gets exactly what
transformers' greedy `generate` gives it alone.

Policies: `inflight` admits new requests at every step (at most `prefill_token_budget` prompt
tokens per step, at least one request); `static` admits a batch only when no request is running,
and that batch runs until its longest request ends (the behaviour of a plain batched `generate`,
kept for comparison).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch
from transformers import GraniteForCausalLM

from .errors import RequestError
from .kv_cache import DecodeWriter, KVLayout, KVPool, PrefillWriter
from .nar import PackedLayout, pack_groups

log = logging.getLogger(__name__)
CANCEL_POLL_S = 0.1  # how often a running request's `is_cancelled` is asked (it may cost an IPC round trip)
IDLE_WAIT_S = 1.0  # the loop re-checks deadlines this often while idle


class Policy(str, Enum):
    INFLIGHT = "inflight"
    STATIC = "static"


class Finish(str, Enum):
    EOS = "eos"  # produced an end-of-text token (kept in the output, as transformers does)
    LENGTH = "length"  # reached its max_new_tokens
    CANCELLED = "cancelled"
    DEADLINE = "deadline"
    OVERLOADED = "overloaded"  # waited longer than max_wait_s for a row
    ERROR = "error"


@dataclass(frozen=True)
class EngineConfig:
    """The engine's bounds; every one is a deploy setting (serving/repository.py)."""

    max_rows: int = 16  # requests decoded together (rows of the KV pool)
    max_tokens_per_row: int = 4096  # prompt + new tokens one request may hold
    prefill_token_budget: int = 2048  # prompt tokens per packed prefill forward
    policy: Policy = Policy.INFLIGHT
    max_waiting: int = 0  # requests waiting for a row; more are refused (0: no bound)
    max_wait_s: float = 0.0  # longest wait for a row before the request is dropped (0: no bound)

    def __post_init__(self) -> None:
        if min(self.max_rows, self.max_tokens_per_row, self.prefill_token_budget) < 1:
            raise ValueError(f"engine bounds must be positive: {self}")
        object.__setattr__(self, "policy", Policy(self.policy))


@dataclass(eq=False)
class Sequence:
    """One request in the engine: its prompt, its budget, and what it has produced so far."""

    prompt_ids: list[int]
    audio_embeds: torch.Tensor  # [n_audio_tokens, llm_hidden]: rows spliced in place of the audio tokens
    max_new_tokens: int
    stream: bool = False  # notify after every step, not only at the end
    deadline: float | None = None  # time.time() after which the request is dropped
    key: str = ""  # lets `DecodeEngine.cancel` find it
    notify: Callable[[Sequence], None] | None = None  # called with new tokens (stream) and once when done
    is_cancelled: Callable[[], bool] | None = None  # polled: the caller gave up
    tokens: list[int] = field(default_factory=list)
    finish: Finish | None = None
    message: str = ""  # why it ended early (cancelled, deadline, error)
    row: int = -1  # its KV pool row while running
    submitted_at: float = 0.0
    admitted_at: float = 0.0
    first_token_at: float = 0.0

    @property
    def prompt_length(self) -> int:
        return len(self.prompt_ids)

    @property
    def positions_needed(self) -> int:
        return self.prompt_length + self.max_new_tokens


class Overloaded(Exception):
    """The engine's queue is full: the caller should come back later."""


class Scheduler:
    """Who runs: a FIFO of waiting requests and the running ones, in KV pool row order."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # running[i].row == i

    def admit(self) -> list[Sequence]:
        """Pop the waiting requests that start in this step (first come, first served)."""
        if self.config.policy is Policy.STATIC and self.running:
            return []
        free = self.config.max_rows - len(self.running)
        admitted: list[Sequence] = []
        tokens = 0
        while self.waiting and len(admitted) < free:
            length = self.waiting[0].prompt_length
            inflight = self.config.policy is Policy.INFLIGHT
            if inflight and admitted and tokens + length > self.config.prefill_token_budget:
                break
            admitted.append(self.waiting.popleft())
            tokens += length
        return admitted

    def packs(self, seqs: list[Sequence]) -> list[list[Sequence]]:
        """Groups of new requests prefilled in one forward each, within the prefill token budget."""
        groups = pack_groups([s.prompt_length for s in seqs], self.config.prefill_token_budget)
        return [[seqs[i] for i in group] for group in groups]


class GraniteRunner:
    """One forward of transformers' Granite: a packed prefill of new prompts, or one decode step."""

    def __init__(self, llm: GraniteForCausalLM, audio_token_index: int, pool: KVPool) -> None:
        self.llm = llm
        self.audio_token_index = audio_token_index
        self.pool = pool

    @property
    def device(self) -> torch.device:
        return self.llm.device

    def embed_prompt(self, prompt_ids: list[int], audio_embeds: torch.Tensor) -> torch.Tensor:
        """[L] prompt ids -> [L, D] embeddings with audio rows in place of the audio tokens."""
        ids = torch.tensor(prompt_ids, device=self.device)
        is_audio = ids == self.audio_token_index
        embeds = self.llm.get_input_embeddings()(torch.where(is_audio, 0, ids))
        embeds[is_audio] = audio_embeds.to(embeds.device, embeds.dtype)
        return embeds

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> list[int]:
        """Prompts packed into one sequence [1, sum L] -> the first new token of each; fills their KV rows."""
        lengths = [s.prompt_length for s in seqs]
        embeds = torch.cat([self.embed_prompt(s.prompt_ids, s.audio_embeds) for s in seqs])[None]  # [1, T, D]
        layout = PackedLayout.from_lengths(lengths, self.device)
        ids = layout.sequence_ids[0]
        order = torch.arange(ids.shape[0], device=self.device)
        mask = (ids[:, None] == ids[None, :]) & (order[:, None] >= order[None, :])  # [T, T] block-diagonal causal
        writer = PrefillWriter(self.pool, [s.row for s in seqs], lengths)
        last = layout.cu_seqlens[1:].long() - 1  # [S]: each prompt's last position
        logits = self.llm(
            inputs_embeds=embeds,
            attention_mask=mask[None, None],
            position_ids=layout.position_ids,
            past_key_values=writer,
            use_cache=True,
            logits_to_keep=last,
        ).logits[0]  # [S, vocab]
        writer.commit()
        return logits.argmax(dim=-1).tolist()

    @torch.inference_mode()
    def decode(self, last_tokens: list[int]) -> list[int]:
        """The last token of rows 0..n-1 -> the next token of each; appends to their KV rows."""
        writer = DecodeWriter(self.pool, len(last_tokens))
        ids = torch.tensor(last_tokens, device=self.device)
        # transformers embeds a generated audio placeholder as token 0, like those of the prompt
        ids = torch.where(ids == self.audio_token_index, 0, ids)[:, None]  # [n, 1]
        logits = self.llm(
            input_ids=ids,
            attention_mask=writer.attention_mask(),
            position_ids=writer.positions[:, None],
            past_key_values=writer,
            use_cache=True,
        ).logits[:, -1]  # [n, vocab]
        writer.commit()
        return logits.argmax(dim=-1).tolist()


class DecodeEngine:
    """The step loop: admit, prefill, decode, finish. `submit` and `cancel` are thread-safe."""

    def __init__(
        self,
        runner: GraniteRunner,
        config: EngineConfig,
        eos_token_ids: list[int],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.runner = runner
        self.config = config
        self.eos = set(eos_token_ids)
        self.clock = clock
        self.scheduler = Scheduler(config)
        self.inbox: queue.SimpleQueue[Sequence | str] = queue.SimpleQueue()
        self.wake = threading.Event()
        self.observers: list[Callable[[StepReport], None]] = []
        self._cancel_polled_at = 0.0

    @property
    def pool(self) -> KVPool:
        return self.runner.pool

    def check(self, seq: Sequence) -> None:
        """RequestError unless the request fits a KV pool row and its audio rows match its prompt."""
        audio_tokens = seq.prompt_ids.count(self.runner.audio_token_index)
        if audio_tokens != seq.audio_embeds.shape[0]:
            raise RequestError(f"prompt has {audio_tokens} audio tokens but {seq.audio_embeds.shape[0]} audio rows")
        if seq.positions_needed > self.config.max_tokens_per_row:
            raise RequestError(
                f"prompt ({seq.prompt_length} tokens) plus MAX_NEW_TOKENS ({seq.max_new_tokens}) exceeds the "
                f"{self.config.max_tokens_per_row} positions a request may hold (the model's context, or the "
                "kv_tokens_per_row setting): send shorter audio or fewer tokens"
            )

    def submit(self, seq: Sequence) -> None:
        """Queue a request (any thread); it joins at the next step boundary.

        Overloaded when `max_waiting` requests already wait for a row.
        """
        self.check(seq)
        waiting = len(self.scheduler.waiting) + self.inbox.qsize()  # read from another thread: a close estimate
        if self.config.max_waiting and waiting >= self.config.max_waiting:
            raise Overloaded(f"the decoding engine's queue is full ({self.config.max_waiting} requests wait for a row)")
        seq.submitted_at = self.clock()
        self.inbox.put(seq)
        self.wake.set()

    def cancel(self, key: str) -> None:
        """Drop the request submitted with `key` at the next step boundary (any thread)."""
        self.inbox.put(key)
        self.wake.set()

    @property
    def idle(self) -> bool:
        return not self.scheduler.running and not self.scheduler.waiting and self.inbox.empty()

    def generate(self, seqs: list[Sequence]) -> list[list[int]]:
        """In-process use: run `seqs` to the end on this thread; their new tokens, in order."""
        for seq in seqs:
            self.submit(seq)
        while not self.idle:
            self.step()
        return [s.tokens for s in seqs]

    def serve(self, stop: threading.Event) -> None:
        """The background loop of a server: step while there is work, sleep otherwise."""
        while not stop.is_set():
            if self.idle and self.wake.wait(IDLE_WAIT_S):
                self.wake.clear()
            try:
                self.step()
            except Exception as exc:  # a failed forward fails its requests, never the loop
                log.exception("decode step failed")
                self.fail_all(f"internal error: {type(exc).__name__}: {exc}")

    def step(self) -> None:
        """One step boundary: take new requests and cancellations, drop expired ones, run the forwards."""
        started = self.clock()
        self._drain_inbox()
        self._drop(self._expired())
        admitted = self.scheduler.admit()
        if admitted:
            self._prefill(admitted)
        rows = len(self.scheduler.running)
        if rows:
            tokens = self.runner.decode([s.tokens[-1] for s in self.scheduler.running])
            for seq, token in zip(self.scheduler.running, tokens, strict=True):
                seq.tokens.append(token)
            self._retire_finished()
        self._notify_streams(self.scheduler.running)
        if admitted or rows:
            now = self.clock()
            report = StepReport(rows, admitted, now - started, now, len(self.scheduler.waiting))
            for observer in self.observers:
                observer(report)

    def fail_all(self, message: str) -> None:
        """End every request with an error and empty the pool (after a failed forward)."""
        victims = list(self.scheduler.running) + list(self.scheduler.waiting)
        self.scheduler.running.clear()
        self.scheduler.waiting.clear()
        self.pool.lengths.zero_()
        for seq in victims:
            self._end(seq, Finish.ERROR, message)

    def _drain_inbox(self) -> None:
        keys: set[str] = set()
        while not self.inbox.empty():
            item = self.inbox.get()
            if isinstance(item, Sequence):
                self.scheduler.waiting.append(item)
            else:
                keys.add(item)
        if keys:
            for seq in [s for s in self._all() if s.key in keys]:
                seq.message = "cancelled by the client"
                self._drop([(seq, Finish.CANCELLED)])

    def _all(self) -> list[Sequence]:
        return list(self.scheduler.waiting) + self.scheduler.running

    def _expired(self) -> list[tuple[Sequence, Finish]]:
        now = self.clock()
        poll = now - self._cancel_polled_at >= CANCEL_POLL_S
        if poll:
            self._cancel_polled_at = now
        expired = []
        for seq in self._all():
            if seq.row < 0 and self.config.max_wait_s and now - seq.submitted_at > self.config.max_wait_s:
                seq.message = f"waited {now - seq.submitted_at:.1f} s for a decoding row (queue_timeout_us)"
                expired.append((seq, Finish.OVERLOADED))
            elif seq.deadline is not None and now > seq.deadline:
                seq.message = f"deadline exceeded (TIMEOUT_MS) after {len(seq.tokens)} generated tokens"
                expired.append((seq, Finish.DEADLINE))
            elif poll and seq.is_cancelled is not None and seq.is_cancelled():
                seq.message = "cancelled by the client"
                expired.append((seq, Finish.CANCELLED))
        return expired

    def _drop(self, dropped: list[tuple[Sequence, Finish]]) -> None:
        """Take requests out wherever they are (freeing their KV rows) and tell their callers."""
        for seq, _ in dropped:
            if seq in self.scheduler.waiting:
                self.scheduler.waiting.remove(seq)
        self._free_rows([seq for seq, _ in dropped if seq.row >= 0])
        for seq, reason in dropped:
            self._end(seq, reason, seq.message)

    def _prefill(self, admitted: list[Sequence]) -> None:
        running = self.scheduler.running
        now = self.clock()
        for seq in admitted:
            seq.row, seq.admitted_at = len(running), now
            running.append(seq)
        self.pool.reserve(len(running), max(s.positions_needed for s in running))
        for pack in self.scheduler.packs(admitted):
            for seq, token in zip(pack, self.runner.prefill(pack), strict=True):
                seq.tokens.append(token)
                seq.first_token_at = self.clock()
        self._retire_finished()
        self._notify_streams(admitted)  # the first token, before this step's decode

    def _retire_finished(self) -> None:
        done = []
        for seq in self.scheduler.running:
            if seq.tokens[-1] in self.eos:
                done.append((seq, Finish.EOS))
            elif len(seq.tokens) >= seq.max_new_tokens:
                done.append((seq, Finish.LENGTH))
        if done:
            self._free_rows([seq for seq, _ in done])
            for seq, reason in done:
                self._end(seq, reason)

    def _free_rows(self, seqs: list[Sequence]) -> None:
        """Remove running requests, moving the last live rows into the freed ones."""
        running = self.scheduler.running
        for seq in sorted(seqs, key=lambda s: s.row, reverse=True):
            last = len(running) - 1
            if seq.row != last:
                self.pool.move_row(last, seq.row)
                running[seq.row] = running[last]
                running[seq.row].row = seq.row
            else:
                self.pool.lengths[last] = 0
            running.pop()
            seq.row = -1

    def _end(self, seq: Sequence, reason: Finish, message: str = "") -> None:
        seq.finish, seq.message = reason, message
        self._notify(seq)

    def _notify_streams(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            if seq.stream and seq.finish is None:
                self._notify(seq)

    @staticmethod
    def _notify(seq: Sequence) -> None:
        if seq.notify is None:
            return
        try:
            seq.notify(seq)
        except Exception:  # a caller's failure to take a response must not stop the engine
            log.exception("notifying a request failed")


@dataclass(frozen=True)
class StepReport:
    """What one step did, for metrics."""

    rows: int  # requests decoded together in this step's decode forward
    admitted: list[Sequence]  # requests prefilled in this step (each produced its first token)
    seconds: float
    finished_at: float
    waiting: int  # requests still waiting for a row


def engine_for(llm: GraniteForCausalLM, audio_token_index: int, eos: list[int], config: EngineConfig) -> DecodeEngine:
    """An engine over `llm` with a KV pool in its device and dtype."""
    pool = KVPool(
        KVLayout.from_llm_config(llm.config), config.max_rows, config.max_tokens_per_row, llm.device, llm.dtype
    )
    return DecodeEngine(GraniteRunner(llm, audio_token_index, pool), config, eos)
