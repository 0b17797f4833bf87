"""lazyfs: container images served lazily from content-addressed chunks.

Layout of the core package (it imports neither the indexer nor the runtime):

- ``errors``    domain exceptions, translated to errno or exit codes at the edges
- ``chunk``     chunk addresses and the stored chunk object format
- ``store``     object stores (``file://`` directory, ``s3://`` bucket) with retries
- ``index``     the binary image index: writer, reader and format description
- ``refs``      image references -> index digests, published last
- ``tiers``     the tier interface, the RAM tier and the chain that queries tiers in order
- ``lmdb_tier`` the disk tier: verified chunks in LMDB, bounded by bytes
- ``store_tier`` the store as a tier: bounded, timed fetches verified before use
- ``config``    the daemon's typed configuration (TOML file plus flags)
- ``tree``      the mounted namespace: inode numbers, attributes, lookups
- ``fuse_ops``  the thin pyfuse3 adapter over ``tree``
- ``control``   the daemon's control socket (status, statistics); ``control_client``
                its blocking client
- ``notify``    the systemd notify protocol (READY, STOPPING, WATCHDOG)
- ``metrics``   Prometheus metrics built from the daemon's status
- ``logutil``   rate-limited repeats, secret redaction and the image named in log lines
- ``daemon``    mount wiring: tiers, tree, FUSE session, signals
- ``cli``       the ``lazyfs`` command
"""

__version__ = "0.1.0"
