"""Configuration: strict loading, overrides, and cross-field validation before anything is built."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megarl.config import (
    PACKAGE_DIR,
    Config,
    ConfigError,
    FieldError,
    ModelFacts,
    OptimizerConfig,
    ParallelConfig,
    Range,
    layout_errors,
    load_config,
    parse_override,
    resolve_data_path,
    resolve_model_path,
    resolve_steps,
    save_config,
    validate,
    world_size_errors,
)
from megarl.preflight import check_run
from tests.distributed import REPO
from tests.rollout.fake_engines import fake_sglang, serving

pytestmark = pytest.mark.cpu

# Both tiny models: 4 layers, 4 heads, 2 key/value heads, 52 tokens, 256 positions.
HF_CONFIG = {
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 52,
    "max_position_embeddings": 256,
}
# Explicit sizes, so that the cases below do not depend on the defaults.
BASE = [
    "rollout.batch_size=16",
    "rollout.n_samples_per_prompt=8",
    "train.global_batch_size=128",
    "train.mini_batch_size=64",
    "train.micro_batch_size=8",
    "data.max_prompt_length=32",
    "data.max_response_length=8",
]


def write_hf_config(directory: Path, **fields) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({**HF_CONFIG, **fields}))
    return directory


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"dense": write_hf_config(root / "dense"), "moe": write_hf_config(root / "moe", num_local_experts=8)}


@pytest.fixture(scope="module")
def facts(model_dirs) -> dict[str, ModelFacts]:
    return {name: ModelFacts.from_hf_dir(path) for name, path in model_dirs.items()}


def violations(error: ConfigError) -> list[str]:
    header, *lines = str(error).split("\n  - ")
    assert header.startswith("invalid configuration for world size"), header
    return lines


# Each case: overrides on top of BASE, world size, model, one substring per expected violation line.
INVALID = [
    (["parallel.tensor=2", "parallel.pipeline=2"], 6, "dense", [
        "world size (6) must be TP x PP x CP x DP, but `parallel.tensor` (2) x `parallel.pipeline` (2) x "
        "`parallel.context` (1) = 4 does not divide it: run a multiple of 4 processes",
    ]),
    (["parallel.tensor=3"], 3, "dense", [
        "`parallel.tensor` (3) must divide the model's attention heads (4): set parallel.tensor to 1, 2 or 4",
        "`parallel.tensor` (3) and the model's query groups (num_key_value_heads, 2) must divide one another: set "
        "parallel.tensor to 1, 2 or 4",
    ]),
    (["parallel.expert=3", "train.global_batch_size=144", "train.mini_batch_size=48"], 3, "moe", [
        "`parallel.expert` (3) must divide the model's experts (8): set parallel.expert to 1, 2, 4 or 8",
    ]),
    (["parallel.expert=4"], 2, "moe", [
        "`parallel.expert` (4) x expert tensor parallel (1) x `parallel.pipeline` (1) = 4 must divide the world size (2)",
    ]),
    (["parallel.expert=2"], 2, "dense", ["`parallel.expert` (2) > 1 needs an MoE model, but the model is dense: set parallel.expert=1"]),
    (["parallel.expert_tensor=1"], 1, "dense", ["`parallel.expert_tensor` (1) is set but the model is dense: set parallel.expert_tensor=null"]),
    (["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert_tensor=1"], 2, "moe", [
        "`parallel.expert_tensor` (1) != `parallel.tensor` (2) needs `parallel.expert` > 1",
    ]),
    (["parallel.tensor=2"], 2, "moe", [
        "`parallel.tensor` (2) > 1 on an MoE model needs `parallel.sequence_parallel`",
    ]),
    (["parallel.pipeline=3"], 3, "dense", ["`parallel.pipeline` (3) must divide the model's layers (4): set parallel.pipeline to 1, 2 or 4"]),
    (["parallel.virtual_pipeline=2"], 1, "dense", ["`parallel.virtual_pipeline` (2) needs `parallel.pipeline` > 1"]),
    (["parallel.pipeline=2", "parallel.virtual_pipeline=4"], 2, "dense", [
        "`parallel.pipeline` (2) x `parallel.virtual_pipeline` (4) = 8 must divide the model's layers (4): "
        "set parallel.virtual_pipeline to 1 or 2",
    ]),
    (["parallel.sequence_parallel=true"], 1, "dense", ["`parallel.sequence_parallel` needs `parallel.tensor` > 1"]),
    (["parallel.context=2", "data.max_prompt_length=33"], 2, "dense", [
        "`data.max_prompt_length` + `data.max_response_length` (33 + 8 = 41) must be divisible by 2 x "
        "`parallel.context` (4): each CP rank holds two load-balanced chunks; raise data.max_prompt_length by 3",
    ]),
    (["data.max_prompt_length=250"], 1, "dense", ["(250 + 8 = 258) exceeds the model's max_position_embeddings (256)"]),
    (["train.dynamic_batch=true", "train.max_tokens_per_micro_batch=16"], 1, "dense", [
        "`train.max_tokens_per_micro_batch` (16) must hold one full sequence",
    ]),
    (["train.dynamic_batch=true", "train.forward_max_tokens_per_micro_batch=16"], 1, "dense", [
        "`train.forward_max_tokens_per_micro_batch` (16) must hold one full sequence",
    ]),
    (["train.packing=true", "train.dynamic_batch=true", "train.max_tokens_per_micro_batch=44", "parallel.tensor=4",
      "parallel.sequence_parallel=true", "parallel.context=2", "data.max_prompt_length=36"], 8, "dense", [
        "`train.max_tokens_per_micro_batch` (44) must hold one full sequence, `data.max_prompt_length` + `data.max_response_length` "
        "(36 + 8 = 44), rounded up to the layout's multiple 8: set it to at least 48",
    ]),
    (["train.packing=true", "model.moe_aux_loss_coeff=0.01", "model.moe_router_load_balancing_type=seq_aux_loss"], 1, "moe", [
        "`model.moe_router_load_balancing_type` (seq_aux_loss) balances each sequence, and with `train.packing`",
    ]),
    (["rollout.stop_token_ids=[3, 60]"], 1, "dense", ["`rollout.stop_token_ids` [60] are outside the model's vocabulary (size 52)"]),
    (["algorithm.overlong_penalty=true", "algorithm.overlong_buffer_length=9"], 1, "dense", [
        "`algorithm.overlong_buffer_length` (9) must be <= `data.max_response_length` (8)",
    ]),
    (["algorithm.routing_replay=r3"], 1, "dense", [
        "`algorithm.routing_replay` (r3) replays MoE routing, but the model is dense: set algorithm.routing_replay=none",
    ]),
    (["model.freeze_moe_router=true"], 1, "dense", [
        "`model.freeze_moe_router` freezes MoE routers, but the model is dense: set model.freeze_moe_router=false",
    ]),
    (["rollout.engine_tensor_parallel=3"], 1, "dense", ["`rollout.engine_tensor_parallel` (3) must divide the model's attention heads (4)"]),
    (["train.global_batch_size=64", "train.mini_batch_size=32"], 1, "dense", [
        "`train.global_batch_size` (64) must be >= `rollout.batch_size` (16) x `rollout.n_samples_per_prompt` (8) = 128",
    ]),
    (["train.global_batch_size=132", "train.mini_batch_size=66", "train.micro_batch_size=6"], 1, "dense", [
        "`train.global_batch_size` (132) must be a multiple of `rollout.n_samples_per_prompt` (8) so that it holds whole groups: set it to 136",
    ]),
    (["train.mini_batch_size=48"], 1, "dense", ["`train.mini_batch_size` (48) must divide `train.global_batch_size` (128): set train.mini_batch_size to 16, 32, 64 or 128"]),
    (["train.micro_batch_size=3"], 1, "dense", [
        "`train.micro_batch_size` (3) x data parallel (1) = 3 must divide `train.mini_batch_size` (64): "
        "set train.micro_batch_size to 1, 2, 4, 8, 16, 32 or 64",
    ]),
    (["train.micro_batch_size=64"], 2, "dense", [
        "`train.micro_batch_size` (64) x data parallel (2) = 128 must divide `train.mini_batch_size` (64): "
        "set train.micro_batch_size to 1, 2, 4, 8, 16 or 32",
    ]),
    (["train.dynamic_batch=true"], 3, "dense", ["`train.mini_batch_size` (64) must be divisible by data parallel (3)"]),
    (["rollout.n_samples_per_prompt=1", "train.global_batch_size=16", "train.mini_batch_size=16"], 1, "dense", [
        "`algorithm.advantage_estimator` (grpo) compares the samples of a prompt: `rollout.n_samples_per_prompt` (1) must be >= 2",
    ]),
    (
        ["algorithm.advantage_estimator=rloo", "algorithm.reward_norm=group", "algorithm.dynamic_sampling=true",
         "rollout.n_samples_per_prompt=1", "train.global_batch_size=16", "train.mini_batch_size=16"],
        1, "dense",
        ["`algorithm.advantage_estimator` (rloo)", "`algorithm.reward_norm` (group)", "`algorithm.dynamic_sampling` drops groups"],
    ),
    (
        ["algorithm.advantage_estimator=grpo_passk", "rollout.n_samples_per_prompt=1", "train.global_batch_size=16", "train.mini_batch_size=16"],
        1, "dense",
        ["`algorithm.advantage_estimator` (grpo_passk) compares the samples of a prompt"],
    ),
    (
        ["algorithm.advantage_estimator=optimal_token_baseline", "rollout.n_samples_per_prompt=1", "train.global_batch_size=16", "train.mini_batch_size=16"],
        1, "dense",
        ["`algorithm.advantage_estimator` (optimal_token_baseline) compares the samples of a prompt"],
    ),
    (["algorithm.advantage_estimator=remax", "rollout.mode=async", "rollout.colocate=false", "algorithm.reward_norm=group"], 1, "dense", [
        "`algorithm.advantage_estimator` (remax) generates its greedy baselines in synchronous rounds: set rollout.mode=sync",
        "`algorithm.reward_norm` (group) would put the scores on another scale than remax's greedy baselines",
    ]),
    (["data.val_files=[]"], 1, "dense", ["`train.eval_every` (10) needs `data.val_files`"]),
    (["data.val_files=[]", "train.eval_every=0", "train.val_before_train=true"], 1, "dense", ["`train.val_before_train` needs `data.val_files`"]),
    (["data.val_files=[]", "train.eval_every=0", "train.val_only=true"], 1, "dense", ["`train.val_only` needs `data.val_files`"]),
    (["algorithm.advantage_estimator=gae", "train.steps=20", "critic.warmup_steps=20"], 1, "dense", [
        "`critic.warmup_steps` (20) must be < `train.steps` (20)",
    ]),
    (["critic.path=/models/critic", "critic.warmup_steps=1"], 1, "dense", [
        "`critic.path` and `critic.warmup_steps` set but `algorithm.advantage_estimator` (grpo) trains no critic",
    ]),
]


@pytest.mark.parametrize("overrides,world_size,model,expected", INVALID)
def test_invalid_configs_fail_naming_the_fields(overrides, world_size, model, expected, facts):
    config = load_config(None, BASE + overrides)
    with pytest.raises(ConfigError) as error:
        validate(config, world_size, facts[model])
    lines = violations(error.value)
    assert len(lines) == len(expected), lines
    for line, text in zip(lines, expected):
        assert text in line


def test_every_violation_is_listed_at_once(facts):
    config = load_config(None, BASE + ["parallel.pipeline=3", "parallel.sequence_parallel=true", "train.micro_batch_size=3"])
    with pytest.raises(ConfigError) as error:
        validate(config, 3, facts["dense"])
    assert [line.split(" ", 1)[0] for line in violations(error.value)] == [
        "`parallel.pipeline`", "`parallel.sequence_parallel`", "`train.micro_batch_size`"
    ]


def test_world_size_must_be_positive(facts):
    with pytest.raises(ConfigError, match=r"world size \(0\) must be >= 1"):
        validate(load_config(None, BASE), 0, facts["dense"])


@pytest.mark.parametrize(
    "overrides,world_size,model",
    [
        ([], 1, "dense"),
        ([], 1, "moe"),
        (["parallel.expert=2"], 2, "moe"),
        (["parallel.expert=2", "algorithm.routing_replay=r3"], 2, "moe"),
        (["parallel.expert=8", "train.micro_batch_size=1"], 8, "moe"),
        (["model.freeze_moe_router=true", "train.forward_micro_batch_size=32", "train.forward_max_tokens_per_micro_batch=64"], 1, "moe"),
        (["parallel.tensor=2", "parallel.sequence_parallel=true"], 2, "moe"),
        (["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert=2", "parallel.expert_tensor=1"], 2, "moe"),
        (["parallel.context=2"], 2, "dense"),
        (["parallel.context=2", "train.dynamic_batch=true"], 4, "dense"),
        (["parallel.pipeline=2", "parallel.virtual_pipeline=2"], 2, "dense"),
        (["parallel.tensor=2", "parallel.pipeline=2"], 8, "dense"),
        # Fewer key/value heads (2) than TP ranks: megatron-core gives each to two ranks.
        (["parallel.tensor=4"], 4, "dense"),
        (["train.global_batch_size=256", "train.mini_batch_size=128", "train.ppo_epochs=2"], 4, "dense"),
        (["algorithm.advantage_estimator=gae", "rollout.n_samples_per_prompt=1", "train.global_batch_size=16", "train.mini_batch_size=16"], 2, "dense"),
        (["algorithm.advantage_estimator=reinforce_pp", "rollout.n_samples_per_prompt=1", "train.global_batch_size=16", "train.mini_batch_size=16"], 1, "dense"),
        (["algorithm.overlong_penalty=true", "algorithm.overlong_buffer_length=8"], 1, "dense"),
        (["data.val_files=[]", "train.eval_every=0"], 1, "dense"),
        # The trainer computes its sum of squared probabilities in either rollout mode, under any layout.
        (["algorithm.advantage_estimator=optimal_token_baseline", "parallel.tensor=2", "algorithm.tis=true"], 2, "dense"),
        (["algorithm.advantage_estimator=optimal_token_baseline", "rollout.mode=async", "rollout.colocate=false",
          "algorithm.use_decoupled_loss=true", "algorithm.reward_norm=group"], 1, "dense"),
    ],
)
def test_valid_configs_pass(overrides, world_size, model, facts):
    validate(load_config(None, BASE + overrides), world_size, facts[model])


@pytest.mark.parametrize(
    "override,expected",
    [
        ("train.lr=1", "override `train.lr=1`: unknown key `train.lr` — did you mean `train.optimizer.lr`?"),
        ("rollout.temprature=0.5", "override `rollout.temprature=0.5`: unknown key `rollout.temprature` — did you mean `rollout.temperature`?"),
        ("trian.steps=3", "override `trian.steps=3`: unknown key `trian.steps` — did you mean `train.steps`?"),
        ("algorithm.kl.coef=1", "override `algorithm.kl.coef=1`: unknown key `algorithm.kl.coef` — did you mean `algorithm.kl_coef`?"),
        ("kl_coef=0.1", "override `kl_coef=0.1`: unknown key `kl_coef` — did you mean `algorithm.kl_coef`?"),
        ("parallel.tp=2", "override `parallel.tp=2`: unknown key `parallel.tp`"),
        ("train.steps.x=1", "override `train.steps.x=1`: unknown key `train.steps.x`"),
    ],
)
def test_unknown_override_keys_suggest_the_nearest(override, expected):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert str(error.value).startswith(expected)


def test_a_dispatcher_megatron_cannot_build_for_rl_batches_is_refused_with_the_field_named():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["model.moe_token_dispatcher=allgather"])
    assert str(error.value) == (
        "override `model.moe_token_dispatcher=allgather`: `model.moe_token_dispatcher` (allgather) needs fixed sequence "
        "lengths in megatron-core 0.16, and RL batches vary: use alltoall"
    )


def test_unknown_key_without_a_near_one_gets_no_suggestion():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["zzzzzz=1"])
    assert str(error.value) == "override `zzzzzz=1`: unknown key `zzzzzz`"


@pytest.mark.parametrize(
    "text,expected",
    [
        ("train:\n  optimizer:\n    lrr: 0.1\n", "unknown key `train.optimizer.lrr` — did you mean `train.optimizer.lr`?"),
        ("train:\n  lr: 0.1\n", "unknown key `train.lr` — did you mean `train.optimizer.lr`?"),
        ("rolout:\n  batch_size: 4\n", "unknown key `rolout.batch_size` — did you mean `rollout.batch_size`?"),
        ("rolout: {}\n", "unknown key `rolout` — did you mean `rollout`?"),
        ("algorithm:\n  kl:\n    coef: 0.1\n", "unknown key `algorithm.kl.coef` — did you mean `algorithm.kl_coef`?"),
    ],
)
def test_unknown_yaml_keys_name_the_file_and_the_nearest(tmp_path, text, expected):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value).startswith(f"{path}: {expected}")


@pytest.mark.parametrize(
    "override,expected",
    [
        ("train.steps=abc", "`train.steps` = 'abc' must be null or an integer"),
        ("train.steps=1.5", "`train.steps` = 1.5 must be null or an integer"),
        ("train.steps=true", "`train.steps` = True must be null or an integer"),
        ("parallel.sequence_parallel=3", "`parallel.sequence_parallel` = 3 must be true or false"),
        ("parallel.sequence_parallel=yes please", "`parallel.sequence_parallel` = 'yes please' must be true or false"),
        ("train.optimizer.lr=fast", "`train.optimizer.lr` = 'fast' must be a number"),
        ("logging.name=12", "`logging.name` = 12 must be a string"),
        ("parallel.virtual_pipeline=two", "`parallel.virtual_pipeline` = 'two' must be null or an integer"),
        ("rollout.stop_token_ids=5", "`rollout.stop_token_ids` = 5 must be a list of integers"),
        ("rollout.stop_token_ids=[1, a]", "`rollout.stop_token_ids[1]` = 'a' must be an integer"),
        ("algorithm.dynamic_sampling_mean_range=[0.1]", "`algorithm.dynamic_sampling_mean_range` = [0.1] must be null or a list of 2 numbers"),
        ("rollout.engine=vllm", "`rollout.engine` = 'vllm' must be one of 'auto', 'hf', 'sglang'"),
        ("train=5", "`train` must be a mapping of field: value, got 5"),
        ("agent.env_kwargs=[1, 2]", "`agent.env_kwargs` = [1, 2] must be a mapping of names to values"),
    ],
)
def test_type_errors_name_field_value_and_type(override, expected):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert str(error.value) == f"override `{override}`: {expected}"


def test_free_form_keyword_arguments_keep_their_values():
    config = load_config(None, ["agent.environment=toy_lookup", "agent.env_kwargs={hidden: 3, names: [a, b]}"])
    assert config.agent.enabled and config.agent.env_kwargs == {"hidden": 3, "names": ["a", "b"]}
    assert not load_config(None).agent.enabled


def test_yaml_type_errors_name_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: ten\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value) == f"{path}: `train.steps` = 'ten' must be null or an integer"
    path.write_text("- model\n- train\n")
    with pytest.raises(ConfigError, match="the top level must be a mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "override,expected",
    [
        ("train.optimizer.lr=0", "`train.optimizer.lr` (0.0) must be > 0"),
        ("critic.optimizer.min_lr=1", "`critic.optimizer.min_lr` (1.0) must be in [0, lr] = [0, 1e-05]"),
        ("train.optimizer.adam_beta2=1", "`train.optimizer.adam_beta2` (1.0) must be in [0, 1)"),
        ("rollout.temperature=0", "`rollout.temperature` (0.0) must be > 0"),
        ("rollout.top_k=0", "`rollout.top_k` (0) must be -1 (off) or >= 1"),
        ("parallel.tensor=0", "`parallel.tensor` (0) must be >= 1"),
        ("parallel.virtual_pipeline=0", "`parallel.virtual_pipeline` (0) must be >= 1, or null"),
        ("train.micro_batch_size=0", "`train.micro_batch_size` (0) must be >= 1"),
        ("train.forward_micro_batch_size=0", "`train.forward_micro_batch_size` (0) must be >= 1, or null"),
        ("algorithm.advantage_clip=0", "`algorithm.advantage_clip` (0.0) must be > 0, or null"),
        ("algorithm.clip_ratio_low=1.5", "`algorithm.clip_ratio_low` (1.5) must be in [0, 1)"),
        ("algorithm.clip_ratio_c=0.5", "`algorithm.clip_ratio_c` (0.5) must be > 1, or null"),
        ("algorithm.dynamic_sampling_mean_range=[0.9, 0.1]", "`algorithm.dynamic_sampling_mean_range` ([0.9, 0.1]) must be [low, high]"),
        ("checkpoint.keep_last=0", "`checkpoint.keep_last` (0) must be >= 1"),
        ("reward.type=function", "`reward.function` must be set (path/to/file.py:name) when reward.type is 'function'"),
        ("data.train_files=[]", "`data.train_files` must list at least one file"),
        ("data.max_samples=0", "`data.max_samples` (0) must be >= 1, or null"),
        ("data.val_max_samples=-1", "`data.val_max_samples` (-1) must be >= 1, or null"),
        ("train.total_epochs=0", "`train.total_epochs` (0) must be >= 1, or null"),
        ("rollout.stop_token_ids=[1, -2]", "`rollout.stop_token_ids` ([1, -2]) must all be >= 0"),
        ("rollout.val_temperature=-1", "`rollout.val_temperature` (-1.0) must be >= 0 (0 is greedy)"),
        ("rollout.mem_fraction=1", "`rollout.mem_fraction` (1.0) must be in (0, 1)"),
        ("algorithm.icepop_low=0", "`algorithm.icepop_low` (0.0) must be > 0"),
        ("algorithm.icepop_low=3", "`algorithm.icepop_low` (3.0) must be < icepop_high (2.0)"),
        ("algorithm.behav_imp_weight_cap=1", "`algorithm.behav_imp_weight_cap` (1.0) must be > 1, or null"),
        ("rollout.max_staleness=-1", "`rollout.max_staleness` (-1) must be >= 0 (0 is on-policy)"),
        ("rollout.hf_step_delay_s=-0.1", "`rollout.hf_step_delay_s` (-0.1) must be >= 0"),
        ("rollout.val_top_p=0", "`rollout.val_top_p` (0.0) must be in (0, 1]"),
        ("rollout.val_top_k=0", "`rollout.val_top_k` (0) must be"),
        ("logging.rollout_dir=''", "`logging.rollout_dir` must be a directory (relative: under the run directory) or null"),
        (
            "rollout.mode=async",
            "`rollout.colocate` (true) cannot be used with `rollout.mode` async: the engines generate while the trainer "
            "trains, so they cannot give their memory back during the update; set rollout.colocate=false",
        ),
        (
            "data.train_file_weights=[1, 2]",
            "`data.train_file_weights` (length 2) must have the length of `data.train_files` (1): one positive weight per file",
        ),
        (
            "data.truncation=left",
            "`data.truncation` (left) has no effect while data.filter_overlong_prompts is true (it drops every prompt over "
            "the limit): set data.filter_overlong_prompts=false",
        ),
    ],
)
def test_range_errors_name_the_override_and_dotted_field(override, expected):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert str(error.value).startswith(f"override `{override}`: {expected}")


def test_unregistered_algorithm_names_are_refused_once_the_cheap_checks_pass(tmp_path):
    # The names are looked up in the registries of megarl.algorithms (torch code), so the loader
    # takes any string and the preflight checks them last.
    moe = REPO / "configs" / "moe_grpo.yaml"
    run_dir = f"logging.run_dir={tmp_path / 'run'}"
    assert check_run(load_config(moe, [run_dir, "algorithm.advantage_estimator=ppo"]), 2) == [
        "`algorithm.advantage_estimator` = 'ppo' is not a registered advantage estimator — did you mean `opo`? Registered: gae, gpg, grpo, "
        "grpo_passk, opo, optimal_token_baseline, reinforce_pp, reinforce_pp_baseline, remax, rloo; a new one is a function decorated with @register_advantage in megarl/algorithms/advantages.py"
    ]
    assert check_run(load_config(moe, [run_dir, "algorithm.advantage_estimator=xyz", "algorithm.policy_loss=ppoo"]), 2) == [
        "`algorithm.advantage_estimator` = 'xyz' is not a registered advantage estimator. Registered: gae, gpg, grpo, grpo_passk, "
        "opo, optimal_token_baseline, reinforce_pp, reinforce_pp_baseline, remax, rloo; a new one is a function decorated with @register_advantage in megarl/algorithms/advantages.py",
        "`algorithm.policy_loss` = 'ppoo' is not a registered policy loss — did you mean `ppo`? Registered: cispo, clip_cov, dppo_kl, dppo_tv, gmpo, gpg, gspo, kl_cov, ppo, sapo; a new one "
        "is a function decorated with @register_policy_loss in megarl/algorithms/policy_losses.py",
    ]
    # A cheap problem is reported alone: the registries are not imported for a run that cannot start.
    missing = tmp_path / "missing.jsonl"
    assert check_run(load_config(moe, [run_dir, f"data.train_files=[{missing}]", "algorithm.policy_loss=ppoo"]), 2) == [
        f"data.train_files: {missing} does not exist"
    ]


def test_turning_whitening_off_is_refused_for_an_estimator_without_it(tmp_path):
    moe = REPO / "configs" / "moe_grpo.yaml"
    run_dir = f"logging.run_dir={tmp_path / 'run'}"
    assert check_run(load_config(moe, [run_dir, "algorithm.whiten_advantages=false"]), 2) == [
        "`algorithm.whiten_advantages` (false) changes nothing for `algorithm.advantage_estimator` grpo, which has no batch normalisation "
        "(only gae, reinforce_pp, reinforce_pp_baseline do): drop it (for grpo's group std, set algorithm.norm_adv_by_std=false)"
    ]
    assert check_run(load_config(moe, [run_dir, "algorithm.whiten_advantages=false", "algorithm.advantage_estimator=reinforce_pp_baseline"]), 2) == []


def test_cispo_refuses_a_dual_clip():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["algorithm.clip_ratio_c=3", "algorithm.policy_loss=cispo"])
    assert str(error.value) == (
        "override `algorithm.clip_ratio_c=3`: `algorithm.clip_ratio_c` (3.0) must be null with "
        "algorithm.policy_loss = cispo (CISPO has no dual clip)"
    )
    assert load_config(None, ["algorithm.clip_ratio_c=3"]).algorithm.clip_ratio_c == 3.0


def test_range_error_names_where_the_value_came_from(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: 0\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value) == f"{path}: `train.steps` (0) must be >= 1, or null"
    # A later override may repair what the file set; only the final values are range-checked.
    assert load_config(path, ["train.steps=3"]).train.steps == 3
    with pytest.raises(ConfigError) as error:
        load_config(path, ["train.steps=3", "reward.type=function", "reward.function=rewards.py"])
    assert str(error.value).startswith("override `reward.function=rewards.py`: `reward.function` ('rewards.py') must look like")
    # A field left at its default is blamed on the latest setting of its section.
    path.write_text("reward:\n  type: function\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, ["reward.num_workers=1", "reward.type=function"])
    assert str(error.value).startswith("override `reward.type=function`: `reward.function` must be set")


def test_a_frozen_router_keeps_its_expert_bias():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["model.freeze_moe_router=true", "model.moe_router_bias_update_rate=0.001"])
    assert "`model.moe_router_bias_update_rate` (0.001) would move the expert bias of routers that model.freeze_moe_router freezes" in str(error.value)
    assert load_config(None, ["model.freeze_moe_router=true"]).model.freeze_moe_router


def test_mixing_weights_must_be_positive():
    files = "data.train_files=[a.jsonl, b.jsonl]"
    with pytest.raises(ConfigError) as error:
        load_config(None, [files, "data.train_file_weights=[1, 0]"])
    assert str(error.value).startswith("override `data.train_file_weights=[1, 0]`: `data.train_file_weights` ([1.0, 0.0]) must all be > 0")
    assert load_config(None, [files, "data.train_file_weights=[1, 3]"]).data.train_file_weights == [1.0, 3.0]
    assert load_config(None, ["data.filter_overlong_prompts=false", "data.truncation=right"]).data.truncation == "right"


def test_run_length_is_steps_or_epochs_never_both_nor_neither():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["train.total_epochs=2"])
    assert str(error.value) == (
        "override `train.total_epochs=2`: `train.total_epochs` (2) and `train.steps` (200) both set the run's length: "
        "set train.steps=null to train for epochs, or drop train.total_epochs"
    )
    with pytest.raises(ConfigError) as error:
        load_config(None, ["train.steps=null"])
    assert str(error.value).startswith("override `train.steps=null`: `train.steps` and `train.total_epochs` are both null: set")
    config = load_config(None, ["train.steps=null", "train.total_epochs=2"])
    assert (config.train.steps, config.train.total_epochs) == (None, 2)


def test_epochs_resolve_to_steps_once_the_prompts_are_counted(caplog):
    # 128 samples per step / 8 per prompt = 16 prompts per step; 50 prompts -> 4 steps an epoch.
    config = load_config(None, BASE + ["train.steps=null", "train.total_epochs=2"])
    with caplog.at_level(logging.INFO, logger="megarl.config"):
        assert resolve_steps(config, 50) == 8
    assert caplog.messages == ["train.total_epochs = 2: 50 prompts, 16 per step -> 8 steps"]
    assert resolve_steps(config, 48) == 6
    assert resolve_steps(load_config(None, BASE + ["train.steps=7"]), 50) == 7


def test_checks_that_need_the_run_length_wait_for_it(facts):
    # Neither check can be made before the data is loaded; once train.steps is resolved both are.
    overrides = ["train.steps=null", "train.total_epochs=1", "train.lr_warmup_steps=5", "algorithm.advantage_estimator=gae", "critic.warmup_steps=2"]
    config = load_config(None, BASE + overrides)
    validate(config, 1, facts["dense"])
    assert config.train.warmup_clamped() is None
    with pytest.raises(ConfigError, match="until the data is loaded"):
        config.train.optimizer_steps()
    config.train.steps = resolve_steps(config, 20)
    with pytest.raises(ConfigError) as error:
        validate(config, 1, facts["dense"])
    assert violations(error.value) == [
        "`critic.warmup_steps` (2) must be < `train.steps` (2, from train.total_epochs = 1): otherwise the policy never trains",
    ]
    assert config.train.warmup_steps() == 4 and "warming up over all 4" in config.train.warmup_clamped()


def test_sections_check_their_ranges_when_built_directly():
    with pytest.raises(FieldError) as error:
        OptimizerConfig(lr=0.0)
    assert str(error.value) == "`optimizer.lr` (0.0) must be > 0"
    assert isinstance(error.value, ConfigError) and isinstance(error.value, ValueError)


def test_a_section_built_directly_lists_every_problem():
    with pytest.raises(FieldError) as error:
        OptimizerConfig(lr=-1.0, adam_beta1=1.0, min_lr=2.0)
    # min_lr is not compared with an lr that is itself out of range.
    assert error.value.problems == [("optimizer.lr", "(-1.0) must be > 0"), ("optimizer.adam_beta1", "(1.0) must be in [0, 1)")]
    assert str(error.value) == "`optimizer.lr` (-1.0) must be > 0\n`optimizer.adam_beta1` (1.0) must be in [0, 1)"


def test_loading_reports_every_violation_at_once(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("algorithm:\n  gamma: 2\ntrain:\n  lr: 0.1\n")
    overrides = ["rollout.n_samples_per_prompt=0", "train.optimizer.lr=0", "algorithm.tis_threshold_low=3", "train.steps=ten", "train.steps"]
    with pytest.raises(ConfigError) as error:
        load_config(path, overrides)
    # Keys and types as each source is read, then ranges and rules section by section.
    assert str(error.value).splitlines() == [
        f"{path}: unknown key `train.lr` — did you mean `train.optimizer.lr`?",
        "override `train.steps=ten`: `train.steps` = 'ten' must be null or an integer",
        "override `train.steps` must look like key.sub=value (e.g. train.steps=10)",
        "override `rollout.n_samples_per_prompt=0`: `rollout.n_samples_per_prompt` (0) must be >= 1",
        f"{path}: `algorithm.gamma` (2.0) must be in [0, 1]",
        "override `algorithm.tis_threshold_low=3`: `algorithm.tis_threshold_low` (3.0) must be < tis_threshold_high (2.0)",
        "override `train.optimizer.lr=0`: `train.optimizer.lr` (0.0) must be > 0",
    ]


def test_a_cli_names_every_violation_on_its_own_line():
    result = run_cli("--config", "configs/moe_grpo.yaml", "algorithm.gamma=2", "train.optimizer.lr=-1", "rollout.n_samples_per_prompt=0")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [
        "megarl.config: override `rollout.n_samples_per_prompt=0`: `rollout.n_samples_per_prompt` (0) must be >= 1",
        "megarl.config: override `algorithm.gamma=2`: `algorithm.gamma` (2.0) must be in [0, 1]",
        "megarl.config: override `train.optimizer.lr=-1`: `train.optimizer.lr` (-1.0) must be > 0",
    ]


def test_a_range_says_its_bounds():
    assert [Range(ge=1).describe(), Range(gt=0).describe(), Range(ge=0, lt=1).describe(), Range(gt=0, le=1).describe()] == [
        ">= 1", "> 0", "in [0, 1)", "in (0, 1]"
    ]
    assert Range(ge=1, off=-1).describe() == "-1 (off) or >= 1" and Range(ge=1, off=-1).admits(-1)
    assert Range(ge=1).problem(None, optional=True, items=False) is None
    assert Range(ge=1).problem(0, optional=True, items=False) == "(0) must be >= 1, or null"
    assert Range(gt=0, fix="drop it").problem([1.0, 0.0], optional=False, items=True) == "([1.0, 0.0]) must all be > 0: drop it"


def test_the_world_size_rules_are_the_layouts_own(facts):
    # megarl.parallel.initialize refuses a layout with these, before Megatron sees it.
    layout = ParallelConfig(tensor=2, pipeline=2, expert=2, sequence_parallel=True)
    assert world_size_errors(layout, 8) == []
    problems = world_size_errors(layout, 6)
    assert [problem.split(" ", 1)[0] for problem in problems] == ["world", "`parallel.expert`"]
    assert set(problems) <= set(layout_errors(layout, 6, facts["moe"]))


def test_override_parsing():
    assert parse_override("train.steps=10") == ("train.steps", 10)
    assert parse_override("train.optimizer.lr=0.5") == ("train.optimizer.lr", 0.5)
    assert parse_override("train.optimizer.lr=1e-6") == ("train.optimizer.lr", "1e-6")  # YAML 1.1: a string
    assert parse_override("parallel.sequence_parallel=true") == ("parallel.sequence_parallel", True)
    assert parse_override("parallel.virtual_pipeline=null") == ("parallel.virtual_pipeline", None)
    assert parse_override("parallel.virtual_pipeline=") == ("parallel.virtual_pipeline", None)
    assert parse_override("rollout.stop_token_ids=[1,2]") == ("rollout.stop_token_ids", [1, 2])
    assert parse_override("logging.name=a=b") == ("logging.name", "a=b")
    for bad, message in [
        ("train.steps", "must look like key.sub=value"),
        ("=5", "needs a dotted key"),
        ("train..steps=5", "needs a dotted key"),
        ("rollout.stop_token_ids=[1,2", "the value is not valid YAML"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_override(bad)


def test_overrides_apply_in_order_over_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("parallel:\n  virtual_pipeline: 2\n  pipeline: 2\ntrain:\n  steps: 5\n  mini_batch_size: 32\n")
    config = load_config(
        path,
        [
            "train.optimizer.lr=1e-6",
            "train.optimizer.weight_decay=1",
            "parallel.virtual_pipeline=null",
            "parallel.sequence_parallel=true",
            "rollout.stop_token_ids=[7, 9]",
            "algorithm.dynamic_sampling_mean_range=[0, 1]",
            "train={steps: 7}",
            "train.steps=9",
        ],
    )
    assert config.train.optimizer.lr == 1e-6 and isinstance(config.train.optimizer.lr, float)
    assert config.train.optimizer.weight_decay == 1.0 and isinstance(config.train.optimizer.weight_decay, float)
    assert config.parallel.virtual_pipeline is None and config.parallel.pipeline == 2
    assert config.parallel.sequence_parallel is True
    assert config.rollout.stop_token_ids == [7, 9]
    assert config.algorithm.dynamic_sampling_mean_range == (0.0, 1.0)
    # A mapping override merges into the section: the file's mini_batch_size stays.
    assert (config.train.steps, config.train.mini_batch_size) == (9, 32)


def test_nested_section_keeps_its_own_defaults():
    # critic.optimizer defaults to lr 1e-5 (train.optimizer to 1e-6); setting another field keeps it.
    config = load_config(None, ["critic.optimizer.clip_grad=0.5"])
    assert (config.critic.optimizer.lr, config.critic.optimizer.clip_grad) == (1e-5, 0.5)
    assert config.train.optimizer.lr == 1e-6


def test_empty_file_and_empty_sections_are_the_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n")
    assert load_config(path) == Config()
    path.write_text("")
    assert load_config(path) == load_config(None) == Config()


def test_round_trip_through_yaml(tmp_path):
    config = load_config(None, BASE + ["train.steps=7", "algorithm.dynamic_sampling_mean_range=[0.2, 0.8]", "rollout.stop_token_ids=[3]"])
    path = tmp_path / "resolved.yaml"
    save_config(config, path)
    assert load_config(path) == config
    as_dict = config.to_dict()
    assert as_dict == yaml.safe_load(path.read_text())
    assert as_dict["train"]["steps"] == 7 and as_dict["train"]["optimizer"]["lr"] == 1e-6
    assert as_dict["algorithm"]["dynamic_sampling_mean_range"] == [0.2, 0.8]


def test_layout_arithmetic():
    assert ParallelConfig().min_world_size() == 1
    assert ParallelConfig(expert=2).min_world_size() == 2
    assert ParallelConfig(tensor=2, expert=4).min_world_size() == 8  # EP x ETP(=TP) = 8
    assert ParallelConfig(tensor=2, expert=4, expert_tensor=1).min_world_size() == 4
    assert ParallelConfig(tensor=2, pipeline=2, expert=2, expert_tensor=1).min_world_size() == 4
    assert ParallelConfig(context=2, expert=3).min_world_size() == 6
    layout = ParallelConfig(tensor=2, pipeline=2)
    assert (layout.model_parallel(), layout.data_parallel(8), layout.expert_tensor_size) == (4, 2, 2)


def test_derived_values():
    config = load_config(None, ["logging.name=exp1"])
    assert config.logging.resolved_run_dir() == Path("runs/exp1")
    assert config.resolved_checkpoint_dir() == Path("runs/exp1/checkpoints")
    assert load_config(None, ["checkpoint.dir=/ckpt"]).resolved_checkpoint_dir() == Path("/ckpt")
    assert not config.critic_enabled
    assert load_config(None, ["algorithm.advantage_estimator=gae"]).critic_enabled
    assert config.train.optimizer_steps() == 200 * 1 * (128 // 64)


def test_bundled_paths_resolve_inside_the_package():
    assert resolve_model_path("bundled:tiny-moe") == PACKAGE_DIR / "assets" / "models" / "tiny-moe"
    assert resolve_model_path("/models/qwen") == Path("/models/qwen")
    assert resolve_data_path("bundled:toy/train.jsonl") == PACKAGE_DIR / "assets" / "data" / "toy" / "train.jsonl"
    assert resolve_data_path("data/x.parquet") == Path("data/x.parquet")


@pytest.mark.parametrize(
    "extra,experts,query_groups",
    [
        ({}, 0, 2),
        ({"num_local_experts": 8}, 8, 2),
        ({"num_experts": 16}, 16, 2),
        ({"n_routed_experts": 64}, 64, 2),
        ({"num_key_value_heads": None}, 0, 4),
    ],
)
def test_model_facts_from_hf_config(tmp_path, extra, experts, query_groups):
    fields = {**HF_CONFIG, **extra}
    if fields["num_key_value_heads"] is None:
        del fields["num_key_value_heads"]
    (tmp_path / "config.json").write_text(json.dumps(fields))
    assert ModelFacts.from_hf_dir(tmp_path) == ModelFacts(
        num_layers=4, num_attention_heads=4, num_query_groups=query_groups, num_experts=experts, vocab_size=52, max_position_embeddings=256
    )


def test_model_facts_errors(tmp_path):
    with pytest.raises(ConfigError, match="config.json does not exist"):
        ModelFacts.from_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 4, "vocab_size": 52}))
    with pytest.raises(ConfigError, match="missing num_hidden_layers, max_position_embeddings"):
        ModelFacts.from_hf_dir(tmp_path)


def run_cli(*arguments: str, world_size: str | None = None) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != "WORLD_SIZE"}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), environment.get("PYTHONPATH")]))
    if world_size is not None:
        environment["WORLD_SIZE"] = world_size
    command = [sys.executable, "-m", "megarl.config", *arguments]
    return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=120)


@pytest.fixture
def moe_run_file(tmp_path, model_dirs) -> Path:
    """A run on a model directory that the command's file checks accept (config, weights file and
    tokenizer present; the weights are not read)."""
    model = tmp_path / "moe"
    shutil.copytree(model_dirs["moe"], model)
    (model / "model.safetensors").write_bytes(b"")
    shutil.copy(resolve_model_path("bundled:tiny-moe") / "tokenizer.json", model)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": str(model)}, "parallel": {"expert": 2}}))
    return path


def test_cli_prints_the_resolved_config(moe_run_file):
    printed = run_cli("--config", str(moe_run_file), "train.steps=3", "--print", "rollout.top_k=5")
    assert printed.returncode == 0, printed.stderr
    resolved = yaml.safe_load(printed.stdout)
    assert resolved == load_config(moe_run_file, ["train.steps=3", "rollout.top_k=5"]).to_dict()
    assert resolved["train"]["steps"] == 3 and resolved["parallel"]["expert"] == 2
    checked = run_cli("--config", str(moe_run_file), "--world-size", "4")
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.strip() == f"{moe_run_file}: valid for world size 4 (DP 4)"


def test_cli_prints_an_epoch_run_that_loads_again(moe_run_file, tmp_path):
    overrides = ["train.steps=null", "train.total_epochs=3"]
    printed = run_cli("--config", str(moe_run_file), *overrides, "--print")
    assert printed.returncode == 0, printed.stderr
    path = tmp_path / "printed.yaml"
    path.write_text(printed.stdout)
    assert load_config(path) == load_config(moe_run_file, overrides)
    assert (load_config(path).train.steps, load_config(path).train.total_epochs) == (None, 3)


def test_cli_reports_errors_without_a_traceback(moe_run_file):
    invalid = run_cli("--config", str(moe_run_file), "parallel.expert=3", "--print")
    assert (invalid.returncode, invalid.stdout) == (2, "")
    assert "`parallel.expert` (3) must divide the model's experts (8)" in invalid.stderr
    unknown = run_cli("--config", str(moe_run_file), "train.lr=1")
    assert unknown.returncode == 2
    assert "unknown key `train.lr` — did you mean `train.optimizer.lr`?" in unknown.stderr
    # The world size comes from $WORLD_SIZE when --world-size is not given.
    from_environment = run_cli("--config", str(moe_run_file), world_size="3")
    assert from_environment.returncode == 2
    assert "invalid configuration for world size 3" in from_environment.stderr
    for result in (invalid, unknown, from_environment):
        assert "Traceback" not in result.stderr


def test_cli_refuses_an_unregistered_policy_loss_in_one_line():
    refused = run_cli("--config", "configs/moe_grpo.yaml", "algorithm.policy_loss=ppoo", world_size="2")
    assert (refused.returncode, refused.stdout) == (2, "")
    assert refused.stderr.splitlines() == [
        "megarl.config: `algorithm.policy_loss` = 'ppoo' is not a registered policy loss — did you mean `ppo`? Registered: cispo, clip_cov, "
        "dppo_kl, dppo_tv, gmpo, gpg, gspo, kl_cov, ppo, sapo; a new one is a function decorated with @register_policy_loss in megarl/algorithms/policy_losses.py"
    ]


SHIPPED = [("moe_grpo.yaml", 2), ("dense_ppo.yaml", 1), ("dense_ppo.yaml", 2)]


@pytest.mark.parametrize("name,world_size", SHIPPED)
def test_shipped_configs_validate(name, world_size):
    config = load_config(REPO / "configs" / name)
    validate(config, world_size, ModelFacts.from_hf_dir(resolve_model_path(config.model.path)))


@pytest.mark.parametrize("name", sorted({name for name, _ in SHIPPED}))
def test_shipped_configs_hold_only_non_defaults(name):
    def leaves(values, prefix=""):
        for key, value in values.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    defaults = dict(leaves(Config().to_dict()))
    written = dict(leaves(yaml.safe_load((REPO / "configs" / name).read_text())))
    assert [key for key, value in written.items() if defaults[key] == value] == []


QWEN3_30B_A3B = ModelFacts(
    num_layers=48, num_attention_heads=32, num_query_groups=4, num_experts=128, vocab_size=151936, max_position_embeddings=40960
)
"""Qwen3-30B-A3B's published config.json dimensions (the model itself is not downloaded here)."""


def test_recipe_for_qwen3_30b_a3b_fits_8_gpus():
    config = load_config(REPO / "configs" / "recipes" / "qwen3_30b_a3b_8xh100.yaml")
    validate(config, 8, QWEN3_30B_A3B)
    assert config.parallel.data_parallel(8) == 2
    with pytest.raises(ConfigError, match="world size"):
        validate(config, 4, QWEN3_30B_A3B)


def test_recipe_for_qwen3_30b_a3b_fits_4_nodes_of_8_gpus(monkeypatch):
    from megarl.preflight import _engine_problems

    config = load_config(REPO / "configs" / "recipes" / "qwen3_30b_a3b_4x8xh100.yaml")
    validate(config, 32, QWEN3_30B_A3B)
    parallel, rollout = config.parallel, config.rollout
    assert parallel.data_parallel(32) == 8
    # Megatron's default order (tp-cp-ep-dp-pp) keeps the TP groups (4) and the EP groups (8
    # consecutive ranks) within a node of 8: every node holds a whole replica for its engines.
    assert 8 % parallel.tensor == 0 and 8 % parallel.expert == 0
    # Two TP-4 engines per node fill its 8 GPUs, behind the router; R3 cannot pass the router.
    assert (rollout.num_engines * rollout.engine_tensor_parallel, rollout.router, config.algorithm.routing_replay) == (8, "sglang", "r2")
    assert config.train.global_batch_size == rollout.batch_size * rollout.n_samples_per_prompt
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object())
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert _engine_problems(config) == []
    # On nodes of 4 GPUs the same engines would not fit beside the ranks.
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert _engine_problems(config) == [
        "`rollout.num_engines` (2) x `rollout.engine_tensor_parallel` (4) = 8 GPUs per node, but a node runs 4 ranks (torchrun "
        "--nproc_per_node), one GPU each: colocated engines share the node's GPUs; lower rollout.num_engines to 1 (it counts engines per node)"
    ]


def test_router_needs_launched_engines():
    with pytest.raises(ConfigError, match=r"`rollout.router` \(sglang\) is for engines megarl launches"):
        load_config(None, ["rollout.router=sglang", "rollout.engine_urls=[http://127.0.0.1:30000]"])


MOONLIGHT_16B_A3B = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 163840, "hidden_size": 2048,
    "intermediate_size": 11264, "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
    "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64, "num_experts_per_tok": 6,
    "routed_scaling_factor": 2.446, "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
    "norm_topk_prob": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "hidden_act": "silu",
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 50000.0, "rope_scaling": None,
    "attention_bias": False, "num_nextn_predict_layers": 0, "tie_word_embeddings": False, "bos_token_id": 163584,
    "eos_token_id": 163585, "torch_dtype": "bfloat16",
}
"""Moonlight-16B-A3B's published config.json (the model itself is not downloaded here)."""


def test_recipe_for_moonlight_16b_a3b_fits_8_gpus(tmp_path):
    import transformers

    from megarl.models.families import checked_family

    (tmp_path / "config.json").write_text(json.dumps(MOONLIGHT_16B_A3B))
    facts = ModelFacts.from_hf_dir(tmp_path)
    assert (facts.num_experts, facts.latent_widths) == (64, (576,))
    config = load_config(REPO / "configs" / "recipes" / "moonlight_16b_a3b_8xh100.yaml")
    validate(config, 8, facts)
    assert config.parallel.data_parallel(8) == 4
    assert config.data.max_prompt_length + config.data.max_response_length <= facts.max_position_embeddings
    with pytest.raises(ConfigError, match="world size"):
        validate(config, 4, facts)
    # megarl's DeepSeek-V3 family builds this model exactly (no option it refuses).
    assert checked_family(transformers.AutoConfig.from_pretrained(tmp_path)).name == "deepseek_v3"


def test_tis_and_icepop_together_are_refused():
    with pytest.raises(ConfigError, match=r"`algorithm.icepop` and algorithm.tis are both true: .* pick one"):
        load_config(None, ["algorithm.tis=true", "algorithm.icepop=true"])


@pytest.mark.parametrize("correction", ["tis", "icepop"])
def test_decoupled_ppo_with_tis_or_icepop_is_refused(correction):
    expected = rf"`algorithm.use_decoupled_loss` and algorithm.{correction} are both true: .* apply it twice; pick one"
    with pytest.raises(ConfigError, match=expected):
        load_config(None, ["algorithm.use_decoupled_loss=true", f"algorithm.{correction}=true"])


@pytest.mark.parametrize("correction", ["tis", "icepop", "use_decoupled_loss"])
def test_sequence_level_importance_sampling_with_a_token_level_weight_is_refused(correction):
    expected = rf"`algorithm.rollout_is` \(sequence\) and algorithm.{correction} are both set: .* apply it twice; pick one"
    with pytest.raises(ConfigError, match=expected):
        load_config(None, ["algorithm.rollout_is=sequence", f"algorithm.{correction}=true"])


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["algorithm.rollout_rs=seq_mean_k3"], r"`algorithm.rollout_rs_threshold` is null but algorithm.rollout_rs is seq_mean_k3"),
        (
            ["algorithm.rollout_rs=token_k2", "algorithm.rollout_rs_threshold=0.1", "algorithm.rollout_rs_threshold_lower=0.05"],
            r"`algorithm.rollout_rs_threshold_lower` \(0.05\) is set but algorithm.rollout_rs token_k2 has no lower bound",
        ),
        (
            ["algorithm.rollout_rs=seq_sum_k1", "algorithm.rollout_rs_threshold=2", "algorithm.rollout_rs_threshold_lower=3"],
            r"`algorithm.rollout_rs_threshold_lower` \(3.0\) must be < rollout_rs_threshold \(2.0\)",
        ),
        (["algorithm.rollout_rs=seq_max_k1"], r"`algorithm.rollout_rs` = 'seq_max_k1' must be null or one of"),
        (["algorithm.rollout_is=token"], r"`algorithm.rollout_is` = 'token' must be null or one of 'sequence', 'geometric'"),
    ],
)
def test_bad_rejection_sampling_settings_are_refused(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, overrides)


def test_rollout_corrections_are_off_by_default_and_combine_with_tis():
    assert load_config(None).algorithm.rollout_is is None and load_config(None).algorithm.rollout_rs is None
    options = ["algorithm.tis=true", "algorithm.rollout_rs=seq_mean_k1", "algorithm.rollout_rs_threshold=1.01"]
    algorithm = load_config(None, options).algorithm
    assert (algorithm.rollout_rs, algorithm.rollout_rs_threshold, algorithm.rollout_rs_threshold_lower) == ("seq_mean_k1", 1.01, None)
    assert load_config(None, ["algorithm.rollout_is=geometric", "algorithm.policy_loss=gspo"]).algorithm.rollout_is == "geometric"


@pytest.mark.parametrize("loss", ["gspo", "gmpo"])
def test_decoupled_ppo_with_a_sequence_level_ratio_is_refused_and_is_off_by_default(loss):
    with pytest.raises(ConfigError, match=rf"`algorithm.use_decoupled_loss` is not available with algorithm.policy_loss = {loss}"):
        load_config(None, ["algorithm.use_decoupled_loss=true", f"algorithm.policy_loss={loss}"])
    assert load_config(None).algorithm.use_decoupled_loss is False
    algorithm = load_config(None, ["algorithm.use_decoupled_loss=true", "algorithm.policy_loss=cispo", "algorithm.behav_imp_weight_cap=null"]).algorithm
    assert algorithm.use_decoupled_loss and algorithm.behav_imp_weight_cap is None


def test_a_short_run_clamps_the_warm_up_and_a_ratio_scales_with_the_run():
    short = load_config(REPO / "configs" / "dense_ppo.yaml", ["train.steps=2"]).train
    assert (short.optimizer_steps(), short.warmup_steps()) == (4, 4)
    assert short.warmup_clamped().startswith("`train.lr_warmup_steps` (5) exceeds the run's 4 optimizer steps")
    full = load_config(REPO / "configs" / "dense_ppo.yaml").train
    assert (full.warmup_steps(), full.warmup_clamped()) == (5, None)
    ratio = load_config(REPO / "configs" / "dense_ppo.yaml", ["train.lr_warmup_steps=0", "train.lr_warmup_ratio=0.1"]).train
    assert (ratio.optimizer_steps(), ratio.warmup_steps(), ratio.warmup_clamped()) == (400, 40, None)
    with pytest.raises(ConfigError, match=r"`train.lr_warmup_ratio` \(0.1\) and `train.lr_warmup_steps` \(5\) both set the warm-up: set train.lr_warmup_steps=0"):
        load_config(REPO / "configs" / "dense_ppo.yaml", ["train.lr_warmup_ratio=0.1"])
    with pytest.raises(ConfigError, match=r"`train.lr_warmup_ratio` \(1.0\) must be in \[0, 1\)"):
        load_config(None, ["train.lr_warmup_ratio=1"])


def test_a_key_given_twice_in_the_yaml_is_refused_with_both_lines(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  optimizer:\n    lr: 1.0e-3\nmodel:\n  seed: 3\ntrain:\n  steps: 4\n")
    with pytest.raises(ConfigError, match=rf"^{path}:6: `train` is given twice \(lines 1 and 6\); YAML would keep only the second: merge them into one$"):
        load_config(path)
    path.write_text("data:\n  train_files: [a.jsonl]\n  seed: 1\n  seed: 2\n")
    with pytest.raises(ConfigError, match=r"twice.yaml:4: `data.seed` is given twice \(lines 3 and 4\)"):
        load_config(path)
    path.write_text("data:\n  seed: 1\ntrain:\n  seed: 1\n")
    assert (load_config(path).data.seed, load_config(path).train.seed) == (1, 1)


def test_an_episode_has_an_environment_or_an_agent_program_never_both():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["agent.environment=toy_lookup", "agent.openai_agent=agent.py:play"])
    assert "`agent.openai_agent` and agent.environment ('toy_lookup') are both set" in str(error.value)
    assert "set one of agent.environment and agent.openai_agent to null" in str(error.value)
    assert load_config(None, ["agent.openai_agent=agent.py:play"]).agent.enabled


def test_the_preflight_imports_the_agent_program(tmp_path):
    program = tmp_path / "agent.py"
    program.write_text("def play(base_url):\n    return 1.0\n")
    moe = REPO / "configs" / "moe_grpo.yaml"
    run_dir = f"logging.run_dir={tmp_path / 'run'}"
    problems = check_run(load_config(moe, [run_dir, f"agent.openai_agent={program}:play", "rollout.mode=async", "rollout.colocate=false"]), 2)
    assert problems == [
        f"agent.openai_agent = '{program}:play': play(base_url) cannot be called as play(base_url, row) (too many positional arguments): "
        "an agent program is def play(base_url: str, row: dict) -> float | None",
    ]
    program.write_text("def play(base_url, row):\n    return 1.0\n")
    for mode in (["rollout.mode=sync"], ["rollout.mode=async", "rollout.colocate=false"]):
        assert check_run(load_config(moe, [run_dir, f"agent.openai_agent={program}:play", *mode]), 2) == []


def test_the_preflight_refuses_an_engine_url_that_does_not_return_routed_experts(tmp_path):
    with contextlib.ExitStack() as engines:
        urls = [
            engines.enter_context(serving(fake_sglang({"enable_return_routed_experts": False}, None))),
            engines.enter_context(serving(fake_sglang({"enable_return_routed_experts": True}, None))),
            # SGLang before /server_info.
            engines.enter_context(serving(fake_sglang(None, {"enable_return_routed_experts": False}))),
            "http://127.0.0.1:9",  # answers nothing: left to the run's start
        ]
        overrides = [f"logging.run_dir={tmp_path / 'run'}", f"rollout.engine_urls=[{', '.join(urls)}]"]
        moe = REPO / "configs" / "moe_grpo.yaml"
        problems = check_run(load_config(moe, [*overrides, "algorithm.routing_replay=r3"]), 2)
        assert problems == [
            f"`rollout.engine_urls`: {urls[0]} does not return routed experts (/server_info reports enable_return_routed_experts=False), "
            "which algorithm.routing_replay=r3 needs: restart it with --enable-return-routed-experts, or set algorithm.routing_replay to r2 or none",
            f"`rollout.engine_urls`: {urls[2]} does not return routed experts (/get_server_info reports enable_return_routed_experts=False), "
            "which algorithm.routing_replay=r3 needs: restart it with --enable-return-routed-experts, or set algorithm.routing_replay to r2 or none",
        ]
        assert check_run(load_config(moe, [*overrides, "algorithm.routing_replay=r2"]), 2) == []


def test_engines_that_are_not_colocated_need_gpus_beside_the_ranks(monkeypatch):
    import torch

    from megarl.preflight import _reserved_gpu_problems

    config = load_config(None, ["rollout.engine=sglang", "rollout.colocate=false", "rollout.mode=async", "rollout.num_engines=2",
                                "rollout.engine_tensor_parallel=2"])
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert _reserved_gpu_problems(config) == []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 6)
    assert _reserved_gpu_problems(config) == [
        "`rollout.colocate` (false): the engines take the GPUs after the node's 4 ranks', 2 x `rollout.engine_tensor_parallel` (2) of "
        "them, 8 GPUs in all, but this node has 6: lower torchrun --nproc_per_node or rollout.num_engines, or set rollout.colocate=true"
    ]


def test_the_router_refuses_routing_replay_r3_and_megarls_own_flags():
    from megarl.preflight import _router_problems

    config = load_config(None, ["rollout.router=sglang", "algorithm.routing_replay=r3", "rollout.router_args=[--port=9000]"])
    problems = _router_problems(config)
    assert problems == [
        "`rollout.router_args`: --port=9000 is set by megarl (the router's address and its engines); remove it",
        "`algorithm.routing_replay` (r3) cannot run behind `rollout.router` (sglang): sglang-router 0.3.2 drops return_routed_experts "
        "from the requests it forwards; set algorithm.routing_replay=r2 (the trainer's own routing, replayed) or rollout.router=none",
    ]
