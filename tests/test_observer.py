"""One observer, passed in once: what the daemon reports, and to whom."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from conftest import Sims
from syncd.domain.orders import LinkedOrder
from syncd.ops.metrics import Metrics
from syncd.runtime.daemon import running_daemon
from syncd.runtime.observer import Observer, Observers, TransitionNotice
from test_flow import is_state, wait_for


class Recorder(Observer):
    """Keeps every report it is told."""

    def __init__(self) -> None:
        self.reports: list[tuple[object, ...]] = []

    def transitioned(self, notice: TransitionNotice) -> None:
        self.reports.append(("transitioned", notice.source, notice.dest, notice.trigger))

    def effect_ran(self, effect: str, result: str) -> None:
        self.reports.append(("effect_ran", effect, result))

    def drift_found(self, side: str) -> None:
        self.reports.append(("drift_found", side))

    def webhook_answered(self, service: str, result: str) -> None:
        self.reports.append(("webhook_answered", service, result))

    def api_answered(
        self, service: str, method: str, endpoint: str, status: int, seconds: float
    ) -> None:
        self.reports.append(("api_answered", service, method, endpoint, status))


def test_observers_tell_each_one_every_report_in_order() -> None:
    first, second = Recorder(), Recorder()
    both = Observers([first, second])
    link = LinkedOrder(id=1, po_id=2, po_number="PO1", state="imported")
    both.transitioned(TransitionNotice(link, "discovered", "imported", "so_created", "made"))
    both.effect_ran("import_order", "ok")
    both.drift_found("katana")
    both.webhook_answered("tradegecko", "accepted")
    both.api_answered("katana", "GET", "/factory", 200, 0.01)
    assert (
        first.reports
        == second.reports
        == [
            ("transitioned", "discovered", "imported", "so_created"),
            ("effect_ran", "import_order", "ok"),
            ("drift_found", "katana"),
            ("webhook_answered", "tradegecko", "accepted"),
            ("api_answered", "katana", "GET", "/factory", 200),
        ]
    )


def test_metrics_count_what_they_are_told_as_an_observer() -> None:
    metrics = Metrics()
    link = LinkedOrder(id=1, po_id=2, po_number="PO1", state="imported")
    metrics.transitioned(TransitionNotice(link, "discovered", "imported", "so_created", "made"))
    metrics.effect_ran("receive_order", "failed")
    metrics.drift_found("katana")
    metrics.webhook_answered("katana", "duplicate")
    metrics.api_answered("katana", "GET", "/factory", 0, 0.01)
    sample = metrics.registry.get_sample_value
    assert (
        sample(
            "syncd_transitions_total",
            {"factory": "default", "from": "discovered", "to": "imported", "trigger": "so_created"},
        )
        == 1
    )
    assert (
        sample("syncd_effect_failures_total", {"factory": "default", "effect": "receive_order"})
        == 1
    )
    assert sample("syncd_drift_detected_total", {"factory": "default", "side": "katana"}) == 1
    assert (
        sample(
            "syncd_webhooks_total",
            {"factory": "default", "service": "katana", "result": "duplicate"},
        )
        == 1
    )
    labels = {
        "factory": "default",
        "service": "katana",
        "method": "GET",
        "endpoint": "/factory",
        "status": "none",
    }
    assert sample("syncd_api_requests_total", labels) == 1


@pytest.mark.anyio
async def test_the_observer_passed_to_the_daemon_hears_the_whole_flow(
    sims: Sims, tmp_path: Path
) -> None:
    heard = Recorder()
    config = sims.config(tmp_path / "syncd.db")
    async with running_daemon(config, observer=heard) as daemon, sims.factory():
        po = await sims.create_po(
            [{"sku": "CHAIR-OAK", "name": "Oak chair", "quantity": "1", "price": "150.00"}]
        )
        await wait_for(daemon, [po["order_number"]], is_state("received"))
        # The daemon's own metrics were told the same, beside the observer passed in.
        assert daemon.metrics is not None
        received = {
            "factory": "default",
            "from": "delivered",
            "to": "received",
            "trigger": "po_received",
        }
        # Observers are told right after the transition is stored, which wait_for may see
        # first: wait (bounded) for the telling, then require exactly one.
        registry = daemon.metrics.registry
        with anyio.fail_after(5):
            # A metric has no event to wait on: look again until it is there.
            while registry.get_sample_value("syncd_transitions_total", received) is None:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        assert registry.get_sample_value("syncd_transitions_total", received) == 1
    steps = [r[1:] for r in heard.reports if r[0] == "transitioned"]
    assert steps[0] == (None, "discovered", "po_discovered")
    assert steps[-1] == ("delivered", "received", "po_received")
    effects = [r[1:] for r in heard.reports if r[0] == "effect_ran"]
    assert effects == [("import_order", "ok"), ("receive_order", "ok")]
    services = {r[1] for r in heard.reports if r[0] == "api_answered"}
    assert services == {"katana", "tradegecko"}
