"""The C{twistd s3proxy} plugin; the options and service live in C{proxy.tap}."""

from twisted.application.service import ServiceMaker

s3proxy = ServiceMaker(
    "s3proxy",
    "proxy.tap",
    "S3 proxy with backend failover, an object cache and Prometheus metrics",
    "s3proxy",
)
