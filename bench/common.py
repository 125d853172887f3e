"""Helpers shared by the side-by-side benchmarks: same weights in both implementations, timing, machine facts."""

from __future__ import annotations

import random
import time

import torch

# The benches' small Qwen3: the real 151,936 vocabulary (so the lm_head costs what it costs in Qwen3), hidden 256,
# 4 / 2 heads of head_dim 64, tied embeddings; `num_hidden_layers` set by each bench.
SMALL_QWEN3 = dict(
    vocab_size=151936,
    hidden_size=256,
    intermediate_size=768,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    tie_word_embeddings=True,
)


def hf_from_qwen3lab(model):
    """A transformers Qwen3ForCausalLM holding exactly the weights of a qwen3lab model."""
    import transformers

    cfg = transformers.Qwen3Config(**{k: v for k, v in model.config.to_hf_dict().items() if k != "architectures"})
    hf = transformers.Qwen3ForCausalLM(cfg).to(next(model.parameters()).dtype)
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return hf.eval()


class StepTimes:
    """Call once per training step (a callback); steps_per_s() after the first step, which carries one-off setup."""

    def __init__(self):
        self.stamps = [time.perf_counter()]

    def __call__(self, *_):
        self.stamps.append(time.perf_counter())

    def steps_per_s(self) -> float:
        later = self.stamps[2:]
        return (len(later) - 1) / (later[-1] - later[0])


def best_of(fn, repeats: int = 3) -> float:
    """Seconds of the fastest of `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_peak_flops(dtype=torch.float32, n: int = 2048, seconds: float = 1.0) -> float:
    """Measured dense matmul FLOP/s on this device: the roof for model FLOPs utilisation."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t0, calls = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        a @ b
        calls += 1
    return 2 * n**3 * calls / (time.perf_counter() - t0)


def machine() -> str:
    """The CPU's model, its bf16 hardware and torch's view of it: bf16 speed differs ~1000x between CPUs."""
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    bf16 = [
        f
        for f, ok in (
            ("AMX", torch.cpu._is_amx_tile_supported()),
            ("AVX512-BF16", torch.cpu._is_avx512_bf16_supported()),
        )
        if ok
    ]
    capability = torch.backends.cpu.get_cpu_capability()
    return (
        f"{name}, bf16 hardware: {'+'.join(bf16) or 'none'}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, CPU capability {capability}"
    )


WORDS = "the of and to in is you that it he was for on are as with his they at be this from have or".split()


def synthetic_conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """Multi-turn chats with system prompts, reasoning, and tool calls, of varied lengths."""
    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(k // 2, k)))

    convs = []
    for _ in range(n):
        conv = [{"role": "system", "content": text(20)}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 4)):
            conv.append({"role": "user", "content": text(40)})
            if rng.random() < 0.2:
                call = {"function": {"name": "search", "arguments": {"q": text(5)}}}
                conv.append({"role": "assistant", "content": "", "tool_calls": [call]})
                conv.append({"role": "tool", "content": text(30)})
            conv.append({"role": "assistant", "content": text(80), "reasoning_content": text(30)})
        convs.append(conv)
    return convs


def token_times(model, prompts: list[list[int]], new_tokens: int, sync=lambda: None) -> tuple[float, float]:
    """One engine run (what generate() does) over these prompts: seconds to the first token, then seconds per
    decode step, as seen by the first row."""
    from qwen3lab.infer.engine import Engine
    from qwen3lab.infer.sampling import SamplingParams

    engine = Engine(model, len(prompts), capacity=max(map(len, prompts)) + new_tokens)
    stamps = []

    def first_row(kind, value):
        if kind == "token":
            sync()
            stamps.append(time.perf_counter())

    params = SamplingParams(max_new_tokens=new_tokens, stop_ids=[])
    t0 = time.perf_counter()
    for i, ids in enumerate(prompts):
        engine.submit(ids, params, first_row if i == 0 else lambda kind, value: None)
    engine.run_until_idle()
    return stamps[0] - t0, (stamps[-1] - stamps[0]) / (len(stamps) - 1)
