"""``data.input_template``: raw-text prompts without a chat template are put into it at its ``{}``
(OpenRLHF's --input_template); a template without exactly one ``{}``, or beside a chat template, is
refused when the config is built."""

from __future__ import annotations

import json

import pytest

from megarl.config import ConfigError, DataConfig, FieldError, load_config, resolve_model_path
from megarl.data.datasets import load_prompts

pytestmark = pytest.mark.cpu

TEMPLATE = "User: {}\nAssistant: "


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path("bundled:tiny-moe"), local_files_only=True)


def test_a_plain_prompt_is_put_into_the_template_and_tokenized_as_that_text(tmp_path, tokenizer):
    rows = [{"prompt": "max 9 4 7", "answer": "9"}, {"prompt": "a {brace} and {}", "answer": "x"}]
    file = tmp_path / "rows.jsonl"
    file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = DataConfig(train_files=[str(file)], apply_chat_template=False, input_template="{{json}} " + TEMPLATE)
    prompts = load_prompts(config, tokenizer).prompts
    # Braces in the prompt are its own text; the template's {{ }} are literal braces.
    assert [prompt.text for prompt in prompts] == ["{json} User: max 9 4 7\nAssistant: ", "{json} User: a {brace} and {}\nAssistant: "]
    assert prompts[0].prompt_ids == tokenizer("{json} User: max 9 4 7\nAssistant: ")["input_ids"]
    assert prompts[0].reward_kwargs(" 9")["prompt"] == prompts[0].text
    without = load_prompts(DataConfig(train_files=[str(file)], apply_chat_template=False), tokenizer).prompts
    assert without[0].text == "max 9 4 7"


@pytest.mark.parametrize(
    "template,expected",
    [
        ("User: {question}\nAssistant: ", "must hold exactly one {} where the prompt goes, found {question}"),
        ("User: {} and {}", "found {}, {}"),
        ("no placeholder", "found none"),
        ("User: {!r}", "found {!r}"),
        ("User: {:>10}", "found {:>10}"),
        ("User: {", "is not a format string (Single '{' encountered in format string)"),
    ],
)
def test_a_template_without_exactly_one_placeholder_is_refused(template, expected):
    with pytest.raises(FieldError) as error:
        DataConfig(apply_chat_template=False, input_template=template)
    (line,) = str(error.value).splitlines()
    assert line.startswith(f"`data.input_template` ({template!r}) ") and expected in line
    assert line.endswith("write literal braces as {{ and }}")


def test_a_template_beside_a_chat_template_is_refused():
    with pytest.raises(ConfigError) as error:
        load_config(None, [f"data.input_template={json.dumps(TEMPLATE)}"])
    assert "`data.input_template` is set but so is `data.apply_chat_template` (true, the default)" in str(error.value)
    assert "set data.apply_chat_template=false to use the input template" in str(error.value)
    assert load_config(None, [f"data.input_template={json.dumps(TEMPLATE)}", "data.apply_chat_template=false"]).data.input_template == TEMPLATE
