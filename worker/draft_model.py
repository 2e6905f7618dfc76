"""The draft model of draft-model speculation (docs/speculative.md): a second, smaller causal LM
loaded in the worker process beside the target, with its own paged KV cache.

Its cache has the target's block size and number of blocks and is addressed by the same block ids,
block tables and slot mapping: a block id means "these tokens' K/V" in both caches. The worker sizes
its blocks by the two models' bytes per block together, so the scheduler's block accounting covers
both; host swap space holds both; swap-out/in and copy-on-write move the draft's blocks with the
target's (`move_blocks`). worker/spec_draft.py keeps the draft's cache valid wherever the target's is.

Start-up checks (`DraftMismatch`): the draft must have the target's vocabulary, the same size and
the same token-to-id map (compared by a hash of the tokenizers' vocabularies).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch

from kernels import swap_ops
from shared.config import ServerConfig
from shared.logging import get_logger
from shared.models import ModelFiles, resolve_model
from shared.protocol import StepPlan
from worker.attention import AttentionBackend, AttentionMetadata
from worker.cpu_linear import pack_linears, should_pack
from worker.kv_cache import KVCache, allocate_kv_cache, bytes_per_block
from worker.loader import load_model
from worker.models.llama import LlamaForCausalLM, ModelArgs

log = get_logger("worker.draft_model")


class DraftMismatch(ValueError):
    """The draft model cannot propose tokens for this target: its vocabulary differs."""


def tokenizer_vocabulary(files: ModelFiles) -> dict[str, int]:
    """The token-to-id map of `files`' tokenizer (added tokens included), read from local files."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoTokenizer  # heavy: only when a draft model is configured

    kwargs = {"gguf_file": files.gguf_file} if files.gguf_file else {}
    return dict(AutoTokenizer.from_pretrained(files.directory, **kwargs).get_vocab())


def vocabulary_digest(vocab: dict[str, int]) -> str:
    """sha256 of the (token, id) pairs in id order."""
    pairs = sorted(vocab.items(), key=lambda item: (item[1], item[0]))
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode()).hexdigest()


def check_same_vocabulary(target: ModelFiles, target_vocab_size: int, draft: ModelFiles, draft_vocab_size: int) -> None:
    """Raise DraftMismatch unless the draft's model vocabulary size and tokenizer (token -> id)
    equal the target's. The same files are the same vocabulary."""
    if draft_vocab_size != target_vocab_size:
        raise DraftMismatch(f"draft model {draft.name} has vocab_size {draft_vocab_size}, the target "
                            f"{target.name} {target_vocab_size}: the draft needs the target's tokenizer")
    if draft == target:
        return
    try:
        target_vocab, draft_vocab = tokenizer_vocabulary(target), tokenizer_vocabulary(draft)
    except (OSError, ValueError) as e:
        raise DraftMismatch(f"cannot compare the tokenizers of draft {draft.name} and target {target.name}: "
                            f"{type(e).__name__}: {e}") from e
    if vocabulary_digest(target_vocab) != vocabulary_digest(draft_vocab):
        differ = sorted(t for t in set(target_vocab) ^ set(draft_vocab))[:3]
        differ += sorted(t for t in set(target_vocab) & set(draft_vocab) if target_vocab[t] != draft_vocab[t])[:3]
        raise DraftMismatch(f"draft model {draft.name}'s tokenizer differs from the target {target.name}'s "
                            f"({len(draft_vocab)} vs {len(target_vocab)} tokens; e.g. {differ!r}): the draft "
                            f"needs the target's tokenizer")


@dataclass
class DraftModel:
    files: ModelFiles
    model: LlamaForCausalLM
    args: ModelArgs
    weights_bytes: int  # including a packed copy of a tied LM head (worker/cpu_linear.py)
    block_bytes: int  # K and V of one block across the draft's layers
    block_size: int
    device: torch.device
    dtype: torch.dtype
    kv_cache: KVCache | None = None
    host_cache: KVCache | None = None

    @classmethod
    def load(cls, config: ServerConfig, target: ModelFiles, target_args: ModelArgs, device: torch.device,
             dtype: torch.dtype, backend: AttentionBackend) -> DraftModel:
        """Load `--draft-model` (unsharded: draft speculation is refused under tensor parallelism,
        shared/config_speculative.py) in the target's dtype; raise DraftMismatch on another vocabulary."""
        files = resolve_model(config.scheduler.draft_model)
        loaded = load_model(files, device, dtype, backend, load_format=config.scheduler.draft_load_format)
        check_same_vocabulary(target, target_args.vocab_size, files, loaded.args.vocab_size)
        weights_bytes = loaded.weights_bytes
        if should_pack(device, dtype, config.worker.cpu_linear):
            weights_bytes += pack_linears(loaded.model)
        a, block_size = loaded.args, config.worker.block_size
        block_bytes = bytes_per_block(a.num_layers, block_size, loaded.model.layout.num_kv_heads, a.head_dim, dtype)
        return cls(files, loaded.model, a, weights_bytes, block_bytes, block_size, device, dtype)

    def allocate(self, num_blocks: int, num_host_blocks: int) -> None:
        """Its caches: as many device and host blocks as the target's, same block size."""
        a, heads, device, dtype = self.args, self.model.layout.num_kv_heads, self.device, self.dtype
        self.kv_cache = allocate_kv_cache(a.num_layers, num_blocks, self.block_size, heads, a.head_dim, dtype, device)
        if num_host_blocks:
            self.host_cache = allocate_kv_cache(a.num_layers, num_host_blocks, self.block_size, heads, a.head_dim,
                                                dtype, torch.device("cpu"), pin_memory=device.type == "cuda")
        log.info("worker.draft_loaded", model=self.files.name, layers=a.num_layers, vocab_size=a.vocab_size,
                 weights_bytes=self.weights_bytes, bytes_per_block=self.block_bytes,
                 kv_cache_bytes=self.kv_cache.nbytes(), host_cache_bytes=self.nbytes_host())

    def nbytes_host(self) -> int:
        return self.host_cache.nbytes() if self.host_cache else 0

    def move_blocks(self, plan: StepPlan, copy_blocks) -> None:
        """The plan's swap-out, swap-in and copy-on-write, on the draft's caches (after the target's)."""
        if plan.swap_out:
            self._swap(self.kv_cache, self.host_cache, plan.swap_out)
        if plan.swap_in:
            self._swap(self.host_cache, self.kv_cache, plan.swap_in)
        if plan.copy:
            pairs = torch.tensor(plan.copy, dtype=torch.int64, device=self.device)
            copy_blocks(self.kv_cache.key_caches, self.kv_cache.value_caches, pairs)

    @staticmethod
    def _swap(src: KVCache | None, dst: KVCache | None, pairs: list[tuple[int, int]]) -> None:
        if src is None or dst is None:
            raise ValueError("the plan swaps blocks but this worker has no host swap space")
        index = torch.tensor(pairs, dtype=torch.int64)
        for s, d in zip((*src.key_caches, *src.value_caches), (*dst.key_caches, *dst.value_caches)):
            swap_ops.swap_blocks(s, d, index)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states of the draft at these tokens; writes their K/V to its cache at meta's slots."""
        return self.model(input_ids, positions, meta, self.kv_cache.layers())

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """int64 [rows]: the draft's most likely next token after each row of `hidden`."""
        return self.model.compute_logits(hidden).argmax(dim=-1)
