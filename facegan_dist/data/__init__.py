"""Data: read CelebA layouts, draw the synthetic demo set, write and verify shards, stream them."""
