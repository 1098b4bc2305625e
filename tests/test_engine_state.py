"""The server's state in the open (service.state): request validation reads the snapshot the
engine published; an adapter reload publishes a new one and leaves the requests validated
before it on the versions they were validated against; a score does not wait for an image
batch. Snapshots are built directly, engines on the tiny base, on a CPU."""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import io
import time
from http import HTTPStatus
from pathlib import Path

import bentoml
import pydantic
import pytest
from bentoml.exceptions import BentoMLException
from PIL import Image

from models import failpoints
from models.store import StoreEntry
from service.admission import Admission
from service.engine import Engine
from service.schemas import GenerateRequest, ScoreRequest, bind_requests
from service.settings import Settings
from service.state import LiveStatus, ServedSnapshot, ServerState
from tests.store_helpers import one_layer_adapter

SMALL = {"width": 64, "height": 64, "steps": 2}


def entry(tag: str) -> StoreEntry:
    return StoreEntry(tag=tag, path=Path("/nowhere"), labels={}, metadata={})


def served(state: ServerState, **fields) -> ServedSnapshot:
    snapshot = ServedSnapshot(settings=state.snapshot.settings, loaded=True, **fields)
    state.publish(snapshot)
    return snapshot


def errors(err: pytest.ExceptionInfo) -> list[tuple[tuple, str]]:
    return [(e["loc"], e["msg"].removeprefix("Value error, ")) for e in err.value.errors()]


# --- request validation reads the published snapshot


def test_requests_are_checked_against_the_snapshot_published_when_they_arrive():
    state = ServerState(Settings(max_pixels=64 * 64))
    Generate, Score = bind_requests(state)
    assert Generate.__name__ == "GenerateRequest" and Generate.served_by is state
    # Before the models are loaded: the limits from the settings, no adapter check yet.
    assert Generate(prompt="x", **SMALL, adapters=[{"name": "any"}]).adapters[0].pinned is None
    with pytest.raises(pydantic.ValidationError, match="over the 4096 pixel cap"):
        Generate(prompt="x", width=128, height=128)

    v1 = entry("lora-style:v1")
    served(
        state,
        base_tag="sdxl-tiny:abc",
        adapters={"style": v1},
        refused_adapters={"broken": "content hash mismatch"},
        foreign_adapters={"elsewhere": "sdxl-other:def"},
    )
    request = Generate(prompt="x", **SMALL, adapters=[{"name": "lora-style", "scale": 0.5}])
    assert request.adapters[0].name == "style" and request.adapters[0].pinned is v1
    for name, message in [
        ("nope", "unknown adapter 'nope'; this server has: style"),
        ("broken", "adapter 'broken' is refused by this server: content hash mismatch"),
        ("elsewhere", "was made for base sdxl-other:def, not for the base this server runs"),
    ]:
        with pytest.raises(pydantic.ValidationError) as err:
            Generate(prompt="x", **SMALL, adapters=[{"name": name}])
        [(loc, msg)] = errors(err)
        assert loc == ("adapters", 0, "name") and message in msg

    # A reload publishes another snapshot: new requests see it, validated ones keep theirs.
    v2 = entry("lora-style:v2")
    served(state, adapters={"style": v2, "new": entry("lora-new:v1")})
    assert request.adapters[0].pinned is v1
    assert Generate(prompt="x", **SMALL, adapters=[{"name": "style"}]).adapters[0].pinned is v2
    assert Generate(prompt="x", **SMALL, adapters=[{"name": "new"}]).adapters[0].name == "new"

    # The unbound models (the engine's direct callers) check no names: the engine does.
    assert GenerateRequest(prompt="x", adapters=[{"name": "nope"}]).adapters[0].pinned is None
    with pytest.raises(pydantic.ValidationError, match="over the 4194304 pixel cap"):
        GenerateRequest(prompt="x", width=4096, height=4096)

    Score(images=[png()])  # within the bound state's limits
    state.publish(dataclasses.replace(state.snapshot, settings=Settings(max_input_pixels=16)))
    with pytest.raises(pydantic.ValidationError, match="images\\[0\\]: .*the limit is"):
        Score(images=[png()])
    assert ScoreRequest(images=[png()])._decoded  # unbound: the default limits


class CountingTokenizer:
    """A tokenizer of one token per word, reading `model_max_length` (with start and end)."""

    model_max_length = 5

    def __call__(self, text: str, truncation: bool):
        return type("Encoded", (), {"input_ids": ["<s>", *text.split(), "</s>"]})

    def decode(self, ids: list[str]) -> str:
        return " ".join(ids)


def test_prompt_lengths_are_checked_with_the_snapshots_tokenizers():
    state = ServerState()
    Generate, _ = bind_requests(state)
    long = "one two three four five"
    assert Generate(prompt=long).prompt == long  # no tokenizers before the models load
    served(state, tokenizers=(CountingTokenizer(),))
    assert Generate(prompt="one two three").prompt == "one two three"
    for field in ("prompt", "negative_prompt"):
        with pytest.raises(pydantic.ValidationError) as err:
            Generate(**{"prompt": "x", field: long})
        [(loc, msg)] = errors(err)
        assert loc == (field,)
        assert msg.startswith("7 tokens; the text encoders read 5") and "'four five'" in msg


def test_a_snapshot_is_never_changed_in_place():
    snapshot = ServedSnapshot(adapters={"style": entry("lora-style:v1")})
    with pytest.raises(dataclasses.FrozenInstanceError):
        snapshot.base_tag = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        snapshot.adapters["other"] = entry("lora-other:v1")  # type: ignore[index]
    source = {"style": entry("lora-style:v1")}
    copied = ServedSnapshot(adapters=source)
    source["late"] = entry("lora-late:v1")
    assert list(copied.adapters) == ["style"]


def test_ready_means_models_published_and_the_gpu_working():
    state = ServerState()
    assert not state.ready
    served(state)
    assert state.ready
    state.live.broken = "CUDA error: an illegal memory access"
    assert not state.ready


def test_live_status_estimates_retry_after_and_keeps_the_last_503_reason():
    live = LiveStatus()
    live.record_batch("/generate", seconds=8.0, requests=2)
    assert live.seconds_per_request["/generate"] == 4.0
    live.record_batch("/generate", seconds=9.0, requests=1)
    assert live.seconds_per_request["/generate"] == pytest.approx(0.8 * 4 + 0.2 * 9)
    admission = Admission(app=None, max_queue=4, live=live)
    admission.in_flight["/generate"] = 3
    assert admission.retry_after_s("/generate") == 15  # ceil(3 × 5.0)
    assert admission.retry_after_s("/score") == 1  # nothing measured yet: 1 s a request
    assert live.recent_unavailable_reason() == ""
    assert live.mark_unavailable("out of GPU memory") == "out of GPU memory"
    assert live.recent_unavailable_reason() == "out of GPU memory"
    assert live.recent_unavailable_reason(within_s=0) == ""


# --- the engine: publishing, reloads, versions, locks


@pytest.fixture(scope="module")
def engine(tiny_base):
    from models.clip import build_tiny_clip, save_clip

    save_clip(*build_tiny_clip(0), "clip-tiny", source="tiny:seed=0", reuse_identical=True)
    engine = Engine(Settings(base="sdxl-tiny", clip="clip-tiny", device="cpu", ui=False))
    yield engine
    engine.encoder.close()


def png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_the_engine_publishes_what_it_serves_and_a_reload_publishes_anew(engine, tiny_base):
    loaded = engine.state.snapshot
    assert loaded.loaded and engine.state.ready
    assert loaded.base_tag == tiny_base.tag and loaded.settings is engine.settings
    assert len(loaded.tokenizers) == 2 and loaded.default_size == 64
    fresh = one_layer_adapter("fresh", tiny_base, 0.05)
    reloaded = engine.reload_adapters()
    assert engine.state.snapshot is reloaded
    assert reloaded.adapters["fresh"].tag == fresh.tag
    assert "fresh" not in loaded.adapters  # the old snapshot is whole, as its readers saw it
    assert reloaded.tokenizers is loaded.tokenizers and reloaded.base_tag == loaded.base_tag
    listing = reloaded.listing()
    assert listing["base"] == tiny_base.tag
    assert {"name": "fresh", "version": fresh.version}.items() <= next(
        row for row in listing["adapters"] if row["name"] == "fresh"
    ).items()


def test_a_request_is_served_with_the_version_it_was_validated_against(engine, tiny_base):
    old = one_layer_adapter("pinned", tiny_base, 0.05)
    engine.reload_adapters()
    Generate, _ = bind_requests(engine.state)
    validated = Generate(prompt="a red circle", **SMALL, seed=5, adapters=[{"name": "pinned"}])
    new = one_layer_adapter("pinned", tiny_base, 0.08)
    assert engine.reload_adapters().adapters["pinned"].tag == new.tag
    later = Generate(prompt="a red circle", **SMALL, seed=5, adapters=[{"name": "pinned"}])
    # One batch, two versions of one adapter: two pipeline calls, each with its own version.
    first, second = engine.generate([validated, later])
    assert first.images[0].adapters[0].version == old.version
    assert second.images[0].adapters[0].version == new.version


def test_a_request_whose_adapter_left_the_store_is_answered_410_naming_it(engine, tiny_base):
    doomed = one_layer_adapter("doomed", tiny_base, 0.05)
    engine.reload_adapters()
    Generate, _ = bind_requests(engine.state)
    validated = Generate(prompt="a red circle", **SMALL, seed=1, adapters=[{"name": "doomed"}])
    bentoml.models.delete(doomed.tag)
    assert "doomed" not in engine.reload_adapters().adapters
    with pytest.raises(BentoMLException) as err:
        engine.generate([validated])
    assert err.value.error_code == HTTPStatus.GONE
    assert f"adapter 'doomed' (version {doomed.version}) left the model store" in str(err.value)
    with pytest.raises(pydantic.ValidationError, match="unknown adapter 'doomed'"):
        Generate(prompt="a red circle", **SMALL, adapters=[{"name": "doomed"}])
    with pytest.raises(BentoMLException, match="unknown adapter 'doomed'") as err:
        engine.generate([GenerateRequest(prompt="x", **SMALL, adapters=[{"name": "doomed"}])])
    assert err.value.error_code == HTTPStatus.BAD_REQUEST  # a direct caller: checked here
    assert engine.generate([Generate(prompt="still serving", **SMALL, seed=1)])[0].images


def test_a_version_still_loaded_is_served_after_it_left_the_store(engine, tiny_base):
    kept = one_layer_adapter("kept", tiny_base, 0.05)
    engine.reload_adapters()
    Generate, _ = bind_requests(engine.state)

    def request() -> GenerateRequest:
        return Generate(prompt="a red circle", **SMALL, seed=2, adapters=[{"name": "kept"}])

    [before] = engine.generate([request()])  # loads its weights
    validated = request()
    bentoml.models.delete(kept.tag)
    engine.reload_adapters()
    [after] = engine.generate([validated])
    assert after.images[0].adapters[0].version == kept.version
    assert after.images[0].image == before.images[0].image


def test_a_score_does_not_wait_for_an_image_batch(engine, monkeypatch):
    """An image batch held inside the pipeline (failpoint `hang`): a score is answered anyway,
    and the batch finishes once released."""
    monkeypatch.setenv(failpoints.ENV, "pipeline=hang")
    reached = failpoints.reached("pipeline")
    held = GenerateRequest(prompt="held in the pipeline", **SMALL, seed=3)
    score = ScoreRequest(images=[png()], texts=["a green square"])
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        generating = pool.submit(engine.generate, [held])
        try:
            while failpoints.reached("pipeline") == reached:  # the batch is in the pipeline
                assert not generating.done(), generating.result()
                time.sleep(0.01)
            scoring = pool.submit(engine.score, [score])
            done, _ = concurrent.futures.wait(
                [scoring, generating], timeout=120, return_when=concurrent.futures.FIRST_COMPLETED
            )
            assert done == {scoring}, "the score waited for the image batch"
        finally:
            monkeypatch.delenv(failpoints.ENV)  # releases the batch
        [generated] = generating.result(timeout=300)
    assert generated.images and scoring.result()[0].clip_scores[0][0] >= 0
