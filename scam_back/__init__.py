"""scam-back: a milter that stops backscatter by verifying recipients at the inner mail server."""

__version__ = "2.0.0"
