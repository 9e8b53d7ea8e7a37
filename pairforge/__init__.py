"""pairforge: vision-language preference pairs — build, audit, publish, train."""

__version__ = "0.1.0"
