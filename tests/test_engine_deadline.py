"""The engine drops requests already in a batch once their deadline has passed: the server's
timeout, or a request's own `deadline_s` when that comes first."""

from __future__ import annotations

import math
import time

import pytest
from pydantic import ValidationError

from service.engine import wanted
from service.schemas import GenerateRequest


def test_jobs_of_late_requests_are_dropped_before_the_pipeline():
    fresh = GenerateRequest(prompt="fresh", num_images=2)
    late = GenerateRequest(prompt="late")
    late._received = time.monotonic() - 11
    chunk = [(0, 0), (1, 0), (0, 1)]
    assert wanted([fresh, late], chunk, timeout_s=10) == [(0, 0), (0, 1)]


def test_requests_within_their_deadline_are_all_kept():
    requests = [GenerateRequest(prompt="a"), GenerateRequest(prompt="b")]
    assert wanted(requests, [(0, 0), (1, 0)], timeout_s=10) == [(0, 0), (1, 0)]


def test_a_request_s_own_deadline_counts_when_it_comes_before_the_server_s():
    hurried = GenerateRequest(prompt="hurried", deadline_s=2)
    patient = GenerateRequest(prompt="patient", deadline_s=50)
    for request in (hurried, patient):
        request._received = time.monotonic() - 3
    assert hurried.time_left(60) < 0 and hurried.unwanted(60)
    assert 46 < patient.time_left(60) <= 47 and not patient.unwanted(60)
    assert patient.time_left(2) < 0  # the server's timeout bounds it too
    assert wanted([hurried, patient], [(0, 0), (1, 0)], timeout_s=60) == [(1, 0)]
    # a long job passes no server timeout: only the request's own deadline counts
    assert wanted([hurried, patient], [(0, 0), (1, 0)], timeout_s=math.inf) == [(1, 0)]


@pytest.mark.parametrize("bad", [0, 0.05, -1, 86401, float("nan"), "soon"])
def test_a_bad_deadline_is_refused_naming_the_field(bad):
    with pytest.raises(ValidationError) as err:
        GenerateRequest(prompt="a", deadline_s=bad)
    assert err.value.errors()[0]["loc"] == ("deadline_s",)
