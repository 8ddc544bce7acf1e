"""Consortia in-process: the service's disk bound counts their messages."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from medblindtuner.he.threshold import RoundMessage
from medblindtuner.protocol import CLOUD_PARTY
from medblindtuner.service.consortia import ConsortiumRelay
from medblindtuner.service.errors import TooLarge
from medblindtuner.service.limits import ServiceConfig, ServiceLimits
from medblindtuner.service.store import Store, bytes_held, utcnow


def relay_of(tmp_path, **limits) -> ConsortiumRelay:  # noqa: ANN001 - a pytest path
    config = ServiceConfig(tmp_path, limits=replace(ServiceLimits(), **limits))
    config.jobs_dir.mkdir(parents=True)
    config.staging_dir.mkdir(parents=True)
    store = Store(config.resolved_db_url)
    store.create_all()
    return ConsortiumRelay(config, store)


def publish(relay: ConsortiumRelay, cid: str, topic: str, size: int) -> None:
    relay.publish(cid, topic, RoundMessage(cid, topic, CLOUD_PARTY, b"x" * size).to_bytes())


def test_consortia_count_in_the_services_disk_bound(tmp_path):
    relay = relay_of(tmp_path, max_total_bytes=20_000)
    first = relay.create(2)["consortium_id"]
    second = relay.create(2)["consortium_id"]
    publish(relay, first, "a", 12_000)
    with relay.store.session() as session:
        held = bytes_held(session, utcnow() - timedelta(hours=1))
    assert 12_000 < held < 13_000
    with pytest.raises(TooLarge, match="disk bound of 20000"):
        publish(relay, second, "b", 8_000)  # within its own bound, not the service's
    publish(relay, second, "b", 4_000)
    relay.delete(first)
    publish(relay, second, "c", 8_000)
