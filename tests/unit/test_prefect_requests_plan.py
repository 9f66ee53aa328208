"""PrefectRequests.plan(): the requests asked for, without the ones a busy server refused
and that were sent again at once; nothing else is hidden."""

from __future__ import annotations

from tests.helpers.prefect_requests import PrefectRequests

CREATE = "POST /deployments/{id}/create_flow_run"
LOOKUP = "GET /deployments/name/capture/on-demand"


def seen(*answers: tuple[str, int]) -> PrefectRequests:
    r = PrefectRequests()
    for req, code in answers:
        r.sent.append(req)
        r.rows.append(None)
        r.status.append(code)
    return r


def test_an_attempt_refused_as_busy_and_made_again_is_one_request() -> None:
    assert seen((CREATE, 503), (CREATE, 201)).plan() == [CREATE]
    assert seen((CREATE, 429), (CREATE, 502), (CREATE, 201)).plan() == [CREATE]


def test_other_answers_and_requests_not_made_again_stay() -> None:
    # a 404 then a lookup: the caller's own plan, shown whole
    assert seen((CREATE, 404), (LOOKUP, 200), (CREATE, 201)).plan() == [CREATE, LOOKUP, CREATE]
    # the same request twice after a success is two requests
    assert seen((CREATE, 201), (CREATE, 201)).plan() == [CREATE, CREATE]
    # a busy answer the caller did not retry is kept (nothing hides it)
    assert seen((CREATE, 503), (LOOKUP, 200)).plan() == [CREATE, LOOKUP]
    assert seen((CREATE, 503)).plan() == [CREATE]
