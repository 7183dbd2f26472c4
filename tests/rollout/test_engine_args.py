"""``rollout.engine_kwargs``: checked against SGLang's own arguments, put on the launched command
line (which SGLang's parser accepts), and honoured or refused by the ``hf`` engine."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from megarl.config import ConfigError, ModelFacts, load_config, resolve_model_path, validate
from megarl.rollout.embedded.hf_engine import HFEngine, RequestFailed
from megarl.rollout.embedded.server import parse_args as hf_server_args
from megarl.rollout.engine import Engine, LaunchOptions
from megarl.rollout.engine_args import command_line, engine_kwargs_problems, installed_sglang_arguments, source_arguments
from tests.rollout.sglang_source import SGLANG, needs_sglang, run_sglang_parser

pytestmark = pytest.mark.cpu

DENSE = resolve_model_path("bundled:tiny-dense")
SETTINGS = {
    "max_running_requests": 64,
    "chunked_prefill_size": 4096,
    "context_length": 8192,
    "attention_backend": "triton",
    "disable_cuda_graph": True,
    "enable_torch_compile": False,
    "cuda_graph_bs_decode": [1, 2, 4],
}
"""What a user sets: ints, a choice, a switch on and one off, a list."""


def sglang_command(engine_kwargs: dict) -> list[str]:
    """The arguments ``sglang.launch_server`` gets from megarl for one engine with ``engine_kwargs``."""
    options = LaunchOptions(engine="sglang", model_path="/models/policy", log_dir=Path("/tmp"), engine_kwargs=engine_kwargs)
    command = Engine("sglang-0", "sglang", 1, launch=options).command(30000, Path("/tmp/ready"))
    assert command[:5] == [sys.executable, "-m", "megarl.rollout.sglang_entry", "--parent-pid", str(os.getpid())]
    return command[5:]


@pytest.fixture(scope="module")
def sglang_parser_run():
    """SGLang's parser, built from the installed source in a subprocess (its modules import there
    with three runtime-only modules stood in: tests/rollout/sglang_source.py), on megarl's command
    line without and with :data:`SETTINGS`."""
    return run_sglang_parser([sglang_command({}), sglang_command(SETTINGS)], keys=[*SETTINGS, "model_path", "tp_size", "mem_fraction_static"])


@needs_sglang
def test_reading_sglangs_source_finds_every_argument_its_parser_has(sglang_parser_run):
    """The fallback reading (SGLang's parser does not import without its runtime dependencies)
    agrees with the parser built from the same source: names, flags, switch or value, lists,
    and the types and choices wherever the source spells them."""
    parsed = sglang_parser_run["arguments"]
    read = source_arguments(SGLANG)
    assert sorted(read) == sorted(parsed) and len(read) > 400
    typed = 0
    for name, argument in read.items():
        dest, flag, takes_value, many, convert, choices = parsed[name]
        assert (argument.name, argument.flag, argument.takes_value, argument.many) == (dest, flag, takes_value, many), name
        if argument.convert is not None:
            typed += 1
            assert argument.convert.__name__ == convert, name
        if argument.choices is not None:
            assert sorted(map(str, argument.choices)) == choices, name
    assert typed > 300


@needs_sglang
def test_settings_reach_the_command_line_and_sglangs_parser_reads_them_back(sglang_parser_run):
    plain, configured = sglang_parser_run["parsed"]
    assert configured == {
        **plain, "max_running_requests": 64, "chunked_prefill_size": 4096, "context_length": 8192, "attention_backend": "triton",
        "disable_cuda_graph": True, "cuda_graph_bs_decode": [1, 2, 4],
    }
    assert plain["disable_cuda_graph"] is False and plain["max_running_requests"] is None
    assert (configured["model_path"], configured["tp_size"], configured["mem_fraction_static"]) == ("/models/policy", 1, 0.5)
    line = sglang_command(SETTINGS)
    assert line[line.index("--max-running-requests") + 1] == "64" and "--enable-torch-compile" not in line


@needs_sglang
@pytest.mark.parametrize(
    "settings,expected",
    [
        ({"max_runing_requests": 8}, "`rollout.engine_kwargs.max_runing_requests` is not an argument of SGLang's server (as read from the ServerArgs fields of "
         "SGLang 0.5.23's source) — did you mean `max_running_requests`?"),
        ({"attention_backnd": "fa3"}, "did you mean `attention_backend`?"),
        ({"zzz_qqq": 1}, "(python -m sglang.launch_server --help lists them)"),
        ({"tp_size": 2}, "`rollout.engine_kwargs.tp_size` is set by megarl: use rollout.engine_tensor_parallel instead"),
        ({"tensor_parallel_size": 2}, "`rollout.engine_kwargs.tensor_parallel_size` is set by megarl: use rollout.engine_tensor_parallel instead"),
        ({"mem_fraction_static": 0.8}, "use rollout.mem_fraction instead"),
        ({"enable_deterministic_inference": True}, "use rollout.deterministic instead"),
        ({"max_running_requests": "many"}, "`rollout.engine_kwargs.max_running_requests` ('many') is refused by --max-running-requests's int"),
        ({"max_running_requests": True}, "(True): --max-running-requests takes a value, not true or false"),
        ({"chunked_prefill_size": [1, 2]}, "must be one value"),
        ({"disable_cuda_graph": "yes"}, "('yes') must be true or false: --disable-cuda-graph is a switch"),
        ({"attention_backend": "fastest"}, "('fastest') must be one of ["),
    ],
)
def test_bad_settings_are_refused_in_one_line_each(settings, expected):
    problems = engine_kwargs_problems("sglang", settings)
    assert len(problems) == 1 and expected in problems[0], problems
    with pytest.raises(ValueError, match="rollout.engine_kwargs"):
        command_line("sglang", settings)


@needs_sglang
def test_good_settings_pass_and_the_arguments_are_read_once():
    assert engine_kwargs_problems("sglang", SETTINGS) == []
    assert installed_sglang_arguments() is installed_sglang_arguments()
    assert installed_sglang_arguments().source.startswith("the ServerArgs fields of SGLang")  # no sgl_kernel here: the source is read


def test_the_hf_engine_honours_context_length_and_refuses_what_it_cannot_do():
    problems = engine_kwargs_problems("hf", {"context_length": 64, "disable_cuda_graph": True, "attention_backend": "fa3", "max_running_requests": 8})
    assert problems == [
        "`rollout.engine_kwargs.attention_backend`: the hf engine (rollout.engine resolves to hf) cannot honour it; it honours context_length, "
        "disable_cuda_graph: remove it or use rollout.engine=sglang",
        "`rollout.engine_kwargs.max_running_requests`: the hf engine (rollout.engine resolves to hf) cannot honour it; it honours "
        "context_length, disable_cuda_graph: remove it or use rollout.engine=sglang",
    ]
    assert engine_kwargs_problems("hf", {"context_lenght": 64})[0].endswith(
        "cannot honour it — did you mean `context_length`?; it honours context_length, disable_cuda_graph: remove it or use rollout.engine=sglang"
    )
    assert engine_kwargs_problems("hf", {"context_length": 0}) == [
        "`rollout.engine_kwargs.context_length` (0) is refused by --context-length's _positive_int: it must be >= 1"
    ]
    assert engine_kwargs_problems("hf", {"tp_size": 2}) == ["`rollout.engine_kwargs.tp_size` is set by megarl: use rollout.engine_tensor_parallel instead"]
    line = command_line("hf", {"context_length": 64, "disable_cuda_graph": True})
    assert line == ["--context-length", "64"]  # no CUDA graphs to disable
    assert hf_server_args(["--model", str(DENSE), *line]).context_length == 64


def test_the_hf_engine_serves_no_longer_sequence_than_its_context_length():
    engine = HFEngine(str(DENSE), "float32", seed=0, context_length=12)
    engine.scheduler.start()
    assert engine.server_info({})["context_length"] == 12
    answer = asyncio.run(engine.generate({"input_ids": [3, 4, 5, 6, 7, 8, 9, 10], "sampling_params": {"max_new_tokens": 100, "ignore_eos": True}}))
    assert len(answer["output_ids"]) == 4 and answer["meta_info"]["finish_reason"]["type"] == "length"
    with pytest.raises(RequestFailed, match="context is 12"):
        asyncio.run(engine.generate({"input_ids": list(range(3, 15)), "sampling_params": {"max_new_tokens": 1}}))
    with pytest.raises(ValueError, match=r"context_length \(257\) must be in \[1, 256\], the model's max_position_embeddings"):
        HFEngine(str(DENSE), "float32", seed=0, context_length=257)


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["rollout.engine_kwargs={max_running_requests: 8}", "rollout.engine_urls=[http://127.0.0.1:1]"],
         "`rollout.engine_kwargs` sets the engines megarl launches, but the `rollout.engine_urls` engines run as they were started"),
        (["rollout.engine_kwargs={context_length: null}"], "`rollout.engine_kwargs.context_length` (None) must be a number, a string"),
        (["rollout.engine_kwargs={cuda_graph_bs_decode: []}"], "(null or an empty list: remove the key to keep the engine's default)"),
    ],
)
def test_the_config_refuses_engine_kwargs_it_cannot_pass(overrides, expected):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert expected in str(error.value)


def test_context_length_must_hold_the_longest_sequence_and_fit_the_model():
    facts = ModelFacts.from_hf_dir(DENSE)
    lengths = ["data.max_prompt_length=32", "data.max_response_length=8"]
    validate(load_config(None, [*lengths, "rollout.engine_kwargs={context_length: 40}"]), 1, facts)
    for length in (39, 257):
        with pytest.raises(ConfigError, match=rf"`rollout.engine_kwargs.context_length` \({length}\) must be >= `data.max_prompt_length`"):
            validate(load_config(None, [*lengths, f"rollout.engine_kwargs={{context_length: {length}}}"]), 1, facts)
