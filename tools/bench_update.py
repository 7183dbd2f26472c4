"""Throughput of the policy's update and log-prob pass: padded vs packed vs packed + balanced
micro-batches, on a long-tailed length distribution.

One batch of ``--samples`` samples: prompts of 32-128 tokens (uniform), responses log-normal
(median ``--median`` tokens, sigma ``--sigma``) clipped to 16-1024, seeded. A policy (a
Qwen3-architecture model made here with transformers, random weights, ``--hidden`` wide and
``--layers`` deep) takes, per case:

- the log-prob pass over the batch (``Policy.log_probs``), and
- one update on it (``Policy.update``: one mini-batch, forward, backward, optimizer step),

with micro-batches cut four ways:

- ``padded-in-order``: ``--micro-batch-size`` samples a micro-batch in the order they come, each
  padded to its longest sample: what verl and OpenRLHF do without dynamic batch sizes or packing
  (megarl never cuts this way: the case swaps its planner for this one, for comparison);
- ``padded``: megarl without ``train.packing``: token-budget micro-batches of ``--budget`` tokens
  (``train.dynamic_batch``) padding included, samples grouped by length;
- ``packed``: ``train.packing``, micro-batches of ``--budget`` real tokens filled in length order
  (``train.balance_batch=false``);
- ``packed+balanced``: ``train.packing`` with Karmarkar-Karp partitions (the default).

Each case runs in its own process (peak memory: the process's peak RSS on CPU, the allocator's
peak on CUDA), ``--repeats`` timed rounds after one warm-up; the table gives medians, tokens/s
over the batch's real tokens, and the tokens the model ran (padding and alignment included).

    python tools/bench_update.py [--samples 64] [--budget 4096] [--repeats 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform as host
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = {
    "padded-in-order": {"packing": False, "dynamic_batch": False},
    "padded": {"packing": False},
    "packed": {"packing": True, "balance_batch": False},
    "packed+balanced": {"packing": True, "balance_batch": True},
}
"""Each case's ``train`` settings (besides the budget: ``train.dynamic_batch`` unless told)."""


def in_order(lengths, data_parallel_size, train, **_) -> list[list[list[int]]]:
    """The ``padded-in-order`` plan (one data-parallel rank): ``train.micro_batch_size``
    consecutive samples a micro-batch."""
    size = train.micro_batch_size
    return [[list(range(start, min(start + size, len(lengths)))) for start in range(0, len(lengths), size)]]


def case_list(text: str) -> str:
    """``--cases``: comma-separated names of :data:`CASES`, checked when the arguments are parsed."""
    unknown = [case for case in text.split(",") if case not in CASES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown case(s) {', '.join(map(repr, unknown))}: choose among {', '.join(CASES)}")
    return text


def sample_lengths(samples: int, median: float, sigma: float, seed: int) -> list[tuple[int, int]]:
    """``(prompt, response)`` tokens of each sample."""
    import numpy as np

    generator = np.random.default_rng(seed)
    prompts = generator.integers(32, 129, samples)
    responses = np.clip(np.round(generator.lognormal(np.log(median), sigma, samples)), 16, 1024).astype(int)
    return list(zip(prompts.tolist(), responses.tolist()))


def make_model(directory: Path, hidden: int, layers: int, vocab: int) -> str:
    """A Qwen3-architecture model with random (seeded) weights, saved as an HF directory."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers, num_attention_heads=hidden // 32,
        num_key_value_heads=max(1, hidden // 64), head_dim=32, max_position_embeddings=2048, tie_word_embeddings=True, dtype="float32",
    )
    Qwen3ForCausalLM(config).save_pretrained(directory)
    return str(directory)


def run_case(options: dict) -> dict:
    """One case in this process: build the policy, time the passes, report."""
    import resource

    import torch

    from megarl import parallel, platform
    from megarl.config import AlgorithmConfig, ModelConfig, ParallelConfig, TrainConfig
    from megarl.models.specs import choose_backend
    from megarl.trainer.batch import TrainBatch
    from megarl.trainer.model import TrainModel
    from megarl.trainer.policy import Policy, attach_hidden_states_heads

    facts = platform.init_distributed()
    layout = ParallelConfig()
    pg_collection = parallel.initialize(layout)
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    lengths = [tuple(pair) for pair in options["lengths"]]
    settings = {"dynamic_batch": True, **CASES[options["case"]]}
    train = TrainConfig(
        global_batch_size=len(lengths), mini_batch_size=len(lengths), max_tokens_per_micro_batch=options["budget"],
        micro_batch_size=options["micro_batch_size"], use_distributed_optimizer=False, **settings,
    )
    if options["case"] == "padded-in-order":
        import megarl.trainer.model

        megarl.trainer.model.plan_micro_batches = in_order
    model_config = ModelConfig(path=options["model"], dtype=options["dtype"])
    backend = choose_backend("auto", facts.has_transformer_engine, packed_fp32=train.packing and options["dtype"] == "fp32")
    model = TrainModel.build(
        options["model"], model_config, layout, train, train.optimizer, pg_collection=pg_collection, backend=backend,
        after_load=attach_hidden_states_heads,
    )
    policy = Policy(model, AlgorithmConfig(), train, temperature=1.0, max_response_length=1024)
    generator = torch.Generator().manual_seed(1)
    vocab = model.spec.hf_config.vocab_size
    prompts = [torch.randint(1, vocab, (prompt,), generator=generator).tolist() for prompt, _ in lengths]
    responses = [torch.randint(1, vocab, (response,), generator=generator).tolist() for _, response in lengths]
    batch = TrainBatch.from_samples(
        prompts, responses, [[0.0] * len(response) for response in responses], [index // 8 for index in range(len(lengths))],
        [False] * len(lengths), pad_token_id=0, pad_multiple=1,
    )
    batch.token_values.update(
        old_log_probs=batch.empty_token_values(), advantages=torch.randn(batch.tokens.shape, generator=generator), loss_weights=torch.ones(batch.tokens.shape)
    )
    micro_batches = model.micro_batches(batch, torch.arange(batch.size), ())
    cuda = torch.cuda.is_available()

    def timed(function) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    log_prob_seconds, update_seconds = [], []
    for round_ in range(options["repeats"] + 1):
        log_prob = timed(lambda: policy.log_probs(batch))
        update = timed(lambda: policy.update(batch, step=round_))
        if round_:
            log_prob_seconds.append(log_prob)
            update_seconds.append(update)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "case": options["case"],
        "log_prob_s": log_prob_seconds,
        "update_s": update_seconds,
        "peak_bytes": peak,
        "micro_batches": len(micro_batches),
        "model_tokens": sum(micro["tokens"].numel() for micro in micro_batches),
        "real_tokens": int(batch.sequence_lengths.sum()),
        "device": torch.cuda.get_device_name() if cuda else f"{host.machine()} CPU",
    }


def machine() -> str:
    with open("/proc/cpuinfo") as info:
        names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    return f"{names[0] if names else host.machine()}, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--median", type=float, default=128.0, help="median response tokens of the log-normal")
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--budget", type=int, default=4096, help="train.max_tokens_per_micro_batch")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="samples per micro-batch of padded-in-order")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per case after one warm-up (the table shows medians)")
    parser.add_argument("--cases", type=case_list, default=",".join(CASES), help="comma-separated, of " + ", ".join(CASES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--case-options", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case_options:
        print(json.dumps(run_case(json.loads(args.case_options))))
        return
    load_before = os.getloadavg()[0]
    lengths = sample_lengths(args.samples, args.median, args.sigma, args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_update_") as root:
        model = make_model(Path(root) / "model", args.hidden, args.layers, args.vocab)
        for case in args.cases.split(","):
            options = {
                "case": case, "lengths": lengths, "budget": args.budget, "model": model, "dtype": args.dtype, "repeats": args.repeats,
                "micro_batch_size": args.micro_batch_size,
            }
            result = subprocess.run(
                [sys.executable, __file__, "--case-options", json.dumps(options)], cwd=REPO, capture_output=True, text=True,
                env={**os.environ, "PYTHONWARNINGS": "ignore"},
            )
            if result.returncode != 0:
                raise SystemExit(f"case {case} failed:\n{result.stderr[-4000:]}")
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    responses = sorted(response for _, response in lengths)
    real = rows[0]["real_tokens"]
    print(
        f"{datetime.date.today().isoformat()}, commit {commit}, {rows[0]['device']} ({machine()}); load average (1 min) "
        f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; {args.samples} samples, {real} tokens, responses "
        f"log-normal median {args.median:g} sigma {args.sigma:g} in [16, 1024] (min {responses[0]}, median {responses[len(responses) // 2]}, "
        f"max {responses[-1]}), prompts 32-128; budget {args.budget} tokens, in-order micro-batches of {args.micro_batch_size}; model hidden {args.hidden}, {args.layers} layers, vocab "
        f"{args.vocab}, {args.dtype}; medians of {args.repeats} rounds\n"
    )
    base = next(row for row in rows if row["case"] == "padded") if any(row["case"] == "padded" for row in rows) else rows[0]
    print(f"x: against {base['case']}\n")
    print("| case | micro-batches | tokens run | update s | update tokens/s | x | log-prob s | log-prob tokens/s | x | peak memory MiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        update, log_prob = statistics.median(row["update_s"]), statistics.median(row["log_prob_s"])
        base_update, base_log_prob = statistics.median(base["update_s"]), statistics.median(base["log_prob_s"])
        print(
            f"| {row['case']} | {row['micro_batches']} | {row['model_tokens']} | {update:.2f} | {real / update:,.0f} | {base_update / update:.2f} | "
            f"{log_prob:.2f} | {real / log_prob:,.0f} | {base_log_prob / log_prob:.2f} | {row['peak_bytes'] / 2**20:,.0f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"lengths": lengths, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
