"""The distillation teacher's config: what ``algorithm.use_opd`` and the ``teacher`` section refuse,
each in one line naming the field and the fix, and the preflight's tokenizer check."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from megarl.config import ConfigError, ModelFacts, load_config, resolve_model_path
from megarl.preflight import check_run
from tests.distributed import REPO

pytestmark = pytest.mark.cpu

MOE_GRPO = REPO / "configs" / "moe_grpo.yaml"
TEACHER = ["algorithm.use_opd=true", "teacher.path=bundled:tiny-dense"]


def problems(tmp_path, overrides: list[str]) -> list[str]:
    return check_run(load_config(MOE_GRPO, [f"logging.run_dir={tmp_path / 'run'}", *overrides]), 2)


@pytest.mark.parametrize("overrides,expected", [
    (["algorithm.use_opd=true"], "`algorithm.use_opd` needs a teacher: set teacher.path"),
    (["teacher.path=bundled:tiny-dense"], "the `teacher` section is set but `algorithm.use_opd` is false"),
    ([*TEACHER, "rollout.temperature=0.7"], "`rollout.temperature` (0.7) must be 1 with `algorithm.use_opd`"),
])
def test_use_opd_and_the_teacher_need_each_other_and_temperature_one(tmp_path, overrides, expected):
    [problem] = problems(tmp_path, overrides)
    assert problem.count("\n") == 1 and expected in problem  # the header line, then the one violation


@pytest.mark.parametrize("overrides,expected", [
    ([*TEACHER, "teacher.engine_urls=[http://127.0.0.1:1]"], "`teacher.engine_urls` and teacher.path are both set"),
    (["algorithm.use_opd=true", "algorithm.opd_task_reward=false", "algorithm.opd_kl_coef=0"], "`algorithm.opd_kl_coef` (0) with algorithm.opd_task_reward false"),
    ([*TEACHER, "teacher.num_engines=0"], "`teacher.num_engines` (0) must be >= 1"),
])
def test_section_rules_are_refused_when_the_config_loads(overrides, expected):
    with pytest.raises(ConfigError) as error:
        load_config(MOE_GRPO, overrides)
    assert expected in str(error.value)


def test_a_teacher_of_the_same_tokenizer_passes_the_preflight(tmp_path):
    assert problems(tmp_path, TEACHER) == []


def test_a_teacher_with_another_tokenizer_or_a_smaller_vocabulary_is_refused_in_one_line(tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(resolve_model_path("bundled:tiny-dense"), teacher)
    tokenizer = json.loads((teacher / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (teacher / "tokenizer.json").write_text(json.dumps(tokenizer))
    [problem] = problems(tmp_path, ["algorithm.use_opd=true", f"teacher.path={teacher}"])
    assert f"teacher.path = '{teacher}': its tokenizer.json differs from the policy's in 2 token ids" in problem
    assert "the teacher must share the policy's tokenizer" in problem and "\n" not in problem
    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] - 1}))
    (teacher / "tokenizer.json").unlink()
    assert [problem.split(":")[1] for problem in problems(tmp_path, ["algorithm.use_opd=true", f"teacher.path={teacher}"])] == [
        " its vocabulary (54) is smaller than the policy's (55), so it cannot score every token the policy samples",
        " without a tokenizer.json on both sides to compare, its config.json differs from the policy's (its vocabulary size differs)",
    ]


def test_the_distillation_config_is_the_main_job_on_the_minmax_task_plus_a_teacher(tmp_path):
    # tiny-dense has the same tokenizer too.
    distill = load_config(REPO / "configs" / "moe_distill.yaml", ["teacher.path=bundled:tiny-dense"])
    main = load_config(MOE_GRPO)
    assert distill.algorithm.use_opd and distill.teacher.path == "bundled:tiny-dense"
    for section in ("model", "parallel", "rollout"):
        assert getattr(distill, section) == getattr(main, section), section
    # The two-number task, for twice the steps.
    assert dataclasses.replace(distill.data, train_files=main.data.train_files, val_files=main.data.val_files) == main.data
    assert (distill.data.train_files, distill.data.val_files) == (["bundled:minmax/train.jsonl"], ["bundled:minmax/val.jsonl"])
    assert dataclasses.replace(distill.train, steps=main.train.steps) == main.train and distill.train.steps == 2 * main.train.steps
    # The teacher's term with its baseline, no entropy bonus (the term's -coef x log pi part is
    # one), and no dynamic sampling (it would drop the all-wrong groups the teacher grades).
    changed = dict(use_opd=False, opd_kl_coef=main.algorithm.opd_kl_coef, opd_baseline="none", entropy_coeff=main.algorithm.entropy_coeff, dynamic_sampling=True)
    assert dataclasses.replace(distill.algorithm, **changed) == main.algorithm
    assert (distill.algorithm.opd_kl_coef, distill.algorithm.opd_baseline, distill.algorithm.entropy_coeff, distill.algorithm.dynamic_sampling) == (1.0, "leave_one_out", 0.0, False)
    for teacher in ("bundled:tiny-dense", "bundled:tiny-teacher"):
        assert check_run(load_config(REPO / "configs" / "moe_distill.yaml", [f"teacher.path={teacher}", f"logging.run_dir={tmp_path}"]), 2) == []


def test_a_teacher_with_a_shorter_context_than_a_sequence_is_refused_in_one_line(tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(resolve_model_path("bundled:tiny-dense"), teacher)
    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 30}))
    [problem] = problems(tmp_path, ["algorithm.use_opd=true", f"teacher.path={teacher}"])
    assert "its context (30 positions) is shorter than a prompt and its response (data.max_prompt_length + data.max_response_length = 36)" in problem
    assert "\n" not in problem


MEGATRON = ["algorithm.use_opd=true", "algorithm.opd_type=megatron"]


@pytest.mark.parametrize("overrides,expected", [
    ([], ["`algorithm.opd_type` (megatron) builds the teacher in the trainer from its weights: set teacher.path (a HF model directory or bundled:NAME)"]),
    (["teacher.engine_urls=[http://127.0.0.1:1]"], [
        "`algorithm.opd_type` (megatron) builds the teacher in the trainer from its weights: set teacher.path",
        "`teacher.engine_urls` is set but `algorithm.opd_type` (megatron) runs the teacher in the trainer, not in engines: remove teacher.engine_urls",
    ]),
    (["teacher.path=bundled:tiny-teacher", "teacher.num_engines=2"], [
        "`teacher.num_engines` (2) sets the teacher's engines, but `algorithm.opd_type` (megatron) launches none (the teacher takes the "
        "training layout): remove teacher.num_engines or set algorithm.opd_type=sglang",
    ]),
    (["teacher.path=bundled:tiny-teacher", "teacher.engine_tensor_parallel=2"], [
        "`teacher.engine_tensor_parallel` (2) sets the teacher's engines, but `algorithm.opd_type` (megatron) launches none",
    ]),
])
def test_a_megatron_teacher_needs_its_path_and_refuses_the_engine_settings(tmp_path, overrides, expected):
    [problem] = problems(tmp_path, [*MEGATRON, *overrides])
    lines = problem.splitlines()[1:]  # after the header line, one violation a line
    assert len(lines) == len(expected) and all(fragment in line for fragment, line in zip(expected, lines)), lines


def test_a_megatron_teacher_of_another_architecture_passes_the_preflight_under_expert_parallelism(tmp_path):
    # The dense teacher is built without the MoE policy's expert parallelism (parallel.expert 2).
    config = load_config(MOE_GRPO, [f"logging.run_dir={tmp_path}", *MEGATRON, "teacher.path=bundled:tiny-teacher"])
    assert config.parallel.expert == 2 and check_run(config, 2) == []
    assert config.parallel.for_model(ModelFacts.from_hf_dir(resolve_model_path("bundled:tiny-teacher"))).expert == 1
    assert not config.algorithm.teacher_in_engines and config.algorithm.teacher_in_megatron


def test_a_megatron_teacher_the_training_layout_does_not_fit_is_refused_a_line_a_rule(tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(resolve_model_path("bundled:tiny-teacher"), teacher)
    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "num_attention_heads": 3, "num_key_value_heads": 3}))
    layout = ["parallel.expert=1", "parallel.tensor=2", "parallel.sequence_parallel=true"]
    found = problems(tmp_path, [*MEGATRON, f"teacher.path={teacher}", *layout])
    where = f"teacher.path = '{teacher}' (algorithm.opd_type megatron, built under the training layout): "
    assert found == [
        where + "`parallel.tensor` (2) must divide the model's attention heads (3): set parallel.tensor to 1 or 3",
        where + "`parallel.tensor` (2) and the model's query groups (num_key_value_heads, 3) must divide one another: set parallel.tensor to 1 or 3",
    ]
    # In engines the training layout does not concern it; a rule the policy breaks is the policy's alone.
    assert problems(tmp_path, ["algorithm.use_opd=true", f"teacher.path={teacher}", *layout]) == []
    [policy_problem] = problems(tmp_path, [*MEGATRON, "teacher.path=bundled:tiny-moe", "parallel.pipeline=3", "parallel.expert=1"])
    assert "teacher.path" not in policy_problem and "`parallel.pipeline` (3) must divide the model's layers (4)" in policy_problem


def test_a_megatron_teacher_takes_no_gpus_of_its_own(monkeypatch):
    import torch

    from megarl.preflight import _reserved_gpu_problems

    engine_teacher = ["rollout.engine=sglang", "rollout.colocate=true", "algorithm.use_opd=true", "teacher.path=bundled:tiny-teacher"]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    [problem] = _reserved_gpu_problems(load_config(None, engine_teacher))
    assert problem.startswith("`teacher.num_engines` (1) x `teacher.engine_tensor_parallel` (1): the teacher's engines take the first node's GPUs")
    assert _reserved_gpu_problems(load_config(None, [*engine_teacher, "algorithm.opd_type=megatron"])) == []
