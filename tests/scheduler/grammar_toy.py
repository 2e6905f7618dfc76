"""A 64-token toy tokenizer for grammar tests (no model files): token 0 is EOS ("</s>"), the
others single characters of JSON and a few merges, serialized as Hugging Face tokenizers JSON,
which is what a frontend sends the scheduler. `MaskedWorker` samples as the sched_harness fake
worker does, but only among the tokens the step's grammar masks allow."""

from __future__ import annotations

import struct
import threading

from sched_harness import FakeWorker, toy_sample
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from scheduler.scheduler import Scheduler
from shared.config import ServerConfig
from shared.protocol import StepMasks, StepPlan, StepResult

CHARS = '{}[]":,0123456789-.abcdefghijklmnopqrstuvwxyz'
TOKENS = ["</s>", *CHARS, "ab", '":', '{"']  # 0 = EOS; id i decodes to TOKENS[i]
VOCAB = 64  # the model's width: ids past the tokenizer's are never allowed


def tokenizer_json() -> str:
    vocab = {t: i for i, t in enumerate(TOKENS)}
    merges = [("a", "b"), ('"', ":"), ("{", '"')]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None))
    tok.add_special_tokens(["</s>"])
    tok.decoder = decoders.ByteLevel()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return tok.to_str()


def decode(token_ids: list[int]) -> str:
    return "".join(TOKENS[t] for t in token_ids if t != 0)


def grammar_scheduler(**settings) -> tuple[Scheduler, threading.Event]:
    """A Scheduler with the toy tokenizer; the event is set whenever a grammar is done."""
    woken = threading.Event()
    s = {"enable_prefix_caching": True, **settings}
    num_blocks, num_host_blocks = s.pop("num_blocks", 1000), s.pop("num_host_blocks", 0)
    config = ServerConfig.from_settings(**s)
    sched = Scheduler(config.scheduler, num_device_blocks=num_blocks, block_size=4, max_model_len=256,
                      vocab_size=VOCAB, eos_token_ids=[0], num_host_blocks=num_host_blocks, wake=woken.set)
    sched.structured.set_tokenizer(tokenizer_json())
    return sched, woken


def allowed(masks: StepMasks, row: int, vocab: int = VOCAB) -> list[int]:
    words = (vocab + 31) // 32
    values = struct.unpack_from(f"<{words}i", masks.bitmask, row * 4 * words)
    return [t for t in range(vocab) if (values[t // 32] >> (t % 32)) & 1]


class MaskedWorker(FakeWorker):
    """Samples the toy model's token when the mask allows it, else one of the allowed tokens
    picked by the same hash (so runs are deterministic)."""

    def __init__(self, block_size: int = 4) -> None:
        super().__init__(block_size)
        self.masks: StepMasks | None = None

    def sample_masked(self, history: list[int], output_index: int, seed: int, allowed_ids: list[int]) -> int:
        token = toy_sample(history, output_index, seed)
        return token if token in allowed_ids else allowed_ids[token % len(allowed_ids)]

    def run_masked(self, plan: StepPlan, masks: StepMasks | None) -> StepResult:
        rows = {position: i for i, position in enumerate(plan.masked_rows)}
        assert (masks is None) == (not rows)
        original = self.sample
        # FakeWorker.run samples in plan order, skipping partial chunks: track which row samples.
        sampling_rows = [i for i, w in enumerate(plan.scheduled)
                         if w.num_computed_tokens + w.num_tokens >= len(self.seqs[w.seq_id].token_ids)]
        assert set(rows) <= set(sampling_rows), "a masked row that does not sample"
        order = iter(sampling_rows)

        def sample(history, output_index, seed):
            i = next(order)
            row = rows.get(i)
            if row is None:
                return original(history, output_index, seed)
            return self.sample_masked(history, output_index, seed, allowed(masks, row))

        self.sample = sample
        try:
            return self.run(plan)
        finally:
            self.sample = original
