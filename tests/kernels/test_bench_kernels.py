"""``tools/bench_kernels.py`` runs on the CPU and writes every field it promises."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torch.distributed as dist

from tests.distributed import REPO, run_python

pytestmark = pytest.mark.cpu

SCRIPT = REPO / "tools" / "bench_kernels.py"
RESULT_FIELDS = {
    "op", "provider", "n", "hidden", "vocab", "pass", "time_ms", "peak_bytes", "extra_bytes", "work", "work_unit",
    "achieved", "achieved_unit", "floor_ms", "fraction_of_floor",
}


def test_cpu_run_writes_the_json_report(tmp_path):
    # A vocabulary of 16 torch-path column chunks: the fused op's chunks must show in its memory.
    n, hidden_size, vocab = 32, 32, 65536
    report_path = tmp_path / "bench.json"
    result = run_python(SCRIPT, [
        "--device", "cpu", "--shapes", f"{n},{hidden_size},{vocab}", "--warmup", "0", "--iters", "1",
        "--json", str(report_path),
    ])
    assert "fused_linear_logprob_entropy" in result.stdout and "of floor" in result.stdout

    report = json.loads(report_path.read_text())
    assert report["device"].startswith("CPU") and report["dtype"] == "bfloat16"
    assert report["floors"]["bandwidth_bytes_per_s"] > 0 and report["floors"]["matmul_flop_per_s"] > 0
    assert {(entry["op"], entry["provider"]) for entry in report["skipped"]} == {
        ("logprob_entropy", "liger"), ("fused_linear_logprob_entropy", "liger"),
    }
    results = {(entry["op"], entry["provider"], entry["pass"]): entry for entry in report["results"]}
    assert set(results) == {
        (op, provider, pass_name)
        for op in ("logprob_entropy", "fused_linear_logprob_entropy")
        for provider in ("megarl", "torch")
        for pass_name in ("forward", "forward+backward")
    }
    for entry in results.values():
        assert set(entry) == RESULT_FIELDS
        assert (entry["n"], entry["hidden"], entry["vocab"]) == (n, hidden_size, vocab)
        assert entry["time_ms"] > 0 and entry["achieved"] > 0 and entry["fraction_of_floor"] > 0
        assert entry["peak_bytes"] >= entry["extra_bytes"] > 0
    assert results["fused_linear_logprob_entropy", "megarl", "forward+backward"]["work"] == 8 * n * hidden_size * vocab
    assert results["logprob_entropy", "megarl", "forward+backward"]["work"] == 3 * n * vocab * 2
    # The fused op's torch path holds a 4096-column chunk of fp32 logits, the reference all 65536.
    for pass_name in ("forward", "forward+backward"):
        fused = results["fused_linear_logprob_entropy", "megarl", pass_name]["extra_bytes"]
        reference = results["fused_linear_logprob_entropy", "torch", pass_name]["extra_bytes"]
        assert 4 * fused < reference, (pass_name, fused, reference)


def test_the_trainer_call_computes_what_the_plain_call_computes():
    # megarl-tp1 times the op as the trainer calls it (a [1, N] micro-batch, the vocabulary size and a
    # one-rank tensor-parallel group): the same numbers as the plain call, so its rows time the same op.
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    device = torch.device("cpu")
    group = bench.one_rank_group(device)
    try:
        assert dist.get_world_size(group) == 1
        for op in bench.OPS:
            functions, _ = bench.providers(op, device, group)
            assert list(functions) == ["megarl", "megarl-tp1", "torch"]
            tensors, targets, _ = bench.make_inputs(op, 16, 8, 64, torch.float32, device)
            plain = functions["megarl"](*tensors, targets)
            trainer = functions["megarl-tp1"](*tensors, targets)
            for trainer_values, plain_values in zip(trainer, plain):
                assert trainer_values.shape == (1, 16)
                torch.testing.assert_close(trainer_values[0], plain_values)
    finally:
        dist.destroy_process_group()


def test_phases_time_every_phase_of_the_megarl_providers(tmp_path, capsys):
    # --phases on a tiny CPU shape: the ops record their own phases (perf_counter on the CPU).
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    n, hidden_size, vocab = 16, 8, 64
    report_path = tmp_path / "bench.json"
    bench.main([
        "--device", "cpu", "--shapes", f"{n},{hidden_size},{vocab}", "--warmup", "0", "--iters", "2",
        "--providers", "megarl", "torch", "--phases", "--json", str(report_path),
    ])
    printed = capsys.readouterr().out
    assert "phase" in printed and "grad-logits" in printed and "of pass" in printed
    report = json.loads(report_path.read_text())
    assert report["autotune"] == {}  # no CUDA kernel ran
    expected = {
        ("logprob_entropy", "forward"): {"stats"},
        ("logprob_entropy", "forward+backward"): {"stats", "grad-logits"},
        ("fused_linear_logprob_entropy", "forward"): {"stats"},
        ("fused_linear_logprob_entropy", "forward+backward"): {"stats", "grad-logits", "dW", "dX"},
    }
    for entry in report["results"]:
        if entry["provider"] == "torch":
            assert "phases" not in entry
            continue
        phases = entry["phases"]
        assert set(phases) == expected[entry["op"], entry["pass"]]
        for name, phase in phases.items():
            assert phase["time_ms"] > 0 and phase["achieved"] > 0
            if entry["op"] == "fused_linear_logprob_entropy":
                assert phase["work"] == 2 * n * hidden_size * vocab and phase["achieved_unit"] == "TFLOP/s"
            else:
                assert phase["work"] == (1 if name == "stats" else 2) * n * vocab * 2 and phase["achieved_unit"] == "GB/s"
