"""Generate megarl's bundled assets, bit for bit the same on every run.

    python tools/make_assets.py            # writes megarl/assets/{tokenizer,models,data}
    python tools/make_assets.py --out DIR  # writes the same tree under DIR

- ``tokenizer/``: a word-level HF tokenizer (each digit a token) with a Qwen-style chat template.
- ``models/tiny-dense`` (Qwen3: GQA, q/k norm, tied embeddings), ``models/tiny-moe`` (Qwen3-MoE:
  8 experts, top 2), ``models/tiny-qwen2-moe`` (Qwen2-MoE with a gated shared expert),
  ``models/tiny-glm4-moe`` (GLM-4.5: q/k/v biases, q/k norm, half the head dims rotary, a dense
  first layer, then a sigmoid router with a random expert bias choosing the top 2 of 8 experts in
  1 of 2 groups, and a shared expert) and ``models/tiny-deepseek-v3`` (DeepSeek-V3: multi-latent
  attention, one dense layer, then 8 experts top 2 in 2 groups of which 1 is kept, a shared
  expert, a random expert bias), fp32.
- ``data/toy/{train,val}.jsonl``: the toy task, the largest of three digits (800 train and 200
  validation prompts, disjoint), which a random tiny model answers right about one time in ten and
  GRPO teaches it in about a hundred steps; the answer needs comparing the digits, not copying one.
- ``data/toy/sft.jsonl``: the first 400 training prompts of the toy task as chat conversations
  with the correct answer as the assistant turn, for supervised fine-tuning (``configs/sft.yaml``).
- ``data/minmax/{train,val,sft}.jsonl``: the two-number toy task, the smallest and the largest of
  the same three digits (``min max 3 8 1``: ``1 8``; the same split), whose reward needs both: a
  random model is never right and GRPO learns it slowly; the task of ``configs/moe_distill.yaml``.
- ``data/lookup/{train,val}.jsonl``: the multi-turn toy task (``configs/moe_agent.yaml``): the
  digit hidden behind a key, which only the ``lookup`` tool of ``megarl.agents.toy`` reveals.

``models/tiny-teacher`` is trained, not generated: ``tools/make_teacher.py`` makes it from this
file's settings (:func:`common_config`, :func:`fill_deterministically`, :func:`save_model`).

Weights come from one seeded generator filled in a fixed parameter order, not from transformers'
initialisers, so they do not change with the transformers version.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

ASSETS = Path(__file__).resolve().parents[1] / "megarl" / "assets"

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>"]
WORDS = (
    "user assistant system first last max min next answer the is of digit number copy "
    "what which a an and or to from list in out yes no ok = + - : ? . , ( )"
).split()
AGENT_WORDS = "tool lookup key".split()
"""The words of the multi-turn toy task (``data/lookup``): the observation's role, its tool, its
prompts. Appended after the others, so that every earlier token keeps its id."""
VOCABULARY = SPECIAL_TOKENS + [str(d) for d in range(10)] + WORDS + AGENT_WORDS
CHAT_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\n' }}"
    "{% for tool in tools %}{{ 'tool ' + tool['function']['name'] + '\n' }}{% endfor %}"
    "{{ '<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""Qwen's layout in words the tokenizer has. Tools given to ``apply_chat_template(tools=...)`` are
listed by name in a system turn first (``tool lookup``); a tool's result is a ``tool`` turn."""
INIT_STD = 0.02
"""Weight init std (HF's initializer_range): small random logits, so a fresh model samples tokens
nearly uniformly."""


def build_tokenizer(out: Path) -> transformers.PreTrainedTokenizerFast:
    vocab = {token: index for index, token in enumerate(VOCABULARY)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.Punctuation()]
    )
    # Words are separated by single spaces when decoding.
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|unk|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=256,
    )
    fast.save_pretrained(out)
    return fast


FIRST_VOCABULARY = len(SPECIAL_TOKENS) + 10 + len(WORDS)
"""Tokens of the first release of the assets (before :data:`AGENT_WORDS`)."""


def fill_deterministically(model: torch.nn.Module, seed: int) -> None:
    """Norm weights 1, biases and everything else N(0, INIT_STD) from one seeded generator; after
    the parameters, the routers' expert bias (``e_score_correction_bias``, a buffer that
    transformers initialises to 0) from the same generator, so that a dropped bias shows.

    The rows of tokens added after the first release (embeddings, output layer) come from a second
    generator, so every weight the first release had, the rows of its tokens included, keeps its
    value."""
    generator = torch.Generator().manual_seed(seed)
    added_rows = torch.Generator().manual_seed(1_000 + seed)
    vocabulary = model.config.vocab_size
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            elif param.shape[0] == vocabulary and ("embed_tokens" in name or "lm_head" in name):
                first = torch.randn((FIRST_VOCABULARY, *param.shape[1:]), generator=generator)
                added = torch.randn((vocabulary - FIRST_VOCABULARY, *param.shape[1:]), generator=added_rows)
                param.copy_(torch.cat([first, added]) * INIT_STD)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * INIT_STD)
        for name, buffer in sorted(model.named_buffers()):
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * INIT_STD)


def common_config(vocab_size: int, eos: int, pad: int) -> dict[str, object]:
    """The settings every bundled model shares (and the teacher of ``tools/make_teacher.py``):
    the tokenizer's vocabulary and special tokens, the width (64, 4 heads sharing 2 key/value
    heads), 256 positions, :data:`INIT_STD`. A model overrides what it needs."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=None,
        initializer_range=INIT_STD,
    )


def model_configs(vocab_size: int, eos: int, pad: int) -> dict[str, transformers.PretrainedConfig]:
    common = common_config(vocab_size, eos, pad)
    return {
        "tiny-dense": transformers.Qwen3Config(
            **common, num_hidden_layers=4, head_dim=16, intermediate_size=128, rope_theta=10000.0,
            tie_word_embeddings=True,
        ),
        "tiny-moe": transformers.Qwen3MoeConfig(
            **common, num_hidden_layers=4, head_dim=16, intermediate_size=128, moe_intermediate_size=32,
            num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
            mlp_only_layers=[], rope_theta=10000.0, tie_word_embeddings=False,
        ),
        "tiny-qwen2-moe": transformers.Qwen2MoeConfig(
            **common, num_hidden_layers=2, intermediate_size=128, moe_intermediate_size=32,
            shared_expert_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=False, rope_theta=10000.0, tie_word_embeddings=False,
        ),
        "tiny-glm4-moe": transformers.Glm4MoeConfig(
            **common, num_hidden_layers=4, head_dim=16, intermediate_size=128, moe_intermediate_size=16,
            n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
            first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True, partial_rotary_factor=0.5,
            attention_bias=True, use_qk_norm=True, num_mtp_layers=0, rope_theta=10000.0, tie_word_embeddings=False,
        ),
        "tiny-deepseek-v3": transformers.DeepseekV3Config(
            **{**common, "num_key_value_heads": 4}, num_hidden_layers=4, intermediate_size=128,
            q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
            n_shared_experts=1, moe_intermediate_size=32, routed_scaling_factor=2.5, norm_topk_prob=True,
            num_nextn_predict_layers=0, rope_theta=10000.0, tie_word_embeddings=False,
        ),
    }


def special_token_ids(tokenizer) -> tuple[int, int]:
    """``(eos, pad)``: the ids of ``<|im_end|>`` and ``<|endoftext|>``."""
    eos, pad = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    return eos, pad


def save_model(model: transformers.PreTrainedModel, directory: Path, tokenizer_dir: Path) -> None:
    """Write ``model`` (safetensors, config, a generation config that stops at the tokenizer's
    end of turn) and copy the tokenizer's files beside it."""
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    model.generation_config = transformers.GenerationConfig(eos_token_id=eos, pad_token_id=pad)
    model.save_pretrained(directory, safe_serialization=True)
    for file in tokenizer_dir.iterdir():
        shutil.copy2(file, directory / file.name)


def build_models(out: Path, tokenizer_dir: Path, tokenizer) -> None:
    eos, pad = special_token_ids(tokenizer)
    for seed, (name, config) in enumerate(model_configs(len(tokenizer), eos, pad).items()):
        model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
        fill_deterministically(model, seed)
        shutil.rmtree(out / name, ignore_errors=True)
        save_model(model, out / name, tokenizer_dir)


def toy_rows() -> list[dict[str, str]]:
    """Every prompt of the toy task, the largest of three digits, with its answer."""
    return [
        {"prompt": f"max {a} {b} {c}", "answer": str(max(a, b, c)), "task": "max"}
        for a in range(10)
        for b in range(10)
        for c in range(10)
    ]


def minmax_rows() -> list[dict[str, str]]:
    """Every prompt of the two-number toy task, the smallest and the largest of three digits
    (``min max 3 8 1``: ``1 8``), with its answer. Its reward needs both numbers right, so a model
    that has the format but guesses is right one time in a hundred: the task on which a teacher's
    per-token signal (on-policy distillation) says more than the reward does."""
    return [
        {"prompt": f"min max {a} {b} {c}", "answer": f"{min(a, b, c)} {max(a, b, c)}", "task": "minmax"}
        for a in range(10)
        for b in range(10)
        for c in range(10)
    ]


KEY_WORDS = "first last next answer the is of digit number what which a an and or to from in out yes no ok".split()
"""The words keys are made of: none is a digit, so once the model called ``lookup`` the tool's
answer is the only digit it has read."""


def lookup_rows() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The multi-turn toy task, as ``(train, val)`` rows.

    A ``lookup`` row's prompt names a key (two words); its answer is a digit hidden behind the key
    that only the ``lookup`` tool returns: answers are drawn at random (seed 1), so the prompt does
    not determine them and a model that answers at once is right one time in ten. Half the training
    rows are ``copy`` rows instead (``copy 7``, answer 7): they teach the tiny model to answer with
    the digit it has read, which is what makes calling the tool pay. A training key may come back
    with another answer. Validation holds lookup rows only, with keys never seen in training, so its
    accuracy is the tool task's."""
    draw = random.Random(1)
    keys = [f"{first} {second}" for first in KEY_WORDS for second in KEY_WORDS if first != second]
    draw.shuffle(keys)
    val_keys, train_keys = keys[:200], keys[200:]

    def lookup(key: str) -> dict[str, str]:
        return {"prompt": f"key {key}", "answer": str(draw.randrange(10)), "task": "lookup"}

    val = [lookup(key) for key in val_keys]
    train = [lookup(draw.choice(train_keys)) for _ in range(400)]
    train += [{"prompt": f"copy {digit}", "answer": str(digit), "task": "copy"} for digit in (draw.randrange(10) for _ in range(400))]
    draw.shuffle(train)
    return train, val


def split_at_random(rows: list[dict[str, str]], val_size: int = 200) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """``rows`` split at random (seed 0): ``(train, val)``, ``val_size`` for validation."""
    shuffled = random.Random(0).sample(rows, len(rows))
    return shuffled[val_size:], shuffled[:val_size]


SFT_ROWS = 400
"""Conversations in ``data/toy/sft.jsonl``: a few hundred, enough to teach the tiny model the task."""


def sft_rows(train: list[dict[str, str]], count: int = SFT_ROWS) -> list[dict[str, list[dict[str, str]]]]:
    """The first ``count`` training rows as conversations: the prompt from the user, the right
    answer from the assistant."""
    return [
        {"messages": [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["answer"]}]}
        for row in train[:count]
    ]


def build_data(out: Path, splits: tuple[list[dict[str, str]], list[dict[str, str]]]) -> None:
    """Write the ``(train, val)`` rows as ``train.jsonl`` and ``val.jsonl``."""
    out.mkdir(parents=True, exist_ok=True)
    for name, split in zip(("train", "val"), splits):
        write_jsonl(out / f"{name}.jsonl", split)


def build_toy_data(out: Path, rows: list[dict[str, str]]) -> None:
    """A toy task's ``train.jsonl`` and ``val.jsonl`` (the same prompts' digits in each split for
    every task: the split is by position) and its SFT conversations, ``sft.jsonl``."""
    train, val = split_at_random(rows)
    build_data(out, (train, val))
    write_jsonl(out / "sft.jsonl", sft_rows(train))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write ``rows``, one JSON object a line."""
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ASSETS, help="assets root (default: megarl/assets)")
    args = parser.parse_args()
    # Not the whole models/: tiny-teacher is trained (tools/make_teacher.py), build_models replaces the others.
    for part in ("tokenizer", "data"):
        shutil.rmtree(args.out / part, ignore_errors=True)
    tokenizer = build_tokenizer(args.out / "tokenizer")
    build_models(args.out / "models", args.out / "tokenizer", tokenizer)
    build_toy_data(args.out / "data" / "toy", toy_rows())
    build_toy_data(args.out / "data" / "minmax", minmax_rows())
    build_data(args.out / "data" / "lookup", lookup_rows())
    print(f"wrote {args.out}: vocabulary {len(tokenizer)} tokens")


if __name__ == "__main__":
    main()
