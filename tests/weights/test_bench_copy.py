"""``tools/bench_copy.py`` runs every case on the CPU and writes the fields it promises."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.distributed import REPO

pytestmark = pytest.mark.cpu


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_copy", REPO / "tools" / "bench_copy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_run_of_every_case_writes_the_json_report(tmp_path, capsys):
    bench = load_bench()
    path = tmp_path / "bench_copy.json"
    report = bench.main(["--mib", "0.25", "--repeats", "1", "--small-count", "30", "--json", str(path)])
    assert json.loads(path.read_text()) == report
    assert report["machine"]["device"].startswith("CPU")
    results = {entry["case"]: entry for entry in report["results"]}
    assert list(results) == list(bench.CASES)
    for entry in results.values():
        assert entry["engine_gbps"] > 0 and entry["copy_gbps"] > 0
        assert entry["ratio"] == pytest.approx(entry["engine_gbps"] / entry["copy_gbps"])
    # The same output bytes in every case: 256 KiB, read and written (fp32 reads twice as many).
    assert results["aligned"]["bytes"] == results["misaligned2"]["bytes"] == 2 * 2**18
    assert results["fp32->bf16"]["bytes"] == 3 * 2**18
    # 30 tensors of 1 - 8 KiB fit in 256 KiB.
    assert results["small"]["copies"] == 30 and results["small"]["per_tensor_copy_gbps"] > 0
    assert "| misaligned2 | 1 |" in capsys.readouterr().out


def test_unknown_case_is_refused():
    with pytest.raises(SystemExit, match="unknown --cases \\['fast'\\]"):
        load_bench().main(["--cases", "aligned,fast"])
