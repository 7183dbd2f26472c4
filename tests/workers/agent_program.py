"""An agent program for the end-to-end test of ``agent.openai_agent`` (tests/test_train.py), written
as one writes an agent against the OpenAI chat-completions API, with plain httpx: it sends the row's
prompt with a ``lookup`` tool, answers the model's call (or its plain answer) with a tool message
holding the row's answer, asks again and leaves the scoring to the reward section. Rows whose
answer is even raise after the first turn, as a broken program would (their episodes fail,
counted; the run goes on)."""

from __future__ import annotations

import httpx

LOOKUP = {"type": "function", "function": {"name": "lookup", "description": "The digit hidden behind the key.", "parameters": {"type": "object", "properties": {}}}}


def lookup_agent(base_url: str, row: dict) -> float | None:
    messages = [{"role": "user", "content": row["prompt"]}]
    with httpx.Client(base_url=base_url, timeout=60) as client:
        for turn in range(2):
            reply = client.post("/chat/completions", json={"model": "policy", "messages": messages, "tools": [LOOKUP]})
            reply.raise_for_status()
            message = reply.json()["choices"][0]["message"]
            messages.append(message)
            if turn == 1:
                return None
            if int(row["answer"]) % 2 == 0:
                raise ValueError(f"no tool result for {row['answer']}")
            call_id = message["tool_calls"][0]["id"] if message.get("tool_calls") else "call_none"
            messages.append({"role": "tool", "tool_call_id": call_id, "content": str(row["answer"])})
    return None
