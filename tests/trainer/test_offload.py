"""``train.offload`` (megarl/trainer/offload.py): a round trip of a real Megatron model and optimizer
through host memory (the ``offload`` check of tests/workers/offload_check.py, in the single-process
suite) releases every storage it moves, restores every tensor bit for bit with its views still
aliasing the DDP buffers, and the next update is the same as without it; and the config refuses
what cannot work. A whole run with ``train.offload=[params,grads,optimizer]`` logging the same
metrics step for step as one without it is tests/test_train.py's resumed README run."""

from __future__ import annotations

import pytest

from megarl.config import ConfigError, load_config, validate
from megarl.config.loader import parse_override
from tests.hf_models import model_dir
from tests.jobs import layout_job
from tests.test_config import QWEN3_30B_A3B
from tests.distributed import REPO

SETUPS = ("bf16-distributed", "bf16")


def offload_jobs(directory):
    return [layout_job(model_dir(directory, "bundled:tiny-moe"), "single", {"offload": {}})]


@pytest.mark.multirank
@pytest.mark.jobs(planner=offload_jobs)
@pytest.mark.parametrize("setup", SETUPS)
def test_a_round_trip_through_the_host_releases_the_storages_and_restores_them_bitwise(setup, jobs):
    (job,) = offload_jobs(jobs.directory)
    report = jobs.report(job.name)["offload"][setup]
    # Parameters, gradients and the optimizer's own tensors each had something to move.
    assert all(count > 0 for count in report["kinds"].values()), report
    assert report["still_held"] == 0, report
    assert report["compared"] > report["storages"] and report["changed"] == 0, report
    assert report["not_aliased"] == 0, report
    moved = report["moved"]
    assert moved["offload/bytes_to_host"] == moved["offload/bytes_to_device"] > 0, moved
    # Gradients are released, not copied (zeros between steps).
    assert moved["offload/bytes_released"] > moved["offload/bytes_to_host"], moved
    assert report["second_update_equal"] and report["parameters_equal"], report
    assert report["second_update"]["grad_norm"] > 0


@pytest.mark.cpu
def test_offload_is_refused_for_engines_on_devices_of_their_own_and_twice_named_choices():
    recipe = REPO / "configs" / "recipes" / "qwen3_30b_a3b_8xh100.yaml"
    config = load_config(recipe, ["rollout.colocate=false", "rollout.num_engines=1"])
    with pytest.raises(ConfigError, match=r"`train.offload` \(\['params', 'grads', 'optimizer'\]\) frees the GPUs for colocated engines.*set train.offload=\[\]"):
        validate(config, 8, QWEN3_30B_A3B)
    with pytest.raises(ConfigError, match=r"`train.offload`.*names a choice twice"):
        load_config(None, ["train.offload=[params,params]"])
    with pytest.raises(ConfigError, match=r"`train.offload\[0\]` = 'weights' must be one of 'params', 'grads', 'optimizer'"):
        load_config(None, ["train.offload=[weights]"])
    assert parse_override("train.offload=[]") == ("train.offload", [])
