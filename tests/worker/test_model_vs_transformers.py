"""Our model and ModelRunner against Hugging Face transformers on the same weights.

(1) The default model (SmolLM2-135M-Instruct, Q4_1 GGUF), loaded by both: teacher-forced logits
through the paged prefill and decode paths, greedy continuations through `ModelRunner.execute`
(batched, chunked, recompute). (2) Small random-weight Llama/Qwen2/Qwen3/Mistral checkpoints
written by `save_pretrained`, loaded by our Hugging Face directory loader.

Tolerances (max abs logit difference, float32 on CPU): 1e-3 for the default model (its logits
reach ~40; we measure ~6e-5), 3e-4 for the small random models (logits ~35; we measure ~3e-5).
Greedy outputs must be equal token for token.
"""

from __future__ import annotations

import random

import pytest
import torch
from hf_reference import hf_greedy

from shared.config import ServerConfig
from shared.models import ModelNotFound, resolve_model
from shared.protocol import NewSeq, SamplingParams, ScheduledSeq, StepPlan
from worker.model_runner import ModelRunner

transformers = pytest.importorskip("transformers")

DEFAULT_ATOL = 1e-3
RANDOM_ATOL = 3e-4
GREEDY = SamplingParams(temperature=0.0, max_tokens=None)


class PlanDriver:
    """Plays the scheduler: shuffled block ids, chunked prefill, one decode token per step."""

    def __init__(self, runner: ModelRunner, seed: int = 0):
        self.runner, self.block_size, self.step_id = runner, runner.config.worker.block_size, 0
        self.free = list(range(runner.kv_cache.num_blocks))
        random.Random(seed).shuffle(self.free)
        self.next_seq_id = 1000 * seed

    def run(self, seqs: list[tuple[list[int], int]], max_new: int, chunk: int = 1 << 30,
            params: SamplingParams = GREEDY) -> list[list[int]]:
        """seqs: (known tokens, prompt_len). Returns the tokens each one generates in this run."""
        ids = list(range(self.next_seq_id, self.next_seq_id + len(seqs)))
        self.next_seq_id += len(seqs)
        tokens = {i: list(t) for i, (t, _) in zip(ids, seqs)}
        computed, blocks, generated = dict.fromkeys(ids, 0), {i: [] for i in ids}, {i: [] for i in ids}
        new_seqs = [NewSeq(i, list(t), p, [], params) for i, (t, p) in zip(ids, seqs)]
        while any(len(generated[i]) < max_new for i in ids):
            active = [i for i in ids if len(generated[i]) < max_new]
            scheduled = []
            for i in active:
                n = min(chunk, len(tokens[i]) - computed[i])
                need = -(-(computed[i] + n) // self.block_size) - len(blocks[i])
                new_blocks = [self.free.pop() for _ in range(need)]
                blocks[i] += new_blocks
                scheduled.append(ScheduledSeq(i, n, computed[i], new_blocks))
            result = self.runner.execute(StepPlan(self.step_id, scheduled, new_seqs))
            self.step_id, new_seqs = self.step_id + 1, []
            for work, token in zip(scheduled, result.sampled):
                i = work.seq_id
                computed[i] += work.num_tokens
                assert (token == -1) == (computed[i] < len(tokens[i]))
                if token != -1:
                    tokens[i].append(token)
                    generated[i].append(token)
        self.runner.execute(StepPlan(self.step_id, [], finished_seq_ids=ids))
        self.step_id += 1
        for i in ids:
            self.free += blocks[i]
        return [generated[i] for i in ids]


def paged_logits(runner: ModelRunner, prompts: list[list[int]], first_chunk: int) -> list[torch.Tensor]:
    """Teacher-forced logits of every position: one batched prefill of `first_chunk` tokens per
    prompt, then one token per prompt per step (decode-only steps once all prefills are done)."""
    batch, bs = runner.batch, runner.config.worker.block_size
    free = list(range(runner.kv_cache.num_blocks))
    random.Random(1).shuffle(free)
    for i, p in enumerate(prompts):
        batch.add(NewSeq(i, p, len(p), [free.pop() for _ in range(-(-len(p) // bs))], GREEDY))
    done, rows = [0] * len(prompts), [[] for _ in prompts]
    with torch.inference_mode():
        while any(d < len(p) for d, p in zip(done, prompts)):
            active = [i for i, p in enumerate(prompts) if done[i] < len(p)]
            scheduled = [ScheduledSeq(i, first_chunk if done[i] == 0 else 1, done[i]) for i in active]
            scheduled = [ScheduledSeq(s.seq_id, min(s.num_tokens, len(prompts[s.seq_id]) - done[s.seq_id]),
                                      s.num_computed_tokens) for s in scheduled]
            inputs = batch.prepare(scheduled)
            assert inputs.meta.decode_only == all(s.num_tokens == 1 for s in scheduled)
            hidden = runner.model(inputs.input_ids, inputs.positions, inputs.meta, runner.kv_cache.layers())
            logits = runner.model.compute_logits(hidden)
            start = 0
            for s in scheduled:
                rows[s.seq_id].append(logits[start : start + s.num_tokens])
                start += s.num_tokens
                done[s.seq_id] += s.num_tokens
    batch.drop(list(range(len(prompts))))
    return [torch.cat(r) for r in rows]


def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf_model(torch.tensor([ids])).logits[0].float()


# ---- (1) the default GGUF model ------------------------------------------------------------


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


def test_unpermute_inverts_llama_cpp_permutation():
    """llama.cpp's convert_hf_to_gguf.py permutes q/k rows per head as
    reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2); we must undo exactly that."""
    import numpy as np

    from worker.loader import unpermute_rope_rows

    heads, head_dim, cols = 3, 8, 5
    weight = np.arange(heads * head_dim * cols, dtype=np.float32).reshape(heads * head_dim, cols)
    permuted = weight.reshape(heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(weight.shape)
    assert np.array_equal(unpermute_rope_rows(permuted, heads), weight)


# ---- (2) small random-weight checkpoints in the Hugging Face format ---------------------------

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             vocab_size=300, max_position_embeddings=256, rms_norm_eps=1e-6)

RANDOM_MODELS = {
    "llama_gqa": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2)),
    "llama3_rope_tied": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=1, tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "qwen2_bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2)),
    "qwen3_qk_norm": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=32)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=1, sliding_window=None)),
}


def randomize(hf_model) -> None:
    """Default init leaves biases at 0 and norms at 1, and gives logits below 1, where greedy
    near-ties would make the comparison fragile. These give logits of ~30 and top-2 margins of
    >2e-3 along the greedy paths below (our differences are ~1e-5)."""
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif "embed" in name or "lm_head" in name:
                param.normal_(0.0, 1.0)
            else:
                param.normal_(0.0, 0.15)


@pytest.mark.parametrize("name", sorted(RANDOM_MODELS))
def test_random_hf_checkpoint_matches(name, tmp_path):
    config_cls, model_cls, extra = RANDOM_MODELS[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**SMALL, **extra, eos_token_id=7, bos_token_id=1)
    hf = getattr(transformers, model_cls)(config).eval()
    randomize(hf)
    hf.save_pretrained(tmp_path)
    runner = ModelRunner(ServerConfig.from_settings(model=str(tmp_path), num_kv_blocks=64, block_size=8))
    runner.load()
    assert runner.eos_token_ids == [7]

    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in (1, 9, 30, 17)]
    for prompt, logits in zip(prompts, paged_logits(runner, prompts, first_chunk=6)):
        assert (logits - hf_logits(hf, prompt)).abs().max().item() < RANDOM_ATOL
    ours = PlanDriver(runner).run([(p, len(p)) for p in prompts], max_new=12, chunk=10)
    assert ours == [hf_greedy(hf, p, 12) for p in prompts]
