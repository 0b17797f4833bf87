"""OCI image indexer: turn an image into a lazyfs index plus chunks in a store.

One module per step of the pipeline:

- ``source``      parse a SOURCE argument into an image source
- ``oci_layout``  an OCI image layout directory as a source
- ``registry``    a distribution (registry API v2) client as a source
- ``docker_archive`` a ``docker save`` archive as a source
- ``mediatypes``  the manifest, config and layer media types understood
- ``manifest``    manifests, image indexes, platform selection, image config
- ``streams``     the base class of the read-only streams below
- ``verify``      readers that check a blob's size and SHA-256 while streaming
- ``layers``      layer decompression by media type, checked against magic bytes
- ``flatten``     apply layer tar streams in order onto one tree (whiteouts, hardlinks)
- ``chunker``     cut file data into content-defined and packed chunks
- ``upload``      store chunks concurrently with bounded memory, skipping known ones
- ``pipeline``    the whole run: resolve, verify, flatten, chunk, upload, publish
- ``cli``         the ``lazyfs-index`` command
"""
