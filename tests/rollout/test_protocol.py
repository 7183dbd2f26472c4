"""What megarl sends to SGLang matches SGLang's own schema, read from its installed source.

tools/setup.sh installs SGLang's source without its dependencies, so its modules mostly do not
import here: request classes are checked by reading their fields from the source (``ast``), and
the parts that import alone (``tensor_bucket.py``; ``api_types.py`` where msgspec is installed)
are run for real. On a GPU machine with a full SGLang the io_struct test runs the request classes
themselves.
"""

from __future__ import annotations

import ast
import base64
import dataclasses
import importlib.util
import io
import pickle
import sys
import types
from multiprocessing.reduction import ForkingPickler

import pytest
import torch

from megarl.rollout import protocol
from megarl.rollout.engine import Engine, LaunchOptions
from megarl.rollout.sampling import Sample, SamplingParams, WeightSegment, resume_seed, sample_seed
from megarl.rollout.transports import cuda_ipc_payloads, flattened_metadata
from megarl.weights.bucket import Bucket, TensorMeta
from tests.rollout.sglang_source import SGLANG, class_fields, load_source, needs_sglang

pytestmark = pytest.mark.cpu

SAMPLING = SamplingParams(max_new_tokens=16, temperature=0.7, top_p=0.9, top_k=20, stop_token_ids=(2, 5), n=4, seed=3)
BUCKET = Bucket.from_named_tensors([("model.norm.weight", torch.randn(8)), ("lm_head.weight", torch.randn(4, 8).to(torch.bfloat16))])


def payloads() -> dict[str, dict]:
    """Every request body megarl sends, by SGLang request class name."""
    return {
        "GenerateReqInput": protocol.generate_body([[1, 2, 3], [4, 5]], [protocol.sampling_body(SAMPLING, 7)] * 2, rid="step-3", return_routed_experts=True),
        "UpdateWeightsFromTensorReqInput": protocol.update_from_tensor_body(["cGF5bG9hZA=="], "3"),
        "UpdateWeightsFromDistributedReqInput": protocol.update_from_distributed_body(BUCKET.metas, "3", protocol.FLATTENED_BUCKET),
        "UpdateWeightFromDiskReqInput": protocol.update_from_disk_body("/dev/shm/weights-v3", "3"),
        "InitWeightsUpdateGroupReqInput": protocol.init_update_group_body("127.0.0.1", 29500, 1, 3, "nccl"),
        "DestroyWeightsUpdateGroupReqInput": protocol.destroy_update_group_body(),
        "ReleaseMemoryOccupationReqInput": protocol.memory_body(["weights", "kv_cache"]),
        "ResumeMemoryOccupationReqInput": protocol.memory_body(None),
        "GetWeightsByNameReqInput": protocol.get_weights_body("model.norm.weight", 10),
        "BeginWeightUpdateReqInput": {},
        "EndWeightUpdateReqInput": {},
        "PauseGenerationReqInput": protocol.pause_body("retract"),
        "ContinueGenerationReqInput": protocol.continue_body(),
        "AbortReq": protocol.abort_body("step-3_1"),
        "UpdateWeightVersionReqInput": protocol.update_weight_version_body("4", abort_all_requests=False),
    }


def test_sample_seeds_are_stable_distinct_and_in_range():
    assert sample_seed(3, 0, 0) == sample_seed(3, 0, 0)
    seeds = {sample_seed(seed, prompt, sample) for seed in (0, 1, -5) for prompt in range(20) for sample in range(8)}
    assert len(seeds) == 3 * 20 * 8
    assert all(0 <= seed < 2**63 for seed in seeds)


def test_sampling_body_carries_every_parameter_but_n():
    body = protocol.sampling_body(SAMPLING, 11)
    assert body == {"max_new_tokens": 16, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "stop_token_ids": [2, 5], "sampling_seed": 11}
    assert "sampling_seed" not in protocol.sampling_body(SAMPLING, None)


def test_parse_generate_response_reads_sglang_items_and_rejects_bad_ones():
    item = {
        "output_ids": [5, 2],
        "meta_info": {
            "id": "x", "finish_reason": {"type": "stop", "matched": 2}, "weight_version": "4",
            "output_token_logprobs": [[-0.5, 5, None], [-1.5, 2, None]],
        },
    }
    [parsed] = protocol.parse_generate_response([item], 1)
    assert (parsed.output_ids, parsed.logprobs, parsed.finish_reason, parsed.weight_version) == ([5, 2], [-0.5, -1.5], "stop", "4")
    with pytest.raises(ValueError, match="1 items for a batch of 2"):
        protocol.parse_generate_response([item], 2)
    aborted = {**item, "meta_info": {**item["meta_info"], "finish_reason": {"type": "abort", "message": "out of memory"}}}
    with pytest.raises(ValueError, match="did not finish.*out of memory"):
        protocol.parse_generate_response([aborted], 1)
    with pytest.raises(ValueError, match="lacks 'output_token_logprobs'"):
        protocol.parse_generate_response([{"output_ids": [1], "meta_info": {"finish_reason": {"type": "length"}}}], 1)


def test_memory_tags_are_checked():
    with pytest.raises(ValueError, match="unknown engine memory tags"):
        protocol.memory_body(["weights", "activations"])


@needs_sglang
@pytest.mark.parametrize("request_class", sorted(payloads()))
def test_request_bodies_fit_sglang_request_classes(request_class):
    body = payloads()[request_class]
    fields, required = class_fields(SGLANG / "srt" / "managers" / "io_struct.py", request_class)
    assert set(body) <= fields, f"{request_class} has no fields {sorted(set(body) - fields)}"
    assert required <= set(body), f"{request_class} needs {sorted(required - set(body))}"


@needs_sglang
def test_generate_body_fits_the_http_contract():
    body = payloads()["GenerateReqInput"]
    contract = SGLANG / "api" / "v1" / "api_types.py"
    request_fields, _ = class_fields(contract, "GenerateRequest")
    sampling_fields, _ = class_fields(contract, "SamplingParams")
    runtime_sampling_fields, _ = class_fields(SGLANG / "srt" / "sampling" / "sampling_params.py", "SamplingParams")
    # The HTTP contract ignores unknown keys and lacks return_routed_experts (it has only
    # routed_experts_start_len); the server reads the flag into GenerateReqInput, checked above.
    assert set(body) - {"return_routed_experts"} <= request_fields
    for params in body["sampling_params"]:
        assert set(params) <= sampling_fields & runtime_sampling_fields


@needs_sglang
def test_generate_body_passes_sglang_contract_decoder():
    pytest.importorskip("msgspec", reason="SGLang's contract decoder needs msgspec (an SGLang dependency)")
    api_types = load_source("api/v1/api_types.py", "sglang_api_types_under_test")
    body = payloads()["GenerateReqInput"]
    api_types.GenerateRequest.from_json_value(body)
    for params in body["sampling_params"]:
        api_types.SamplingParams.from_json_value(params)


@needs_sglang
def test_request_bodies_convert_to_sglang_request_classes():
    io_struct = pytest.importorskip("sglang.srt.managers.io_struct", reason="SGLang's runtime dependencies are not installed")
    import msgspec

    for name, body in payloads().items():
        if name == "GenerateReqInput":
            io_struct.GenerateReqInput(**body).normalize_batch_and_arguments()
        else:
            msgspec.convert(body, getattr(io_struct, name), strict=False)


@needs_sglang
def test_endpoints_exist_with_the_methods_megarl_uses():
    routes: set[tuple[str, str]] = set()
    for node in ast.walk(ast.parse((SGLANG / "srt" / "entrypoints" / "http_server.py").read_text())):
        if isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef):
            for decorator in node.decorator_list:
                if isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute) and decorator.args:
                    path = ast.literal_eval(decorator.args[0]) if isinstance(decorator.args[0], ast.Constant) else None
                    if decorator.func.attr in ("get", "post"):
                        routes.add((decorator.func.attr.upper(), path))
                    elif decorator.func.attr == "api_route":
                        methods = next(ast.literal_eval(kw.value) for kw in decorator.keywords if kw.arg == "methods")
                        routes.update((method, path) for method in methods)
    used = {
        ("GET", protocol.HEALTH), ("GET", protocol.HEALTH_GENERATE), ("GET", protocol.MODEL_INFO),
        ("POST", protocol.GENERATE), ("POST", protocol.FLUSH_CACHE), ("POST", protocol.RELEASE_MEMORY), ("POST", protocol.RESUME_MEMORY),
        ("POST", protocol.BEGIN_WEIGHT_UPDATE), ("POST", protocol.END_WEIGHT_UPDATE), ("POST", protocol.UPDATE_FROM_TENSOR),
        ("POST", protocol.UPDATE_FROM_DISK), ("POST", protocol.UPDATE_FROM_DISTRIBUTED), ("POST", protocol.INIT_UPDATE_GROUP),
        ("POST", protocol.DESTROY_UPDATE_GROUP), ("POST", protocol.GET_WEIGHTS_BY_NAME),
        ("POST", protocol.PAUSE_GENERATION), ("POST", protocol.CONTINUE_GENERATION), ("POST", protocol.ABORT_REQUEST),
        ("POST", protocol.UPDATE_WEIGHT_VERSION),
    }
    assert used <= routes, f"SGLang does not serve {sorted(used - routes)}"


@needs_sglang
def test_memory_tags_and_dtype_names_are_sglangs():
    constants = {}
    exec(compile((SGLANG / "srt" / "constants.py").read_text(), "constants.py", "exec"), constants)
    assert set(protocol.MEMORY_TAGS) == set(constants["GPU_MEMORY_ALL_TYPES"])
    for dtype in protocol.update_from_distributed_body(BUCKET.metas, "1", None)["dtypes"]:
        assert isinstance(getattr(torch, dtype), torch.dtype)  # SGLang reads them with getattr(torch, name)


@needs_sglang
def test_sglang_launch_flags_exist(tmp_path):
    options = LaunchOptions(
        engine="sglang", model_path="/models/x", log_dir=tmp_path, tensor_parallel=2, colocate=True, deterministic=True, return_routed_experts=True
    )
    command = Engine("sglang-1", "sglang", 2, launch=options, index=1).command(30000, tmp_path / "ready")
    assert command[1:3] == ["-m", "megarl.rollout.sglang_entry"]
    flags = {part for part in command[5:] if part.startswith("--")}
    known = set()
    for fields_file in (SGLANG / "srt" / "arg_groups" / "fields").glob("*.py"):
        tree = ast.parse(fields_file.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                known.add("--" + node.target.id.replace("_", "-"))
    assert flags <= known, f"SGLang has no flags {sorted(flags - known)}"
    assert command[command.index("--base-gpu-id") + 1] == "2" and command[command.index("--tp-size") + 1] == "2"


@needs_sglang
def test_bucket_layout_is_sglangs_flattened_bucket():
    tensor_bucket = load_source("srt/weight_sync/tensor_bucket.py", "sglang_tensor_bucket_under_test")
    named = [("a", torch.randn(3, 2)), ("b", torch.arange(5, dtype=torch.int64)), ("c", torch.randn(4).to(torch.bfloat16))]
    ours = Bucket.from_named_tensors(named)
    theirs = tensor_bucket.FlattenedTensorBucket(named_tensors=named)
    assert torch.equal(ours.buffer, theirs.get_flattened_tensor())
    def fields(metadata):
        return [(m.name, tuple(m.shape), m.dtype, m.start_idx, m.end_idx, m.numel) for m in metadata]

    assert fields(theirs.get_metadata()) == fields(flattened_metadata(ours, tensor_bucket.FlattenedTensorMetadata))
    rebuilt = tensor_bucket.FlattenedTensorBucket(flattened_tensor=ours.buffer, metadata=flattened_metadata(ours, tensor_bucket.FlattenedTensorMetadata))
    assert all(name == want_name and torch.equal(got, want) for (name, got), (want_name, want) in zip(rebuilt.reconstruct_tensors(), named))
    distributed = payloads()["UpdateWeightsFromDistributedReqInput"]
    receive = tensor_bucket.FlattenedTensorBucket.empty(distributed["names"], distributed["dtypes"], distributed["shapes"], "cpu")
    assert [(m.start_idx, m.end_idx) for m in receive.get_metadata()] == [(m.start, m.end) for m in BUCKET.metas]


def _allowed_globals() -> set[tuple[str, str]]:
    """SGLang's ``SafeUnpickler.ALLOWED_GLOBALS`` (``sglang.srt.utils.common``)."""
    tree = ast.parse((SGLANG / "srt" / "utils" / "common.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "SafeUnpickler":
            for statement in node.body:
                if isinstance(statement, ast.Assign) and statement.targets[0].id == "ALLOWED_GLOBALS":
                    return ast.literal_eval(statement.value)
    raise AssertionError("SafeUnpickler.ALLOWED_GLOBALS not found in sglang/srt/utils/common.py")


@needs_sglang
def test_tensor_payload_passes_sglangs_safe_unpickler(monkeypatch):
    """The tensor transport's payload, serialized as SGLang's MultiprocessingSerializer does
    (ForkingPickler, then base64), unpickles under SGLang's allow-list and rebuilds the bucket.
    On CPU the tensor pickles as a file-descriptor handle instead of a CUDA-IPC one."""
    module_name = "sglang.srt.weight_sync.tensor_bucket"
    for parent in ("sglang", "sglang.srt", "sglang.srt.weight_sync"):
        monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
    tensor_bucket = load_source("srt/weight_sync/tensor_bucket.py", module_name)
    monkeypatch.setitem(sys.modules, module_name, tensor_bucket)
    payload = {"flattened_tensor": BUCKET.buffer[: BUCKET.nbytes], "metadata": flattened_metadata(BUCKET, tensor_bucket.FlattenedTensorMetadata)}
    buffer = io.BytesIO()
    ForkingPickler(buffer).dump(payload)
    serialized = base64.b64encode(buffer.getvalue()).decode()
    allowed = _allowed_globals()

    class AllowListUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            assert (module, name) in allowed, f"SGLang's SafeUnpickler blocks {module}.{name}"
            return super().find_class(module, name)

    received = AllowListUnpickler(io.BytesIO(base64.b64decode(serialized))).load()
    rebuilt = tensor_bucket.FlattenedTensorBucket(flattened_tensor=received["flattened_tensor"], metadata=received["metadata"])
    assert all(torch.equal(got, want) for (_, got), (_, want) in zip(rebuilt.reconstruct_tensors(), BUCKET.named_tensors()))


def test_sglang_entry_watches_the_launcher_then_runs_sglangs_launcher(monkeypatch):
    from megarl.rollout import sglang_entry

    calls = []
    monkeypatch.setattr(sglang_entry, "start_parent_watchdog", lambda pid: calls.append(("watch", pid)))
    monkeypatch.setattr(sglang_entry.runpy, "run_module", lambda name, **kw: calls.append((name, list(sys.argv), kw)))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    sglang_entry.main(["--parent-pid", "42", "--model-path", "/m", "--tp-size", "2"])
    assert calls == [
        ("watch", 42),
        ("sglang.launch_server", ["sglang.launch_server", "--model-path", "/m", "--tp-size", "2"], {"run_name": "__main__", "alter_sys": True}),
    ]


def test_auto_engine_is_hf_without_cuda():
    from megarl.rollout import resolve_engine

    assert resolve_engine("auto") == ("sglang" if torch.cuda.is_available() and importlib.util.find_spec("sgl_kernel") else "hf")
    assert resolve_engine("sglang") == "sglang"


def test_tensor_meta_json_round_trip():
    assert [TensorMeta.from_json(fields) for fields in BUCKET.metadata_json()] == BUCKET.metas


def test_cuda_ipc_refuses_a_tensor_sglang_could_not_view():
    # A float32 tensor after three bytes of int8: SGLang's .view(float32) of that slice would fail.
    bucket = Bucket.from_named_tensors([("a", torch.zeros(3, dtype=torch.int8)), ("b", torch.zeros(2))])
    with pytest.raises(ValueError, match=r"^b starts at a byte offset that is not a multiple of its element size"):
        cuda_ipc_payloads(bucket, ranks=1)


def test_an_aborted_item_is_a_partial_sample_when_asked_for():
    aborted = {
        "output_ids": [5, 6, 7],
        "meta_info": {
            "id": "r_0", "finish_reason": {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None},
            "weight_version": "3", "weight_versions": [{"version": "2", "start": 0, "end": 1}, {"version": "3", "start": 1, "end": 3}],
            "output_token_logprobs": [[-0.5, 5, None], [-1.5, 6, None], [-2.5, 7, None]],
        },
    }
    with pytest.raises(ValueError, match="did not finish.*Aborted"):
        protocol.parse_generate_response([aborted], 1)
    [parsed] = protocol.parse_generate_response([aborted], 1, partial=True)
    assert (parsed.output_ids, parsed.logprobs, parsed.finish_reason, parsed.weight_version) == ([5, 6, 7], [-0.5, -1.5, -2.5], "abort", "3")
    assert parsed.weight_segments == (WeightSegment("2", 0, 1), WeightSegment("3", 1, 3))
    gap = {**aborted, "meta_info": {**aborted["meta_info"], "weight_versions": [{"version": "2", "start": 0, "end": 1}]}}
    with pytest.raises(ValueError, match="do not cover the 3 output tokens"):
        protocol.parse_generate_response([gap], 1, partial=True)
    # An engine that reports only the version: one segment over every token.
    only_version = {**aborted, "meta_info": {key: value for key, value in aborted["meta_info"].items() if key != "weight_versions"}}
    assert protocol.parse_generate_response([only_version], 1, partial=True)[0].weight_segments == (WeightSegment("3", 0, 3),)


@needs_sglang
def test_weight_segments_read_sglangs_meta_info(monkeypatch):
    pytest.importorskip("msgspec", reason="SGLang's weight_versions module needs msgspec (an SGLang dependency)")
    for name in ("sglang", "sglang.srt", "sglang.srt.utils", "sglang.srt.utils.msgspec_utils"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["sglang.srt.utils.msgspec_utils"].msgspec_struct_pydantic_core_schema = None
    spec = importlib.util.spec_from_file_location("sglang_weight_versions_for_segments", SGLANG / "srt" / "utils" / "weight_versions.py")
    weight_versions = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, weight_versions)
    spec.loader.exec_module(weight_versions)
    events = [weight_versions.WeightVersionEvent(old_version="4", num_output_tokens=2), weight_versions.WeightVersionEvent(old_version="5", num_output_tokens=3)]
    meta = {"finish_reason": {"type": "length", "length": 5}, "output_token_logprobs": [[-1.0, token, None] for token in range(5)]}
    weight_versions.add_weight_versions_to_meta_info(meta, weight_versions.compute_weight_version_spans(events, "6", 5), 5)
    [parsed] = protocol.parse_generate_response([{"output_ids": list(range(5)), "meta_info": meta}], 1)
    assert parsed.weight_segments == (WeightSegment("4", 0, 2), WeightSegment("5", 2, 3), WeightSegment("6", 3, 5))
    assert parsed.weight_version == "6"
    empty = {"finish_reason": {"type": "abort", "message": "Abort in waiting queue"}, "output_token_logprobs": []}
    weight_versions.add_weight_versions_to_meta_info(empty, weight_versions.compute_weight_version_spans([], "6", 0), 0)
    [parsed] = protocol.parse_generate_response([{"output_ids": [], "meta_info": empty}], 1, partial=True)
    assert parsed.weight_segments == (WeightSegment("6", 0, 0),) and parsed.finish_reason == "abort"


def test_a_continued_sample_concatenates_tokens_and_segments():
    partial = Sample(
        prompt_index=1, sample_index=2, response_ids=[5, 6, 7], logprobs=[-1.0, -2.0, -3.0], finish_reason="abort",
        weight_version="3", weight_segments=(WeightSegment("2", 0, 1), WeightSegment("3", 1, 3)),
    )
    continuation = Sample(
        prompt_index=0, sample_index=0, response_ids=[8, 2], logprobs=[-4.0, -5.0], finish_reason="stop",
        weight_version="4", weight_segments=(WeightSegment("4", 0, 2),),
    )
    whole = partial.continued_by(continuation)
    assert (whole.prompt_index, whole.sample_index, whole.response_ids, whole.logprobs) == (1, 2, [5, 6, 7, 8, 2], [-1.0, -2.0, -3.0, -4.0, -5.0])
    assert (whole.finish_reason, whole.weight_version) == ("stop", "4")
    assert whole.weight_segments == (WeightSegment("2", 0, 1), WeightSegment("3", 1, 3), WeightSegment("4", 3, 5))
    # Resumed under the same version: one segment; a partial without tokens: the continuation's.
    same = partial.continued_by(dataclasses.replace(continuation, weight_version="3", weight_segments=(WeightSegment("3", 0, 2),)))
    assert same.weight_segments == (WeightSegment("2", 0, 1), WeightSegment("3", 1, 5))
    empty = dataclasses.replace(partial, response_ids=[], logprobs=[], weight_segments=(WeightSegment("3", 0, 0),))
    assert empty.continued_by(continuation).weight_segments == (WeightSegment("4", 0, 2),)


def test_resume_seeds_differ_by_progress_and_from_the_sample_seed():
    seed = sample_seed(7, 1, 2)
    seeds = {resume_seed(seed, generated) for generated in range(1, 200)}
    assert len(seeds) == 199 and seed not in seeds and all(0 <= value < 2**63 for value in seeds)
    assert resume_seed(seed, 5) == resume_seed(seed, 5)
