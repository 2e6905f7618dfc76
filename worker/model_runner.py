"""Executes step plans on one device: owns the model, the KV cache, host swap space and sampling.

It never decides policy: every block id, token count and swap comes from the scheduler's
`StepPlan`. Order within a step (shared/protocol.py): drop finished sequences, swap out, swap in,
copy, register new sequences, run the scheduled chunks, sample.

Tensor parallelism (worker/parallel.py): every rank holds its share of the weights and of each
KV block (its KV heads), receives the same plans and runs the same steps, collectives in the
same order. Rank 0 alone gathers the logits, samples and computes logprobs, then broadcasts the
sampled tokens, so every rank's persistent batch (token ids, penalty counts) stays identical.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from kernels import reference, swap_ops
from shared.config import ServerConfig
from shared.logging import get_logger
from shared.models import resolve_model
from shared.protocol import PROTOCOL_VERSION, StepPlan, StepResult, WorkerHello
from worker.activation_profile import profile_activation_peak
from worker.attention import get_attention_backend
from worker.beam_candidates import add_candidates, beam_rows
from worker.cpu_linear import pack_linears, should_pack
from worker.decode_graphs import Capture, DecodeGraphs, capture_sizes, cuda_capture
from worker.grammar_mask import apply_grammar_masks, mask_logit_rows
from worker.input_batch import InputBatch, StepInputs
from worker.kernel_build import cpu_kernel_status, prepare_cpu_kernel
from worker.kv_cache import (GIB, KVCache, allocate_kv_cache, bytes_per_block, kv_cache_budget_bytes,
                             plan_num_blocks)
from worker.loader import load_model, resolve_dtype
from worker.logprobs import collect_prompt_logprobs
from worker.parallel import ParallelGroup
from worker.sampler import Sampler
from worker.spec_draft import DraftModel, DraftProposer
from worker.spec_verify import accept_proposals

log = get_logger("worker.model_runner")


class ModelRunner:
    """``load()`` once, then ``execute(plan)`` per step. Not thread-safe."""

    def __init__(self, config: ServerConfig, attention_backend: str | None = None, cancelled: Callable | None = None):
        config.validate()
        self.config = config
        self.device = torch.device(config.worker.device)
        self.swap_space_gib = config.worker.swap_space_gib  # host swap space for swapped-out KV blocks, GiB
        name = attention_backend or config.worker.attention_backend
        # Not get_attention_backend(name).name for torch: its constructor would build the CPU kernel here, unlogged.
        torch_backend = name == "torch" or (name == "auto" and self.device.type != "cuda")
        self.attention_backend = "torch" if torch_backend else get_attention_backend(name, self.device).name
        self.cancelled = cancelled or (lambda: False)  # () -> bool, polled during the kernel build (a SIGTERM)
        self.model = None
        self.memory_profile: dict[str, int] = {}
        self.group = ParallelGroup(config.parallel.worker_rank, config.parallel.tensor_parallel_size)

    # ---- start-up ---------------------------------------------------------------------------

    def load(self) -> None:
        """Build or find the CPU kernel (worker/kernel_build.py), load the weights, measure memory, allocate
        the KV cache and host swap space; log `worker.loaded` with the memory profile (bytes) and the load
        time. Returns early, with nothing loaded, when `cancelled()` became true during the kernel build."""
        started = time.perf_counter()
        config, device = self.config, self.device
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.files = resolve_model(config.model.model)
        self.dtype = resolve_dtype(config.worker.dtype, device)
        if device.type == "cpu" and self.attention_backend == "torch":  # before the backend: logged, cancellable
            bound_s = config.worker.kernel_build_timeout_s  # the compile, and the wait for another build
            prepare_cpu_kernel(bound_s, self.cancelled, lock_wait_s=bound_s)
            if self.cancelled():
                return
        backend = get_attention_backend(self.attention_backend, device)
        # Copy-on-write through the backend's kernel (one launch for every layer) where it has one.
        self._copy_blocks = getattr(backend, "copy_blocks", reference.copy_blocks)
        loaded = load_model(self.files, device, self.dtype, backend, self.group, load_format=config.worker.load_format)
        self.model, self.args, self.eos_token_ids = loaded.model, loaded.args, loaded.eos_token_ids
        weights_bytes = loaded.weights_bytes
        self.cpu_linear = "torch"
        if should_pack(device, self.dtype, config.worker.cpu_linear):
            weights_bytes += pack_linears(self.model)
            self.cpu_linear = "onednn"
        self.draft = (DraftModel.load(config, self.files, self.args, device, self.dtype, backend)
                      if config.scheduler.speculative_method == "draft" else None)  # worker/draft_model.py
        weights_bytes += self.draft.weights_bytes if self.draft else 0
        # After loading, so a rank that cannot load fails before the others wait for it.
        self.group.init(config.parallel.dist_init_addr, device, config.parallel.dist_timeout_s)
        self.num_kv_heads = self.model.layout.num_kv_heads  # this rank's: its share of each block
        self.max_model_len = self._resolve_max_model_len()
        self.max_num_batched_tokens = config.scheduler.resolved_max_num_batched_tokens(self.max_model_len)

        a = self.args
        block_bytes = bytes_per_block(a.num_layers, config.worker.block_size, self.num_kv_heads, a.head_dim, self.dtype)
        block_bytes += self.draft.block_bytes if self.draft else 0  # a block id holds the draft's K/V too
        activation_peak = profile_activation_peak(self) if device.type == "cuda" else 0
        budget = kv_cache_budget_bytes(config, device, weights_bytes, activation_peak)
        num_blocks = plan_num_blocks(config, budget, block_bytes)
        self.kv_cache = allocate_kv_cache(a.num_layers, num_blocks, config.worker.block_size, self.num_kv_heads,
                                          a.head_dim, self.dtype, device)
        num_host_blocks = int(self.swap_space_gib * GIB) // block_bytes
        self.host_cache: KVCache | None = None
        if num_host_blocks:
            self.host_cache = allocate_kv_cache(a.num_layers, num_host_blocks, config.worker.block_size, self.num_kv_heads,
                                                a.head_dim, self.dtype, torch.device("cpu"),
                                                pin_memory=device.type == "cuda")
        self.num_host_blocks = num_host_blocks
        if self.draft:  # the same block ids in its own cache
            self.draft.allocate(num_blocks, num_host_blocks)
        self.memory_profile = {
            "weights_bytes": weights_bytes,
            "kv_cache_bytes": self.kv_cache.nbytes() + (self.draft.kv_cache.nbytes() if self.draft else 0),
            "activation_peak_bytes": activation_peak,
            "bytes_per_block": block_bytes,
            "host_cache_bytes": sum(c.nbytes() for c in (self.host_cache, self.draft and self.draft.host_cache) if c),
        }
        self.batch = InputBatch(config.worker.block_size, self.max_model_len, device, initial_rows=2 * config.scheduler.max_num_seqs,
                                vocab_size=a.vocab_size, eos_token_ids=self.eos_token_ids)
        self.sampler = Sampler(device, config.model.seed)
        self.proposer = DraftProposer(self.draft, self.batch) if self.draft else None  # worker/spec_draft.py
        self.decode_graphs: DecodeGraphs | None = None
        self.cuda_graphs = self._capture_cuda_graphs()
        # worker/loop.py logs `worker.ready` after the handshake; this is the load itself.
        log.info("worker.loaded", model=self.files.name, device=str(device), rank=self.group.rank,
                 tensor_parallel_size=self.group.world_size, kv_heads=self.num_kv_heads,
                 dtype=str(self.dtype).removeprefix("torch."),
                 attention_backend=self.attention_backend, cpu_decode_kernel=cpu_kernel_status(backend),
                 cpu_linear=self.cpu_linear, cuda_graphs=self.cuda_graphs,
                 num_device_blocks=num_blocks,
                 num_host_blocks=num_host_blocks, block_size=config.worker.block_size, max_model_len=self.max_model_len,
                 max_num_batched_tokens=self.max_num_batched_tokens, load_s=round(time.perf_counter() - started, 3),
                 **self.memory_profile)

    def _capture_cuda_graphs(self) -> str:
        """Capture decode graphs where they apply; return what `worker.loaded` reports:
        "captured", "off: <why not>", or "failed: <error>" (the worker then runs eagerly)."""
        if self.device.type != "cuda":
            return "off: no CUDA"
        if self.config.worker.enforce_eager:
            return "off: enforce_eager"
        if self.attention_backend != "triton":
            return f"off: attention backend {self.attention_backend} (syncs with the host)"
        if self.group.world_size > 1:
            return "off: tensor parallel (collectives are not captured)"
        started = time.perf_counter()
        reserved = torch.cuda.memory_reserved(self.device)
        try:
            self.capture_decode_graphs(cuda_capture(self.device))
        except Exception as e:  # a kernel that cannot be captured must not stop the worker
            self.decode_graphs = None
            torch.cuda.synchronize(self.device)
            log.warning("worker.cuda_graphs_failed", error=f"{type(e).__name__}: {e}")
            return f"failed: {type(e).__name__}"
        torch.cuda.synchronize(self.device)
        log.info("worker.cuda_graphs", sizes=self.decode_graphs.sizes, max_batch=self.decode_graphs.max_batch,
                 capture_s=round(time.perf_counter() - started, 3),
                 pool_bytes=torch.cuda.memory_reserved(self.device) - reserved)
        return "captured"

    @torch.inference_mode()
    def capture_decode_graphs(self, capture: Capture) -> None:
        """Replay decode steps of up to max_num_seqs sequences from graphs made by `capture`
        (worker/decode_graphs.py; tests pass `eager_capture` on CPU)."""
        graphs = DecodeGraphs(lambda ids, pos, meta: self.model(ids, pos, meta, self.kv_cache.layers()),
                              capture_sizes(self.config.scheduler.max_num_seqs), self.batch.max_blocks_per_seq, self.device)
        graphs.capture(capture)
        self.decode_graphs = graphs

    def _resolve_max_model_len(self) -> int:
        """The config's limit, capped at what the model supports (its context, or its sliding
        window since we attend over the whole context)."""
        model_len = self.args.max_position_embeddings
        if self.args.sliding_window:
            model_len = min(model_len, self.args.sliding_window)
        wanted = self.config.model.max_model_len
        if wanted is None:
            return model_len
        if wanted > model_len:
            log.warning("worker.max_model_len_capped", requested_tokens=wanted, model_max_tokens=model_len)
            return model_len
        return wanted

    def hello(self, rank: int | None = None, world_size: int | None = None) -> WorkerHello:
        """The handshake; `rank` and `world_size` default to (and should equal) this rank's group."""
        rank = self.group.rank if rank is None else rank
        world_size = self.group.world_size if world_size is None else world_size
        return WorkerHello(
            rank=rank, world_size=world_size, num_device_blocks=self.kv_cache.num_blocks,
            num_host_blocks=self.num_host_blocks, block_size=self.config.worker.block_size,
            max_model_len=self.max_model_len, vocab_size=self.args.vocab_size,
            eos_token_ids=list(self.eos_token_ids), model=self.files.name,
            dtype=str(self.dtype).removeprefix("torch."), device=str(self.device), memory=dict(self.memory_profile),
            protocol_version=PROTOCOL_VERSION,
        )

    def close(self) -> None:
        """Leave the tensor-parallel group (on a clean stop; a dying process just exits)."""
        self.group.close()

    # ---- steps ------------------------------------------------------------------------------

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """float32 ``[rows, vocab_size]`` on rank 0, None on the others. Collective: every rank
        must call it for the same rows."""
        return self.group.gather_vocab(self.model.compute_logits(hidden), self.args.vocab_size)

    @torch.inference_mode()
    def execute(self, plan: StepPlan, await_masks: Callable[[int], bytes] | None = None) -> StepResult:
        """Apply the plan's changes, run its chunks, return one token per scheduled sequence
        (-1 where the chunk stops short of the sequence's known tokens). With `plan.masked_rows`,
        rank 0 calls `await_masks(step_id)` after the forward for the grammar masks (`StepMasks`)."""
        started = time.perf_counter()
        self.batch.drop(plan.finished_seq_ids)
        if plan.swap_out:
            self._swap(self.kv_cache, self._host(), plan.swap_out)
        if plan.swap_in:
            self._swap(self._host(), self.kv_cache, plan.swap_in)
        if plan.copy:
            pairs = torch.tensor(plan.copy, dtype=torch.int64, device=self.device)
            self._copy_blocks(self.kv_cache.key_caches, self.kv_cache.value_caches, pairs)
        if self.draft:  # its cache's blocks move with the target's
            self.draft.move_blocks(plan, self._copy_blocks)
        for new in plan.new_seqs:
            self.batch.add(new)
        result = StepResult(step_id=plan.step_id, sampled=[-1] * len(plan.scheduled))
        if plan.scheduled:
            inputs = (self.proposer or self.batch).prepare(plan.scheduled)  # a draft proposes first
            forward_started = time.perf_counter()
            if self.decode_graphs is not None and self.decode_graphs.fits(inputs):
                hidden = self.decode_graphs.run(inputs)
            else:
                hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta, self.kv_cache.layers())
            sample_started = time.perf_counter()
            collect_prompt_logprobs(self.compute_logits, hidden, inputs.prompt_logprob_spans, self.device)
            if inputs.sampling is None:
                self.batch.record(plan.scheduled, inputs, [])
            else:
                self._sample(hidden, inputs, plan, result, await_masks)
            # Host wall-clock (see StepResult.phase_times_s); plan changes above count as prepare.
            result.phase_times_s = {"prepare": forward_started - started, "forward": sample_started - forward_started,
                                    "sample": time.perf_counter() - sample_started}
        result.step_time_s = time.perf_counter() - started
        return result

    def _sample(self, hidden: torch.Tensor, inputs: StepInputs, plan: StepPlan, result: StepResult,
                await_masks: Callable[[int], bytes] | None) -> None:
        """Sample every row that reached its end; fill `result` (tokens, logprobs, prompt logprobs).
        With tensor parallelism rank 0 samples and broadcasts the tokens, so every rank's result
        has the same tokens; logprobs exist on rank 0 only (the only rank that answers)."""
        logits = self.compute_logits(hidden.index_select(0, inputs.logits_indices))
        if logits is not None:
            if plan.masked_rows:
                if await_masks is None:
                    raise RuntimeError(f"step {plan.step_id} has grammar masks and nothing to receive them")
                apply_grammar_masks(logits, await_masks(plan.step_id),
                                    mask_logit_rows(plan, inputs.sampled_positions, inputs.spec_rows))
            out = self.sampler.sample(logits, inputs.sampling, self.batch.sampling)
            token_ids, logprobs = out.token_ids, out.logprobs
            beams = beam_rows(plan.scheduled, inputs.sampled_positions)
            if beams:  # beam rows return candidates; their sampled token is ignored
                add_candidates(result, logits, beams, plan.scheduled, inputs.sampled_positions)
        else:
            token_ids = torch.empty(inputs.logits_indices.shape[0], dtype=torch.int64, device=self.device)
            logprobs = None
        self.group.broadcast(token_ids, src=0)  # verification rows too: every rank accepts the same
        tokens = token_ids.tolist()
        num_rows = len(inputs.sampled_seqs)  # the rows past them verify proposals
        self.batch.record(plan.scheduled, inputs, tokens[:num_rows], token_ids[:num_rows])
        if inputs.spec_rows:
            accept_proposals(self.batch, inputs, tokens, token_ids, logprobs, result)
        num_scheduled = len(plan.scheduled)
        if logprobs is not None:
            result.logprobs = [None] * num_scheduled
        for i, (position, token, seq) in enumerate(zip(inputs.sampled_positions, tokens, inputs.sampled_seqs)):
            result.sampled[position] = token
            if logprobs is not None:
                result.logprobs[position] = logprobs[i]
            if seq.prompt_logprobs is not None:  # its prompt is done: send them with the first token
                if logits is not None:
                    if not result.prompt_logprobs:
                        result.prompt_logprobs = [[] for _ in range(num_scheduled)]
                    result.prompt_logprobs[position] = seq.prompt_logprobs
                seq.prompt_logprobs = None

    def _host(self) -> KVCache:
        if self.host_cache is None:
            raise ValueError("the plan swaps blocks but this worker has no host swap space")
        return self.host_cache

    @staticmethod
    def _swap(src: KVCache, dst: KVCache, pairs: list[tuple[int, int]]) -> None:
        index = torch.tensor(pairs, dtype=torch.int64)
        for s, d in zip((*src.key_caches, *src.value_caches), (*dst.key_caches, *dst.value_caches)):
            swap_ops.swap_blocks(s, d, index)
