"""The client's retry policy (429 and 503 only, after Retry-After, bounded in tries and seconds)
and its typed generate signature, which must be the server's request model. No server here: the
real-server tests of the clients are in test_robust_service.py (with a token) and
test_service.py."""

from __future__ import annotations

import asyncio
import email.utils
import inspect
import time
import typing

import httpx
import pytest
from bentoml.exceptions import BentoMLException

from service import client as client_module
from service.client import AsyncClient, Client, RetryPolicy, retry_after_s

OK = [{"clip_scores": [[1.0]], "image_similarity": [[1.0]]}]


class Answers:
    """Stands in for BentoML's HTTP client: answers each request with the next response."""

    def __init__(self, answers: list[tuple[int, dict[str, str]]]):
        self.answers = answers
        self.calls = 0

    def respond(self) -> httpx.Response:
        self.calls += 1
        if self.answers:
            status, headers = self.answers.pop(0)
            return httpx.Response(status, headers=headers, json={"error": "busy"})
        return httpx.Response(200, json=OK)

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        return self.respond()


class AsyncAnswers(Answers):
    async def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        return self.respond()


def sync_client(answers, **policy) -> Client:
    c = Client.__new__(Client)  # no server: only the retry loop is under test
    c.retry, c._http = RetryPolicy(**policy), Answers(answers)
    return c


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """Every wait the clients make, instead of making it."""
    waited: list[float] = []
    monkeypatch.setattr(client_module.time, "sleep", waited.append)

    async def no_wait(seconds: float) -> None:
        waited.append(seconds)

    monkeypatch.setattr(client_module.asyncio, "sleep", no_wait)
    return waited


def test_429_is_retried_after_the_servers_retry_after(sleeps):
    c = sync_client([(429, {"Retry-After": "7"}), (429, {"Retry-After": "2"})])
    assert c.score([]).clip_scores == [[1.0]]
    assert c._http.calls == 3 and sleeps == [7.0, 2.0]


def test_503_without_retry_after_backs_off_exponentially(sleeps):
    c = sync_client([(503, {}), (503, {}), (503, {})], backoff_s=0.5)
    c.score([])
    assert c._http.calls == 4 and sleeps == [0.5, 1.0, 2.0]


def test_retry_after_as_an_http_date():
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= retry_after_s(when) <= 30
    assert retry_after_s(email.utils.formatdate(time.time() - 30, usegmt=True)) == 0
    assert retry_after_s("soon") is None and retry_after_s(None) is None


def test_gives_up_after_the_retries_with_the_status(sleeps):
    c = sync_client([(429, {"Retry-After": "1"})] * 5, retries=2)
    with pytest.raises(BentoMLException) as raised:
        c.score([])
    assert raised.value.error_code == 429 and "busy" in str(raised.value)
    assert c._http.calls == 3 and sleeps == [1.0, 1.0]


def test_a_wait_past_the_budget_is_not_started(sleeps):
    c = sync_client([(429, {"Retry-After": "5"}), (429, {"Retry-After": "20"})], max_wait_s=10)
    with pytest.raises(BentoMLException) as raised:
        c.score([])
    assert raised.value.error_code == 429
    assert c._http.calls == 2 and sleeps == [5.0]  # 5 + 20 > 10: raised at once


@pytest.mark.parametrize("status", [400, 401, 404, 413, 500, 504])
def test_other_errors_are_not_retried(sleeps, status):
    c = sync_client([(status, {"Retry-After": "1"})])
    with pytest.raises(BentoMLException) as raised:
        c.score([])
    assert raised.value.error_code == status and c._http.calls == 1 and sleeps == []


def test_the_async_client_retries_the_same_way(sleeps):
    c = AsyncClient.__new__(AsyncClient)
    c.retry, c._http = (
        RetryPolicy(retries=3),
        AsyncAnswers([(503, {}), (429, {"Retry-After": "3"})]),
    )
    assert asyncio.run(c.score([])).clip_scores == [[1.0]]
    assert c._http.calls == 3 and sleeps == [1.0, 3.0]


def test_the_retry_settings_are_constructor_arguments():
    for cls in (Client, AsyncClient):
        params = inspect.signature(cls).parameters
        assert {"token", "retries", "backoff_s", "max_retry_wait_s"} <= set(params), cls


@pytest.mark.parametrize("cls", [Client, AsyncClient])
def test_generate_takes_exactly_the_request_fields_typed(cls):
    """One keyword argument per field of the server's GenerateRequest, of the same type (or None,
    meaning the server's default), with the same allowed values where the field is a Literal."""
    from service.schemas import GenerateRequest

    params = inspect.signature(cls.generate).parameters
    hints = typing.get_type_hints(cls.generate, vars(client_module))
    fields = GenerateRequest.model_fields
    assert set(params) - {"self"} == set(fields)
    assert params["prompt"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    for name, info in fields.items():
        if name in ("prompt", "adapters"):  # adapters: {name: scale} or [{name, scale}] here
            continue
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert params[name].default is None, name
        [got] = [a for a in typing.get_args(hints[name]) if a is not type(None)]
        want = info.annotation
        if typing.get_origin(want) is typing.Literal:
            assert set(typing.get_args(got)) == set(typing.get_args(want)), name
        else:
            want = {bare(a) for a in typing.get_args(want) if a is not type(None)} or {want}
            assert {got} == want, (name, got, want)


def bare(annotation):
    """`annotation` without its pydantic limits: tuple[Annotated[int, ...], ...] -> tuple[int, ...]."""
    if typing.get_origin(annotation) is tuple:
        return tuple[tuple(bare(a) for a in typing.get_args(annotation))]
    if typing.get_origin(annotation) is typing.Annotated:
        return typing.get_args(annotation)[0]
    return annotation
