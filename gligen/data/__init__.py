"""Training data: the webdataset shard format and the writers that make shards.

Writers: COCO detection (+ captions), MDETR-style grounding annotations, detector
pseudo-labels of image-caption pairs, and synthetic shapes. All resume and report what
they dropped; see `gligen.data.writer`.
"""

from gligen.data.format import Sample, SampleError, decode_sample, encode_sample, read_shards, shard_urls
from gligen.data.writer import ShardWriter

__all__ = ["Sample", "SampleError", "ShardWriter", "decode_sample", "encode_sample", "read_shards", "shard_urls"]
