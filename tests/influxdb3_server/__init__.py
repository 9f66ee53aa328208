"""An InfluxDB 3 compatible server for tests, spoken to by the real influxdb3-python client.

    from tests.influxdb3_server import InfluxDB3TestServer

    srv = InfluxDB3TestServer(token="secret").start()   # port 0: a free port
    client = InfluxDBClient3(host=srv.url, token="secret", database="memdump")
    srv.stop()    # outage: the port is closed, open connections are cut
    srv.start()   # same port, same data

Or from a shell: ``python -m tests.influxdb3_server --port 8181 --token secret``.
"""

from tests.influxdb3_server.server import InfluxDB3TestServer

__all__ = ["InfluxDB3TestServer"]
