"""Data: ground truths, the proximity engine and its cache, proposals, the shared datamodule."""
