"""Conversion tools: HF -> distributed checkpoint (EP2) -> HF loads in transformers, same logits;
re-exports replace the directory whole; bad input is refused in one line, exit code 2."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import types

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from megarl.config import resolve_model_path
from megarl.models.loader import CheckpointError, HFCheckpoint
from tests.distributed import REPO, TORCHRUN_ENVIRONMENT, launch, run_python, run_torchrun, torchrun_command
from tests.hf_models import model_dir
from tests.jobs import layout_job

SOURCE = resolve_model_path("bundled:tiny-moe")
FROM_HF, TO_HF = REPO / "tools" / "convert_from_hf.py", REPO / "tools" / "convert_to_hf.py"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The bundled tiny MoE converted into a distributed checkpoint under EP 2."""
    root = tmp_path_factory.mktemp("converted") / "checkpoints"
    run_torchrun(FROM_HF, ["--hf", str(SOURCE), "--out", str(root), "--ep", "2"], nproc=2)
    return root


@pytest.mark.multirank
def test_convert_round_trip_loads_in_transformers(checkpoint, tmp_path, jobs):
    out = tmp_path / "hf"
    # A tiny shard limit forces several shards and an index.
    run_python(TO_HF, ["--checkpoint", str(checkpoint), "--out", str(out), "--max-shard-gb", "0.0002"])
    assert (out / "model.safetensors.index.json").exists()
    assert (out / "tokenizer.json").exists()
    converted = transformers.AutoModelForCausalLM.from_pretrained(out)
    original = transformers.AutoModelForCausalLM.from_pretrained(SOURCE)
    tokens = torch.randint(0, original.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(converted(tokens).logits, original(tokens).logits)
    # And the Megatron model built from the converted directory gives transformers' logits.
    check = layout_job(str(out), "single", {"logits": {}})
    jobs.run([check])
    assert jobs.report(check.name)["logits"]["max_logit_diff"] <= 1e-4

    # Exported again into the same directory, as one bf16 file: exactly the new files remain, and
    # transformers loads the model as bf16 (the config's dtype says so).
    first_export = {path.name for path in out.iterdir()}
    run_python(TO_HF, ["--checkpoint", str(checkpoint), "--out", str(out), "--dtype", "bf16"])
    shards = {name for name in first_export if name.startswith("model-") or name == "model.safetensors.index.json"}
    assert {path.name for path in out.iterdir()} == first_export - shards | {"model.safetensors"}
    assert [path.name for path in out.parent.iterdir() if path.name.startswith(".")] == []
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "torch_dtype" not in config
    assert transformers.AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def run_tool(tool, *args: str):
    return subprocess.run([sys.executable, str(tool), *args], capture_output=True, text=True, timeout=300)


def assert_refused(result, tool: str, expected: str) -> None:
    """Exit code 2; the tool's output is a line per problem, one of them saying ``expected``; no
    traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert lines and all(line.startswith(f"{tool}: ") for line in lines), result.stderr
    assert any(expected in line for line in lines), result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def copy_dense(directory, change=lambda tensors: None, skip=()):
    """The bundled tiny dense model copied to ``directory``, its tensors changed by ``change``."""
    directory.mkdir()
    dense = resolve_model_path("bundled:tiny-dense")
    for file in dense.iterdir():
        if file.name not in skip and file.name != "model.safetensors":
            (directory / file.name).write_bytes(file.read_bytes())
    tensors = load_file(dense / "model.safetensors")
    change(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def truncate(path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def truncated_weights(directory):
    model = copy_dense(directory)
    truncate(model / "model.safetensors")
    return model


BAD_HF_DIRS = {
    "truncated-safetensors": (truncated_weights, [], "model.safetensors: not a complete safetensors file"),
    "no-config": (lambda directory: copy_dense(directory, skip={"config.json"}), [], "config.json does not exist"),
    "extra-tensor": (
        lambda directory: copy_dense(directory, lambda tensors: tensors.update({"model.layers.1.self_attn.o_proj.bias": torch.zeros(64)})),
        [], "1 tensor(s) the qwen3 model would not use (model.layers.1.self_attn.o_proj.bias)",
    ),
    "six-experts-at-ep4": (
        lambda directory: model_dir(directory, "qwen3-moe-6-experts"), ["--ep", "4"],
        "`--ep` (4) must divide the model's experts (6): set --ep to 1, 2, 3 or 6",
    ),
    "unsupported-architecture": (
        lambda directory: model_dir(directory, "mistral"), [], "no megarl model family serves architectures ['MistralForCausalLM']",
    ),
    "unsupported-option": (
        lambda directory: model_dir(directory, "llama-gelu"), [], "hidden_act = 'gelu' is not supported by megarl's llama family",
    ),
}


def run_tool_in_process(tool, capsys, *args: str) -> types.SimpleNamespace:
    """The tool's ``main`` called in this process, as :func:`run_tool`'s result: its exit code and
    what it printed. For checks that refuse before anything is built (no process group, no
    model), this spares a fresh interpreter's imports per case; one case still runs the tool as
    a process (the exit code and stderr a user sees)."""
    spec = importlib.util.spec_from_file_location(f"megarl_tool_{tool.stem}", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    code = module.main(list(args))
    printed = capsys.readouterr()
    return types.SimpleNamespace(returncode=code, stdout=printed.out, stderr=printed.err)


@pytest.mark.cpu
@pytest.mark.parametrize("case", sorted(BAD_HF_DIRS))
def test_bad_hf_directories_are_refused_in_one_line_before_anything_is_built(case, tmp_path, capsys):
    make, flags, expected = BAD_HF_DIRS[case]
    arguments = ("--hf", str(make(tmp_path / "model")), "--out", str(tmp_path / "out"), *flags)
    result = run_tool(FROM_HF, *arguments) if case == "no-config" else run_tool_in_process(FROM_HF, capsys, *arguments)
    assert_refused(result, "convert_from_hf", expected)
    assert not (tmp_path / "out").exists()


@pytest.mark.multirank
def test_a_layout_for_more_processes_is_refused_in_one_line_that_torchrun_reports_as_the_root_cause(tmp_path):
    result = launch(
        [*torchrun_command(2), str(FROM_HF), "--hf", str(SOURCE), "--out", str(tmp_path / "out"), "--ep", "4"],
        TORCHRUN_ENVIRONMENT, timeout=300,
    )
    message = (
        "convert_from_hf: `--ep` (4) x expert tensor parallel (1) x `--pp` (1) = 4 must divide the world size (2): each "
        "stage's experts are spread over its TP x CP x DP ranks; run 4 processes (or a multiple) or lower --ep"
    )
    # torchrun exits 1 whatever its workers' codes, after its own traceback; the first rank says
    # why once, and torchrun's root cause quotes it (every rank's failure does).
    assert result.returncode == 1
    assert [line for line in result.stderr.splitlines() if line.startswith("convert_from_hf")] == [message]
    assert result.stderr.split("Root Cause")[1].count(f"traceback : {message}") == 1
    assert result.stderr.count("Traceback (most recent call last)") == 1 and "exitcode  : 2" in result.stderr


@pytest.mark.multirank
def test_a_damaged_checkpoint_is_named_with_the_file(checkpoint, tmp_path):
    damaged = tmp_path / "checkpoints"
    shutil.copytree(checkpoint, damaged)
    (shard,) = [path for path in damaged.glob("step_*/weights/__0_0.distcp")]
    size = shard.stat().st_size
    truncate(shard)
    result = run_tool(TO_HF, "--checkpoint", str(damaged), "--out", str(tmp_path / "hf"))
    assert_refused(
        result, "convert_to_hf",
        f"checkpoint {shard.parents[1]} is damaged: weights/__0_0.distcp is truncated ({size // 2} bytes of the ",
    )


@pytest.mark.multirank
def test_an_export_into_a_directory_of_other_files_is_refused(checkpoint, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = run_tool(TO_HF, "--checkpoint", str(checkpoint), "--out", str(tmp_path))
    assert_refused(result, "convert_to_hf", f"{tmp_path}: exists and is not an empty directory or a HF model directory")
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.cpu
def test_convert_to_hf_without_checkpoint_names_the_directory(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_to_hf.py"), "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert str(tmp_path) in result.stderr and "no committed checkpoint" in result.stderr


@pytest.mark.cpu
def test_missing_hf_tensor_names_file_and_tensor(tmp_path):
    tensors = load_file(resolve_model_path("bundled:tiny-dense") / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    checkpoint = HFCheckpoint(tmp_path)
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight is missing"):
        checkpoint.read("model.layers.1.mlp.up_proj.weight", 0, 0, 1)
    with pytest.raises(CheckpointError, match="shape"):
        checkpoint.read("model.norm.weight", 0, 0, 10_000)
