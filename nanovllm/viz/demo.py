"""`nano-vllm run --demo`: a small scenario that shows why the engine exists.

Five chat requests arrive at different steps. Two start together and decode
side by side (continuous batching). At step 4 a long prompt arrives; with a
token budget of 32 per step it cannot be prefilled at once, so it is cut into
chunks that share each step with the others' decodes (chunked prefill), and
nobody stalls. Later requests start while earlier ones are still running, and
every request begins with the same system prompt, whose full KV blocks are
found in the prefix cache once the first request has computed them. A small KV
pool (40 blocks of 16 slots) keeps the memory map readable. Paged, it never
holds more than about half of it; with `--kv naive` each request reserves
max_model_len = 256 slots (16 blocks) up front, so the same pool runs only two
requests at a time and the others queue (`--kv both` runs the two in turn).
"""
from __future__ import annotations

from nanovllm.sampling_params import SamplingParams
from nanovllm.tokenizer import Tokenizer
from nanovllm.viz.workload import Arrival

# Engine settings the demo picks unless the command line gives them.
DEMO_ENGINE_ARGS = {"max_num_batched_tokens": 32, "num_kv_blocks": 40, "max_model_len": 256}
DEMO_TEMPERATURE = 0.0   # greedy unless -t says otherwise: the demo replays the same every time
DEMO_VIZ_EVERY = 4

_LONG_TEXT = (
    "A language model writes one token at a time. For every token it has read, each layer keeps a key "
    "and a value vector, so that later tokens can attend to it without computing it again: this is the "
    "KV cache. A server that reserves room for the longest possible answer for every request wastes most "
    "of that memory, because most answers are short. Paged attention cuts the cache into small blocks of "
    "sixteen tokens and hands them out as a sequence grows, the way an operating system hands out pages "
    "of memory; a block table maps each sequence's tokens to the blocks that hold them. Continuous "
    "batching adds new requests to the running batch at every step instead of waiting for the whole "
    "batch to finish, and chunked prefill splits a long prompt into pieces so that it shares each step "
    "with the requests that are already decoding. Identical prompt prefixes, such as a common system "
    "prompt, can share their blocks through a prefix cache, so they are computed only once."
)

SYSTEM_PROMPT = "You are a helpful assistant. Answer briefly and clearly."

# (arrival step, user message, max tokens)
DEMO_REQUESTS = [
    (0, "What is the capital of France?", 24),
    (0, "Write a short poem about the sea.", 28),
    (4, "Summarize this text in one sentence.\n\n" + _LONG_TEXT, 20),
    (9, "What is the capital of Italy?", 16),
    (16, "Name three colors.", 12),
]


def demo_arrivals(tokenizer: Tokenizer, params: SamplingParams) -> list[Arrival]:
    """The scenario's requests, chat-templated when the model has a template (each with its own max_tokens)."""
    arrivals = []
    for i, (step, message, max_tokens) in enumerate(DEMO_REQUESTS):
        request_params = SamplingParams(temperature=params.temperature, top_p=params.top_p, max_tokens=max_tokens)
        if tokenizer.has_chat_template:
            prompt: str | list[int] = tokenizer.apply_chat_template(
                [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": message}])
        else:
            prompt = SYSTEM_PROMPT + "\n\n" + message
        arrivals.append(Arrival(step, f"Req{i}", prompt, request_params, prompt_text=message))
    return arrivals
