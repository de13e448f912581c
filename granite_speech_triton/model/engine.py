"""AR decoding engine: in-flight batching of every decoding mode over transformers' Granite.

    submit(Sequence) -> waiting --Scheduler.admit--> packed prefill (a draft to verify included)
                                                  -> decode steps: every live row, one forward per step
                                                  -> done: end of text, budget, accepted draft,
                                                     cancelled, past its deadline, or overloaded

The scheduler decides who runs in a step, `GraniteRunner` runs one forward, `KVPool` owns the
cache memory. New requests join at every step boundary and leave the moment they end. A
request's tokens never depend on its batch-mates: new prompts are packed into one sequence with
a block-diagonal causal mask and positions restarting per prompt (never padded to the longest),
and each decode row attends only to its own cache row.

Decoding modes (MODEL_SPEC.md 3b), each exact for the request alone:
  greedy:       transformers' greedy `generate` of the composite model (one row);
  beam:         GraniteForCausalLM.generate(num_beams=n, early_stopping=True): n rows, `BeamSearch`;
  speculative:  greedy, the encoder's CTC draft verified in the prefill: the longest prefix equal to
                the LLM's own greedy choices is kept, plus its next token, then greedy steps;
  cascade:      IBM's published pipeline: the draft is the answer if every draft token's probability
                is at least `confidence` (or its CTC entropy passes the gate); otherwise beam search
                from the prompt, which the verification prefill has already filled.

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
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from enum import Enum

import torch
from transformers import GraniteForCausalLM

from .beam import BeamSearch
from .errors import RequestError
from .kv_cache import KVLayout, KVPool
from .ragged import pack_groups
from .runner import GraniteRunner, PrefillInput

log = logging.getLogger(__name__)
CANCEL_POLL_S = 0.1  # how often a running request's `is_cancelled` is asked (it may cost an IPC round trip)
IDLE_WAIT_S = 1.0  # an idle loop checks its stop flag this often (arrivals wake it at once)


class Policy(str, Enum):
    INFLIGHT = "inflight"
    STATIC = "static"


class Mode(str, Enum):
    GREEDY = "greedy"
    BEAM = "beam"
    CASCADE = "cascade"
    SPECULATIVE = "speculative"


class Finish(str, Enum):
    EOS = "eos"  # produced an end-of-text token (kept in the output, as transformers does)
    LENGTH = "length"  # reached its max_new_tokens
    DRAFT = "draft"  # cascade: the CTC draft was accepted as the answer
    CANCELLED = "cancelled"
    DEADLINE = "deadline"
    OVERLOADED = "overloaded"  # waited longer than max_wait_s for a row
    ERROR = "error"


@dataclass(frozen=True)
class EngineConfig:
    """The engine's bounds; every one is a deploy setting (serving/repository.py)."""

    max_rows: int = 16  # KV pool rows: a greedy request takes one, a beam request one per beam
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
class Row:
    """One KV pool row: a greedy request's, or one beam's."""

    seq: Sequence
    index: int = -1  # in the pool (and in Scheduler.running)
    next_token: int = 0  # what it feeds to the next decode step


@dataclass(eq=False)
class Sequence:
    """One request in the engine: its prompt, how to decode it, and what it has produced so far."""

    prompt_ids: list[int]
    audio_embeds: torch.Tensor  # [n_audio_tokens, llm_hidden]: rows spliced in place of the audio tokens
    max_new_tokens: int
    mode: Mode = Mode.GREEDY
    num_beams: int = 1  # beam mode, and the cascade's fallback
    draft_ids: list[int] = field(default_factory=list)  # speculative and cascade: the CTC draft, as LLM tokens
    draft_entropy: float = float("inf")  # cascade: the draft's largest per-frame CTC entropy
    confidence: float = 0.4  # cascade: every draft token needs at least this probability
    entropy_gate: float = 0.0  # cascade: a draft with entropy at most this is taken unverified
    stream: bool = False  # notify after every step, not only at the end
    deadline: float | None = None  # time.time() after which the request is dropped
    key: str = ""  # lets `DecodeEngine.cancel` find it
    notify: Callable[[Sequence], None] | None = None  # called with new tokens (stream) and once when done
    is_cancelled: Callable[[], bool] | None = None  # polled: the caller gave up
    tokens: list[int] = field(default_factory=list)
    finish: Finish | None = None
    message: str = ""  # why it ended early (cancelled, deadline, error)
    rows: list[Row] = field(default_factory=list)  # while running: one, or one per beam
    beams: BeamSearch | None = None
    passes: int = 0  # LLM forwards this request took part in
    draft_accepted: int = 0  # draft tokens taken without a step of their own
    submitted_at: float = 0.0
    admitted_at: float = 0.0
    first_token_at: float = 0.0

    def __post_init__(self) -> None:
        self.mode = Mode(self.mode)

    @property
    def prompt_length(self) -> int:
        return len(self.prompt_ids)

    @property
    def verifies(self) -> bool:
        """Its prefill checks a draft (an empty draft has nothing to check)."""
        return self.mode in (Mode.CASCADE, Mode.SPECULATIVE) and bool(self.draft_ids)

    @property
    def prefill_length(self) -> int:
        return self.prompt_length + (len(self.draft_ids) if self.verifies else 0)

    @property
    def positions_needed(self) -> int:
        return self.prompt_length + max(self.max_new_tokens, len(self.draft_ids) if self.verifies else 0)

    @property
    def rows_needed(self) -> int:
        return self.num_beams if self.mode in (Mode.BEAM, Mode.CASCADE) else 1

    @property
    def audio_as_zero(self) -> bool:
        """Greedy modes follow the composite model, which embeds a generated audio id as token 0;
        beam search follows GraniteForCausalLM.generate (IBM's fallback), which embeds it as itself."""
        return self.beams is None and self.mode in (Mode.GREEDY, Mode.SPECULATIVE)


class Overloaded(Exception):
    """The engine's queue is full: the caller should come back later."""


class Scheduler:
    """Who runs: a FIFO of waiting requests and the running rows, in KV pool order."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Row] = []  # running[i].index == i

    def running_sequences(self) -> list[Sequence]:
        """Each running request once, in row order."""
        return list(dict.fromkeys(row.seq for row in self.running))

    def admit(self) -> list[Sequence]:
        """Pop the waiting requests that start in this step (first come, first served)."""
        if self.config.policy is Policy.STATIC and self.running:
            return []
        free = self.config.max_rows - len(self.running)
        admitted: list[Sequence] = []
        tokens = 0
        inflight = self.config.policy is Policy.INFLIGHT
        while self.waiting and self.waiting[0].rows_needed <= free:
            length = self.waiting[0].prefill_length
            if inflight and admitted and tokens + length > self.config.prefill_token_budget:
                break
            admitted.append(self.waiting.popleft())
            free -= admitted[-1].rows_needed
            tokens += length
        return admitted

    def packs(self, seqs: list[Sequence]) -> list[list[Sequence]]:
        """Groups of new requests prefilled in one forward each, within the prefill token budget."""
        groups = pack_groups([s.prefill_length for s in seqs], self.config.prefill_token_budget)
        return [[seqs[i] for i in group] for group in groups]


def speculative_tokens(draft: list[int], greedy: list[int]) -> tuple[list[int], int]:
    """The draft checked against the LLM's greedy choices at each of its positions (len(draft) + 1).

    -> (the longest draft prefix the LLM agrees with, then the LLM's next token; how many draft
    tokens were kept). Greedy decoding would have produced exactly these tokens.
    """
    kept = next((k for k, (d, g) in enumerate(zip(draft, greedy, strict=False)) if d != g), len(draft))
    return draft[:kept] + [greedy[kept]], kept


def draft_confident(logits: torch.Tensor, draft: list[int], confidence: float) -> bool:
    """logits [m, vocab] at the positions predicting the m draft tokens -> is every draft token's
    probability (softmax in float32) at least `confidence`? An empty draft never is."""
    if not draft:
        return False
    probs = torch.softmax(logits.float(), dim=-1)  # [m, vocab]
    chosen = probs.gather(1, torch.tensor(draft, device=probs.device)[:, None])[:, 0]  # [m]
    return bool((chosen >= confidence).all())


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
        self.eos_ids = list(eos_token_ids)
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
        """RequestError unless the request fits the pool and its audio rows match its prompt."""
        audio_tokens = seq.prompt_ids.count(self.runner.audio_token_index)
        if audio_tokens != seq.audio_embeds.shape[0]:
            raise RequestError(f"prompt has {audio_tokens} audio tokens but {seq.audio_embeds.shape[0]} audio rows")
        if seq.positions_needed > self.config.max_tokens_per_row:
            raise RequestError(
                f"prompt ({seq.prompt_length} tokens) plus MAX_NEW_TOKENS ({seq.max_new_tokens}) exceeds the "
                f"{self.config.max_tokens_per_row} positions a request may hold (the model's context, or the "
                "kv_tokens_per_row setting): send shorter audio or fewer tokens"
            )
        if seq.rows_needed > self.config.max_rows:
            raise RequestError(f"NUM_BEAMS {seq.rows_needed} exceeds the engine's {self.config.max_rows} rows")

    def submit(self, seq: Sequence) -> None:
        """Queue a request (any thread); it joins at the next step boundary.

        Overloaded when `max_waiting` requests already wait for a row. A cascade request whose
        draft passes the entropy gate is answered at once, without the LLM.
        """
        self.check(seq)
        waiting = len(self.scheduler.waiting) + self.inbox.qsize()  # read from another thread: a close estimate
        if self.config.max_waiting and waiting >= self.config.max_waiting:
            raise Overloaded(f"the decoding engine's queue is full ({self.config.max_waiting} requests wait for a row)")
        seq.submitted_at = self.clock()
        if seq.mode is Mode.CASCADE and seq.draft_ids and seq.draft_entropy <= seq.entropy_gate:
            self._accept_draft(seq)
            return
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

    def serve(self, stop: threading.Event, turn: AbstractContextManager | None = None) -> None:
        """The background loop of a server: step while there is work, sleep otherwise. Each step
        runs inside `turn` when given (the server's CPU lease: serving/cpu_lease.py)."""
        turn = turn or nullcontext()
        while not stop.is_set():
            if self.idle and self.wake.wait(IDLE_WAIT_S):
                self.wake.clear()
            if self.idle:
                continue
            try:
                with turn:
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
        prefilled = self.clock()
        rows = len(self.scheduler.running)
        if rows:
            self._decode()
        self._notify_streams(self.scheduler.running_sequences())
        if admitted or rows:
            now = self.clock()
            report = StepReport(rows, admitted, prefilled - started, now - prefilled, now, len(self.scheduler.waiting))
            for observer in self.observers:
                observer(report)

    def fail_all(self, message: str) -> None:
        """End every request with an error and empty the pool (after a failed forward)."""
        victims = self.scheduler.running_sequences() + list(self.scheduler.waiting)
        self.scheduler.running.clear()
        self.scheduler.waiting.clear()
        self.pool.lengths.zero_()
        for seq in victims:
            seq.rows = []
            self._end(seq, Finish.ERROR, message)

    # ---- arrivals and departures ----------------------------------------------------------------

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
        return list(self.scheduler.waiting) + self.scheduler.running_sequences()

    def _expired(self) -> list[tuple[Sequence, Finish]]:
        now = self.clock()
        poll = now - self._cancel_polled_at >= CANCEL_POLL_S
        if poll:
            self._cancel_polled_at = now
        expired = []
        for seq in self._all():
            if not seq.rows and self.config.max_wait_s and now - seq.submitted_at > self.config.max_wait_s:
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
        self._free_rows([seq for seq, _ in dropped])
        for seq, reason in dropped:
            self._end(seq, reason, seq.message)

    def _free_rows(self, seqs: list[Sequence]) -> None:
        """Remove requests' rows, moving the last live rows into the freed ones."""
        running = self.scheduler.running
        for row in sorted((r for s in seqs for r in s.rows), key=lambda r: r.index, reverse=True):
            last = running[-1]
            if row is not last:
                self.pool.move_row(last.index, row.index)
                running[row.index], last.index = last, row.index
            else:
                self.pool.lengths[row.index] = 0
            running.pop()
        for seq in seqs:
            seq.rows = []

    def _end(self, seq: Sequence, reason: Finish, message: str = "") -> None:
        seq.finish, seq.message = reason, message
        self._notify(seq)

    def _finish(self, done: list[tuple[Sequence, Finish]]) -> None:
        self._free_rows([seq for seq, _ in done])
        for seq, reason in done:
            self._end(seq, reason)

    # ---- prefill ----------------------------------------------------------------------------------

    def _prefill(self, admitted: list[Sequence]) -> None:
        running = self.scheduler.running
        now = self.clock()
        for seq in admitted:
            seq.admitted_at = now
            seq.rows = [Row(seq, len(running) + i) for i in range(seq.rows_needed)]
            running.extend(seq.rows)
        self.pool.reserve(len(running), max(r.seq.positions_needed for r in running))
        done: list[tuple[Sequence, Finish]] = []
        for pack in self.scheduler.packs(admitted):
            for seq, logits in zip(pack, self.runner.prefill([self._prefill_input(s) for s in pack]), strict=True):
                seq.passes += 1
                seq.first_token_at = self.clock()
                reason = self._after_prefill(seq, logits)
                if reason is not None:
                    done.append((seq, reason))
        self._finish(done)
        self._notify_streams(admitted)  # the first tokens, before this step's decode

    def _prefill_input(self, seq: Sequence) -> PrefillInput:
        """The prompt (and the draft, when verified) into the first row; logits from the last prompt
        position, and after each draft token."""
        extra = seq.draft_ids if seq.verifies else []
        positions = list(range(seq.prompt_length - 1, seq.prompt_length + len(extra)))
        return PrefillInput(seq.prompt_ids, seq.audio_embeds, extra, seq.rows[0].index, positions)

    def _after_prefill(self, seq: Sequence, logits: torch.Tensor) -> Finish | None:
        """The request's first tokens from its prefill logits [1 + draft, vocab]; a Finish if it is done."""
        row = seq.rows[0]
        if seq.mode is Mode.CASCADE:
            if seq.verifies and draft_confident(logits[:-1], seq.draft_ids, seq.confidence):
                seq.tokens, seq.draft_accepted = list(seq.draft_ids), len(seq.draft_ids)
                return Finish.DRAFT
            self.pool.lengths[row.index] = seq.prompt_length  # forget the rejected draft
            return self._start_beams(seq, logits[0])
        if seq.mode is Mode.BEAM:
            return self._start_beams(seq, logits[0])
        greedy = logits.argmax(dim=-1).tolist()
        if seq.verifies:  # speculative
            tokens, seq.draft_accepted = speculative_tokens(seq.draft_ids, greedy)
            self.pool.lengths[row.index] = seq.prompt_length + seq.draft_accepted  # keep the agreed prefix
        else:
            tokens = greedy[:1]
        for token in tokens:
            seq.tokens.append(token)
            reason = self._greedy_finish(seq)
            if reason is not None:
                return reason
        row.next_token = seq.tokens[-1]
        return None

    def _start_beams(self, seq: Sequence, logits: torch.Tensor) -> Finish | None:
        """Beam search (or greedy, for one beam, as transformers does) from the prompt's logits."""
        if seq.num_beams == 1:
            seq.beams = None
            token = int(logits.argmax())
            seq.tokens = [token]
            seq.rows[0].next_token = token
            return self._greedy_finish(seq)
        seq.beams = BeamSearch(seq.num_beams, seq.max_new_tokens, self.eos_ids)
        first = seq.rows[0].index
        for row in seq.rows[1:]:
            self.pool.copy_rows([row.index], [first])
        return self._beam_step(seq, logits.expand(seq.num_beams, -1))

    # ---- decode -------------------------------------------------------------------------------------

    def _decode(self) -> None:
        running = self.scheduler.running
        logits = self.runner.decode([r.next_token for r in running], [r.seq.audio_as_zero for r in running])
        greedy = logits.argmax(dim=-1).tolist()
        done: list[tuple[Sequence, Finish]] = []
        for seq in self.scheduler.running_sequences():
            seq.passes += 1
            if seq.beams is not None:
                reason = self._beam_step(seq, logits[[r.index for r in seq.rows]])
            else:
                token = greedy[seq.rows[0].index]
                seq.tokens.append(token)
                seq.rows[0].next_token = token
                reason = self._greedy_finish(seq)
            if reason is not None:
                done.append((seq, reason))
        self._finish(done)

    def _greedy_finish(self, seq: Sequence) -> Finish | None:
        if seq.tokens[-1] in self.eos:
            return Finish.EOS
        return Finish.LENGTH if len(seq.tokens) >= seq.max_new_tokens else None

    def _beam_step(self, seq: Sequence, logits: torch.Tensor) -> Finish | None:
        """Advance the beams by one token; KV rows follow the beams they continue."""
        sources, tokens = seq.beams.step(logits)
        rows = [r.index for r in seq.rows]
        if sources != list(range(len(rows))):
            self.pool.copy_rows(rows, [rows[s] for s in sources])
        for row, token in zip(seq.rows, tokens, strict=True):
            row.next_token = token
        if not seq.beams.done:
            return None
        seq.tokens = seq.beams.best()
        return Finish.EOS if seq.tokens and seq.tokens[-1] in self.eos else Finish.LENGTH

    def _accept_draft(self, seq: Sequence) -> None:
        seq.tokens, seq.draft_accepted = list(seq.draft_ids), len(seq.draft_ids)
        self._end(seq, Finish.DRAFT)

    # ---- callers --------------------------------------------------------------------------------------

    def _notify_streams(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            if seq.stream and seq.finish is None and seq.beams is None and seq.tokens:
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

    rows: int  # rows decoded together in this step's decode forward
    admitted: list[Sequence]  # requests prefilled in this step
    prefill_seconds: float  # admitting and prefilling the new requests
    decode_seconds: float  # the decode forward of the running rows, and their delivery
    finished_at: float
    waiting: int  # requests still waiting for rows


def engine_for(llm: GraniteForCausalLM, audio_token_index: int, eos: list[int], config: EngineConfig) -> DecodeEngine:
    """An engine over `llm` with a KV pool in its device and dtype."""
    pool = KVPool(
        KVLayout.from_llm_config(llm.config), config.max_rows, config.max_tokens_per_row, llm.device, llm.dtype
    )
    return DecodeEngine(GraniteRunner(llm, audio_token_index, pool), config, eos)
