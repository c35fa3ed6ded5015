"""Corpora: the synthetic default, users' own, tokenisation and packing into fixed-length shards."""
