"""Training on two torchrun "nodes" on this machine (``--nnodes 2 --nproc_per_node 1``, gloo, c10d
rendezvous): expert parallelism across them, one ``hf`` engine per node launched and supervised by
its node, SGLang's router in front of both.

tests/workers/node_check.py runs two GRPO steps of the bundled tiny MoE; after every step each
node's engine must hold exactly the exporter's weights, and the engine that the second node's
rank kills after step 0 is restarted by that node, not by the first.
"""

from __future__ import annotations

import json
import sys
import uuid

import pytest

from tests.distributed import REPO, TORCHRUN_ENVIRONMENT, WORKERS, free_port, run_together

pytestmark = pytest.mark.multirank

STEPS = 2


def test_two_nodes_with_router_train_and_restart_engines_on_their_node(tmp_path):
    endpoint, run_id = f"127.0.0.1:{free_port()}", uuid.uuid4().hex[:8]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", endpoint, "--rdzv-id", run_id, "--rdzv-conf", "join_timeout=60",
        str(WORKERS / "node_check.py"), "--report-dir", str(tmp_path / "reports"), "--kill-engine-after", "0",
        "--config", str(REPO / "configs" / "moe_grpo.yaml"),
        f"logging.run_dir={tmp_path / 'run'}", "checkpoint.resume=never", f"train.steps={STEPS}", "train.eval_every=0",
        "checkpoint.save_every=0", "rollout.batch_size=4", "rollout.n_samples_per_prompt=4", "train.micro_batch_size=8",
        "algorithm.dynamic_sampling=false", "rollout.router=sglang", "rollout.health_check_interval_s=1", "rollout.health_timeout_s=5",
    ]
    first, second = run_together([command, command], TORCHRUN_ENVIRONMENT, timeout=240)
    for result in (first, second):
        assert result.returncode == 0, f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-8000:]}"
    reports = [json.loads((tmp_path / "reports" / f"node{node}.json").read_text()) for node in range(2)]
    assert all(report["completed"] and report["ranks"] == 2 for report in reports)
    # One engine per node, named for its node; the first rank generates on the other's too, and
    # the router lists both.
    assert [[name for name, _ in report["engines"]] for report in reports] == [["hf-n0-0"], ["hf-n1-0"]]
    assert reports[0]["generates_on"] == ["hf-n1-0"] and reports[0]["route"] == "sglang-router"
    urls = {url: True for report in reports for _, url in report["engines"]}
    assert reports[0]["router"] == urls
    # The restarted engine was taken out of the router and put back: both serve at the end.
    assert reports[0]["router_after"] == urls
    # After every update both engines hold exactly the exporter's weights.
    for report in reports:
        assert report["differing"] == {f"after_{step}": [] for step in range(STEPS)}
    # The second node restarted its own engine (a new process, the same URL); the first restarted nothing.
    assert reports[0]["restarts"] == 0 and reports[0]["pids_after"] == reports[0]["pids_before"]
    assert reports[1]["restarts"] == 1 and reports[1]["pids_after"] != reports[1]["pids_before"]
