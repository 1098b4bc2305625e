"""BENTOLORA_PROMOTED_ONLY: the setting, and which adapter versions the engine then serves."""

from __future__ import annotations

import pytest

from models.loading import load_pipeline
from models.stages import promote
from service.adapter_selection import select_adapters
from service.settings import Settings
from tests.store_helpers import one_layer_adapter

NOT_PROMOTED = "not promoted (BENTOLORA_PROMOTED_ONLY)"


@pytest.mark.parametrize(
    ("raw", "value"), [("1", True), ("0", False), ("true", True), ("No", False), ("", False)]
)
def test_promoted_only_reads_booleans(raw, value):
    assert Settings.from_env({"BENTOLORA_PROMOTED_ONLY": raw}).promoted_only is value
    assert Settings.from_env({}).promoted_only is False


def test_every_bad_variable_is_reported_at_once():
    with pytest.raises(ValueError) as err:
        Settings.from_env(
            {
                "BENTOLORA_PROMOTED_ONLY": "maybe",
                "BENTOLORA_MAX_PIXELS": "lots",
                "BENTOLORA_DTYPE": "fp8",
            }
        )
    message = str(err.value)
    assert "BENTOLORA_PROMOTED_ONLY='maybe' is not a boolean: use 1 or 0" in message
    assert "BENTOLORA_MAX_PIXELS='lots' is not an integer" in message
    assert "BENTOLORA_DTYPE='fp8' is not one of" in message


@pytest.fixture
def pipe(tiny_base):
    return load_pipeline(f"store:{tiny_base.tag}")


def test_promoted_only_serves_the_newest_production_version(pipe, tiny_base):
    promoted = one_layer_adapter("gated", tiny_base, 0.01)
    newer = one_layer_adapter("gated", tiny_base, 0.02)
    never = one_layer_adapter("never-promoted", tiny_base, 0.01)
    promote(promoted)

    found = select_adapters(pipe, tiny_base, Settings())
    assert found.served["gated"].tag == newer.tag  # off: the newest version
    assert found.served["never-promoted"].tag == never.tag

    found = select_adapters(pipe, tiny_base, Settings(promoted_only=True))
    assert found.served["gated"].tag == promoted.tag
    assert "gated" not in found.refused  # a promoted version exists
    assert "never-promoted" not in found.served
    assert found.refused["never-promoted"] == NOT_PROMOTED

    promote(newer)  # the older one is archived, so the newer one is served
    found = select_adapters(pipe, tiny_base, Settings(promoted_only=True))
    assert found.served["gated"].tag == newer.tag
