"""Calls every read endpoint of a live Milepost through a client generated from its
/openapi.json by openapi-python-client (tests/api/clients.rs generates it and runs
this). Fails if the generator left an operation out or a real answer does not parse
into the generated models.

usage: generated_client.py BASE_URL API_KEY DAY SPEC_JSON
  DAY: the UTC day (YYYY-MM-DD) the test stored speed 50 at 10:00 and 60 at 12:00 and
  one GPS fix at 10:00, for device "default"; nothing else.
"""

import importlib
import json
import pkgutil
import sys

import milepost_client.api as api_pkg
from milepost_client import AuthenticatedClient
from milepost_client.models import (
    DeviceList,
    DumpList,
    ErrorBody,
    Fill,
    Health,
    LatestLocation,
    LatestStatistics,
    ReadingPage,
    SensorList,
    StatisticsBody,
    Status,
    AnomalyList,
)

base, key, day, spec_path = sys.argv[1:5]
client = AuthenticatedClient(base_url=base, token=key, raise_on_unexpected_status=True)


def op(name):
    """The generated module of an operation, found by its function name."""
    for tag in pkgutil.iter_modules(api_pkg.__path__):
        mod = importlib.import_module(f"milepost_client.api.{tag.name}")
        for m in pkgutil.iter_modules(mod.__path__):
            if m.name == name:
                return importlib.import_module(f"milepost_client.api.{tag.name}.{m.name}")
    raise AssertionError(f"the generator left out {name}")


def is_(value, cls):
    assert isinstance(value, cls), f"expected {cls.__name__}, got {value!r}"
    return value


# Every GET operation of the spec has a generated module.
spec = json.load(open(spec_path))
for path, ops in spec["paths"].items():
    if "get" in ops:
        name = "get" + path.replace("/", "_").replace("{", "").replace("}", "").replace(".", "_")
        op(name)

at10, at12 = f"{day}T10:00:00Z", f"{day}T12:00:00Z"

assert is_(op("get_healthz").sync(client=client), Health).status == "ok"
assert is_(op("get_readyz").sync(client=client), Health).status == "ok"
# The generator does not model the OpenMetrics text answer (it says so and leaves the
# response out), so this one call must not raise on its "unexpected" 200.
plain = AuthenticatedClient(base_url=base, token=key)
assert op("get_metrics").sync_detailed(client=plain).status_code == 200

status = is_(op("get_api_status").sync(client=client), Status)
assert status.last_ingest_timestamp == at12, status
latest = is_(op("get_api_statistics_latest").sync(client=client), LatestStatistics)
assert (latest.speed, latest.fuel) == (60.0, 0.0), latest
loc = is_(op("get_api_location_latest").sync(client=client), LatestLocation)
assert (loc.latitude, loc.longitude) == (52.5, 13.4), loc
chart = op("get_api_statistics_sensor_sensor_date_date").sync("speed", day, client=client)
assert len(chart) == 96 and chart[40].value == 50.0 and chart[48].value == 60.0, chart

devices = is_(op("get_api_v1_devices").sync(client=client), DeviceList)
assert [(d.device, d.readings) for d in devices.devices] == [("default", 4)], devices
sensors = {s.name: s for s in is_(op("get_api_v1_sensors").sync(client=client), SensorList).sensors}
assert (sensors["speed"].readings, sensors["speed"].last_value) == (2, 60.0), sensors["speed"]
# A sensor without readings: its nullable fields arrive as None, not a parse error.
assert (sensors["fuel"].readings, sensors["fuel"].last_value, sensors["fuel"].last) == (0, None, None)

page = is_(
    op("get_api_v1_sensors_sensor_readings").sync(
        "speed", client=client, from_=f"{day}T00:00:00Z", to=f"{day}T23:00:00Z"
    ),
    ReadingPage,
)
assert [r.value for r in page.readings] == [50.0, 60.0] and page.next_cursor is None, page

stats = is_(
    op("get_api_v1_sensors_sensor_statistics").sync(
        "speed", client=client, from_=at10, to=f"{day}T13:00:00Z", bucket="1h", fill=Fill.NULL
    ),
    StatisticsBody,
)
counts = [(b.count, b.min_, b.avg) for b in stats.buckets]
assert counts == [(1, 50.0, 50.0), (0, None, None), (1, 60.0, 60.0)], counts

track = op("get_api_v1_location_track").sync_detailed(
    client=client, from_=f"{day}T00:00:00Z", to=f"{day}T23:00:00Z"
)
assert track.status_code == 200 and b"52.5" in track.content, track
anomalies = is_(op("get_api_v1_anomalies").sync(client=client), AnomalyList)
assert anomalies.anomalies == [], anomalies
dumps = is_(op("get_api_v1_dumps").sync(client=client), DumpList)
assert dumps.node == "client-test", dumps
missing = op("get_api_v1_dumps_name").sync("2001-01-01.json.gz", client=client)
assert isinstance(missing, ErrorBody), missing
print("generated client: every read endpoint answered and parsed")
