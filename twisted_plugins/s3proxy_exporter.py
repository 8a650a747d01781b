"""The ``twistd s3proxy-exporter`` plugin; see ``collector.exporter_tap``."""

from twisted.application.service import ServiceMaker

s3proxy_exporter = ServiceMaker(
    "s3proxy exporter",
    "collector.exporter_tap",
    "Serve the metrics of every s3proxy process from their shared Redis to Prometheus",
    "s3proxy-exporter",
)
