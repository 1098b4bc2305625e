"""The engine drops requests already in a batch once their deadline has passed."""

from __future__ import annotations

import time

from service.engine import within_deadline
from service.schemas import GenerateRequest


def test_jobs_of_late_requests_are_dropped_before_the_pipeline():
    fresh = GenerateRequest(prompt="fresh", num_images=2)
    late = GenerateRequest(prompt="late")
    late._received = time.monotonic() - 11
    chunk = [(0, 0), (1, 0), (0, 1)]
    assert within_deadline([fresh, late], chunk, deadline_s=10) == [(0, 0), (0, 1)]


def test_requests_within_their_deadline_are_all_kept():
    requests = [GenerateRequest(prompt="a"), GenerateRequest(prompt="b")]
    assert within_deadline(requests, [(0, 0), (1, 0)], deadline_s=10) == [(0, 0), (1, 0)]
