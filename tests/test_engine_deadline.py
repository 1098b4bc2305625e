"""The engine drops requests already in a batch once their deadline has passed."""

from __future__ import annotations

import time
from types import SimpleNamespace

from service.engine import Engine
from service.schemas import GenerateRequest
from service.settings import Settings


def test_jobs_of_late_requests_are_dropped_before_the_pipeline():
    fresh = GenerateRequest(prompt="fresh", num_images=2)
    late = GenerateRequest(prompt="late")
    late._received = time.monotonic() - 11
    engine = SimpleNamespace(settings=Settings(request_timeout_s=10))
    chunk = [(0, 0), (1, 0), (0, 1)]
    assert Engine._live(engine, [fresh, late], chunk) == [(0, 0), (0, 1)]


def test_requests_within_their_deadline_are_all_kept():
    requests = [GenerateRequest(prompt="a"), GenerateRequest(prompt="b")]
    engine = SimpleNamespace(settings=Settings(request_timeout_s=10))
    assert Engine._live(engine, requests, [(0, 0), (1, 0)]) == [(0, 0), (1, 0)]
