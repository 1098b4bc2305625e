"""Every bad input gets a 400 naming the field and what is allowed; the server keeps serving."""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request

import pytest
from PIL import Image

from tests.test_service import SMALL, client, reference, server  # noqa: F401 - shared fixtures

pytestmark = pytest.mark.slow


def post(url: str, path: str, body: object, raw: bytes | None = None) -> tuple[int, str]:
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(
        url + path, data=data, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def png(size=(32, 32)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


LONG = "word " * 40
GENERATE_CASES = [
    ("empty prompt", {"prompt": "   "}, "prompt", "prompt is empty"),
    ("long prompt", {"prompt": LONG}, "prompt", "so this part would be cut: 'd word"),
    ("long negative", {"prompt": "x", "negative_prompt": LONG}, "negative_prompt", "would be cut"),
    ("width not /8", {"prompt": "x", "width": 100}, "width", "multiple of 8"),
    ("height too small", {"prompt": "x", "height": 8}, "height", "greater than or equal to 64"),
    (
        "over pixel cap",
        {"prompt": "x", "width": 512, "height": 512},
        "",
        "over the 65536 pixel cap",
    ),
    ("steps zero", {"prompt": "x", "steps": 0}, "steps", "greater than or equal to 1"),
    ("steps huge", {"prompt": "x", "steps": 10_000}, "steps", "less than or equal to 150"),
    ("too many images", {"prompt": "x", "num_images": 9}, "num_images", "less than or equal to 8"),
    ("guidance nan", {"prompt": "x", "guidance": "NaN"}, "guidance", "finite number"),
    ("guidance inf", {"prompt": "x", "guidance": "Infinity"}, "guidance", "finite number"),
    ("seed negative", {"prompt": "x", "seed": -1}, "seed", "greater than or equal to 0"),
    ("unknown scheduler", {"prompt": "x", "scheduler": "heun"}, "scheduler", "'euler', 'euler_a'"),
    (
        "unknown adapter",
        {"prompt": "x", "adapters": [{"name": "nope"}]},
        "name",
        "unknown adapter 'nope'; this server has: ",
    ),
    (
        "foreign adapter",
        {"prompt": "x", "adapters": [{"name": "elsewhere"}]},
        "name",
        "was made for base sdxl-tiny-elsewhere",
    ),
    (
        "adapter path",
        {"prompt": "x", "adapters": [{"name": "../../etc/passwd"}]},
        "name",
        "unknown adapter",
    ),
    (
        "scale inf",
        {"prompt": "x", "adapters": [{"name": "red", "scale": "Infinity"}]},
        "scale",
        "finite number",
    ),
    (
        "same adapter twice",
        {"prompt": "x", "adapters": [{"name": "red"}, {"name": "red"}]},
        "",
        "each adapter at most once",
    ),
    (
        "bad format",
        {"prompt": "x", "output_format": "gif"},
        "output_format",
        "'png', 'jpeg' or 'webp'",
    ),
    ("wrong type", {"prompt": "x", "steps": "many"}, "steps", "valid integer"),
    (
        "deadline zero",
        {"prompt": "x", "deadline_s": 0},
        "deadline_s",
        "greater than or equal to 0.1",
    ),
    ("deadline a day", {"prompt": "x", "deadline_s": 86401}, "deadline_s", "less than or equal"),
    ("size of one", {"prompt": "x", "original_size": [64]}, "original_size", "Field required"),
    (
        "negative size alone",
        {"prompt": "x", "negative_original_size": [64, 64]},
        "",
        "negative_original_size and negative_target_size go together",
    ),
]


@pytest.mark.parametrize(
    ("case", "fields", "field", "message"), GENERATE_CASES, ids=[c[0] for c in GENERATE_CASES]
)
def test_bad_generate_requests_get_400_naming_the_field(server, case, fields, field, message):  # noqa: F811
    status, body = post(server, "/generate", {"requests": [{**SMALL, **fields}]})
    assert status == 400, body
    detail = json.loads(body)["detail"]
    assert any(message in d["msg"] and (not field or field in d["loc"]) for d in detail), detail


SCORE_CASES = [
    ("not base64", {"images": ["%%%"]}, "not valid base64"),
    ("not an image", {"images": [base64.b64encode(b"hello").decode()]}, "does not decode"),
    ("truncated", {"images": [png()[:60]]}, "images[0]"),
    ("too many pixels", {"images": [png((5000, 4000))]}, "the limit is"),
    ("no images", {"images": []}, "at least 1 item"),
    ("empty text", {"images": [png()], "texts": [""]}, "at least 1 character"),
]


@pytest.mark.parametrize(
    ("case", "fields", "message"), SCORE_CASES, ids=[c[0] for c in SCORE_CASES]
)
def test_bad_score_requests_get_400(server, case, fields, message):  # noqa: F811
    status, body = post(server, "/score", {"requests": [fields]})
    assert status == 400, body
    assert message in body


@pytest.mark.parametrize("raw", [b"not json", b"{}", b'{"requests": {"prompt": "x"}}', b"[1,2]"])
def test_malformed_bodies_get_400(server, raw):  # noqa: F811
    status, _ = post(server, "/generate", None, raw=raw)
    assert status == 400


def test_server_still_serves_after_all_that(client):  # noqa: F811
    assert client.generate("still here", seed=1, **SMALL)[0].image.size == (64, 64)
