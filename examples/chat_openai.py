"""Chat with a Resultity cloud through the official ``openai`` client, streaming the answer.

    resultity demo                       # in another terminal; prints the URL and API key
    OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=rk-... \
        python examples/chat_openai.py "What does a node do?"

Needs ``pip install openai``. The model defaults to the first one the cloud lists.
"""

from __future__ import annotations

import os
import sys

from openai import OpenAI


def main() -> int:
    prompt = " ".join(sys.argv[1:]) or "What does the Network do in Resultity?"
    client = OpenAI(
        base_url=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"),
        api_key=os.environ.get("OPENAI_API_KEY", "rk-set-OPENAI_API_KEY"),
    )
    model = os.environ.get("RESULTITY_MODEL") or client.models.list().data[0].id
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=96,
        temperature=0.7,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        for choice in chunk.choices:
            print(choice.delta.content or "", end="", flush=True)
        if chunk.usage is not None:
            usage = chunk.usage
            print(f"\n[{model}: {usage.prompt_tokens} prompt + "
                  f"{usage.completion_tokens} completion tokens]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
