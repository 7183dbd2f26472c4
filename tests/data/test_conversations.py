"""Chat conversations for SFT: the loss mask covers the assistant turns only, bad rows are named."""

from __future__ import annotations

import json
import re

import pytest

from megarl.config import resolve_model_path
from megarl.config.sft import SFTDataConfig
from megarl.data.conversations import ConversationLoader, load_conversations
from megarl.data.datasets import DataError

pytestmark = pytest.mark.cpu


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_model_path("bundled:tiny-moe")), local_files_only=True)


def write(tmp_path, rows) -> str:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def conversation(*turns):
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def test_only_assistant_tokens_carry_loss(tmp_path, tokenizer):
    rows = [conversation(("user", "max 1 2 3"), ("assistant", "3"), ("user", "min 4 5 6"), ("assistant", "4"), ("user", "ok"))]
    (loaded,) = load_conversations(SFTDataConfig(train_files=[write(tmp_path, rows)]), tokenizer)
    trained = [token for token, mask in zip(loaded.token_ids, loaded.loss_mask) if mask]
    # Each assistant turn: its content and the end of turn (the bundled tokenizer has no newline token).
    assert tokenizer.convert_ids_to_tokens(trained) == ["3", "<|im_end|>", "4", "<|im_end|>"]
    untrained = tokenizer.decode([token for token, mask in zip(loaded.token_ids, loaded.loss_mask) if not mask])
    assert "max 1 2 3" in untrained and "min 4 5 6" in untrained and "ok" in untrained
    assert loaded.token_ids == tokenizer(tokenizer.apply_chat_template(rows[0]["messages"], tokenize=False), add_special_tokens=False)["input_ids"]

    # Imported here: megarl.trainer imports Megatron, and with it Triton, which must not happen before
    # tests/kernels/conftest.py switches Triton to its interpreter.
    from megarl.trainer.sft import conversation_batch

    batch = conversation_batch([loaded], pad_token_id=tokenizer.pad_token_id, pad_multiple=4)
    # Label space: column t is trained where token t + 1 is an assistant token.
    labels_trained = [loaded.token_ids[column + 1] for column in batch.response_mask[0].nonzero().flatten().tolist()]
    assert labels_trained == trained
    assert batch.tokens.shape[1] % 4 == 0


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"prompt": "max 1 2 3"}, "no field 'messages' (data.messages_key)"),
        (conversation(("user", "max 1 2 3")), "no assistant turn"),
        ({"messages": [{"role": "user"}]}, "must be a non-empty list"),
    ],
)
def test_bad_rows_are_named_by_file_and_line(tmp_path, tokenizer, row, problem):
    path = write(tmp_path, [conversation(("user", "max 1 2 3"), ("assistant", "3")), row])
    with pytest.raises(DataError, match=f"{re.escape(path)}:2: .*{re.escape(problem)}"):
        load_conversations(SFTDataConfig(train_files=[path]), tokenizer)


def test_a_conversation_over_max_length_is_refused(tmp_path, tokenizer):
    path = write(tmp_path, [conversation(("user", "max 1 2 3"), ("assistant", "3"))])
    with pytest.raises(DataError, match=f"{path}:1: .*over data.max_length \\(4\\)"):
        load_conversations(SFTDataConfig(train_files=[path], max_length=4), tokenizer)


def test_the_loader_resumes_where_it_stopped(tmp_path, tokenizer):
    conversations = load_conversations(SFTDataConfig(), tokenizer)
    assert len(conversations) == 400
    loader = ConversationLoader(conversations, 48, shuffle=True, seed=3)
    for _ in range(9):
        next(loader)
    resumed = ConversationLoader(conversations, 48, shuffle=True, seed=3)
    resumed.load_state_dict(loader.state_dict())
    assert next(resumed) == next(loader)
    with pytest.raises(DataError, match="for 400 conversations"):
        ConversationLoader(conversations[:10], 4, shuffle=True, seed=3).load_state_dict(loader.state_dict())
