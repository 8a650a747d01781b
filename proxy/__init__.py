"""
The S3 proxy run by C{twistd s3proxy}: request classification, client authentication, forwarding
to S3-compatible backends and the per-request metrics.
"""
