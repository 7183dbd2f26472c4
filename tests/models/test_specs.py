"""Layer-spec backend choice: Transformer Engine when it imports, portable torch specs otherwise."""

from __future__ import annotations

import pytest

from megarl.models.specs import choose_backend

pytestmark = pytest.mark.cpu


def test_auto_prefers_transformer_engine_when_present():
    assert choose_backend("auto", has_transformer_engine=True) == "te"
    assert choose_backend("auto", has_transformer_engine=False) == "torch"
    assert choose_backend("torch", has_transformer_engine=True) == "torch"


def test_requesting_missing_transformer_engine_is_a_clear_error():
    with pytest.raises(ValueError, match="Transformer Engine does not import"):
        choose_backend("te", has_transformer_engine=False)
