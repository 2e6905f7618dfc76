"""Our model and ModelRunner against Hugging Face transformers on the same weights.

(1) The default model (SmolLM2-135M-Instruct, Q4_1 GGUF), loaded by both: teacher-forced logits
through the paged prefill and decode paths, greedy continuations through `ModelRunner.execute`
(batched, chunked, recompute). Small random checkpoints: tests/worker/test_random_checkpoints.py.

Tolerance (max abs logit difference, float32 on CPU): 1e-3 (its logits reach ~40; we measure
~6e-5).
Greedy outputs must be equal token for token.
"""

from __future__ import annotations

import pytest
import torch
from hf_reference import hf_greedy
from paged_driver import GREEDY, PlanDriver, hf_logits, paged_logits

from shared.config import ServerConfig
from shared.models import ModelNotFound, resolve_model
from shared.protocol import NewSeq, SamplingParams, ScheduledSeq, StepPlan
from worker.model_runner import ModelRunner

transformers = pytest.importorskip("transformers")

DEFAULT_ATOL = 1e-3


@pytest.fixture(scope="module")
def default_files():
    try:
        return resolve_model("default")
    except ModelNotFound as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def tokenizer(default_files):
    return transformers.AutoTokenizer.from_pretrained(default_files.directory, gguf_file=default_files.gguf_file)


@pytest.fixture(scope="module")
def hf_default(default_files):
    return transformers.AutoModelForCausalLM.from_pretrained(
        default_files.directory, gguf_file=default_files.gguf_file, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def runner(default_files):
    r = ModelRunner(ServerConfig.from_settings(model="default", num_kv_blocks=160, max_num_seqs=8, swap_space_gib=0.01))
    r.load()
    return r


def chat(tokenizer, question: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                              add_generation_prompt=True, return_dict=False))


@pytest.fixture(scope="module")
def prompts(tokenizer):
    text = ("PagedAttention stores the key-value cache in fixed-size blocks, and a block table maps "
            "each sequence's logical blocks to physical ones, so memory is never reserved for "
            "tokens that do not exist yet. Continuous batching")
    return [
        chat(tokenizer, "What is the capital of France?"),
        tokenizer.encode("The quick brown fox"),
        tokenizer.encode(text),
        tokenizer.encode("Hi"),
        chat(tokenizer, "Write a haiku about the sea."),
    ]


@pytest.mark.slow
def test_default_model_facts(runner):
    hello = runner.hello(0, 1)
    assert (runner.args.num_heads, runner.args.num_kv_heads, runner.args.head_dim) == (9, 3, 64)
    assert runner.args.num_layers == 30 and runner.args.tie_word_embeddings
    assert hello.eos_token_ids == [2] and hello.vocab_size == 49152 and hello.max_model_len == 8192
    assert hello.num_device_blocks == 160 and hello.dtype == "float32"
    assert hello.memory["bytes_per_block"] == 2 * 30 * 16 * 3 * 64 * 4
    assert hello.num_host_blocks == (1 << 30) // 100 // hello.memory["bytes_per_block"]


@pytest.mark.slow
@pytest.mark.parametrize("first_chunk", [1 << 30, 5])
def test_teacher_forced_logits_match(runner, hf_default, prompts, first_chunk):
    ours = paged_logits(runner, prompts, first_chunk)
    for prompt, logits in zip(prompts, ours):
        expected = hf_logits(hf_default, prompt)
        assert (logits - expected).abs().max().item() < DEFAULT_ATOL
        assert torch.equal(logits.argmax(-1), expected.argmax(-1))


@pytest.mark.slow
def test_capital_of_france(runner, tokenizer, prompts):
    out = PlanDriver(runner, seed=1).run([(prompts[0], len(prompts[0]))], max_new=9)[0]
    assert 2 in out
    answer = out[: out.index(2) + 1]
    assert tokenizer.decode(answer[:-1]) == "The capital of France is Paris."


@pytest.fixture(scope="module")
def hf_continuations(hf_default, prompts):
    return [hf_greedy(hf_default, p, 32) for p in prompts]


@pytest.mark.slow
def test_batched_greedy_matches_transformers(runner, prompts, hf_continuations):
    ours = PlanDriver(runner, seed=2).run([(p, len(p)) for p in prompts], max_new=32)
    assert ours == hf_continuations


@pytest.mark.slow
def test_chunked_prefill_mixed_with_decodes_matches(runner, prompts, hf_continuations):
    # Chunks of 7 tokens: short prompts decode while long ones still prefill in the same step.
    ours = PlanDriver(runner, seed=3).run([(p, len(p)) for p in prompts], max_new=12, chunk=7)
    assert ours == [c[:12] for c in hf_continuations]


@pytest.mark.slow
def test_recompute_continues_identically(runner, prompts, hf_continuations):
    """A preempted sequence comes back as prompt + generated tokens and resumes where it was."""
    seqs = [(p + c[:10], len(p)) for p, c in zip(prompts, hf_continuations)]
    ours = PlanDriver(runner, seed=4).run(seqs, max_new=3)
    assert ours == [c[10:13] for c in hf_continuations]


@pytest.mark.slow
def test_seeded_sampling_reproduces_across_batches(runner, prompts):
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=77, max_tokens=None)
    alone = PlanDriver(runner, seed=5).run([(prompts[1], len(prompts[1]))], max_new=8, params=params)[0]
    batched = PlanDriver(runner, seed=6).run([(p, len(p)) for p in prompts], max_new=8, params=params)
    assert batched[1] == alone


@pytest.mark.slow
def test_copy_on_write_fork_continues_identically(runner, prompts, hf_continuations):
    """Parallel sampling: a second output shares the full blocks and gets a copy of the last one."""
    prompt, expected, bs = prompts[2], hf_continuations[2], runner.config.worker.block_size
    n = len(prompt)
    assert n % bs and bs - n % bs >= 3, "the fork must decode inside its copied partial block"
    blocks, spare = [100, 7, 42][: -(-n // bs)], 13
    first = runner.execute(StepPlan(0, [ScheduledSeq(1, n, 0)], [NewSeq(1, prompt, n, blocks, GREEDY)])).sampled
    fork = NewSeq(2, prompt + first, n, blocks[:-1] + [spare], GREEDY, output_index=1)
    outs = [runner.execute(StepPlan(1, [ScheduledSeq(1, 1, n), ScheduledSeq(2, 1, n)], [fork],
                                    copy=[(blocks[-1], spare)])).sampled]
    for step in range(2):
        outs.append(runner.execute(StepPlan(2 + step, [ScheduledSeq(1, 1, n + 1 + step),
                                                       ScheduledSeq(2, 1, n + 1 + step)])).sampled)
    runner.execute(StepPlan(9, [], finished_seq_ids=[1, 2]))
    assert first == expected[:1] and [o[0] for o in outs] == [o[1] for o in outs] == expected[1:4]


@pytest.mark.slow
def test_swap_out_and_in_continues_identically(runner, prompts, hf_continuations):
    """Swap a sequence's blocks to host, let another sequence overwrite them, swap them back into
    different device blocks (re-registering the sequence with its new table) and resume."""
    prompt, expected = prompts[4], hf_continuations[4]
    n = len(prompt)
    num_blocks = -(-(n + 2) // runner.config.worker.block_size)
    device_blocks, host_blocks = list(range(num_blocks)), list(range(num_blocks))
    tokens = list(prompt)
    plan = StepPlan(0, [ScheduledSeq(1, n, 0)], [NewSeq(1, prompt, n, device_blocks, GREEDY)])
    for step in range(2):
        tokens += runner.execute(plan).sampled
        plan = StepPlan(step + 1, [ScheduledSeq(1, 1, len(tokens) - 1)])
    runner.execute(StepPlan(3, [], swap_out=list(zip(device_blocks, host_blocks))))
    other = prompts[2]  # overwrites the freed device blocks
    runner.execute(StepPlan(4, [ScheduledSeq(3, len(other), 0)], [NewSeq(3, other, len(other), device_blocks, GREEDY)]))
    new_blocks = list(range(50, 50 + num_blocks))
    back = NewSeq(1, tokens, n, new_blocks, GREEDY)
    resumed = runner.execute(StepPlan(5, [ScheduledSeq(1, 1, len(tokens) - 1)], [back], finished_seq_ids=[3],
                                      swap_in=list(zip(host_blocks, new_blocks)))).sampled
    runner.execute(StepPlan(6, [], finished_seq_ids=[1]))
    assert tokens[n:] + resumed == expected[:3]
