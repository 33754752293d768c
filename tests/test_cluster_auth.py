"""The cluster token (whepfan/cluster/): another node pulling a stream presents it as a
view credential on a node whose viewing needs a token; it cannot publish."""

from __future__ import annotations

import pytest

from whepfan.http.auth import AccessControl, BearerForbidden, BearerUnauthorized
from whepfan.http.tokens import Role


def access() -> AccessControl:
    return AccessControl(publish_token="pub", view_token="view", cluster_token="nodes")


def test_the_cluster_token_views_every_stream() -> None:
    grant = access().authorize("Bearer nodes", Role.VIEW, "any-stream")
    assert grant is not None and grant.role is Role.VIEW
    # A session it made is bound to it, not to the shared view token.
    view = access().authorize("Bearer view", Role.VIEW, "any-stream")
    assert view is not None and grant.binding != view.binding


def test_the_cluster_token_cannot_publish() -> None:
    with pytest.raises(BearerForbidden):
        access().authorize("Bearer nodes", Role.PUBLISH, "s")


def test_without_a_cluster_token_it_is_just_a_wrong_token() -> None:
    plain = AccessControl(publish_token="pub", view_token="view")
    with pytest.raises(BearerUnauthorized):
        plain.authorize("Bearer nodes", Role.VIEW, "s")
