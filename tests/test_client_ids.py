"""ClientIds: the engine-wide registry that refuses a client request id already in flight."""
import pytest

from fastdeploy.engine.engine_core import ClientIds, DuplicateRequestError


def test_choices_of_one_request_share_the_id_and_release_it_together():
    ids = ClientIds()
    ids.claim("abc", "chatcmpl-1-0")
    ids.claim("abc", "chatcmpl-1-1")  # n=2: a sibling, not a duplicate
    with pytest.raises(DuplicateRequestError) as err:
        ids.claim("abc", "chatcmpl-2-0")
    assert err.value.status == 409 and err.value.param == "request_id"
    ids.release("chatcmpl-1-0")
    with pytest.raises(DuplicateRequestError):
        ids.claim("abc", "chatcmpl-2-0")
    ids.release("chatcmpl-1-1")
    assert len(ids) == 0
    ids.claim("abc", "chatcmpl-2-0")  # free again once every choice ended


def test_requests_without_a_client_id_are_not_tracked():
    ids = ClientIds()
    ids.claim("", "a-0")
    ids.claim("", "b-0")
    ids.release("a-0")
    ids.release("unknown-0")
    assert len(ids) == 0
