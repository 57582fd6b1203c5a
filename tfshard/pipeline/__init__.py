"""Pipeline parallelism: stages of contiguous blocks, balanced by cost (see `staged`)."""
