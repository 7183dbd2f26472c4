"""What the agent tests share: a Qwen3-like chat template and a byte-level BPE tokenizer with it,
a tool, a question, and the ids an engine would sample for a turn's text."""

from __future__ import annotations

from megarl.agents.tools import Tool, ToolSet

# Written for the agent tests; behaves as Qwen3's template does where it matters here: the tool
# declarations as JSON lines inside <tools></tools> in a system turn, an assistant's tool calls as
# <tool_call> JSON blocks, consecutive tool results grouped into one user turn of <tool_response>
# blocks, "\n" after every <|im_end|>, and an empty <think> block in an assistant turn rendered
# last (so a conversation that ends with an assistant turn is no prefix of its continuation).
QWEN3_LIKE_TEMPLATE = """
{%- if tools or messages[0].role == 'system' %}
  {{- '<|im_start|>system\\n' }}
  {%- if messages[0].role == 'system' %}{{- messages[0].content }}{%- if tools %}{{- '\\n\\n' }}{%- endif %}{%- endif %}
  {%- if tools %}
    {{- 'Tools you can call, one JSON schema a line:\\n<tools>' }}
    {%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
    {{- '\\n</tools>\\nCall one as <tool_call>\\n{"name": NAME, "arguments": {...}}\\n</tool_call>' }}
  {%- endif %}
  {{- '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
  {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
  {%- elif message.role == 'assistant' %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if loop.last %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
    {{- message.content }}
    {%- for call in message.tool_calls or [] %}
      {%- if message.content or not loop.first %}{{- '\\n' }}{%- endif %}
      {%- set arguments = call.function.arguments %}
      {{- '<tool_call>\\n{"name": "' + call.function.name + '", "arguments": ' }}
      {{- arguments if arguments is string else arguments | tojson }}
      {{- '}\\n</tool_call>' }}
    {%- endfor %}
    {{- '<|im_end|>\\n' }}
  {%- elif message.role == 'tool' %}
    {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
    {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
    {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

CORPUS = [
    "What is the value stored under key 47? Look it up with the lookup tool.",
    "Tools you can call, one JSON schema a line: <tools> </tools> Call one as",
    '{"type": "function", "function": {"name": "lookup", "description": "The value stored under a key.",',
    '"parameters": {"type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]}}}',
    '{"name": "lookup", "arguments": {"key": "47"}} <tool_response> 1234 </tool_response>',
    "system user assistant tool I will look it up. The answer is 1234. Try again.",
]

TOOLS = ToolSet(
    [
        Tool(
            "lookup",
            "The value stored under a key.",
            {"type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]},
            lambda key: {"47": 1234, "5": 6}[key],
        )
    ]
)
QUESTION = {"role": "user", "content": "What is the value stored under key 47?"}


def qwen_like_tokenizer():
    """A byte-level BPE tokenizer trained on CORPUS, with Qwen's special tokens and QWEN3_LIKE_TEMPLATE."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(CORPUS, trainer)
    # One token each, but not special, as in Qwen's tokenizers: decoding with
    # skip_special_tokens=True keeps them for the parser.
    bpe.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in ("<tool_call>", "</tool_call>")])
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=QWEN3_LIKE_TEMPLATE,
    )


def sampled_ids(tokenizer, text: str) -> list[int]:
    """Stands in for the engine's ids of a model turn: the text, then the end-of-turn token."""
    ids = tokenizer(text + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id
    return ids
