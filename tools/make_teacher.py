"""Train megarl's bundled teacher, ``megarl/assets/models/tiny-teacher``, for on-policy distillation
(issue 23): a dense Qwen3 wider and larger than the student ``bundled:tiny-moe``, with exactly the
student's tokenizer and vocabulary, fine-tuned on the two toy tasks: ``bundled:toy`` (the largest of
three digits, one number) and ``bundled:minmax`` (the smallest and the largest, two numbers).

    python tools/make_teacher.py                       # writes megarl/assets/models/tiny-teacher
    python tools/make_teacher.py --out DIR --work WORK # elsewhere, keeping the runs in WORK

Every stage is megarl itself, ``torchrun --nproc_per_node 2`` on the CPU:

1. **init**: :data:`TEACHER_CONFIG` on ``make_assets``' shared settings (:func:`common_config`:
   vocabulary, special tokens, positions), weights from ``make_assets``' seeded
   :func:`fill_deterministically` (seed :data:`TEACHER_SEED`), written with the bundled tokenizer.
2. **sft**: ``megarl.sft --config configs/sft.yaml`` on all 800 training prompts of each task as
   conversations (the bundled ``sft.jsonl`` files hold the first 400), data parallel over the 2 ranks
   (``parallel.expert=1``: the teacher is dense), exported as a HF directory
   (``checkpoint.save_hf``).
3. **validation**: ``megarl.train --config configs/moe_grpo.yaml`` for one step with
   ``train.val_before_train=true``, whose ``val/accuracy_before_train`` is the RL job's own
   validation (greedy, each task's ``val.jsonl``: 200 prompts the teacher never trained on), for
   the teacher and, for contrast, the untrained student.

The teacher (``hf/`` of the SFT run, fp32 safetensors) is copied to ``--out`` with a README.md
that names these commands and the accuracies; below ``--min-accuracy`` nothing is written and the
tool exits 1. Seeds are fixed (the weights', the data order's ``data.seed``, the training's
``train.seed`` and ``model.seed``), so a rerun on the same machine and library versions trains
the same teacher; the weights are not promised bit for bit across machines (floating-point
reduction orders), so unlike ``make_assets.py`` no test regenerates them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

# Run as a script, tools/ is on the path: the teacher shares make_assets' settings and tokenizer.
from make_assets import ASSETS, common_config, fill_deterministically, save_model, sft_rows, special_token_ids, write_jsonl

from megarl.metrics import read_rows

REPO = ASSETS.parents[1]
TEACHER_SEED = 100
"""Seed of the teacher's initial weights (the bundled models use 0-4)."""
TEACHER_CONFIG = dict(
    hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_hidden_layers=4,
    intermediate_size=256, rope_theta=10000.0, tie_word_embeddings=False,
)
"""Twice the student's width, a dense MLP of 256 in every layer, untied output layer like the
student's: about 0.6 M parameters, 2.4 MB in fp32 (the student: 0.26 M, 1 MB)."""
SFT_STEPS = 160
"""SFT steps of 64 conversations (configs/sft.yaml's batch): 6.4 epochs over the 1600 prompts."""
TASKS = ("toy", "minmax")
"""The bundled toy tasks the teacher learns (``megarl/assets/data/NAME``)."""
MIN_ACCURACY = 0.95
"""The teacher's greedy validation accuracy the tool requires before it writes the asset."""


def make_initial_model(directory: Path) -> Path:
    """Write the randomly initialised teacher with the bundled tokenizer into ``directory``."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(ASSETS / "tokenizer")
    eos, pad = special_token_ids(tokenizer)
    config = transformers.Qwen3Config(**{**common_config(len(tokenizer), eos, pad), **TEACHER_CONFIG})
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fill_deterministically(model, TEACHER_SEED)
    save_model(model, directory, ASSETS / "tokenizer")
    return directory


def torchrun(module: str, config: str, overrides: list[str]) -> tuple[list[str], float]:
    """Run ``python -m module --config config overrides`` on 2 processes; the command (as a
    reader would type it) and its wall time in seconds."""
    arguments = ["--config", config, *overrides]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", module, *arguments]
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True)
    return ["torchrun", "--nproc_per_node", "2", "-m", module, *arguments], time.perf_counter() - started


def validation_accuracy(model_path: str, run_dir: Path, overrides: list[str]) -> tuple[dict[str, float], list[str]]:
    """The RL job's greedy validation accuracy of ``model_path`` (``val/accuracy_before_train`` of
    a one-step run of configs/moe_grpo.yaml; dynamic sampling off, so that the step ends however
    well the model scores) and the mean reward of that step's samples (temperature 1, training
    prompts), as ``{"accuracy", "sampled_reward"}``; with the command."""
    command, _ = torchrun("megarl.train", "configs/moe_grpo.yaml", [
        f"model.path={model_path}", *overrides, "train.steps=1", "train.val_before_train=true", "train.eval_every=0",
        "algorithm.dynamic_sampling=false", "checkpoint.resume=never", f"logging.run_dir={run_dir}",
    ])
    first_step = read_rows(run_dir / "metrics.jsonl")[0]
    return {"accuracy": first_step["val/accuracy_before_train"], "sampled_reward": first_step["reward/mean"]}, command


def task_data(task: str) -> list[str]:
    """The overrides that point the RL job at ``task``'s training and validation sets."""
    return [f"data.train_files=[bundled:{task}/train.jsonl]", f"data.val_files=[bundled:{task}/val.jsonl]"]


def write_readme(out: Path, facts: dict) -> None:
    """The teacher's README.md: what it is, the commands that made it, its accuracy on each task."""
    shape = TEACHER_CONFIG
    parameters = sum(tensor.numel() for tensor in transformers.AutoModelForCausalLM.from_pretrained(out).state_dict().values())
    rows = "\n".join(
        f"| {model} | `bundled:{task}` | {scores['accuracy']:.3f} | {scores['sampled_reward']:.3f} |"
        for task in TASKS
        for model, scores in (("tiny-teacher", facts["teacher"][task]), ("tiny-moe, untrained (the student at the start)", facts["student"][task]))
    )
    (out / "README.md").write_text(
        f"""# tiny-teacher

The teacher of on-policy distillation on the bundled toy tasks, `bundled:toy` (the largest of three
digits) and `bundled:minmax` (the smallest and the largest):
a dense Qwen3 (hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, {shape['num_attention_heads']} attention heads sharing \
{shape['num_key_value_heads']} key/value heads of {shape['head_dim']}, MLP {shape['intermediate_size']}, untied output layer; \
{parameters:,} parameters, fp32) with exactly the tokenizer and vocabulary of
the student `bundled:tiny-moe`. Made by `python tools/make_teacher.py` (seeds fixed there), not by
`tools/make_assets.py`: it is trained.

1. Random initialisation: make_assets' settings and seeded fill (seed {TEACHER_SEED}).
2. Supervised fine-tuning on the {facts['conversations']} training prompts of both tasks as
   conversations ({facts['sft_seconds']:.0f} s on {facts['machine']}; `$WORK` is make_teacher's
   working directory, `$WORK/init` the initial model, `$WORK/sft.jsonl` the conversations):

       {facts['sft_command']}

3. Validation as the RL job validates (greedy, the 200 prompts of each task's `val.jsonl`, never
   trained on), `val/accuracy_before_train` of a one-step run, here for `bundled:minmax`:

       {facts['teacher_command']}

| model | task | greedy accuracy, its val.jsonl | mean reward of the step's 128 samples (temperature 1, training prompts) |
| --- | --- | --- | --- |
{rows}
"""
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ASSETS / "models" / "tiny-teacher", help="where the teacher goes (default: megarl/assets/models/tiny-teacher)")
    parser.add_argument("--work", type=Path, default=None, help="where the runs go (default: a temporary directory, removed after)")
    parser.add_argument("--sft-steps", type=int, default=SFT_STEPS, help=f"SFT steps of 64 conversations (default {SFT_STEPS})")
    parser.add_argument("--min-accuracy", type=float, default=MIN_ACCURACY, help=f"refuse a teacher below this accuracy on a task (default {MIN_ACCURACY})")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="megarl_teacher_") as temporary:
        work = (args.work or Path(temporary)).resolve()
        shutil.rmtree(work / "runs", ignore_errors=True)
        initial = make_initial_model(work / "init")
        conversations = []
        for task in TASKS:
            train = [json.loads(line) for line in (ASSETS / "data" / task / "train.jsonl").read_text().splitlines()]
            conversations += sft_rows(train, count=len(train))
        write_jsonl(work / "sft.jsonl", conversations)
        sft_command, sft_seconds = torchrun("megarl.sft", "configs/sft.yaml", [
            f"model.path={initial}", "parallel.expert=1", f"data.train_files=[{work / 'sft.jsonl'}]", f"train.steps={args.sft_steps}",
            "checkpoint.resume=never", f"logging.run_dir={work / 'runs' / 'sft'}",
        ])
        machine = f"a {os.cpu_count()}-core CPU, 1-minute load {os.getloadavg()[0]:.1f} at its end"
        teacher = work / "runs" / "sft" / "hf"
        teacher_scores, student_scores = {}, {}
        for task in TASKS:
            teacher_scores[task], teacher_command = validation_accuracy(str(teacher), work / "runs" / f"val_teacher_{task}", ["parallel.expert=1", *task_data(task)])
            student_scores[task], _ = validation_accuracy("bundled:tiny-moe", work / "runs" / f"val_student_{task}", task_data(task))
            print(f"{task}: greedy validation accuracy: teacher {teacher_scores[task]['accuracy']:.3f}, untrained student {student_scores[task]['accuracy']:.3f}")
        weakest = min(TASKS, key=lambda task: teacher_scores[task]["accuracy"])
        if teacher_scores[weakest]["accuracy"] < args.min_accuracy:
            print(
                f"make_teacher: the teacher's accuracy on {weakest}, {teacher_scores[weakest]['accuracy']:.3f}, is below --min-accuracy {args.min_accuracy}: raise --sft-steps",
                file=sys.stderr,
            )
            return 1
        shutil.rmtree(args.out, ignore_errors=True)
        # copyfile: the files get the usual permissions, not the export's private ones.
        shutil.copytree(teacher, args.out, copy_function=shutil.copyfile)
        write_readme(args.out, {
            "sft_command": " ".join(sft_command).replace(str(work), "$WORK"), "sft_seconds": sft_seconds, "machine": machine,
            "conversations": len(conversations), "teacher_command": " ".join(teacher_command).replace(str(work), "$WORK"),
            "teacher": teacher_scores, "student": student_scores,
        })
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
