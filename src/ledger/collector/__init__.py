"""Channel intake over HTTP: a Segment-compatible collector, provider webhooks, identity stitching.

``auth`` holds the write keys, ``segment`` and ``webhooks`` turn what channels send into
contract events, ``identity`` resolves who they are about, ``app`` is the ASGI server.
"""
