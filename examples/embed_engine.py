"""Use the Resultity engine directly in your own program: no network, no servers.

    python examples/embed_engine.py [MODEL_DIR]

MODEL_DIR is a Hugging Face style Llama-family directory (config.json, *.safetensors,
tokenizer.model, tokenizer_config.json). Without one, a small model is created in a temporary
directory first (`resultity model init DIR` does the same from the shell).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import anyio

from resultity_runtime import Engine, SamplingParams, init_model_dir


async def stream_one(engine: Engine) -> None:
    params = SamplingParams(max_tokens=24, temperature=0.8, seed=7)
    messages = [{"role": "user", "content": "Say something about receipts."}]
    async for delta in engine.stream(messages, params):
        print(delta.text, end="", flush=True)
        if delta.usage is not None:
            print(f"\n[{delta.usage.prompt_tokens} prompt + "
                  f"{delta.usage.completion_tokens} completion tokens]")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else init_model_dir(
            Path(tmp) / "tiny", "tiny", 0)
        # CPU defaults to float32 (matches transformers); dtype="bfloat16" is faster, and
        # quantization="int4" (4-bit weights) decodes fastest at a small cost in accuracy
        engine = Engine.from_pretrained(model_dir, kv_cache_bytes=32 << 20)

        # batched, blocking: one RequestOutput per prompt, in order
        greedy = SamplingParams(max_tokens=16, temperature=0.0)
        for out in engine.generate(["The network", "A node"], greedy):
            print(repr(out.outputs[0].text), out.outputs[0].finish_reason)

        # chat through the model's template
        reply = engine.chat([{"role": "user", "content": "Hello!"}], greedy)
        print("chat:", repr(reply.outputs[0].text))

        # streaming (anyio): text arrives as it is generated
        anyio.run(stream_one, engine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
