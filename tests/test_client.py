"""The client retries 503 (not ready, overloaded) with backoff, and nothing else."""

from __future__ import annotations

from http import HTTPStatus

import pytest
from bentoml.exceptions import BentoMLException

from service.client import Client


class Flaky:
    def __init__(self, failures: list[int]):
        self.failures = failures
        self.calls = 0

    def __call__(self, **kwargs):
        self.calls += 1
        if self.failures:
            err = BentoMLException("no")
            err.error_code = HTTPStatus(self.failures.pop(0))
            raise err
        return "ok"


def client(retries: int = 3) -> Client:
    c = Client.__new__(Client)  # no server needed: only the retry policy is under test
    c.retries, c.backoff_s = retries, 0.0
    return c


def test_503_is_retried_until_it_succeeds():
    fn = Flaky([503, 503])
    assert client()._call(fn) == "ok" and fn.calls == 3


def test_503_gives_up_after_the_retries():
    fn = Flaky([503] * 5)
    with pytest.raises(BentoMLException):
        client(retries=2)._call(fn)
    assert fn.calls == 3


@pytest.mark.parametrize("status", [400, 404, 500, 504])
def test_other_errors_are_not_retried(status):
    fn = Flaky([status])
    with pytest.raises(BentoMLException):
        client()._call(fn)
    assert fn.calls == 1
