"""Configuration: strict loading, overrides, and cross-field validation before anything is built."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from megarl.config import (
    Config,
    ConfigError,
    ModelFacts,
    load_config,
    parse_override,
    resolve_model_path,
    save_config,
    validate,
)
from tests.distributed import REPO

pytestmark = pytest.mark.cpu

MOE = ModelFacts(num_layers=4, num_attention_heads=4, num_query_groups=2, num_experts=8, vocab_size=52, max_position_embeddings=256)
DENSE = ModelFacts(num_layers=4, num_attention_heads=4, num_query_groups=2, num_experts=0, vocab_size=52, max_position_embeddings=256)
VALID = ["rollout.batch_size=16", "rollout.n_samples_per_prompt=8", "train.global_batch_size=128", "train.mini_batch_size=64", "train.micro_batch_size=8"]


@pytest.mark.parametrize(
    "overrides,world_size,facts,expected",
    [
        (["parallel.tensor=2", "parallel.pipeline=2"], 6, DENSE, ["world size (6)", "`parallel.tensor` (2) x `parallel.pipeline` (2)"]),
        (["parallel.tensor=3"], 3, DENSE, ["`parallel.tensor` (3) must divide the attention heads (4)"]),
        (["parallel.tensor=4"], 4, DENSE, ["`parallel.tensor` (4) must divide the query groups"]),
        (["parallel.expert=3"], 3, MOE, ["`parallel.expert` (3) must divide the experts (8)"]),
        (["parallel.expert=4"], 2, MOE, ["`parallel.expert` (4) x expert tensor parallel (1) x `parallel.pipeline` (1) = 4 must divide the world size (2)"]),
        (["parallel.expert=2"], 2, DENSE, ["`parallel.expert` (2) > 1 needs an MoE model"]),
        (["parallel.expert_tensor=1"], 2, DENSE, ["`parallel.expert_tensor` is set but the model is dense"]),
        (["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert_tensor=1"], 2, MOE, ["`parallel.expert_tensor` (1) != `parallel.tensor` (2) needs `parallel.expert` > 1"]),
        (["parallel.tensor=2"], 2, MOE, ["needs `parallel.sequence_parallel`"]),
        (["parallel.pipeline=3"], 3, DENSE, ["`parallel.pipeline` (3) must divide the layers (4)"]),
        (["parallel.pipeline=2", "parallel.virtual_pipeline=4"], 2, DENSE, ["x `parallel.virtual_pipeline` (4) must divide the layers (4)"]),
        (["parallel.virtual_pipeline=2"], 1, DENSE, ["`parallel.virtual_pipeline` (2) needs `parallel.pipeline` > 1"]),
        (["parallel.sequence_parallel=true"], 1, DENSE, ["`parallel.sequence_parallel` needs `parallel.tensor` > 1"]),
        (["parallel.context=2", "data.max_prompt_length=33", "data.max_response_length=8"], 2, DENSE, ["(41) must be divisible by 2 x `parallel.context` (4)"]),
        (["data.max_prompt_length=250", "data.max_response_length=8"], 1, DENSE, ["exceeds the model's max_position_embeddings (256)"]),
        (["train.global_batch_size=64"], 1, DENSE, ["`train.global_batch_size` (64) must be >= `rollout.batch_size` (16) x `rollout.n_samples_per_prompt` (8) = 128"]),
        (["train.global_batch_size=132", "train.mini_batch_size=66", "train.micro_batch_size=6"], 1, DENSE, ["(132) must be a multiple of `rollout.n_samples_per_prompt` (8)"]),
        (["train.mini_batch_size=48"], 1, DENSE, ["`train.mini_batch_size` (48) must divide `train.global_batch_size` (128)"]),
        (["train.micro_batch_size=3"], 1, DENSE, ["`train.micro_batch_size` (3) x data parallel (1) = 3 must divide `train.mini_batch_size` (64)", "[1, 2, 4, 8, 16, 32, 64]"]),
        (["train.micro_batch_size=64"], 2, DENSE, ["`train.micro_batch_size` (64) x data parallel (2) = 128"]),
        (["rollout.n_samples_per_prompt=1", "train.global_batch_size=16", "train.mini_batch_size=16"], 1, DENSE, ["`rollout.n_samples_per_prompt` (1) must be >= 2"]),
    ],
)
def test_invalid_configs_fail_naming_the_fields(overrides, world_size, facts, expected):
    config = load_config(None, VALID + overrides)
    with pytest.raises(ConfigError) as error:
        validate(config, world_size, facts)
    for text in expected:
        assert text in str(error.value)


def test_every_violation_is_listed_at_once():
    config = load_config(None, VALID + ["parallel.pipeline=3", "parallel.sequence_parallel=true"])
    with pytest.raises(ConfigError) as error:
        validate(config, 3, DENSE)
    assert str(error.value).count("\n  - ") == 2


def test_valid_configs_pass():
    validate(load_config(None, VALID), 1, DENSE)
    validate(load_config(None, VALID + ["parallel.expert=2"]), 2, MOE)
    validate(load_config(None, VALID + ["parallel.tensor=2", "parallel.sequence_parallel=true"]), 2, MOE)
    validate(load_config(None, VALID + ["parallel.context=2"]), 2, DENSE)
    validate(load_config(None, VALID + ["parallel.pipeline=2", "parallel.virtual_pipeline=2"]), 2, DENSE)


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["train.lr=1"], "unknown key `train.lr` — did you mean `train.optimizer.lr`?"),
        (["rollout.temprature=0.5"], "did you mean `rollout.temperature`?"),
        (["trian.steps=3"], "unknown key `trian` — did you mean `train`?"),
        (["train.steps=abc"], "`train.steps` = 'abc' must be an integer"),
        (["train.steps=1.5"], "`train.steps` = 1.5 must be an integer"),
        (["parallel.sequence_parallel=3"], "must be true or false"),
        (["rollout.engine=vllm"], "`rollout.engine` = 'vllm' is not one of 'auto', 'hf', 'sglang'"),
        (["rollout.stop_token_ids=[1, a]"], "`rollout.stop_token_ids[1]` = 'a' must be an integer"),
        (["train.optimizer.lr=0"], "`train.optimizer.lr` (0.0) must be > 0"),
        (["critic.optimizer.min_lr=1"], "`critic.optimizer.min_lr` (1.0) must be in [0, optimizer.lr = 1e-05]"),
        (["rollout.temperature=0"], "`rollout.temperature` (0.0) must be > 0"),
        (["reward.type=function"], "`reward.function` must be set"),
        (["train.steps"], "must look like key.sub=value"),
        (["train.steps.x=1"], "unknown key `train.steps.x`"),
    ],
)
def test_override_errors(overrides, expected):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert expected in str(error.value)


def test_unknown_yaml_key_names_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  optimizer:\n    lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"run.yaml: unknown key `train.optimizer.lrr` — did you mean `train.optimizer.lr`"):
        load_config(path)


def test_override_parsing():
    assert parse_override("train.steps=10") == ("train.steps", 10)
    assert parse_override("train.optimizer.lr=1e-6") == ("train.optimizer.lr", "1e-6")
    assert parse_override("parallel.virtual_pipeline=null") == ("parallel.virtual_pipeline", None)
    assert parse_override("rollout.stop_token_ids=[1,2]") == ("rollout.stop_token_ids", [1, 2])
    config = load_config(None, ["train.optimizer.lr=1e-6", "parallel.virtual_pipeline=null", "parallel.sequence_parallel=true"])
    assert config.train.optimizer.lr == 1e-6 and config.parallel.virtual_pipeline is None and config.parallel.sequence_parallel


def test_nested_override_keeps_section_defaults():
    # critic.optimizer defaults to lr 1e-5; overriding another of its fields keeps that.
    assert load_config(None, ["critic.optimizer.clip_grad=0.5"]).critic.optimizer.lr == 1e-5


def test_round_trip_through_yaml(tmp_path):
    config = load_config(REPO / "configs" / "moe_grpo.yaml", ["train.steps=7"])
    save_config(config, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == config
    assert config.to_dict()["train"]["steps"] == 7


def test_facts_from_hf_config(tmp_path):
    facts = ModelFacts.from_hf_dir(resolve_model_path("bundled:tiny-moe"))
    assert (facts.num_layers, facts.num_attention_heads, facts.num_query_groups, facts.num_experts) == (4, 4, 2, 8)
    with pytest.raises(ConfigError, match="config.json does not exist"):
        ModelFacts.from_hf_dir(tmp_path)


@pytest.mark.parametrize("name,world_size", [("moe_grpo.yaml", 2), ("dense_ppo.yaml", 2), ("dense_ppo.yaml", 1)])
def test_shipped_configs_validate(name, world_size):
    config = load_config(REPO / "configs" / name)
    validate(config, world_size, ModelFacts.from_hf_dir(resolve_model_path(config.model.path)))


def test_cli_prints_resolved_config_and_reports_errors():
    command = [sys.executable, "-m", "megarl.config", "--config", str(REPO / "configs" / "moe_grpo.yaml")]
    printed = subprocess.run([*command, "train.steps=3", "--print"], capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr
    resolved = yaml.safe_load(printed.stdout)
    assert resolved["train"]["steps"] == 3 and resolved["parallel"]["expert"] == 2
    assert set(resolved) == set(Config().to_dict())
    failed = subprocess.run([*command, "parallel.expert=3"], capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2
    assert "`parallel.expert` (3) must divide the experts (8)" in failed.stderr
    assert "Traceback" not in failed.stderr
