"""Decode graphs (worker/decode_graphs.py): static buffers, padding and replay through
`ModelRunner.execute`, against the same runner without graphs.

CUDA graphs cannot be captured on CPU, so the graphs here are `eager_capture` stand-ins: the
forward pass captured over the static buffers is re-run at each replay. That checks everything
but the capture itself: which steps replay, padding to the captured size, rows left by a larger
step, padding rows neither writing the KV cache nor reaching the sampler. The Triton backend runs
in Triton's interpreter, as in test_attention_backends.py.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
from tiny_llama import write_tiny_llama

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before kernels/triton_*.py are imported

from shared.config import ServerConfig  # noqa: E402
from shared.config_file import load_config  # noqa: E402
from shared.protocol import NewSeq, SamplingParams, ScheduledSeq, StepPlan  # noqa: E402
from worker.attention import AttentionMetadata  # noqa: E402
from worker.decode_graphs import DecodeGraphs, capture_sizes, eager_capture  # noqa: E402
from worker.input_batch import StepInputs  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GREEDY = SamplingParams(temperature=0.0, max_tokens=None)
NUM_BLOCKS, BLOCK_SIZE = 48, 8


def test_capture_sizes():
    assert capture_sizes(1) == [1]
    assert capture_sizes(4) == [1, 2, 4]
    assert capture_sizes(12) == [1, 2, 4, 8, 12]
    assert capture_sizes(128) == [1, 2, 4, *range(8, 129, 8)]
    assert capture_sizes(10_000)[-1] == 512
    with pytest.raises(ValueError, match="ascending"):
        DecodeGraphs(lambda *a: None, [4, 2], 8, DEVICE)


def test_enforce_eager_config():
    assert ServerConfig().worker.enforce_eager is False
    assert load_config(None, {"enforce_eager": "true"}).worker.enforce_eager is True


def decode_inputs(slots: list[int], seq_lens: list[int], width: int) -> StepInputs:
    n = len(slots)
    meta = AttentionMetadata(slot_mapping=torch.tensor(slots), block_tables=torch.arange(n * width,
                             dtype=torch.int32).reshape(n, width), seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                             query_start_loc=torch.arange(n + 1, dtype=torch.int32), decode_only=True)
    return StepInputs(input_ids=torch.tensor(slots) + 1000, positions=torch.tensor(seq_lens) - 1, meta=meta,
                      logits_indices=torch.arange(n), sampled_positions=list(range(n)), sampled_seqs=[],
                      sampling=None, prompt_logprob_spans=[])


def test_padding_rows_are_inert():
    """At every replay: rows [:batch] are this step's, rows [batch:size] are padding (slot -1,
    context 0) even where a larger earlier step left real rows; the caller sees [:batch] only."""
    seen = []

    def forward(ids, positions, meta):
        seen.append((ids.clone(), meta.slot_mapping.clone(), meta.seq_lens.clone(), meta.block_tables.clone()))
        return ids.float()[:, None] * 2

    graphs = DecodeGraphs(forward, [1, 2, 4, 8], max_blocks_per_seq=6, device=torch.device("cpu"))
    graphs.capture(eager_capture)
    assert [len(ids) for ids, *_ in seen] == [8, 4, 2, 1]  # largest first
    assert all((slots == -1).all() and (lens == 0).all() for _, slots, lens, _ in seen)
    assert not graphs.fits(decode_inputs([0] * 9, [1] * 9, 1))
    for slots, lens, width in (([40, 41, 42, 43, 44, 45, 46], [5, 6, 7, 8, 9, 10, 11], 2),
                               ([7, 8, 9], [3, 4, 5], 1), ([3], [2], 3)):
        inputs = decode_inputs(slots, lens, width)
        assert graphs.fits(inputs)
        seen.clear()
        hidden = graphs.run(inputs)
        ids, seen_slots, seen_lens, tables = seen[-1]
        n, size = len(slots), graphs.padded_size(len(slots))
        assert len(ids) == size and hidden.shape == (n, 1)
        assert hidden[:, 0].tolist() == [2.0 * (s + 1000) for s in slots]
        assert seen_slots[:n].tolist() == slots and seen_lens[:n].tolist() == lens
        assert (seen_slots[n:] == -1).all() and (seen_lens[n:] == 0).all()
        assert torch.equal(tables[:n, :width], inputs.meta.block_tables)
    mixed = decode_inputs([1, 2], [3, 4], 1)
    mixed.meta.decode_only = False
    assert not graphs.fits(mixed)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    pytest.importorskip("transformers")
    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama_graphs"))


# (prompt tokens, tokens to generate, step it arrives at): a prefill-only step, a mixed one (the
# late prefill), decode batches of 5 (more than the largest graph: eager), 4, then 3 (padded to
# 4, with the rows the step of 4 left), 2 and 1.
SEQS = [(3, 7, 0), (9, 4, 0), (17, 10, 0), (5, 5, 0), (12, 8, 1)]


def run(model_dir: str, graphs: bool) -> tuple[list[list[int]], list[tuple[bool, int]], list[int], object]:
    """Greedy tokens of SEQS, (decode_only, batch) per step, replayed sizes, and the runner."""
    from worker.model_runner import ModelRunner

    runner = ModelRunner(ServerConfig.from_settings(model=model_dir, device=str(DEVICE), dtype="float32",
                                                    num_kv_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE,
                                                    attention_backend="triton",
                                                    max_num_seqs=4))
    runner.load()
    assert runner.cuda_graphs == ("off: no CUDA" if DEVICE.type == "cpu" else "captured")
    runner.decode_graphs = None
    replayed: list[int] = []
    if graphs:
        def counting_capture(forward):
            replay, out = eager_capture(forward)

            def counted():
                replayed.append(out.shape[0])
                replay()
            return counted, out

        runner.capture_decode_graphs(counting_capture)
        assert runner.decode_graphs.sizes == [1, 2, 4]
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 300, (n,), generator=gen).tolist() for n, _, _ in SEQS]
    free = [b for b in range(NUM_BLOCKS) if b != 0]
    random.Random(7).shuffle(free)
    free.append(0)  # block 0 (where a padding slot would land if it were written) is taken first
    tokens = {i: list(p) for i, p in enumerate(prompts)}
    computed, blocks, generated = [0] * len(SEQS), [[] for _ in SEQS], [[] for _ in SEQS]
    steps: list[tuple[bool, int]] = []
    for step_id in range(100):
        new_seqs = [NewSeq(i, list(prompts[i]), len(prompts[i]), [], GREEDY)
                    for i, (_, _, arrives) in enumerate(SEQS) if arrives == step_id]
        active = [i for i, (_, n_new, arrives) in enumerate(SEQS)
                  if arrives <= step_id and len(generated[i]) < n_new]
        finished = [i for i, (_, n_new, arrives) in enumerate(SEQS)
                    if arrives <= step_id and len(generated[i]) == n_new and blocks[i]]
        if not active:
            break
        scheduled = []
        for i in active:
            n = len(tokens[i]) - computed[i]
            new_blocks = [free.pop() for _ in range(-(-(computed[i] + n) // BLOCK_SIZE) - len(blocks[i]))]
            blocks[i] += new_blocks
            scheduled.append(ScheduledSeq(i, n, computed[i], new_blocks))
        for i in finished:
            free += blocks[i]
            blocks[i] = []
        steps.append((all(s.num_tokens == 1 for s in scheduled), len(scheduled)))
        result = runner.execute(StepPlan(step_id, scheduled, new_seqs, finished_seq_ids=finished))
        for work, token in zip(scheduled, result.sampled):
            computed[work.seq_id] += work.num_tokens
            tokens[work.seq_id].append(token)
            generated[work.seq_id].append(token)
    assert [len(g) for g in generated] == [n for _, n, _ in SEQS]
    return generated, steps, replayed, runner


def test_replayed_decode_steps_match_eager(tiny_llama):
    expected, steps, replayed, eager = run(tiny_llama, graphs=False)
    actual, graph_steps, replayed, graphed = run(tiny_llama, graphs=True)
    assert graph_steps == steps
    assert actual == expected
    decode_batches = [n for decode_only, n in steps if decode_only]
    assert decode_batches == [5, 5, 4, 3, 3, 2, 2, 1]
    assert not steps[0][0] and not steps[1][0]
    # Every decode step of <= 4 sequences replays its padded size (3 -> 4); the others (5
    # sequences, steps with a prefill) run eagerly.
    assert replayed == [graphed.decode_graphs.padded_size(n) for n in decode_batches if n <= 4]
    assert graphed.decode_graphs.padded_size(3) == 4
    # Padding rows wrote nothing: block 0 (taken by a real sequence) and every other slot agree.
    for ours, theirs in zip(graphed.kv_cache.key_caches + graphed.kv_cache.value_caches,
                            eager.kv_cache.key_caches + eager.kv_cache.value_caches):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
