"""Layer-spec backend choice: Transformer Engine when it imports, portable torch specs otherwise."""

from __future__ import annotations

import pytest

from megarl.models.specs import choose_backend

pytestmark = pytest.mark.cpu


def test_auto_prefers_transformer_engine_when_present():
    assert choose_backend("auto", has_transformer_engine=True) == "te"
    assert choose_backend("auto", has_transformer_engine=False) == "torch"
    assert choose_backend("torch", has_transformer_engine=True) == "torch"


def test_packed_fp32_runs_the_portable_attention():
    # Transformer Engine attends packed sequences in bf16/fp16 only.
    assert choose_backend("auto", has_transformer_engine=True, packed_fp32=True) == "torch"
    assert choose_backend("te", has_transformer_engine=True, packed_fp32=False) == "te"
    with pytest.raises(ValueError, match="set model.dtype=bf16, model.attention_backend=torch, or train.packing=false"):
        choose_backend("te", has_transformer_engine=True, packed_fp32=True)


def test_requesting_missing_transformer_engine_is_a_clear_error():
    with pytest.raises(ValueError, match="Transformer Engine does not import"):
        choose_backend("te", has_transformer_engine=False)
