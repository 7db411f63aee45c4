"""The inference engine: requests in, token streams out (the engine's one public object).

One `step()` is one iteration of continuous batching: schedule, move KV blocks
(swap, copy-on-write), run the model once over every scheduled token, sample,
detokenize, and finish requests that hit a stop condition (output_processor.py).

Isolation: a failure inside a step that belongs to one sequence (its model
inputs, its grammar, its sampling, its detokenization) finishes that
request with finish_reason "error" and the error in stop_reason; the other
sequences of the step go on and produce exactly the tokens they would alone.
A constrained sequence closes its JSON within max_tokens (guided.BudgetGuard).
"""

from __future__ import annotations

import itertools
import logging
import random
import time
import weakref
from dataclasses import dataclass, field, replace

import torch

from llmos.engine.block_manager import BlockManager, PrefixCacheStats, SwapSpace
from llmos.engine.config import ConfigError, EngineConfig
from llmos.engine.guided import BudgetGuard, Closing, GrammarCompiler, json_schema_grammar
from llmos.engine.histograms import LatencyHistograms
from llmos.engine.kv_cache import KVCache, kv_dtype_for
from llmos.engine.metrics import EngineMetrics
from llmos.engine.model_runner import ModelRunner
from llmos.engine.output_processor import OutputProcessor, completion_output
from llmos.engine.outputs import RequestOutput
from llmos.engine.sampler import sample
from llmos.engine.sampling_params import InvalidRequestError, SamplingParams
from llmos.engine.scheduler import Scheduler, SchedulerStats
from llmos.engine.sequence import Sequence, SequenceStatus
from llmos.models.loader import LoadedModel, load_model
from llmos.models.quant import QuantizedLinear
from llmos.models.tokenizer import Tokenizer

logger = logging.getLogger("llmos.engine")


class RequestFailedError(RuntimeError):
    """A request failed inside the engine; other requests were not affected."""


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    arrival: float = 0.0
    scheduled: bool = False  # has had its first step (its queue time is recorded)

    @property
    def finished(self) -> bool:
        return len(self.seqs) == self.params.n and all(s.is_finished for s in self.seqs)


class LLMEngine:
    """Owns the model, the paged KV cache and the scheduler; knows nothing of agents."""

    def __init__(self, model: str | LoadedModel = "smollm2-135m-instruct",
                 config: EngineConfig | None = None, **kwargs) -> None:
        self.config = config or EngineConfig(**kwargs)
        cfg = self.config
        device, dtype = cfg.torch_device, cfg.torch_dtype
        if isinstance(model, LoadedModel):
            self.loaded = model
        else:
            self.loaded = load_model(model, dtype=dtype, device=device, quantization=cfg.weight_quantization)
        self.model_config = self.loaded.config
        # A step on quantized weights runs its heavy work on the kernels' own thread pool; torch's
        # OpenMP threads, spinning after each of the step's few torch ops, would only take its
        # cores, so the step runs torch on one thread (and gives the process its setting back).
        quantized = any(isinstance(m, QuantizedLinear) for m in self.loaded.model.modules())
        self._one_torch_thread = quantized
        self.tokenizer: Tokenizer | None = self.loaded.tokenizer
        self.max_model_len = min(cfg.max_model_len or self.model_config.max_position_embeddings,
                                 self.model_config.max_position_embeddings)
        self.kv_dtype = kv_dtype_for(quantized, dtype, device)
        block_bytes = KVCache.block_bytes(self.model_config, cfg.block_size, self.kv_dtype)
        budget = cfg.kv_budget_bytes()
        num_blocks = budget // block_bytes
        if num_blocks < 1:
            raise ConfigError(f"kv_budget of {budget} bytes holds no block of {block_bytes} bytes; "
                              "give at least that much")
        num_swap = cfg.swap_space // block_bytes
        self.kv_cache = KVCache(self.model_config, num_blocks, cfg.block_size, num_swap, self.kv_dtype,
                                device)
        self.blocks = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(cfg, self.blocks, SwapSpace(num_swap))
        self.runner = ModelRunner(self.loaded.model, self.kv_cache, cfg.block_size)
        self.requests: dict[str, _Request] = {}
        self.metrics = EngineMetrics(kv_blocks_total=num_blocks)
        self.histograms = LatencyHistograms()
        self._ids = itertools.count()
        self.output_processor = OutputProcessor(self.tokenizer, set(self.model_config.eos_token_ids),
                                                self.max_model_len)
        self._grammar_compiler: GrammarCompiler | None = None
        self._budget_guard: BudgetGuard | None = None
        # Constrained sequences near the end of their budget, and how they will close.
        self._closing: weakref.WeakKeyDictionary[Sequence, Closing] = weakref.WeakKeyDictionary()

    # -- requests -----------------------------------------------------------

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        paused: bool = False,
    ) -> str:
        """Queue a prompt (text or token ids); returns its request id.

        A paused request waits, holding nothing, until `resume_request`.
        """
        params = replace(params) if params else SamplingParams()  # ours to resolve max_tokens in
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: send token ids")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
        self._validate(ids, params)
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if params.max_tokens is None:
            params.max_tokens = self.max_model_len - len(ids)
        req = _Request(request_id, text, ids, params, arrival=time.perf_counter())
        seq = self._new_sequence(req, 0, list(ids), priority)
        schema = params.json_schema
        grammar = json_schema_grammar(schema) if schema is not None else params.grammar
        if grammar is not None:
            seq.matcher = self._grammars().matcher(grammar)
        req.seqs.append(seq)
        self.requests[request_id] = req
        self.scheduler.add(seq)
        if paused:
            self.scheduler.pause(seq)
        self.metrics.prompt_tokens += len(ids)
        return request_id

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise InvalidRequestError("prompt is empty")
        vocab = self.model_config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        bad = next((t for t in params.logit_bias if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"logit_bias token id {bad} is outside the vocabulary [0, {vocab})")
        total = len(ids) + (params.max_tokens or 1)
        if total > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                f"the model's context length of {self.max_model_len} tokens")
        need = -(-total // self.config.block_size) * params.n
        if need > self.blocks.num_blocks:
            raise InvalidRequestError(
                f"the request needs {need} KV blocks at most but the KV budget holds "
                f"{self.blocks.num_blocks}; raise kv_budget or lower max_tokens")

    def _grammars(self) -> GrammarCompiler:
        if self._grammar_compiler is None:
            if self.tokenizer is None:
                raise InvalidRequestError("grammars need a model with a tokenizer")
            self._grammar_compiler = GrammarCompiler(self.tokenizer, self.model_config.vocab_size,
                                                     self.model_config.eos_token_ids)
            self._budget_guard = BudgetGuard(self.tokenizer, self.model_config.eos_token_ids)
        return self._grammar_compiler

    def _new_sequence(self, req: _Request, index: int, ids: list[int], priority: int) -> Sequence:
        gen = torch.Generator()
        seed = req.params.seed
        gen.manual_seed(random.getrandbits(63) if seed is None else hash((seed, index)) & (2**63 - 1))
        return Sequence(req.request_id, index, ids, len(req.prompt_token_ids), req.params,
                        priority=priority, arrival=req.arrival, generator=gen)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now; its KV blocks are freed before this returns."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
                seq.finish_reason = "abort"

    def pause_request(self, request_id: str) -> None:
        """Stop scheduling a request (a context switch): it keeps its KV blocks until they are
        needed, then they are swapped out or dropped, and `resume_request` continues it exactly."""
        for seq in self._live_seqs(request_id):
            self.scheduler.pause(seq)

    def resume_request(self, request_id: str) -> None:
        for seq in self._live_seqs(request_id):
            self.scheduler.resume(seq)

    def _live_seqs(self, request_id: str) -> list[Sequence]:
        req = self.requests.get(request_id)
        return [s for s in req.seqs if not s.is_finished] if req else []

    def set_kv_capacity(self, num_blocks: int) -> int:
        """Cap the KV blocks in use at run time (at most the pool's size); returns the old cap."""
        if not 1 <= num_blocks <= self.blocks.num_blocks:
            raise InvalidRequestError(f"KV capacity must be between 1 and {self.blocks.num_blocks} blocks, "
                                      f"got {num_blocks}")
        old, self.blocks.capacity = self.blocks.capacity, num_blocks
        return old

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def has_pending_work(self) -> bool:
        """Something a step would run: paused requests alone make no work."""
        return self.scheduler.has_unfinished()

    # -- the step -----------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One iteration; returns an output for every request that made progress."""
        threads = torch.get_num_threads()
        if not self._one_torch_thread or threads == 1:
            return self._step()
        torch.set_num_threads(1)
        try:
            return self._step()
        finally:
            torch.set_num_threads(threads)

    def _step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        self.kv_cache.swap_out(out.swap_out)
        self.kv_cache.swap_in(out.swap_in)
        self.kv_cache.copy(out.copies)
        if out.is_empty:
            return []
        touched: dict[str, _Request] = {}
        self._record_queue_time(out.scheduled)
        started = time.perf_counter()
        logits, sampled = self._execute(out.scheduled, touched)
        self.metrics.observe_compute(sum(out.scheduled.values()), time.perf_counter() - started)
        for seq, n in out.scheduled.items():
            if not seq.is_finished:
                seq.num_computed_tokens += n
        if sampled:
            logits, sampled = self._fork_for_n(logits, sampled)
            tokens, logprobs, errors = sample(logits, sampled, self._closing_tokens(sampled),
                                              lambda i, token: self._check_closing(sampled[i], token))
            now = time.perf_counter()
            for i, (seq, token, lp) in enumerate(zip(sampled, tokens, logprobs, strict=True)):
                if seq.is_finished:  # its request failed on another of its sequences
                    continue
                try:
                    if i in errors:
                        raise errors[i]
                    self._append_token(seq, token, lp, now)
                except Exception as e:  # noqa: BLE001 - fails this request only
                    self._fail(seq, e)
                touched[seq.request_id] = self.requests[seq.request_id]
        self.metrics.steps += 1
        self._account_kv()
        return [self._output(req) for req in touched.values()]

    def _record_queue_time(self, scheduled: dict[Sequence, int]) -> None:
        now = time.perf_counter()
        for seq in scheduled:
            req = self.requests[seq.request_id]
            if not req.scheduled:
                req.scheduled = True
                self.histograms.queue.observe(now - req.arrival)

    def _execute(self, scheduled: dict[Sequence, int], touched: dict[str, _Request]):
        """Run the model over the step; if that fails, run each sequence alone and fail only those
        that fail alone (their model inputs are what broke it)."""
        try:
            return self.runner.execute(scheduled)
        except Exception as batch_error:  # noqa: BLE001 - isolated below
            logger.warning("engine step failed (%s); running its %d sequences one by one",
                           batch_error, len(scheduled))
        rows, seqs = [], []
        for seq, n in scheduled.items():
            if seq.is_finished:
                continue
            try:
                logits, sampled = self.runner.execute({seq: n})
            except Exception as e:  # noqa: BLE001 - this sequence's own failure
                self._fail(seq, e)
                touched[seq.request_id] = self.requests[seq.request_id]
                continue
            if sampled:
                rows.append(logits)
                seqs += sampled
        return (torch.cat(rows) if rows else None), seqs

    def _fail(self, seq: Sequence, error: BaseException) -> None:
        """Finish the request of `seq` (all its sequences) as failed, freeing its KV blocks now."""
        logger.error("request %s failed: %r", seq.request_id, error, exc_info=error)
        for s in self.requests[seq.request_id].seqs:
            if not s.is_finished:
                self.scheduler.finish(s)
                s.finish_reason, s.stop_reason = "error", f"{type(error).__name__}: {error}"

    def _left(self, seq: Sequence) -> int:
        return min(seq.params.max_tokens - seq.num_output_tokens, self.max_model_len - len(seq))

    def _closing_tokens(self, seqs: list[Sequence]) -> dict[int, int]:
        """For constrained sequences whose budget is nearly spent: the token that closes their JSON."""
        forced: dict[int, int] = {}
        guard, step = self._budget_guard, self.metrics.steps
        for i, seq in enumerate(seqs):
            if seq.matcher is None or guard is None or self._left(seq) > guard.HORIZON:
                continue
            left, c = self._left(seq), self._closing.setdefault(seq, Closing())
            if c.committed is None and step >= c.check_at:
                text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=False)
                c.plan, c.planned_at = guard.plan(seq.matcher, text, left), step
                if c.plan is not None and len(c.plan) + guard.MARGIN >= left:
                    c.committed = list(c.plan)  # the plan needs what is left: follow it from now on
                slack = left - len(c.plan) if c.plan is not None else 0
                c.check_at = step + (1 if slack <= guard.NEAR else slack // 4)
            if c.committed:
                forced[i] = c.committed.pop(0)
        return forced

    def _check_closing(self, seq: Sequence, token: int) -> int:
        """The sampled `token`, unless a closing plan would no longer fit after it: then the plan's."""
        c, guard = self._closing.get(seq), self._budget_guard
        if c is None or c.committed is not None or c.plan is None or c.planned_at != self.metrics.steps:
            return token
        left = self._left(seq)
        if left - len(c.plan) > guard.NEAR:
            return token
        text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=False)
        if guard.plan(seq.matcher, text, left - 1, after=token) is not None:
            return token
        c.committed = c.plan[1:]
        return c.plan[0]

    def _fork_for_n(self, logits: torch.Tensor, seqs: list[Sequence]):
        """A request with n > 1 forks after its prompt: children share the prompt's blocks."""
        rows = list(range(len(seqs)))
        out = list(seqs)
        for i, seq in enumerate(seqs):
            req = self.requests[seq.request_id]
            if req.params.n > 1 and len(req.seqs) == 1 and seq.num_output_tokens == 0:
                for index in range(1, req.params.n):
                    child = self._new_sequence(req, index, list(seq.token_ids), seq.priority)
                    child.num_cached_tokens = seq.num_cached_tokens
                    if seq.matcher is not None:
                        child.matcher = seq.matcher.deep_copy()
                    self.blocks.fork(seq, child)
                    child.status = SequenceStatus.RUNNING
                    self.scheduler.running.append(child)
                    req.seqs.append(child)
                    out.append(child)
                    rows.append(i)
        if len(out) == len(seqs):
            return logits, seqs
        return logits[torch.tensor(rows, device=logits.device)], out

    def _append_token(self, seq: Sequence, token: int, logprobs, now: float) -> None:
        seq.token_ids.append(token)
        if logprobs is not None:
            seq.output_logprobs.append(logprobs)
        m = self.metrics
        m.generation_tokens += 1
        if seq.first_token_time is None:
            seq.first_token_time = now
            m.ttft.append(now - self.requests[seq.request_id].arrival)
            self.histograms.ttft.observe(m.ttft[-1])
        else:
            m.itl.append(now - seq.last_token_time)
            self.histograms.itl.observe(m.itl[-1])
        seq.last_token_time = now
        if seq.matcher is not None:
            seq.matcher.consume_token(token)
        if (reason := self.output_processor.process_token(seq, token)) is not None:
            seq.finish_reason, seq.stop_reason = reason
            self.scheduler.finish(seq)
            req = self.requests[seq.request_id]
            if req.finished:
                m.requests_finished += 1
                m.e2e.append(now - req.arrival)
                self.histograms.e2e.observe(m.e2e[-1])

    def _output(self, req: _Request) -> RequestOutput:
        outputs = [completion_output(seq) for seq in req.seqs]
        if req.finished:
            self.requests.pop(req.request_id, None)
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outputs,
                             req.finished, req.seqs[0].num_cached_tokens)

    def _account_kv(self) -> None:
        """Add this step's allocated and filled KV slots to the utilisation average."""
        bm, running = self.blocks, self.scheduler.running
        if running:
            slots = bm.num_used_blocks * bm.block_size
            filled = sum(min(q.num_computed_tokens, len(q.block_table) * bm.block_size) for q in running)
            self.metrics.kv_slots_allocated += slots
            self.metrics.kv_slots_filled += min(filled, slots)

    def reset_metrics(self) -> None:
        """Start the counters afresh (after a warm-up, say); the prefix cache keeps its content."""
        self.metrics = EngineMetrics(kv_blocks_total=self.blocks.num_blocks,
                                     prefill_s_per_token=self.metrics.prefill_s_per_token)  # a machine fact
        self.scheduler.stats = SchedulerStats()
        self.blocks.prefix_stats = PrefixCacheStats()

    def stats(self) -> dict[str, float]:
        """A snapshot of the metrics, gauges read now."""
        m, s, bm = self.metrics, self.scheduler, self.blocks
        m.num_running, m.num_waiting, m.num_swapped = len(s.running), len(s.waiting), len(s.swapped)
        m.num_paused = len(s.paused)
        m.kv_blocks_used, m.kv_blocks_capacity = bm.num_used_blocks, bm.capacity
        m.preemptions = s.stats.preemptions
        m.prefix_cache_queries, m.prefix_cache_hits = bm.prefix_stats.queries, bm.prefix_stats.hits
        return m.as_dict()
